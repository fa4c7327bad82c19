"""``apd train {sgd,dropout,sgld} --arch ARCH [--dataset DATA] --out DIR``: train and write
a run directory.

``--arch`` is any network of :func:`apd.networks.build_spec` (``fcnn1``, ``fcnn2``,
``mlp:W1[,W2...]``, ``al-cnn``, ``lenet5``, ``cnn:...``), fitted to the data's example shape
and number of classes; ``--dataset`` is MNIST (the default) or the user's data
(:mod:`training.own_data`).

A run directory (:mod:`training.run_layout`) holds

* ``config.json``: every flag, resolved (architecture defaults filled in), plus the data
  (``data``: the :class:`~training.own_data.DataSpec` that reads it again, ``data_sha256``,
  ``input``: the input convention), the network (``network``) and the code version;
* ``metrics.json``: validation and (when the data has a test split) test accuracy / NLL of the
  method's predictive, wall time and device;
* ``samples/`` (SGLD): a :class:`~training.sample_store.SampleStore`; or
  ``weights.safetensors`` (SGD, MC-Dropout): tensor ``theta`` of shape ``(1, P)`` with
  metadata ``arch`` and ``dropout`` (the rate p, ``"0.0"`` for SGD);
* ``READY``: an empty file written last, so a reader can tell a finished run.

Predictives: SGD uses its single network; MC-Dropout averages the softmax of 200 stochastic
passes (Gal & Ghahramani 2016); SGLD averages the softmax of 100 samples spread evenly
across the chains and across time within each chain
(:meth:`~training.sample_store.SampleStore.select_spread`).

Every flag left unset takes the tuned default for the architecture
(:data:`training.defaults.DEFAULTS`: fcnn1 and fcnn2 on MNIST, chosen by validation accuracy,
see ``docs/training.md``); any other network takes
:data:`~training.defaults.GENERIC_DEFAULTS` for its family, with the cyclical schedule's cycle
length and the thinning derived from ``--steps`` (:func:`~training.defaults.sgld_defaults`),
and a minibatch
no larger than the training split. Runs are seeded: the same flags, seed and thread count
give the same numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import torch
from safetensors.numpy import save_file

from apd import __version__
from apd.networks import NetworkSpec, build_spec
from training import sgld
from training.baselines import (
    ClassificationLikelihood,
    MinibatchStream,
    PointTrainSettings,
    init_theta,
    train_point_estimate,
)
from training.defaults import (
    DEFAULTS,
    DROPOUT_PASSES,
    DROPOUT_RATE,
    POINT_DEFAULTS,
    SGLD_EVAL_SAMPLES,
    PointDefaults,
    SGLDDefaults,
    check_arch,
    sgld_defaults,
)
from training.errors import UserError
from training.metrics import ClassificationMetrics, accuracy, classification_metrics
from training.own_data import (
    Dataset,
    add_data_arguments,
    data_spec_from_args,
    load_dataset,
)
from training.run_layout import (
    CONFIG_FILE,
    METRICS_FILE,
    READY_FILE,
    SAMPLES_DIR,
    WEIGHTS_FILE,
)
from training.sample_store import SampleStore
from training.threads import device_description
from training.torch_ops import member_probs

METHODS: Final = ("sgd", "dropout", "sgld")


# -- CLI -------------------------------------------------------------------------------------


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--arch",
        required=True,
        help="target network: fcnn1 (mlp:100), fcnn2 (mlp:400,400), mlp:W1[,W2...], al-cnn, "
        "lenet5, or cnn:LAYER[,LAYER...] with LAYER convOxK[pP], poolS or fcW",
    )
    p.add_argument("--out", required=True, type=Path, help="run directory to write")
    add_data_arguments(p)
    p.add_argument("--data-dir", default=None, help="MNIST's folder (default: $APD_DATA_DIR)")
    p.add_argument("--seed", type=int, default=0, help="seed for init, minibatches and noise")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: on a shared 2-core machine 2 threads run 5-15x "
        "slower under load)",
    )
    p.add_argument("--batch-size", type=int, default=None, help="minibatch size per network")
    p.add_argument("--lr", type=float, default=None, help="step size (on the mean loss)")
    p.add_argument("--force", action="store_true", help="overwrite an existing run directory")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def configure(parser: argparse.ArgumentParser) -> None:
    """Add ``sgd``, ``dropout`` and ``sgld`` sub-commands with their flags."""
    sub = parser.add_subparsers(dest="method", required=True, metavar="method")
    for method, help_text in (
        ("sgd", "SGD point estimate (MAP with weight decay)"),
        ("dropout", f"MC-Dropout, p = {DROPOUT_RATE}, {DROPOUT_PASSES} passes at test time"),
    ):
        p = sub.add_parser(method, help=help_text, description=help_text)
        _common(p)
        p.add_argument("--epochs", type=int, default=None)
        p.add_argument("--momentum", type=float, default=None)
        p.add_argument("--weight-decay", type=float, default=None)
    desc = "SGLD (Welling & Teh 2011), C chains in parallel, samples to <out>/samples/"
    p = sub.add_parser("sgld", help=desc, description=desc)
    _common(p)
    p.add_argument("--chains", type=int, default=None, help="parallel chains C")
    p.add_argument("--steps", type=int, default=None, help="steps per chain")
    p.add_argument("--burn-in", type=int, default=None, help="steps discarded first")
    p.add_argument("--thinning", type=int, default=None, help="keep every k-th step")
    p.add_argument("--schedule", default=None, help="constant | polynomial | cyclical")
    p.add_argument("--gamma", type=float, default=None, help="polynomial decay exponent")
    p.add_argument("--decay-steps", type=int, default=None, help="polynomial decay scale")
    p.add_argument("--cycle-steps", type=int, default=None, help="cyclical: steps per cycle")
    p.add_argument(
        "--explore-fraction", type=float, default=None, help="cyclical: noise-free fraction"
    )
    p.add_argument("--temperature", type=float, default=None, help="T (1 = Bayes posterior)")
    p.add_argument("--prior-std", type=float, default=None, help="Gaussian prior std sigma")
    p.add_argument("--preconditioner", default=None, help="identity (SGLD) | rmsprop (pSGLD)")
    p.add_argument(
        "--eval-every",
        type=int,
        default=0,
        help="every N steps print the validation accuracy of the chains (0 = never)",
    )
    p.add_argument(
        "--device",
        default="cpu",
        help="torch device of the chains, e.g. cuda (default cpu); the data is held there too",
    )


@dataclass(frozen=True)
class RunConfig:
    """Every flag of ``apd train``, resolved: what ``config.json`` records (with the data
    fingerprint and the code version)."""

    method: str
    arch: str
    out: str
    dataset: str
    label_column: str | None
    image_size: str | None
    channels: int | None
    val_fraction: float
    split_seed: int
    preprocess: str
    data_dir: str | None
    seed: int
    threads: int
    batch_size: int
    lr: float
    force: bool
    no_progress: bool


@dataclass(frozen=True)
class PointRunConfig(RunConfig):
    """``apd train sgd`` and ``apd train dropout``."""

    epochs: int
    momentum: float
    weight_decay: float


@dataclass(frozen=True)
class SGLDRunConfig(RunConfig):
    """``apd train sgld``."""

    chains: int
    steps: int
    burn_in: int
    thinning: int
    schedule: str
    gamma: float
    decay_steps: int
    cycle_steps: int
    explore_fraction: float
    temperature: float
    prior_std: float
    preconditioner: str
    eval_every: int
    device: str


def resolve_config(
    args: argparse.Namespace, num_train: int | None = None
) -> PointRunConfig | SGLDRunConfig:
    """Every flag with the architecture's default filled in; validates names and ranges.
    With ``num_train``, the default minibatch is capped at the training split's size."""
    method = str(args.method)
    arch = str(args.arch)
    family = check_arch(arch)
    flags = {k: v for k, v in vars(args).items() if k not in ("command", "func")}
    defaults: PointDefaults | SGLDDefaults
    if method == "sgld":
        defaults = sgld_defaults(arch, family, flags.get("steps"))
    else:
        tuned = DEFAULTS[method].get(arch)
        defaults = tuned if isinstance(tuned, PointDefaults) else POINT_DEFAULTS
    for key, value in asdict(defaults).items():
        if flags.get(key) is None:
            flags[key] = value
            if key == "batch_size" and num_train is not None:
                flags[key] = min(value, num_train)
    flags["out"] = str(args.out)
    cfg = SGLDRunConfig(**flags) if method == "sgld" else PointRunConfig(**flags)
    _validate(cfg)
    if num_train is not None and cfg.batch_size > num_train:
        raise UserError(f"--batch-size {cfg.batch_size} exceeds the {num_train} training examples")
    return cfg


