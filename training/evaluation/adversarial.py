"""Experiment 3: adversarial examples against each method's posterior predictive.

For a subset of MNIST test images (1,000 by default, as the protocol allows: the reference
code attacks 6,000 validation images one at a time with foolbox) and each attack
(FGSM, PGD; :mod:`training.evaluation.attacks`) at each eps (L-infinity, pixels in [0, 1]):

* **white-box**: the attack is crafted against the method's own predictive, using the same K
  networks the method then predicts with (for MC-Dropout, fresh masks at every gradient step);
* **transfer**: the attack is crafted once against the SGD network and shown to every method.

For each method we report accuracy on the attacked images, and for each uncertainty score
the AUROC of telling attacked images (positive) from the same images clean (negative). All
attacked images count, whether or not the attack changed the label.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final

import numpy as np
import torch
from numpy.typing import NDArray
from tqdm import tqdm

from apd.uncertainty import PredictiveSummary
from training import metrics
from training.evaluation.anomaly import ANOMALY_SCORES, is_constant_score, score_defined
from training.evaluation.attacks import fgsm, pgd
from training.evaluation.methods import MemberNetworks
from training.evaluation.results import AdversarialRecord, AttackSettingsRecord, as_record

WHITE_BOX: Final = "white-box"
DEFAULT_EPS: Final = (0.05, 0.1, 0.2, 0.3)
# Elements of the widest activation tensor per attack chunk (the backward pass keeps a few).
_ATTACK_BUDGET: Final = 12_000_000


PGD_STEP_SIZE: Final = "2.5 * eps / steps, random start"
"""How :func:`~training.evaluation.attacks.pgd` steps by default, as the record states it."""


class AttackKind(enum.StrEnum):
    FGSM = "fgsm"
    PGD = "pgd"


@dataclass(frozen=True)
class AttackSettings:
    kinds: tuple[AttackKind, ...] = (AttackKind.FGSM, AttackKind.PGD)
    eps: tuple[float, ...] = DEFAULT_EPS
    pgd_steps: int = 20
    num_inputs: int = 1000
    transfer_source: str = "sgd"  # the method transfer attacks are crafted on
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.eps or any(not (e > 0 and math.isfinite(e)) for e in self.eps):
            raise ValueError(f"attack eps must be positive numbers, got {self.eps}")
        if self.pgd_steps < 1 or self.num_inputs < 1:
            raise ValueError("pgd_steps and num_inputs must be positive")

    def to_dict(self) -> AttackSettingsRecord:
        return as_record(self, AttackSettingsRecord, pgd_step_size=PGD_STEP_SIZE)


def craft(
    members: MemberNetworks,
    x: NDArray[np.float32],
    y: NDArray[np.integer],
    kind: AttackKind,
    eps: float,
    pgd_steps: int = 20,
    seed: int = 0,
) -> NDArray[np.float32]:
    """Adversarial versions of ``x`` against ``members``' predictive, in input chunks."""
    widest = members.spec.max_activations
    chunk = max(1, _ATTACK_BUDGET // (members.num_members * widest))
    gen = torch.Generator().manual_seed(seed)

    def logits(xb: torch.Tensor) -> torch.Tensor:
        return members.logits(xb, gen)

    out = np.empty_like(x, dtype=np.float32)
    for start in range(0, len(x), chunk):
        xb = torch.from_numpy(np.ascontiguousarray(x[start : start + chunk], np.float32))
        yb = torch.from_numpy(np.asarray(y[start : start + chunk], np.int64))
        if kind is AttackKind.FGSM:
            adv = fgsm(logits, xb, yb, eps)
        else:
            adv = pgd(logits, xb, yb, eps, steps=pgd_steps, generator=gen)
        out[start : start + len(xb)] = adv.numpy()
    return out


def _row(
    method: str,
    kind: AttackKind,
    eps: float,
    crafted_on: str,
    clean: PredictiveSummary,
    attacked: PredictiveSummary,
    y: NDArray[np.integer],
    num_members: int,
) -> AdversarialRecord:
    aurocs: dict[str, float | None] = {}
    for score in ANOMALY_SCORES:
        s_clean, s_adv = clean.score(score), attacked.score(score)
        aurocs[score.value] = (
            None
            if not score_defined(score, num_members) or is_constant_score(s_clean, s_adv)
            else metrics.auroc(s_clean, s_adv)
        )
    return AdversarialRecord(
        method=method,
        attack=kind.value,
        eps=eps,
        crafted_on=crafted_on,
        accuracy=metrics.accuracy(attacked.probabilities, y),
        clean_accuracy=metrics.accuracy(clean.probabilities, y),
        auroc=aurocs,
    )


def run_adversarial(
    members: Mapping[str, MemberNetworks],
    x: NDArray[np.float32],
    y: NDArray[np.integer],
    settings: AttackSettings,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> list[AdversarialRecord]:
    """White-box rows for every method, then transfer rows from ``settings.transfer_source``."""
    jobs = [(k, e) for k in settings.kinds for e in settings.eps]
    clean = {m: mem.summary(x, settings.seed) for m, mem in members.items()}
    rows: list[AdversarialRecord] = []
    transfer: dict[tuple[AttackKind, float], NDArray[np.float32]] = {}
    total = len(members) * len(jobs)
    bar = tqdm(total=total, desc="attacks", disable=not progress, unit="attack")
    for method, mem in members.items():
        for kind, eps in jobs:
            bar.set_postfix_str(f"{method} {kind.value} eps={eps:g}", refresh=False)
            adv = craft(mem, x, y, kind, eps, settings.pgd_steps, settings.seed)
            if method == settings.transfer_source:
                transfer[(kind, eps)] = adv
            attacked = mem.summary(adv, settings.seed + 1)
            rows.append(
                _row(method, kind, eps, WHITE_BOX, clean[method], attacked, y, mem.num_members)
            )
            bar.update()
        if log is not None:
            worst = min(r["accuracy"] for r in rows if r["method"] == method)
            log(f"adversarial: {method} white-box done (lowest accuracy {worst:.3f})")
    bar.close()
    if settings.transfer_source in members:
        for method, mem in members.items():
            if method == settings.transfer_source:
                continue
            for kind, eps in jobs:
                attacked = mem.summary(transfer[(kind, eps)], settings.seed + 1)
                rows.append(
                    _row(
                        method,
                        kind,
                        eps,
                        settings.transfer_source,
                        clean[method],
                        attacked,
                        y,
                        mem.num_members,
                    )
                )
    return rows
