"""The report's text: one function per section of ``report.md``, each rendering a part of
``results.json`` (as :func:`~training.evaluation.results.load_results` reads it back) into
Markdown lines, and :func:`render_markdown` putting them together. No torch: a report renders
from its ``results.json`` alone."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Final, Literal

import numpy as np

from apd.networks import MLPSpec, spec_from_dict
from training.evaluation import peers
from training.evaluation.results import (
    EXPERIMENTS,
    VARIANT_PREFIX,
    ActiveLearningSection,
    ActiveLearningSettingsRecord,
    CalibrationRecord,
    CurveRunRecord,
    EvaluationResults,
    Fidelity,
    GaussianFidelity,
    SpecRecord,
)

RESULTS_FILE: Final = "results.json"
REPORT_FILE: Final = "report.md"
SCORE_LABELS: Final = {
    "max_probability": "max-probability",
    "predictive_entropy": "predictive entropy",
    "mutual_information": "mutual information",
    "model_variance": "model variance",
}
_DETECTION_METRICS: Final[tuple[tuple[Literal["auroc", "aupr_in", "aupr_out"], str], ...]] = (
    ("auroc", "AUROC"),
    ("aupr_in", "AUPR-in"),
    ("aupr_out", "AUPR-out"),
)
METHOD_COLORS: Final = {
    "sgd": "#7f7f7f",
    "dropout": "#ff7f0e",
    "ensemble": "#2ca02c",
    "sgld": "#1f77b4",
    "gaussian": "#9467bd",
    "mixture": "#17becf",
    "laplace_ll": "#8c564b",
    "laplace_kfac": "#e377c2",
    "apd": "#d62728",
}


# --------------------------------------------------------------------------- formatting


def _f(v: float | None, digits: int = 4) -> str:
    if v is None or math.isnan(v):
        return "n/a"
    return f"{float(v):.{digits}f}"


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * float(v):.2f}%"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _scale(s: float) -> str:
    return f"{s:g}"


def provenance_line(
    results: EvaluationResults, keys: Iterable[str] | None = None, source: str | None = None
) -> str:
    """``Source: ...`` naming the runs and seeds of ``keys`` (default: every method), or
    ``source`` for experiments that train their own models."""
    meta = results["meta"]
    parts = []
    methods = results.get("methods", {})
    for key in keys if keys is not None else methods:
        m = methods.get(key)
        if m is None:
            continue
        prov = m["provenance"]
        if key == "apd" or key.startswith(VARIANT_PREFIX):
            parts.append(f"{key}={Path(prov['checkpoint']).name} sha256 {prov['sha256'][:12]}")
        elif key == "ensemble":
            seeds = [str(x.get("seed", "?")) for x in prov.get("members", [])]
            parts.append(f"ensemble=sgd seeds {','.join(seeds)}")
        elif key == "gaussian":
            parts.append(f"gaussian=rank {prov.get('rank')} fit to {prov.get('fitted_to', 'sgld')}")
        elif key == "mixture":
            parts.append(
                f"mixture={prov.get('components')} SWAG components fit to "
                f"{prov.get('fitted_to', 'sgld')}"
            )
        elif key.startswith("laplace"):
            parts.append(
                f"{key}=KFAC Laplace ({prov.get('subset_of_weights')}) on {prov.get('run', '?')}"
            )
        else:
            run = prov.get("run", "?")
            parts.append(f"{key}={run} (seed {prov.get('seed', '?')})")
    rev = meta.get("code_revision", "unknown")
    dirty = " + local changes" if meta.get("uncommitted_changes") else ""
    cfg = meta["config"]
    if source is not None:
        return f"Source: {source}; code {rev[:10]}{dirty}; {meta['created_at']}."
    return (
        f"Source: {'; '.join(parts)}. Evaluation seed {cfg['seed']}, "
        f"K={cfg['num_samples']} (MC-Dropout {cfg['dropout_passes']} passes); "
        f"code {rev[:10]}{dirty}; {meta['created_at']}."
    )


def _network(record: SpecRecord) -> str:
    """``[784, 100, 10]`` for an MLP; ``lenet5: 1x28x28 -> conv6x5p2, pool2, ... -> 10`` for
    a CNN (the ``--arch`` tokens of its layers)."""
    spec = spec_from_dict(record)
    if isinstance(spec, MLPSpec):
        return str(list(spec.layer_sizes))
    shape = "x".join(str(d) for d in spec.input_shape)
    layers = spec.arch.removeprefix("cnn:").replace(",", ", ")
    return f"{spec.name}: {shape} -> {layers} -> {spec.num_classes}"


def _al_protocol(al: ActiveLearningSection) -> str:
    """The paragraph describing the run; sections written before warm starts (no
    ``candidates`` in their settings) keep the words they were published with."""
    st = al["settings"]
    seeds = ", ".join(str(x) for x in st["seeds"])
    start = (
        f"{st['rounds']} acquisition rounds of {st['acquire']} from "
        f"{10 * st['initial_per_class']} initial labels ({st['initial_per_class']} per class), "
    )
    if "candidates" not in st:
        return (
            f"Scale run here (for a shared 2-core CPU, {al['seconds']:.0f} s): seeds {seeds}, "
            f"{start}pool = {st['pool_size']} random training images, test accuracy on "
            f"{st['test_size']} random test images, K = {st['num_samples']} networks. Each "
            f"round refits from scratch: {st['chains']} SGLD chains x "
            f"{st['sgld_steps_per_round']} steps (step {st['sgld_lr']}, burn-in "
            f"{st['burn_in']}, thinning {st['thinning']}, temperature {st['temperature']:g}, "
            f"prior std {st['prior_std']}); online APD runs the same chains with "
            f"{st['gan_steps']} GAN steps interleaved (subspace rank {st['apd_rank']}, buffer "
            f"{st['buffer_size']}), selecting its generator by KL to the chains on unlabelled "
            "pool images. The paper's curves go to 1,000 labels; this run shows the start of "
            "them only."
        )
    return (
        f"Run here in {al['seconds'] / 60:.0f} min: seeds {seeds}, {start}pool = "
        f"{_al_pool(st)}, each round scoring {st['candidates']} random unlabelled pool images"
        f"{_al_batch(st)}; test accuracy on {_al_test(st)} every {st['test_every']} rounds "
        f"and at the last, K = {st['num_samples']} networks. {_al_fits(st)}"
    )


def _resumed_runs(al: ActiveLearningSection | None) -> list[CurveRunRecord]:
    """The runs that made the active-learning curves when there were several (a run resumed
    from a curve log); empty otherwise."""
    runs = [] if al is None else al.get("runs", [])
    return runs if len(runs) > 1 else []


def _resumed_wall_time(results: EvaluationResults) -> str:
    if not _resumed_runs(results.get("active_learning")):
        return ""
    return (
        f"; the active-learning curves took "
        f"{results['active_learning']['seconds'] / 60:.0f} min over the runs "
        "that section 4 lists (this run resumed them from their curve log)"
    )


def _al_runs(al: ActiveLearningSection) -> list[str]:
    """Which runs made the curves, when the section was resumed from a curve log."""
    runs = _resumed_runs(al)
    if not runs:
        return []
    items = [
        f"- started {r['started']} at code {r['code_revision'][:10]}, "
        f"{r['cpu'] or 'CPU not recorded'}: {r['curves']} curves in {r['seconds'] / 60:.0f} min"
        for r in runs
    ]
    return [
        f"The curves come from {len(runs)} runs of the same command and settings, each "
        "resuming from the curve log of the ones before (`--al-log`; the wall time above is "
        "their sum):",
        "",
        *items,
        "",
    ]


def _al_batch(st: ActiveLearningSettingsRecord) -> str:
    """How BALD and entropy pick a round's images (sections written before batch rules took
    the top scores and do not say so)."""
    rule, k = st.get("batch_rule"), st["acquire"]
    if rule == "joint":
        return (
            f" (BALD and entropy score the round's {k} as a batch, picked greedily by their "
            "joint mutual information and joint entropy under the K networks, BatchBALD after "
            f"Kirsch et al. 2019, not Gal et al.'s top {k} of the per-image scores)"
        )
    if rule == "power":
        beta = st.get("power_exponent", 1.0)
        power = "the score" if beta == 1 else f"the score to the power {beta:g}"
        return (
            f" (BALD and entropy draw the round's {k} from them in proportion to {power}, "
            f"power acquisition after Kirsch et al. 2023, not Gal et al.'s top {k})"
        )
    return f" (BALD and entropy take the top {k})" if rule == "top" else ""


def _al_pool(st: ActiveLearningSettingsRecord) -> str:
    if st["pool_size"] is None:
        return "the whole training split"
    return f"{st['pool_size']} random training images"


def _al_test(st: ActiveLearningSettingsRecord) -> str:
    if st["test_size"] is None:
        return "the whole test set"
    return f"{st['test_size']} random test images"


def _al_fits(st: ActiveLearningSettingsRecord) -> str:
    sgld = (
        f"{st['chains']} SGLD chains (step {st['sgld_lr']}, batch {st['batch_size']}, "
        f"thinning {st['thinning']}, temperature {st['temperature']:g}, prior std "
        f"{st['prior_std']})"
    )
    if st["warm_start"]:
        fits = (
            f"The first round runs {sgld} for {st['sgld_steps_first_round']} steps from a fresh "
            f"start (burn-in {st['first_burn_in']}); every later round continues the last "
            f"round's chains for {st['sgld_steps_per_round']} steps (burn-in {st['burn_in']})."
        )
    else:
        fits = (
            f"Every round refits from scratch: {sgld} x {st['sgld_steps_per_round']} steps "
            f"(burn-in {st['first_burn_in']})."
        )
    start = st.get("moment_init_steps", 0)
    init = (
        f"; its generator starts at the per-chain Gaussian of the round's first "
        f"{st['warmup_samples']} samples ({start} regression steps)"
        if start
        else ""
    )
    text = (
        f"{fits} Online APD runs the same chains with {st['gan_steps']} GAN steps interleaved "
        f"(subspace rank {st['apd_rank']} refitted each round, buffer {st['buffer_size']}{init}), "
        "selecting its generator by KL to the chains on unlabelled pool images"
        + _al_apd_networks(st)
        + "."
    )
    return f"{text} {_al_dropout(st)}" if "dropout" in st["learners"] else text


def al_apd_networks(st: ActiveLearningSettingsRecord) -> int | None:
    """Online APD's own K where it draws another number of networks than SGLD keeps (None
    where it draws as many, as in sections written before it had its own)."""
    k = st.get("apd_networks", st["num_samples"])
    return None if k == st["num_samples"] else k


def _al_apd_networks(st: ActiveLearningSettingsRecord) -> str:
    k = al_apd_networks(st)
    return "" if k is None else f", and scores and predicts with K = {k} networks drawn from it"


GAL_CNN: Final = "cnn:conv32x4,conv32x4,pool2,fc128"
"""Gal, Islam & Ghahramani (2017)'s MC-Dropout CNN, as :func:`apd.networks.build_spec` names it."""


