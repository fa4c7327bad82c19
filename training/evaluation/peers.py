"""APD against its peers: one headline number per experiment and method, and a verdict
(win, tie, loss) for each, computed from ``results.json``.

The headline numbers (:func:`headline`), each only where its experiment ran:

* classification: accuracy, NLL, ECE on the test set;
* anomaly: for each input scale, the AUROC by predictive entropy and by mutual information,
  averaged over the OOD sets;
* adversarial: for each attack, white-box accuracy and white-box AUROC by mutual information
  (attacked vs clean), averaged over the radii;
* cost: bytes stored to serve, time to draw K networks, time to predict a batch.

A difference smaller than the criterion's tolerance is a tie (:data:`TOLERANCES`): the
distillation issue's fidelity bars for accuracy, NLL and anomaly AUROC (what "no loss" means
in this project), 1 point and 0.01 for the adversarial accuracy and AUROC (one binomial
standard error on the default 1,000 attacked images is up to 1.6 points), and 10 % (bytes) or
25 % (times, measured on a shared CPU) for the costs.
:func:`verdicts` holds APD against each peer on every criterion both have.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final

import numpy as np

from training.evaluation.results import ClassificationRecord, CostRecord, EvaluationResults
from training.metrics import ACCURACY_TOLERANCE, AUROC_TOLERANCE, NLL_TOLERANCE

# The fair peers of the issue; SGD (one network) and the one-Gaussian illustration are in
# the tables but are not peers.
PEERS: Final = ("laplace_ll", "laplace_kfac", "dropout", "ensemble", "sgld", "mixture")
SUBJECT: Final = "apd"
ECE_TOLERANCE: Final = 0.005
ADVERSARIAL_ACCURACY_TOLERANCE: Final = 0.01
ADVERSARIAL_AUROC_TOLERANCE: Final = 0.01
BYTES_TOLERANCE: Final = 0.10  # relative
SECONDS_TOLERANCE: Final = 0.25  # relative


@dataclass(frozen=True)
class Criterion:
    """One headline number: its column name, the experiment, which way is better and the
    tie tolerance (absolute, or a fraction of the larger value when ``relative``)."""

    name: str
    experiment: str
    higher_is_better: bool
    tolerance: float
    relative: bool = False

    def verdict(self, subject: float, peer: float) -> str:
        """``win``, ``tie`` or ``loss`` for the subject against the peer."""
        diff = subject - peer if self.higher_is_better else peer - subject
        bar = self.tolerance * max(abs(subject), abs(peer)) if self.relative else self.tolerance
        if abs(diff) <= bar + 1e-12:
            return "tie"
        return "win" if diff > 0 else "loss"


Table = dict[str, dict[str, float | None]]  # method -> criterion name -> value


def _mean(values: Iterable[float | None]) -> float | None:
    vals = list(values)
    if not vals or any(v is None for v in vals):
        return None
    return float(np.mean([v for v in vals if v is not None]))


def headline(results: EvaluationResults) -> tuple[list[Criterion], Table]:
    """The criteria present in ``results`` and every method's value for each (``None``
    where undefined, e.g. mutual information of one network)."""
    methods = list(results["methods"])
    crit: list[Criterion] = []
    table: Table = {m: {} for m in methods}
    if "classification" in results:
        rows = {r["method"]: r for r in results["classification"]["rows"]}
        cls: tuple[tuple[str, Callable[[ClassificationRecord], float], bool, float], ...] = (
            ("accuracy", lambda r: r["accuracy"], True, ACCURACY_TOLERANCE),
            ("NLL", lambda r: r["nll"], False, NLL_TOLERANCE),
            ("ECE", lambda r: r["ece"], False, ECE_TOLERANCE),
        )
        for name, get, higher, tol in cls:
            crit.append(Criterion(name, "classification", higher, tol))
            for m in methods:
                r = rows.get(m)
                table[m][name] = None if r is None else float(get(r))
    if "anomaly" in results:
        an = results["anomaly"]
        sets = list(an["ood_size"])
        by = {(r["method"], r["ood_set"], r["scale"], r["score"]): r["auroc"] for r in an["rows"]}
        for scale in an["scales"]:
            for score, short in (("predictive_entropy", "entropy"), ("mutual_information", "MI")):
                name = f"OOD AUROC {short} x{scale:g}"
                crit.append(Criterion(name, "anomaly", True, AUROC_TOLERANCE))
                for m in methods:
                    table[m][name] = _mean(by.get((m, s, scale, score)) for s in sets)
    if "adversarial" in results:
        adv = results["adversarial"]
        white = [r for r in adv["rows"] if r["crafted_on"] == "white-box"]
        for kind in adv["settings"]["kinds"]:
            acc_name, auc_name = f"{kind.upper()} accuracy", f"{kind.upper()} AUROC MI"
            crit.append(Criterion(acc_name, "adversarial", True, ADVERSARIAL_ACCURACY_TOLERANCE))
            crit.append(Criterion(auc_name, "adversarial", True, ADVERSARIAL_AUROC_TOLERANCE))
            for m in methods:
                sel = [r for r in white if r["method"] == m and r["attack"] == kind]
                table[m][acc_name] = _mean(r["accuracy"] for r in sel)
                table[m][auc_name] = _mean(r["auroc"].get("mutual_information") for r in sel)
    if "cost" in results:
        rows_c = {r["method"]: r for r in results["cost"]["rows"]}
        batch = results["cost"]["batch_size"]
        costs: tuple[tuple[str, Callable[[CostRecord], float], float], ...] = (
            ("stored bytes", lambda r: r["stored_bytes"], BYTES_TOLERANCE),
            ("draw K", lambda r: r["draw_seconds"], SECONDS_TOLERANCE),
            (f"predict {batch}", lambda r: r["predict_seconds"], SECONDS_TOLERANCE),
        )
        for name, get_c, tol in costs:
            crit.append(Criterion(name, "cost", False, tol, relative=True))
            for m in methods:
                rc = rows_c.get(m)
                table[m][name] = None if rc is None else float(get_c(rc))
    return crit, table


@dataclass(frozen=True)
class PeerVerdict:
    """APD against one peer: the criteria it wins, ties and loses (by name)."""

    peer: str
    wins: tuple[str, ...]
    ties: tuple[str, ...]
    losses: tuple[str, ...]


def verdicts(results: EvaluationResults) -> list[PeerVerdict]:
    """APD against each peer present in ``results``, on every criterion both have a value
    for; empty without APD."""
    if SUBJECT not in results["methods"]:
        return []
    crit, table = headline(results)
    out = []
    for peer in PEERS:
        if peer not in table:
            continue
        found: dict[str, list[str]] = {"win": [], "tie": [], "loss": []}
        for c in crit:
            a, b = table[SUBJECT].get(c.name), table[peer].get(c.name)
            if a is None or b is None:
                continue
            found[c.verdict(a, b)].append(c.name)
        out.append(
            PeerVerdict(peer, tuple(found["win"]), tuple(found["tie"]), tuple(found["loss"]))
        )
    return out
