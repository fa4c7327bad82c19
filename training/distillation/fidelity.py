"""How faithfully a generator reproduces its SGLD teacher's posterior predictive.

Teacher and student are each K networks ``theta (K, P)``; each gives member softmax outputs
``p_k(y|x)`` and the posterior predictive ``p(y|x) = 1/K sum_k p_k(y|x)``. We compare

* test accuracy and NLL ``-1/N sum_n log p(y_n|x_n)`` of the two predictives;
* ``KL(p_teacher || p_student)`` per input, averaged over the test set, in nats;
* per OOD set and per anomaly score (:mod:`apd.uncertainty`), the AUROC of telling the OOD
  inputs (positives) from the in-distribution test inputs (negatives) by the score.

The targets of the distillation issue: accuracy at most 0.1 points below the teacher's, NLL
at most 0.01 above, each AUROC at most 0.005 below (:data:`TARGETS`).

:class:`ValidationMonitor` tracks a generator during training on the MNIST **validation**
split (never the test set) against the teacher's predictive there; distillation keeps the
generator with the lowest validation criterion.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import torch
from numpy.typing import NDArray

from apd.networks import NetworkSpec
from apd.uncertainty import PredictiveSummary, ScoreName, summarize
from training.metrics import (
    ACCURACY_TOLERANCE,
    AUROC_TOLERANCE,
    NLL_TOLERANCE,
    accuracy,
    auroc,
    kl_divergence,
    negative_log_likelihood,
)
from training.torch_ops import member_probs

from .gan import Generator

FIDELITY_SCORES: Final = (
    ScoreName.PREDICTIVE_ENTROPY,
    ScoreName.MUTUAL_INFORMATION,
    ScoreName.MODEL_VARIANCE,
)
TARGETS: Final = {
    "accuracy_drop_max": ACCURACY_TOLERANCE,
    "nll_increase_max": NLL_TOLERANCE,
    "auroc_drop_max": AUROC_TOLERANCE,
}
_EPS: Final = 1e-12


def ood_aurocs(
    in_summary: PredictiveSummary,
    ood_summary: PredictiveSummary,
    scores: tuple[ScoreName, ...] = FIDELITY_SCORES,
) -> dict[str, float]:
    return {s.value: auroc(in_summary.score(s), ood_summary.score(s)) for s in scores}


@dataclass(frozen=True)
class Predictions:
    """One method's K-network outputs on the test set and on each OOD set."""

    test: PredictiveSummary
    ood: dict[str, PredictiveSummary]


def predict(
    spec: NetworkSpec,
    theta: torch.Tensor,
    test_x: NDArray[np.float32],
    ood: Mapping[str, NDArray[np.float32]],
) -> Predictions:
    return Predictions(
        test=summarize(member_probs(spec, theta, test_x).numpy()),
        ood={name: summarize(member_probs(spec, theta, x).numpy()) for name, x in ood.items()},
    )


def compare(
    teacher: Predictions, student: Predictions, test_y: NDArray[np.integer]
) -> dict[str, Any]:
    """Every fidelity figure of the issue, with pass/fail against :data:`TARGETS`."""
    t_acc, s_acc = (
        accuracy(teacher.test.probabilities, test_y),
        accuracy(student.test.probabilities, test_y),
    )
    t_nll, s_nll = (
        negative_log_likelihood(teacher.test.probabilities, test_y),
        negative_log_likelihood(student.test.probabilities, test_y),
    )
    kl = kl_divergence(teacher.test.probabilities, student.test.probabilities)
    out: dict[str, Any] = {
        "teacher": {"accuracy": t_acc, "nll": t_nll},
        "student": {"accuracy": s_acc, "nll": s_nll},
        "accuracy_drop": t_acc - s_acc,
        "nll_increase": s_nll - t_nll,
        "mean_kl_teacher_student": float(kl.mean()),
        "pass_accuracy": t_acc - s_acc <= ACCURACY_TOLERANCE,
        "pass_nll": s_nll - t_nll <= NLL_TOLERANCE,
        "auroc": {},
    }
    all_pass = True
    for name in teacher.ood:
        t_au = ood_aurocs(teacher.test, teacher.ood[name])
        s_au = ood_aurocs(student.test, student.ood[name])
        rows = {}
        for score in t_au:
            drop = t_au[score] - s_au[score]
            ok = drop <= AUROC_TOLERANCE
            all_pass &= ok
            rows[score] = {"teacher": t_au[score], "student": s_au[score], "drop": drop, "pass": ok}
        out["auroc"][name] = rows
    out["pass_auroc"] = all_pass
    out["pass_all"] = bool(out["pass_accuracy"] and out["pass_nll"] and all_pass)
    return out


class ValidationMonitor:
    """Scores a generator against the teacher on held-out validation inputs.

    The same noise (seeded once) is used at every evaluation, so two evaluations differ only
    through the generator. The criterion is the mean ``KL(p_teacher || p_generator)`` over
    the validation inputs: it is zero only when the two predictives agree everywhere, and it
    penalises both a generator that is too narrow (overconfident, higher NLL) and one that
    is too wide (blurred predictions).
    """

    def __init__(
        self,
        spec: NetworkSpec,
        x: NDArray[np.float32],
        y: NDArray[np.integer],
        teacher_theta: torch.Tensor,
        num_networks: int = 100,
        seed: int = 0,
    ) -> None:
        self.spec = spec
        self.x = torch.from_numpy(np.array(x, dtype=np.float32))  # a copy: x may be read-only
        self.y = np.asarray(y)
        self.num_networks = int(num_networks)
        self.seed = int(seed)
        teacher = summarize(member_probs(spec, teacher_theta, self.x).numpy())
        self.teacher = teacher
        self.teacher_metrics = {
            "accuracy": accuracy(teacher.probabilities, self.y),
            "nll": negative_log_likelihood(teacher.probabilities, self.y),
            "mutual_information": float(teacher.mutual_information.mean()),
            "model_variance": float(teacher.model_variance.mean()),
        }

    def draw(self, generator: Generator) -> torch.Tensor:
        rng = torch.Generator(device=generator.scale.device).manual_seed(self.seed)
        return generator.sample(self.num_networks, rng)

    @torch.no_grad()
    def evaluate(self, generator: Generator) -> dict[str, float]:
        """Validation accuracy, NLL, KL to the teacher, and mean MI / model variance ratios."""
        was_training = generator.training
        generator.eval()
        s = summarize(member_probs(self.spec, self.draw(generator), self.x).numpy())
        generator.train(was_training)
        kl = kl_divergence(self.teacher.probabilities, s.probabilities)
        t = self.teacher_metrics
        return {
            "val_accuracy": accuracy(s.probabilities, self.y),
            "val_nll": negative_log_likelihood(s.probabilities, self.y),
            "val_kl": float(kl.mean()),
            "val_mi_ratio": float(s.mutual_information.mean()) / max(t["mutual_information"], _EPS),
            "val_variance_ratio": float(s.model_variance.mean()) / max(t["model_variance"], _EPS),
        }