def _validate(cfg: PointRunConfig | SGLDRunConfig) -> None:
    def positive(v: float, flag: str) -> None:
        if not (isinstance(v, int | float) and math.isfinite(v) and v > 0):
            raise UserError(f"--{flag} must be positive, got {v}")

    positive(cfg.lr, "lr (the step size)")
    positive(cfg.batch_size, "batch-size")
    positive(cfg.threads, "threads")
    if isinstance(cfg, SGLDRunConfig):
        for name in ("chains", "steps", "thinning", "cycle_steps", "decay_steps", "prior_std"):
            positive(getattr(cfg, name), name.replace("_", "-"))
        if cfg.burn_in < 0 or cfg.burn_in >= cfg.steps:
            raise UserError(f"--burn-in must lie in [0, --steps), got {cfg.burn_in}")
        if not (cfg.temperature >= 0 and math.isfinite(cfg.temperature)):
            raise UserError(f"--temperature must be >= 0, got {cfg.temperature}")
        for name, value, enum_type in (
            ("schedule", cfg.schedule, sgld.ScheduleKind),
            ("preconditioner", cfg.preconditioner, sgld.Preconditioner),
        ):
            valid = [e.value for e in enum_type]
            if value not in valid:
                raise UserError(f"--{name} must be one of {', '.join(valid)}, got {value!r}")
        if not 0.0 <= cfg.explore_fraction < 1.0:
            raise UserError(f"--explore-fraction must lie in [0, 1), got {cfg.explore_fraction}")
        if cfg.eval_every < 0:
            raise UserError(f"--eval-every must be >= 0, got {cfg.eval_every}")
        if not 0.0 <= cfg.gamma <= 1.0:
            raise UserError(f"--gamma must lie in [0, 1], got {cfg.gamma}")
        try:
            device = torch.device(cfg.device)
        except RuntimeError:
            raise UserError(f"--device {cfg.device!r} is not a torch device") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"--device {cfg.device}: no CUDA device is available")
    else:
        positive(cfg.epochs, "epochs")
        if not 0.0 <= cfg.momentum < 1.0:
            raise UserError(f"--momentum must lie in [0, 1), got {cfg.momentum}")
        if cfg.weight_decay < 0:
            raise UserError(f"--weight-decay must be >= 0, got {cfg.weight_decay}")