def _al_dropout(st: ActiveLearningSettingsRecord) -> str:
    """The MC-Dropout learner's sentence (Gal et al. 2017's protocol)."""
    rates = ", ".join(f"{r:g}" for r in st.get("dropout_rates", []))
    arch = st.get("dropout_arch", "")
    layers = arch.removeprefix("cnn:").replace(",", ", ")
    network = (
        f"their CNN ({layers}"
        if arch == GAL_CNN
        else f"{layers}, not their CNN (the choice is measured in "
        "training/evaluation/active_learning.py"
    )
    return (
        f"MC-Dropout (Gal, Islam & Ghahramani 2017's protocol) trains {network}; "
        f"dropout {rates} on the dense layers' inputs) from scratch every round: Adam (rate "
        f"{st.get('dropout_lr', 0):g}), minibatches of {st.get('dropout_batch_size')}, "
        f"{st.get('dropout_epochs')} epochs, L2 {st.get('dropout_weight_decay', 0):g} / N on "
        f"the first dense layer's weights; K = {st.get('dropout_passes')} dropout passes."
    )


def _al_source(results: EvaluationResults) -> str:
    st = results["active_learning"]["settings"]
    seeds = ", ".join(str(s) for s in st["seeds"])
    return (
        "MNIST training split (pool) and test split, networks trained inside this evaluation, "
        f"seeds {seeds}, settings in results.json active_learning.settings"
    )