def _prepare_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise UserError(f"run directory {out} is not empty; pass --force to overwrite it")
        for name in (READY_FILE, CONFIG_FILE, METRICS_FILE, WEIGHTS_FILE):
            (out / name).unlink(missing_ok=True)
        samples = out / SAMPLES_DIR
        if samples.is_dir():
            for f in samples.iterdir():
                if f.suffix in (".npy", ".json") and f.is_file():
                    f.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


# -- training ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tensors:
    """A :class:`~training.own_data.Dataset`'s splits as torch tensors (no copies)."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor | None
    test_y: torch.Tensor | None

    @classmethod
    def of(cls, data: Dataset) -> Tensors:
        def t(a: np.ndarray | None) -> torch.Tensor | None:
            return None if a is None else torch.from_numpy(np.require(a, requirements="W"))

        def req(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.require(a, requirements="W"))

        return cls(
            req(data.train_x),
            req(data.train_y),
            req(data.val_x),
            req(data.val_y),
            t(data.test_x),
            t(data.test_y),
        )

    def splits(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``val`` and, where there is one, ``test``: ``(inputs, labels)``."""
        out = {"val": (self.val_x, self.val_y)}
        if self.test_x is not None and self.test_y is not None:
            out["test"] = (self.test_x, self.test_y)
        return out


def sgld_settings(cfg: SGLDRunConfig, num_data: int) -> sgld.SGLDSettings:
    schedule = sgld.StepSchedule(
        kind=sgld.ScheduleKind(cfg.schedule),
        lr=cfg.lr,
        gamma=cfg.gamma,
        decay_steps=cfg.decay_steps,
        cycle_steps=cfg.cycle_steps,
        explore_fraction=cfg.explore_fraction,
    )
    return sgld.SGLDSettings(
        num_data=num_data,
        schedule=schedule,
        prior_std=cfg.prior_std,
        temperature=cfg.temperature,
        preconditioner=sgld.Preconditioner(cfg.preconditioner),
    )


def count_retained(num_steps: int, burn_in: int, thinning: int, schedule: sgld.StepSchedule) -> int:
    return sum(sgld.is_retained(t, burn_in, thinning, schedule) for t in range(num_steps))