def toy_source(results: EvaluationResults) -> str:
    seed = results["toy"]["settings"]["seed"]
    return (
        f"2-D toy data and networks trained inside this evaluation (toy seed {seed}, "
        "settings in results.json toy.settings)"
    )


# --------------------------------------------------------------------------- sections


def _header(results: EvaluationResults) -> list[str]:
    meta = results["meta"]
    cfg = meta["config"]
    secs = meta["seconds"]
    out = [
        f"# Evaluation report: {meta['name']} ({meta['arch']})",
        "",
        f"Generated {meta['created_at']} by `{meta['command'] or 'apd evaluate'}`.",
        "",
        f"- Code revision: `{meta['code_revision']}`"
        + (" (with uncommitted local changes)" if meta.get("uncommitted_changes") else ""),
        f"- Machine: {meta['machine']}",
        f"- MNIST files sha256 fingerprint: `{meta['data_sha256']}`",
        f"- Target network: {_network(meta['spec'])} ({meta['spec']['num_params']:,} weights)",
        f"- Evaluation seed {cfg['seed']}; K = {cfg['num_samples']} networks per predictive "
        f"(MC-Dropout: {cfg['dropout_passes']} passes; SGD: 1; deep ensemble: its members)",
        f"- Wall time: **{secs.get('total', float('nan')):.0f} s** in all ("
        + ", ".join(f"{k} {v:.0f} s" for k, v in secs.items() if k != "total")
        + ")"
        + _resumed_wall_time(results),
    ]
    skipped = [e for e in EXPERIMENTS if e not in cfg["experiments"]]
    if skipped:
        out.append(
            f"- Experiments not run in this report: {', '.join(skipped)} "
            f"(chosen with `--experiments`)"
        )
    if not results["methods"] and not results.get("missing_methods"):
        return [
            *out,
            "",
            "The experiments here train their own models (see their sections); no trained run "
            "or checkpoint is used.",
        ]
    out += [
        "",
        "## Methods and where they came from",
        "",
    ]
    rows = []
    for key, m in results["methods"].items():
        prov = m["provenance"]
        if key == "apd" or key.startswith(VARIANT_PREFIX):
            src = (
                f"`{prov['checkpoint']}` (sha256 `{prov['sha256'][:16]}`, {prov['design']} design"
                + (f", subspace rank {prov['subspace_rank']}" if prov.get("subspace_rank") else "")
                + f", built at code `{str(prov.get('code_revision'))[:10]}`)"
            )
        elif key == "ensemble":
            src = ", ".join(f"`{x['run']}` (seed {x.get('seed', '?')})" for x in prov["members"])
        elif key == "gaussian":
            src = (
                f"fitted to `{prov.get('fitted_to')}`: mean and per-weight variance over "
                f"{prov['moment_samples']} samples, rank-{prov['rank']} factor from "
                f"{prov['fit_samples']} spread samples (one Gaussian across all chains: an "
                "illustration, not a peer)"
            )
        elif key == "mixture":
            sizes = prov.get("component_samples") or [0]
            src = (
                f"fitted to `{prov.get('fitted_to')}`: one SWAG Gaussian per "
                f"{prov.get('component_rule', 'chain')} ({prov.get('components')} components of "
                f"{min(sizes)}-{max(sizes)} samples): mean, per-weight variance and up to "
                f"{prov.get('rank')} deviation columns each, weighted by sample count"
            )
        elif key.startswith("laplace"):
            prior = ", ".join(f"{v:.3g}" for v in prov.get("prior_precision", []))
            src = (
                f"laplace-torch on `{prov.get('run', '?')}` (seed {prov.get('seed', '?')}): "
                f"{prov.get('subset_of_weights')} ({prov.get('laplace_params', 0):,} weights), "
                f"KFAC GGN over {prov.get('fit_inputs', 0):,} training images, prior precision "
                f"{prov.get('prior_structure')} [{prior}] by marginal likelihood; K networks "
                "sampled"
            )
        elif key == "sgld":
            src = (
                f"`{prov['run']}` (seed {prov.get('seed', '?')}; {prov.get('samples_stored', '?')} "
                f"samples from {prov.get('chains', '?')} chains; K spread across chains and time)"
            )
        else:
            extra = f", dropout p = {prov['dropout']}" if "dropout" in prov else ""
            src = f"`{prov['run']}` (seed {prov.get('seed', '?')}{extra})"
        rows.append([m["label"], f"`{key}`", str(m["num_members"]), src])
    out.append(_table(["method", "key", "K", "source"], rows))
    missing = results.get("missing_methods") or {}
    if missing:
        out += ["", "Not evaluated (inputs missing):", ""]
        out += [f"- `{k}`: {v}" for k, v in missing.items()]
    return out


def _classification(results: EvaluationResults) -> list[str]:
    cl = results["classification"]
    rows = [
        [
            results["methods"][r["method"]]["label"],
            str(r["num_members"]),
            _pct(r["accuracy"]),
            _f(r["nll"]),
            _f(r["brier"]),
            _f(r["ece"]),
        ]
        for r in cl["rows"]
    ]
    served = ""
    if "calibration" in results and "apd" in results["methods"]:
        served = (
            " APD's row is the probabilities the service returns: its checkpoint's "
            "recalibration map applied to the networks' predictive (before and after in "
            "the recalibration table below)."
        )
    out = [
        "## 1. Classification",
        "",
        f"{cl['inputs']}. Brier score: mean over images of the squared distance between the "
        "predictive and the one-hot label (range 0 to 2). ECE: 15 equal-width confidence bins."
        + served,
        "",
        _table(["method", "K", "accuracy", "NLL (nats)", "Brier", "ECE"], rows),
        "",
        f"_{provenance_line(results)}_",
        "",
        "![Reliability diagrams](reliability.png)",
    ]
    if "calibration" in results:
        out += ["", *_calibration(results)]
    return out


def _map_cell(r: CalibrationRecord) -> str:
    if r["map"] == "none":
        return f"none ({r['fit_size']:,} validation inputs are too few)"
    where = "stored in the checkpoint" if r["map"] == "checkpoint" else "fitted here"
    return f"{where} ({r['fit_size']:,} {r['fitted_on']} inputs, {r['knots']} knots)"


def _calibration(results: EvaluationResults) -> list[str]:
    cal = results["calibration"]
    rows = []
    for r in cal["rows"]:
        b, a = r["before"], r["after"]
        rows.append(
            [
                results["methods"][r["method"]]["label"],
                str(b["num_members"]),
                _map_cell(r),
                _f(b["ece"]),
                _f(None if a is None else a["ece"]),
                _f(b["nll"]),
                _f(None if a is None else a["nll"]),
                _f(b["brier"]),
                _f(None if a is None else a["brier"]),
            ]
        )
    return [
        "### Recalibration: ECE and NLL before and after",
        "",
        "Every method's test predictive passed through the recalibration the service applies "
        "(`apd.recalibration`): the top class's probability c becomes g(c), a non-decreasing "
        "map fitted by isotonic regression of whether the top label is right on c over a "
        "validation predictive and capped below 1, the other classes rescaled in proportion, "
        "the predicted label kept. APD's map is the one its checkpoint stores and serves "
        "(fitted at distillation on the validation split); every other method's is fitted "
        "here the same way (`training.distillation.calibrate.fit_recalibration`, one "
        f"implementation) on its own predictive over {cal['validation']}, with the K of the "
        f"table. Evaluated on {cal['inputs']}. The anomaly scores are the networks' own and "
        "do not change.",
        "",
        _table(
            [
                "method",
                "K",
                "map",
                "ECE before",
                "ECE after",
                "NLL before",
                "NLL after",
                "Brier before",
                "Brier after",
            ],
            rows,
        ),
        "",
        f"_{provenance_line(results)}_",
        "",
        "![Reliability before and after recalibration](recalibration.png)",
    ]


def _fidelity(results: EvaluationResults) -> list[str]:
    fid = results.get("fidelity")
    if fid is None:
        return ["### APD against SGLD", "", "Not available: needs both `sgld` and `apd`."]
    c = fid["classification"]
    t = c["targets"]
    tol = t["auroc_drop_max"]
    out = [
        "### APD against its SGLD teacher (fidelity targets)",
        "",
        f"Targets (distillation issue): accuracy at most {100 * t['accuracy_drop_max']:.1f} "
        f"points below SGLD's, NLL at most {t['nll_increase_max']} above, and on every "
        f"anomaly row AUROC at most {tol} below SGLD's. Every row is listed below; the three "
        "scores the issue names are predictive entropy, mutual information and model variance, "
        "and max-probability is held to the same bar here.",
        "",
        f"- Accuracy: SGLD {_pct(c['teacher_accuracy'])}, APD {_pct(c['student_accuracy'])} "
        f"-> **{'within target' if c['accuracy_within_target'] else 'MISSES target'}**",
        f"- NLL: SGLD {_f(c['teacher_nll'])}, APD {_f(c['student_nll'])} "
        f"-> **{'within target' if c['nll_within_target'] else 'MISSES target'}**",
        "- Mean KL(SGLD predictive || APD predictive) over the test set: "
        f"{_f(c['mean_kl'], 5)} nats"
        + (
            " (here APD is its networks' predictive, before the recalibration map: what was "
            "distilled)"
            if "calibration" in results
            else ""
        ),
        f"- Anomaly rows within target: **{fid['anomaly_rows_within']} of {fid['anomaly_rows']}** "
        f"(issue's three scores: {fid['issue_score_rows_within']} of {fid['issue_score_rows']})",
        "",
    ]
    teacher = _teacher_line(results)
    if teacher:
        out[-1:-1] = [teacher]
    rows = []
    for r in fid["anomaly"]:
        verdict = "yes" if r["within_target"] else "**NO**"
        rows.append(
            [
                r["ood_set"],
                _scale(r["scale"]),
                SCORE_LABELS[r["score"]],
                _f(r["teacher_auroc"]),
                _f(r["student_auroc"]),
                f"{r['drop']:+.4f}",
                verdict,
            ]
        )
    out.append(
        _table(
            ["OOD set", "scale", "score", "SGLD AUROC", "APD AUROC", "drop (SGLD - APD)", "within"],
            rows,
        )
    )
    out += ["", f"_{provenance_line(results, ['sgld', 'apd'])}_"]
    return out