def run_sgld(
    spec: NetworkSpec,
    data: Dataset,
    cfg: SGLDRunConfig,
    samples_dir: Path,
    progress: bool = True,
    trace: list[dict[str, float]] | None = None,
) -> SampleStore:
    """Run ``cfg.chains`` SGLD chains in one batched process on ``cfg.device``; samples go
    to a store.

    With ``cfg.eval_every`` > 0 the validation accuracy of the current chain states is
    printed every that many steps and appended to ``trace``. On the CPU one generator seeded
    ``cfg.seed`` draws the initial networks, the minibatches and the noise, in that order;
    elsewhere the noise comes from a generator on the device, seeded the same."""
    trace = [] if trace is None else trace
    tensors = Tensors.of(data)
    device = torch.device(cfg.device)
    settings = sgld_settings(cfg, data.train_x.shape[0])
    chains = cfg.chains
    steps, burn_in, thinning = cfg.steps, cfg.burn_in, cfg.thinning
    kept = count_retained(steps, burn_in, thinning, settings.schedule)
    if kept == 0:
        raise UserError("no sample would be kept: check --steps, --burn-in and --thinning")
    gen = torch.Generator().manual_seed(cfg.seed)
    noise = gen if device.type == "cpu" else torch.Generator(device).manual_seed(cfg.seed)
    train_x, train_y = tensors.train_x.to(device), tensors.train_y.to(device)
    likelihood = ClassificationLikelihood(spec, train_x, train_y)
    transform = sgld.build(likelihood, settings, likelihood.fast_gradient)
    state = transform.init(init_theta(spec, chains, gen).to(device))
    stream = MinibatchStream(data.train_x.shape[0], cfg.batch_size, chains, gen)
    batches = stream if device.type == "cpu" else (idx.to(device) for idx in stream)
    meta: dict[str, Any] = {"sampler": {"method": "sgld", **settings.to_dict(), **_chain_meta(cfg)}}
    meta["data_sha256"] = data.fingerprint
    meta["data"] = data.spec.to_dict()
    store = SampleStore.create(samples_dir, spec, kept * chains, meta)
    chain_ids = np.arange(chains, dtype=np.int32)

    def keep(s: sgld.SGLDState) -> None:
        store.append(s.params.cpu().numpy(), chain_ids, s.step)

    def monitor(s: sgld.SGLDState) -> str:
        probs = member_probs(spec, s.params, tensors.val_x)
        each = [accuracy(p.numpy(), data.val_y) for p in probs]
        together = classification_metrics(probs.mean(0).numpy(), data.val_y)
        trace.append(
            {"step": s.step, "val_accuracy_chains": together.accuracy, "val_nll": together.nll}
        )
        return (
            f"val accuracy of the {chains} current chain states: mean {np.mean(each):.4f}, "
            f"averaged {together.accuracy:.4f} (NLL {together.nll:.4f}), "
            f"step size {settings.schedule(s.step - 1):.3g}, kept {len(store)}"
        )

    sgld.sample(
        transform,
        state,
        batches,
        steps,
        burn_in,
        thinning,
        settings.schedule,
        keep,
        noise,
        progress,
        monitor=monitor,
        monitor_every=cfg.eval_every,
    )
    store.close()
    return store


def _chain_meta(cfg: SGLDRunConfig) -> dict[str, int]:
    return {
        "chains": cfg.chains,
        "steps": cfg.steps,
        "burn_in": cfg.burn_in,
        "thinning": cfg.thinning,
        "batch_size": cfg.batch_size,
        "seed": cfg.seed,
    }


def evaluate_samples(
    spec: NetworkSpec, theta: np.ndarray | torch.Tensor, data: Dataset, device: str = "cpu"
) -> dict[str, ClassificationMetrics]:
    """Posterior-predictive metrics of networks ``theta (K, P)`` (run on ``device``) on
    validation and test."""
    th = torch.as_tensor(
        np.asarray(theta, dtype=np.float32) if isinstance(theta, np.ndarray) else theta
    )
    th = th.to(device)
    return {
        split: classification_metrics(member_probs(spec, th, x).mean(0).numpy(), y.numpy())
        for split, (x, y) in Tensors.of(data).splits().items()
    }