def _teacher_line(results: EvaluationResults) -> str | None:
    """Whether the SGLD run evaluated is the one APD was distilled from, by when each sample
    store was written (None when either record lacks it: reports written before)."""
    methods = results["methods"]
    if "apd" not in methods or "sgld" not in methods:
        return None
    taught = methods["apd"]["provenance"].get("teacher") or {}
    here = methods["sgld"]["provenance"]
    if "created_at" not in taught or "samples_created_at" not in here:
        return None
    if taught["created_at"] == here["samples_created_at"]:
        return f"- Teacher: the SGLD run here is APD's own (samples written {taught['created_at']})"
    same = {k: v for k, v in taught.items() if k in (here.get("sampler") or {})}
    settings = (
        "the same sampler settings" if same == here.get("sampler") else "other sampler settings"
    )
    return (
        f"- Teacher: **not APD's own**. APD was distilled from SGLD samples written "
        f"{taught['created_at']}; the SGLD run here ({here.get('run', '?')}, written "
        f"{here['samples_created_at']}) is another run with {settings}, so the rows below "
        "hold APD against a second draw of the posterior, not against its exact teacher"
    )


def _gan_vs_gaussian(results: EvaluationResults) -> list[str]:
    fid, fg = results.get("fidelity"), results.get("fidelity_gaussian")
    fm = results.get("fidelity_mixture")
    variants = results.get("fidelity_variants", {})
    first = fm or fg or next(iter(variants.values()), None)
    if first is None:
        return []
    out = [
        "### Does the GAN beat a Gaussian?",
        "",
        "Gaussians fitted to the same SGLD samples APD distils, measured against SGLD the same "
        "way. The fair one is the mixture: one SWAG Gaussian (mean, diagonal and low-rank "
        "deviations) per chain, or per chain and cycle with a cyclical step size, which is "
        "what MultiSWAG does and the component structure of the chain-conditional generator. "
        "The single Gaussian across all chains is kept only as an illustration of what one "
        "Gaussian over separated modes does.",
        "",
    ]
    rows = []
    main = _variant_label(results, "apd") if variants and "apd" in results["methods"] else "APD"
    students: list[tuple[str, Fidelity | GaussianFidelity | None]] = [(main, fid)]
    students += [(_variant_label(results, key), f) for key, f in variants.items()]
    students += [("Gaussian mixture (MultiSWAG)", fm), ("one Gaussian (illustration)", fg)]
    for name, f in students:
        if f is None:
            continue
        c = f["classification"]
        an = f["anomaly"]
        drops = np.array([r["drop"] for r in an]) if an else np.array([np.nan])
        rows.append(
            [
                name,
                _pct(c["student_accuracy"]),
                _f(c["student_nll"]),
                _f(c["mean_kl"], 5),
                f"{sum(r['within_target'] for r in an)} of {len(an)}",
                _f(float(np.mean(np.abs(drops))), 4),
                _f(float(np.max(drops)), 4),
            ]
        )
    c0 = first["classification"]
    out.append(
        _table(
            [
                "method",
                f"accuracy (SGLD {_pct(c0['teacher_accuracy'])})",
                f"NLL (SGLD {_f(c0['teacher_nll'])})",
                "KL from SGLD",
                "anomaly rows within 0.005",
                "mean abs AUROC diff",
                "worst AUROC drop",
            ],
            rows,
        )
    )
    diag = results.get("gaussian_diagnostics")
    if diag is not None:
        one = diag["one_chain"]
        out += [
            "",
            "Why the one Gaussian does what it does (same test images, K as above):",
            "",
            _table(
                ["Gaussian variant", "accuracy", "NLL"],
                [
                    [
                        "its mean network alone",
                        _pct(diag["mean_network"]["accuracy"]),
                        _f(diag["mean_network"]["nll"]),
                    ],
                    [
                        "draws without the diagonal part",
                        _pct(diag["without_diagonal"]["accuracy"]),
                        _f(diag["without_diagonal"]["nll"]),
                    ],
                    [
                        f"fitted to chain {one['chain']} only ({one['samples']} samples, "
                        f"rank {one['rank']})",
                        _pct(one["accuracy"]),
                        _f(one["nll"]),
                    ],
                ],
            ),
            "",
            "When the mean of all chains' samples is a poor network while a Gaussian fitted "
            "to one chain predicts well, the chains sit in different modes, and one Gaussian "
            "over all of them puts its mass between the modes.",
        ]
    keys = ["sgld", "apd", *variants, "mixture", "gaussian"]
    out += ["", f"_{provenance_line(results, keys)}_"]
    return out


def _variant_label(results: EvaluationResults, key: str) -> str:
    """An APD variant's name with its subspace rank and stored size."""
    m = results["methods"][key]
    rank = m["provenance"].get("subspace_rank")
    what = [f"rank {rank}"] if rank else []
    what.append(f"{m['stored_bytes'] / 1e6:.2f} MB")
    return f"{m['label']}, {', '.join(what)}"


SERVED_SCORES: Final = ("mutual_information", "data_support", "combined")
SERVED_LABELS: Final = {
    "mutual_information": "mutual information",
    "data_support": "data support",
    "combined": "combined flag",
}


def _served_flags(results: EvaluationResults) -> list[str]:
    """The checkpoint's data-support score and combined flag beside mutual information: the
    AUROC of each and the share of inputs each flags at the checkpoint's thresholds."""
    an = results["anomaly"]
    flag_rows = an.get("flag_rates", [])
    if not flag_rows:
        return []
    methods = list(dict.fromkeys(r["method"] for r in flag_rows))
    auroc = {(r["method"], r["ood_set"], r["scale"], r["score"]): r["auroc"] for r in an["rows"]}
    flagged = {(r["method"], r["ood_set"], r["scale"], r["score"]): r for r in flag_rows}
    out = [
        "### The checkpoint's data-support score and combined flag",
        "",
        "Beside mutual information: the data-support score (`apd.support`, how far an input "
        "lies from the training inputs: a low-rank Gaussian score on the inputs, fitted at "
        "distillation) and the default flag `combined` (mutual information above its threshold "
        "or data support above its own; the two thresholds are set together on the validation "
        "split so that their union flags no more in-distribution inputs than one score's "
        "threshold would). AUROC against the in-distribution images as above; flagged: the "
        "share of inputs each score flags at the checkpoint's thresholds, as the service flags "
        "them (on the first row, the in-distribution test images: the false-positive rate).",
        "",
    ]
    for m in methods:
        scores = [s for s in SERVED_SCORES if (m, None, None, s) in flagged]
        rows = [
            [
                "in-distribution",
                "-",
                *["-" for _ in scores],
                *[_pct(flagged[(m, None, None, s)]["flagged"]) for s in scores],
            ]
        ]
        for ood_set in an["ood_size"]:
            for scale in an["scales"]:
                rows.append(
                    [
                        ood_set,
                        _scale(scale),
                        *[_f(auroc.get((m, ood_set, scale, s))) for s in scores],
                        *[
                            _pct(r["flagged"])
                            if (r := flagged.get((m, ood_set, scale, s)))
                            else "n/a"
                            for s in scores
                        ],
                    ]
                )
        thresholds = ", ".join(
            f"{SERVED_LABELS[s]} {flagged[(m, None, None, s)]['threshold']:.4g}" for s in scores
        )
        out += [
            f"{results['methods'][m]['label']} (thresholds: {thresholds}):",
            "",
            _table(
                [
                    "inputs",
                    "scale",
                    *[f"AUROC {SERVED_LABELS[s]}" for s in scores],
                    *[f"flagged by {SERVED_LABELS[s]}" for s in scores],
                ],
                rows,
            ),
            "",
        ]
    out.append(f"_{provenance_line(results, methods)}_")
    return out


def _anomaly(results: EvaluationResults) -> list[str]:
    an = results["anomaly"]
    methods = list(results["methods"])
    labels = [results["methods"][m]["label"] for m in methods]
    table = {(r["method"], r["ood_set"], r["scale"], r["score"]): r for r in an["rows"]}
    out = [
        "## 2. Anomaly detection",
        "",
        f"In-distribution: {an['in_distribution']}. Out-of-distribution sets "
        f"({', '.join(f'{k} {v:,}' for k, v in an['ood_size'].items())} images):",
        "",
    ]
    out += [f"- `{k}`: {v}" for k, v in an["ood_sets"].items()]
    out += [
        "",
        "Scores (larger = more anomalous): 1 - max-probability, predictive entropy, mutual "
        "information (BALD) and model variance (mean over classes of the variance of the "
        "networks' probabilities). At input scale s the OOD images are multiplied by s and the "
        "MNIST images are not; scale 5 is the reference code's default (`ood_scale: 5`), kept "
        "for comparability, scale 1 is the honest setting. `n/a`: the score is undefined "
        "(a single network has no mutual information or model variance).",
        "",
    ]
    out += _fidelity(results)
    out += [""]
    out += _gan_vs_gaussian(results)
    support = _served_flags(results)
    if support:
        out += ["", *support]
    for metric, title in _DETECTION_METRICS:
        for scale in an["scales"]:
            out += ["", f"### {title}, input scale {_scale(scale)}", ""]
            rows = []
            for s in an["ood_size"]:
                for score in SCORE_LABELS:
                    cells = []
                    for m in methods:
                        r = table.get((m, s, scale, score))
                        cells.append(_f(r[metric]) if r else "n/a")
                    rows.append([s, SCORE_LABELS[score], *cells])
            out.append(_table(["OOD set", "score", *labels], rows))
    out += ["", f"_{provenance_line(results)}_", "", "![Anomaly AUROC](anomaly_auroc.png)"]
    return out