def evaluate_dropout(
    spec: NetworkSpec, theta: torch.Tensor, data: Dataset, p: float, passes: int, seed: int
) -> dict[str, ClassificationMetrics]:
    """MC-Dropout predictive: mean softmax over ``passes`` masks (seeded)."""
    out = {}
    for split, (x, y) in Tensors.of(data).splits().items():
        gen = torch.Generator().manual_seed(seed)
        probs = member_probs(spec, theta, x, dropout=p, passes=passes, generator=gen)
        out[split] = classification_metrics(probs.mean(0).numpy(), y.numpy())
    return out


def _metrics(evals: dict[str, ClassificationMetrics], **extra: Any) -> dict[str, Any]:
    m: dict[str, Any] = {}
    for split, e in evals.items():
        m[f"{split}_accuracy"] = e.accuracy
        m[f"{split}_nll"] = e.nll
    m.update(extra)
    return m


def run(args: argparse.Namespace) -> int:
    """Train the requested method and write the run directory (see the module docstring)."""
    check_arch(str(args.arch))
    resolve_config(args)  # every flag checked before the data is read
    data = load_dataset(data_spec_from_args(args), args.data_dir)
    try:
        spec = build_spec(str(args.arch), data.input_shape, data.num_classes)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    cfg = resolve_config(args, num_train=len(data.train_y))
    out = Path(cfg.out)
    torch.set_num_threads(cfg.threads)
    _prepare_out(out, cfg.force)
    progress = not cfg.no_progress
    full_cfg = {
        **asdict(cfg),
        "data": data.spec.to_dict(),
        "data_sha256": data.fingerprint,
        "data_split": data.split,
        "input": data.convention.model_dump(mode="json"),
        "network": spec.to_dict(),
        "apd_version": __version__,
    }
    _write_json(out / CONFIG_FILE, full_cfg)
    device = device_description(cfg.threads)
    start = time.perf_counter()
    if isinstance(cfg, SGLDRunConfig):
        trace: list[dict[str, float]] = []
        store = run_sgld(spec, data, cfg, out / SAMPLES_DIR, progress, trace)
        train_s = time.perf_counter() - start
        idx = store.select_spread(min(SGLD_EVAL_SAMPLES, len(store)))
        evals = evaluate_samples(spec, np.asarray(store.theta[idx]), data, cfg.device)
        metrics = _metrics(
            evals,
            predictive=f"mean softmax of {len(idx)} samples spread across {cfg.chains} chains",
            num_samples_stored=len(store),
            num_samples_evaluated=len(idx),
            val_trace=trace,
        )
    else:
        p = DROPOUT_RATE if cfg.method == "dropout" else 0.0
        settings = PointTrainSettings(
            lr=cfg.lr,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
            batch_size=cfg.batch_size,
            epochs=cfg.epochs,
            dropout=p,
        )
        gen = torch.Generator().manual_seed(cfg.seed)
        tensors = Tensors.of(data)
        try:
            theta = train_point_estimate(
                spec, tensors.train_x, tensors.train_y, settings, gen, progress
            )
        except FloatingPointError as exc:
            raise UserError(str(exc)) from None
        train_s = time.perf_counter() - start
        save_file(
            {"theta": theta.numpy().astype(np.float32)},
            str(out / WEIGHTS_FILE),
            metadata={"arch": spec.name, "dropout": str(p), "network": json.dumps(spec.to_dict())},
        )
        if p > 0:
            evals = evaluate_dropout(spec, theta, data, p, DROPOUT_PASSES, cfg.seed)
            predictive = f"mean softmax of {DROPOUT_PASSES} dropout passes (p={p})"
        else:
            evals = evaluate_samples(spec, theta, data)
            predictive = "single network"
        metrics = _metrics(evals, predictive=predictive)
    metrics.update(
        method=cfg.method,
        arch=spec.name,
        train_wall_s=train_s,
        total_wall_s=time.perf_counter() - start,
        device=device,
        threads=cfg.threads,
    )
    _write_json(out / METRICS_FILE, metrics)
    (out / READY_FILE).touch()
    split = "test" if "test_accuracy" in metrics else "val"
    held_out = (
        f"val accuracy {metrics['val_accuracy']:.4f}"
        if split == "test"
        else "no test split in the data"
    )
    print(
        f"{cfg.method} {spec.name} on {data.name}: {split} accuracy "
        f"{metrics[f'{split}_accuracy']:.4f}, NLL {metrics[f'{split}_nll']:.4f}, {held_out}, "
        f"train {train_s:.0f} s -> {out}"
    )
    return 0