def _adversarial(results: EvaluationResults) -> list[str]:
    adv = results["adversarial"]
    st = adv["settings"]
    methods = list(results["methods"])
    labels = [results["methods"][m]["label"] for m in methods]
    by = {(r["method"], r["attack"], r["eps"], r["crafted_on"]): r for r in adv["rows"]}
    source = st["transfer_source"]
    out = [
        "## 3. Adversarial examples",
        "",
        f"{adv['inputs']}. Attacks: {', '.join(k.upper() for k in st['kinds'])} in the "
        f"L-infinity ball, eps in {st['eps']} (pixels in [0, 1], clipped to [0, 1]); PGD "
        f"{st['pgd_steps']} steps of {st['pgd_step_size']}. The loss is the NLL of each "
        "method's posterior predictive (mean softmax of its K networks). White-box: crafted "
        "against the method's own K networks (MC-Dropout: fresh masks per step). Transfer: "
        f"crafted once against `{source}` and shown to every method (for `{source}` itself "
        "the transfer rows equal its white-box rows). AUROC: attacked (positive) vs the same "
        "images clean, by each score; all attacked images count. In the plots the eps = 0 "
        "points are the clean accuracy and AUROC 0.5 (clean against itself).",
        "",
        "### Accuracy under attack",
        "",
    ]
    settings = ["white-box", source]
    clean = {
        m: next((r["clean_accuracy"] for r in adv["rows"] if r["method"] == m), None)
        for m in methods
    }
    rows = [["clean", "-", "-", *[_pct(clean[m]) for m in methods]]]
    for kind in st["kinds"]:
        for crafted in settings:
            for eps in st["eps"]:
                cells = []
                for m in methods:
                    key = (m, kind, eps, "white-box" if m == source else crafted)
                    r = by.get(key)
                    cells.append(_pct(r["accuracy"]) if r else "n/a")
                where = "white-box" if crafted == "white-box" else f"from {crafted}"
                rows.append([kind.upper(), where, f"{eps:g}", *cells])
    out.append(_table(["attack", "crafted", "eps", *labels], rows))
    for score in SCORE_LABELS:
        out += ["", f"### Clean vs attacked AUROC by {SCORE_LABELS[score]}", ""]
        rows = []
        for kind in st["kinds"]:
            for crafted in settings:
                for eps in st["eps"]:
                    cells = []
                    for m in methods:
                        r = by.get((m, kind, eps, "white-box" if m == source else crafted))
                        cells.append(_f(r["auroc"][score]) if r else "n/a")
                    where = "white-box" if crafted == "white-box" else f"from {crafted}"
                    rows.append([kind.upper(), where, f"{eps:g}", *cells])
        out.append(_table(["attack", "crafted", "eps", *labels], rows))
    out += [
        "",
        f"_{provenance_line(results)}_",
        "",
        "![Adversarial, mutual information](adversarial_mutual_information.png)",
        "",
        "![Adversarial, predictive entropy](adversarial_predictive_entropy.png)",
    ]
    return out


def _active_learning(results: EvaluationResults) -> list[str]:
    al = results["active_learning"]
    out = [
        "## 4. Active learning",
        "",
        _al_protocol(al),
        "",
        *_al_runs(al),
    ]
    rows = []
    for s in al["summary"]:
        cells = [
            f"{100 * mu:.1f} ({100 * lo:.1f}-{100 * hi:.1f})"
            for mu, lo, hi in zip(s["mean"], s["min"], s["max"], strict=True)
        ]
        rows.append([s["learner"], s["acquisition"], *cells])
    labels = al["summary"][0]["labels"] if al["summary"] else []
    out.append(_table(["learner", "acquisition", *[f"{n} labels" for n in labels]], rows))
    out += [
        "",
        "Test accuracy in %, mean over seeds (min-max).",
        "",
        f"_{provenance_line(results, source=_al_source(results))}_",
        "",
        "![Active learning](active_learning.png)",
    ]
    return out


def _toy(results: EvaluationResults) -> list[str]:
    toy = results["toy"]
    st = toy["settings"]
    rows = []
    for name, v in toy["per_method"].items():
        rows.append(
            [
                name,
                _pct(v["train_accuracy"]),
                _f(v["entropy_near_data"], 3),
                _f(v["entropy_far"], 3),
                _f(v["mi_near_data"], 3),
                _f(v["mi_far"], 3),
                _f(toy["kl_from_sgld_grid"].get(name), 4) if name != "SGLD" else "-",
            ]
        )
    return [
        "## 5. The toy picture (paper's Figure 2)",
        "",
        f"Two classes of {st['points_per_class']} points from N((-2,-2), 0.3 I) and "
        "N((2,2), 0.3 I), as in the reference `train_toy2d.py`; a 2-50-2 ReLU network. "
        f"SGLD: {st['sgld_chains']} chains x {st['sgld_steps']} full-batch steps (step "
        f"{st['sgld_lr']}, burn-in {st['sgld_burn_in']}, thinning {st['sgld_thinning']}, prior "
        f"std {st['prior_std']}); APD distilled offline from those samples for "
        f"{st['apd_steps']} generator steps, in the paper's design (all 252 weights) and in "
        f"the default subspace design (rank {st['apd_rank']}); MC-Dropout p = {st['dropout']} "
        f"({st['dropout_passes']} passes). K = {st['num_samples']}; seed {st['seed']}. "
        f"{toy['regions']}.",
        "",
        _table(
            [
                "method",
                "train acc.",
                "entropy near",
                "entropy far",
                "MI near",
                "MI far",
                "KL from SGLD (grid)",
            ],
            rows,
        ),
        "",
        f"_{provenance_line(results, source=toy_source(results))}_",
        "",
        "![Toy](toy.png)",
    ]


def _cost(results: EvaluationResults) -> list[str]:
    cost = results["cost"]
    rows = [
        [
            results["methods"][r["method"]]["label"],
            _bytes(r["stored_bytes"]),
            str(r["num_members"]),
            f"{1e3 * r['draw_seconds']:.2f}",
            f"{1e3 * r['predict_seconds']:.1f}",
        ]
        for r in cost["rows"]
    ]
    note = ""
    if cost.get("sgld_store_bytes"):
        note = (
            f" The SGLD row counts the K = 100 samples a service would keep; the whole sample "
            f"store it draws from is {_bytes(cost['sgld_store_bytes'])}."
        )
    return [
        "## 6. Cost",
        "",
        "Bytes that must be stored to serve each predictive (the mixture: mean, diagonal and "
        "deviation columns of every component; Laplace: the SGD network plus the Hessian's "
        "Kronecker factors and the prior precisions); time to draw K networks (read from the "
        "memory-mapped SGLD store, sample the Gaussians or the Laplace posterior, run the "
        "generator; nothing for fixed sets); and time to predict a batch of "
        f"{cost['batch_size']} images with them (forward pass of the K full networks plus "
        "uncertainty summary; last-layer Laplace could share the hidden layers' pass, which "
        "this does not exploit). Median of 5 after a warm-up, on "
        f"{results['meta']['machine']}, while other jobs shared the CPU." + note,
        "",
        _table(
            ["method", "stored", "K", "draw K (ms)", f"predict {cost['batch_size']} (ms)"], rows
        ),
        "",
        f"_{provenance_line(results)}_",
    ]


def _headline_cell(criterion: peers.Criterion, value: float | None) -> str:
    if value is None:
        return "n/a"
    if criterion.name == "stored bytes":
        return _bytes(int(value))
    if criterion.experiment == "cost":
        return f"{1e3 * value:.1f} ms"
    if criterion.name.endswith("accuracy"):
        return _pct(value)
    return _f(value)


def _peers(results: EvaluationResults) -> list[str]:
    """The headline table and APD's wins, ties and losses against each peer."""
    found = peers.verdicts(results)
    if not found:
        return []
    crit, table = peers.headline(results)
    labels = results["methods"]
    rows = [
        [labels[m]["label"], *[_headline_cell(c, table[m].get(c.name)) for c in crit]]
        for m in table
    ]
    n_adv = results["adversarial"]["settings"]["num_inputs"] if "adversarial" in results else 0
    out = [
        "## 7. APD against its peers",
        "",
        "One headline number per experiment, from the tables above: anomaly AUROCs averaged "
        "over the OOD sets, adversarial numbers over the radii (white-box), times from the cost "
        "table. The peers are "
        + ", ".join(labels[v.peer]["label"] for v in found)
        + "; SGD and the one Gaussian"
        + (
            " and the other APD checkpoints"
            if any(m.startswith(VARIANT_PREFIX) for m in table)
            else ""
        )
        + " are shown for reference and not judged. A difference "
        f"within a tolerance is a tie: accuracy {100 * peers.ACCURACY_TOLERANCE:g} points, "
        f"NLL {peers.NLL_TOLERANCE:g}, ECE {peers.ECE_TOLERANCE:g}, anomaly AUROC "
        f"{peers.AUROC_TOLERANCE:g} (the distillation issue's fidelity bars), adversarial "
        f"accuracy {100 * peers.ADVERSARIAL_ACCURACY_TOLERANCE:g} point and AUROC "
        f"{peers.ADVERSARIAL_AUROC_TOLERANCE:g}"
        + (
            f" (one binomial standard error on the {n_adv:,} attacked images is up to "
            f"{50 / math.sqrt(n_adv):.1f} points)"
            if n_adv
            else ""
        )
        + f", stored bytes {100 * peers.BYTES_TOLERANCE:g} % and times "
        f"{100 * peers.SECONDS_TOLERANCE:g} % (measured on a shared CPU)."
        + (
            " APD's NLL and ECE are of the probabilities it serves (recalibrated), the peers' "
            "of their own predictive; the recalibration table in section 1 gives every "
            "method's after the same map."
            if "calibration" in results
            else ""
        ),
        "",
        _table(["method", *[c.name for c in crit]], rows),
        "",
        "Where APD wins, ties and loses (computed from this table):",
        "",
    ]

    def named(what: str, names: tuple[str, ...]) -> str:
        return f"{what} on {len(names)}" + (f": {', '.join(names)}" if names else "")

    for v in found:
        out.append(
            f"- Against {labels[v.peer]['label']}, APD {named('**wins**', v.wins)}; "
            f"{named('ties', v.ties)}; {named('**loses**', v.losses)}."
        )
    wins = sum(len(v.wins) for v in found)
    ties = sum(len(v.ties) for v in found)
    losses = sum(len(v.losses) for v in found)
    out += [
        f"- In all: {wins} wins, {ties} ties, {losses} losses in {wins + ties + losses} "
        f"comparisons with {len(found)} peers.",
        "",
        f"_{provenance_line(results)}_",
    ]
    return out


def render_markdown(results: EvaluationResults) -> str:
    parts = _header(results)
    if "classification" in results:
        parts += ["", *_classification(results)]
    if "anomaly" in results:
        parts += ["", *_anomaly(results)]
    if "adversarial" in results:
        parts += ["", *_adversarial(results)]
    if "active_learning" in results:
        parts += ["", *_active_learning(results)]
    if "toy" in results:
        parts += ["", *_toy(results)]
    if "cost" in results:
        parts += ["", *_cost(results)]
    summary = _peers(results)
    if summary:
        parts += ["", *summary]
    cfg = results["meta"]["config"]
    parts += [
        "",
        "## Reproducing",
        "",
        "Everything above (tables, figures, `results.json`) came from one run of"
        + (
            " (its active-learning curves from the runs of section 4, each resumed from"
            " the curve log of the ones before)"
            if _resumed_runs(results.get("active_learning"))
            else ""
        ),
        "",
        f"    {results['meta']['command'] or 'apd evaluate'}",
        "",
        f"with the evaluation settings recorded in `results.json` under `meta.config` "
        f"(experiments: {', '.join(cfg['experiments'])}).",
        "",
    ]
    return "\n".join(parts)
