"""The layout of ``results.json``: what :func:`~training.evaluation.suite.run_suite` produces and
:mod:`training.evaluation.report` reads, as TypedDicts.

Each experiment's record is declared here once. The experiments build their rows as these
types (mypy catches a misspelt key on either side); a settings dataclass becomes its record
through :func:`as_record`, serialised by pydantic and checked against the record on the way.
The order of the fields here is the order of the keys in ``results.json``.
:func:`load_results` reads a ``results.json`` back and validates it against these types
(pydantic, strict: no extra, missing or mistyped field passes).

In memory an undefined metric is NaN; ``results.json`` holds ``null`` there (strict JSON), so
the fields that can be undefined are ``float | None``.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import Any, Final, NotRequired, TypeVar, cast

from pydantic import ConfigDict, TypeAdapter, ValidationError, with_config
from typing_extensions import TypedDict  # pydantic reads typing.TypedDict only from 3.12

from training.errors import UserError

_CLOSED: Final = ConfigDict(extra="forbid")


# --------------------------------------------------------------------------- meta


EXPERIMENTS: Final = ("classification", "anomaly", "adversarial", "active_learning", "toy", "cost")
"""The experiments an evaluation runs, each a section of ``results.json`` and of the report."""


@with_config(_CLOSED)
class MLPSpecRecord(TypedDict):
    """:meth:`apd.networks.MLPSpec.to_dict`."""

    name: str
    layer_sizes: list[int]
    activation: str
    num_params: int


@with_config(_CLOSED)
class LayerRecord(TypedDict):
    """One layer of :meth:`apd.networks.CNNSpec.to_dict` (fields by ``type``)."""

    type: str
    output_shape: list[int]
    out_channels: NotRequired[int]
    kernel_size: NotRequired[int]
    padding: NotRequired[int]
    size: NotRequired[int]
    units: NotRequired[int]


@with_config(_CLOSED)
class CNNSpecRecord(TypedDict):
    """:meth:`apd.networks.CNNSpec.to_dict`."""

    name: str
    input_shape: list[int]
    layers: list[LayerRecord]
    activation: str
    num_params: int


SpecRecord = MLPSpecRecord | CNNSpecRecord


@with_config(_CLOSED)
class AttackSettingsRecord(TypedDict):
    kinds: list[str]
    eps: list[float]
    pgd_steps: int
    pgd_step_size: str
    num_inputs: int
    transfer_source: str
    seed: int


@with_config(_CLOSED)
class ActiveLearningSettingsRecord(TypedDict):
    """The ``NotRequired`` fields came with warm starts, candidate subsets, the MC-Dropout
    learner, preconditioners, batch rules and online APD's own K; the settings recorded in
    reports written before lack them."""

    seeds: list[int]
    rounds: int
    acquire: int
    initial_per_class: int
    pool_size: int | None
    candidates: NotRequired[int]
    test_size: int | None
    test_every: NotRequired[int]
    num_samples: int
    learners: list[str]
    acquisitions: list[str]
    batch_rule: NotRequired[str]
    power_exponent: NotRequired[float]  # recorded with the power rule only
    chains: int
    sgld_lr: float
    preconditioner: NotRequired[str]
    temperature: float
    prior_std: float
    batch_size: NotRequired[int]
    first_burn_in: NotRequired[int]
    burn_in: int
    thinning: int
    buffer_size: int
    warmup_samples: int
    gan_steps: int
    apd_rank: int
    apd_networks: NotRequired[int]
    moment_init_steps: NotRequired[int]
    selection_inputs: int
    warm_start: NotRequired[bool]
    sgld_steps_first_round: NotRequired[int]
    sgld_steps_per_round: int
    dropout_arch: NotRequired[str]
    dropout_rates: NotRequired[list[float]]
    dropout_weight_decay: NotRequired[float]
    dropout_lr: NotRequired[float]
    dropout_batch_size: NotRequired[int]
    dropout_epochs: NotRequired[int]
    dropout_passes: NotRequired[int]


@with_config(_CLOSED)
class ToySettingsRecord(TypedDict):
    points_per_class: int
    sgld_chains: int
    sgld_steps: int
    sgld_burn_in: int
    sgld_thinning: int
    sgld_lr: float
    prior_std: float
    apd_steps: int
    apd_rank: int
    dropout: float
    dropout_epochs: int
    num_samples: int
    dropout_passes: int
    grid_size: int
    seed: int


@with_config(_CLOSED)
class SuiteConfigRecord(TypedDict):
    """:meth:`~training.evaluation.suite.SuiteConfig.to_dict`: what ``apd evaluate`` was asked."""

    arch: str
    runs: str
    checkpoint: str | None
    name: str
    num_samples: int
    dropout_passes: int
    gaussian_rank: int | None
    # NotRequired: results.json files written before the fair peers lack them
    mixture_rank: NotRequired[int]
    laplace_fit_inputs: NotRequired[int | None]
    ood_size: int
    test_size: int | None
    scales: list[float]
    attacks: AttackSettingsRecord
    active_learning: ActiveLearningSettingsRecord
    toy: ToySettingsRecord
    experiments: list[str]
    seed: int
    threads: int


@with_config(_CLOSED)
class Meta(TypedDict):
    name: str
    arch: str
    spec: SpecRecord
    created_at: str
    code_revision: str
    uncommitted_changes: bool | None  # None: git could not tell
    command: str
    machine: str
    data_sha256: str
    test_inputs: int
    config: SuiteConfigRecord
    seconds: dict[str, float]  # experiment -> wall time, and "total"


# --------------------------------------------------------------------------- methods


@with_config(_CLOSED)
class Provenance(TypedDict, total=False):
    """Where a method's networks came from; each method fills the keys that apply to it.

    Point estimates and the ensemble's members: ``run``, ``seed``, ``method``, ``arch`` (and
    ``settings``, ``code_revision``, ``created_at`` when the run's ``config.json`` has them);
    the ensemble: ``networks``, ``members``; SGLD: ``samples_stored``, ``chains``, ``sampler``;
    the Gaussian: ``rank``, ``fit_samples``, ``moment_samples``, ``fitted_to``; the mixture:
    ``components``, ``component_rule``, ``component_samples``, ``rank`` (the most deviation
    columns of a component), ``moment_samples``, ``fitted_to``; a Laplace peer: its SGD run's
    keys, ``subset_of_weights`` to ``fit_seconds``; APD: ``checkpoint`` to ``distillation``,
    ``teacher`` (the SGLD record it was distilled from) and ``code_revision``. SGLD's
    ``samples_created_at`` and APD's ``teacher.created_at`` say whether the SGLD run
    evaluated is APD's own teacher.
    """

    networks: int
    dropout: float
    samples_stored: int
    samples_created_at: str
    chains: int | None
    sampler: dict[str, Any] | None
    rank: int
    fit_samples: int
    moment_samples: int
    fitted_to: str
    components: int
    component_rule: str
    component_samples: list[int]
    subset_of_weights: str
    hessian_structure: str
    laplace_params: int
    hessian_floats: int
    prior_structure: str
    prior_precision: list[float]
    fit_inputs: int
    log_marginal_likelihood: float | None
    fit_seconds: float
    members: list[Provenance]
    checkpoint: str
    sha256: str
    model_id: str
    version: str
    design: str
    noise_dim: int
    subspace_rank: int | None
    distillation: dict[str, Any]
    teacher: dict[str, Any]
    run: str
    seed: int
    method: str
    arch: str
    settings: dict[str, Any]
    code_revision: str
    created_at: str


@with_config(_CLOSED)
class MethodRecord(TypedDict):
    label: str
    num_members: int
    stored_bytes: int
    provenance: Provenance


# --------------------------------------------------------------------------- experiments 1, 2


@with_config(_CLOSED)
class ReliabilityRecord(TypedDict):
    """:class:`training.metrics.ReliabilityDiagram`; ``None`` for an empty bin."""

    edges: list[float]
    count: list[int]
    confidence: list[float | None]
    accuracy: list[float | None]
    ece: float


@with_config(_CLOSED)
class ClassificationRecord(TypedDict):
    method: str
    num_members: int
    accuracy: float
    nll: float
    brier: float
    ece: float
    reliability: ReliabilityRecord


@with_config(_CLOSED)
class ClassificationSection(TypedDict):
    inputs: str
    rows: list[ClassificationRecord]


@with_config(_CLOSED)
class CalibrationRecord(TypedDict):
    """One method's test predictive before and after the top-label recalibration map
    (:mod:`apd.recalibration`): ``map`` is ``checkpoint`` for the map a checkpoint serves
    with, ``fitted`` for one fitted here on the method's validation predictive
    (``training.distillation.calibrate.fit_recalibration``), ``none`` where too few validation
    inputs allow one (then ``after`` is None)."""

    method: str
    map: str
    fitted_on: str
    fit_size: int
    knots: int
    before: ClassificationRecord
    after: ClassificationRecord | None


@with_config(_CLOSED)
class CalibrationSection(TypedDict):
    inputs: str
    validation: str
    rows: list[CalibrationRecord]


@with_config(_CLOSED)
class AnomalyRecord(TypedDict):
    """One (method, OOD set, scale, score); ``None`` where the score is undefined."""

    method: str
    ood_set: str
    scale: float
    score: str
    auroc: float | None
    aupr_in: float | None
    aupr_out: float | None


@with_config(_CLOSED)
class FlagRateRecord(TypedDict):
    """The share of inputs a checkpoint's flag raises at its calibrated threshold;
    ``ood_set`` and ``scale`` None: the in-distribution test inputs."""

    method: str
    score: str
    ood_set: str | None
    scale: float | None
    threshold: float
    flagged: float


@with_config(_CLOSED)
class AnomalySection(TypedDict):
    """``flag_rates`` came with the checkpoint's data-support score and combined flag."""

    in_distribution: str
    ood_size: dict[str, int]
    scales: list[float]
    rows: list[AnomalyRecord]
    ood_sets: dict[str, str]  # set -> description
    flag_rates: NotRequired[list[FlagRateRecord]]


VARIANT_PREFIX: Final = "apd-"
"""The method keys of the APD checkpoints evaluated beside the main one (``apd evaluate
--variant``); their fidelity against SGLD is ``fidelity_variants``."""


@with_config(_CLOSED)
class FidelityRecord(TypedDict):
    """A student's AUROC against its teacher's on one anomaly row."""

    ood_set: str
    scale: float
    score: str
    teacher_auroc: float
    student_auroc: float
    tolerance: float
    issue_target: bool
    drop: float
    within_target: bool


@with_config(_CLOSED)
class FidelityTargets(TypedDict):
    accuracy_drop_max: float
    nll_increase_max: float
    auroc_drop_max: float


@with_config(_CLOSED)
class ClassificationFidelityRecord(TypedDict):
    teacher_accuracy: float
    student_accuracy: float
    teacher_nll: float
    student_nll: float
    mean_kl: float
    accuracy_within_target: bool
    nll_within_target: bool
    targets: FidelityTargets


@with_config(_CLOSED)
class Fidelity(TypedDict):
    """APD against its SGLD teacher."""

    teacher: str
    student: str
    classification: ClassificationFidelityRecord
    anomaly: list[FidelityRecord]
    anomaly_rows: int
    anomaly_rows_within: int
    issue_score_rows: int
    issue_score_rows_within: int


@with_config(_CLOSED)
class GaussianFidelity(TypedDict):
    """The one Gaussian, the mixture or an APD variant (``apd evaluate --variant``) against
    the same SGLD teacher."""

    anomaly: list[FidelityRecord]
    classification: ClassificationFidelityRecord


@with_config(_CLOSED)
class AccuracyNLL(TypedDict):
    accuracy: float
    nll: float


@with_config(_CLOSED)
class OneChainGaussian(TypedDict):
    chain: int
    samples: int
    rank: int
    accuracy: float
    nll: float


@with_config(_CLOSED)
class GaussianDiagnostics(TypedDict):
    mean_network: AccuracyNLL
    without_diagonal: AccuracyNLL
    one_chain: OneChainGaussian


@with_config(_CLOSED)
class ClassificationAndAnomaly(TypedDict):
    """What :func:`~training.evaluation.suite.classification_and_anomaly` returns."""

    classification: ClassificationSection
    anomaly: AnomalySection
    calibration: NotRequired[CalibrationSection]
    fidelity: NotRequired[Fidelity]
    fidelity_gaussian: NotRequired[GaussianFidelity]
    fidelity_mixture: NotRequired[GaussianFidelity]
    fidelity_variants: NotRequired[dict[str, GaussianFidelity]]  # method key -> fidelity


# --------------------------------------------------------------------------- experiment 3


@with_config(_CLOSED)
class AdversarialRecord(TypedDict):
    method: str
    attack: str
    eps: float
    crafted_on: str  # "white-box" or the transfer source method
    accuracy: float
    clean_accuracy: float
    auroc: dict[str, float | None]  # score -> clean vs attacked


@with_config(_CLOSED)
class AdversarialSection(TypedDict):
    settings: AttackSettingsRecord
    inputs: str
    rows: list[AdversarialRecord]


# --------------------------------------------------------------------------- experiment 6


@with_config(_CLOSED)
class CostRecord(TypedDict):
    method: str
    stored_bytes: int
    num_members: int
    batch_size: int
    draw_seconds: float
    predict_seconds: float


@with_config(_CLOSED)
class CostSection(TypedDict):
    batch_size: int
    rows: list[CostRecord]
    sgld_store_bytes: int | None


# --------------------------------------------------------------------------- experiment 5


@with_config(_CLOSED)
class ToyMethodNumbers(TypedDict):
    train_accuracy: float
    entropy_near_data: float
    entropy_far: float
    mi_near_data: float
    mi_far: float


@with_config(_CLOSED)
class ToyNumbers(TypedDict):
    sgld_samples: int
    per_method: dict[str, ToyMethodNumbers]  # method label -> numbers
    kl_from_sgld_grid: dict[str, float]  # method label -> mean KL(SGLD || it) over the grid
    regions: str


@with_config(_CLOSED)
class ToySection(TypedDict):
    """:class:`ToyNumbers` after the settings."""

    settings: ToySettingsRecord
    sgld_samples: int
    per_method: dict[str, ToyMethodNumbers]
    kl_from_sgld_grid: dict[str, float]
    regions: str


# --------------------------------------------------------------------------- experiment 4


@with_config(_CLOSED)
class CurveRecord(TypedDict):
    learner: str
    acquisition: str
    seed: int
    labels: list[int]
    accuracy: list[float]
    seconds: float


@with_config(_CLOSED)
class CurveSummary(TypedDict):
    """Accuracy over seeds at each label count, for one learner x acquisition."""

    learner: str
    acquisition: str
    seeds: int
    labels: list[int]
    mean: list[float]
    min: list[float]
    max: list[float]


@with_config(_CLOSED)
class CurveRunRecord(TypedDict):
    """One run that finished curves of a section resumed from a curve log."""

    started: str
    code_revision: str
    cpu: str | None  # None: logged before the CPU was recorded
    curves: int
    seconds: float  # the run's wall time to its last finished curve


@with_config(_CLOSED)
class ActiveLearningSection(TypedDict):
    settings: ActiveLearningSettingsRecord
    curves: list[CurveRecord]
    seconds: float  # wall time, with the earlier runs' when resumed from a curve log
    summary: list[CurveSummary]
    runs: NotRequired[list[CurveRunRecord]]  # with a curve log: the runs that made the curves


# --------------------------------------------------------------------------- the whole


@with_config(_CLOSED)
class EvaluationResults(TypedDict):
    """``results.json``: one section per experiment run."""

    meta: Meta
    methods: dict[str, MethodRecord]  # method key -> record, in report order
    missing_methods: dict[str, str]  # method key -> why it was not evaluated
    classification: NotRequired[ClassificationSection]
    anomaly: NotRequired[AnomalySection]
    calibration: NotRequired[CalibrationSection]  # reports written before it lack it
    fidelity: NotRequired[Fidelity]
    fidelity_gaussian: NotRequired[GaussianFidelity]
    fidelity_mixture: NotRequired[GaussianFidelity]
    fidelity_variants: NotRequired[dict[str, GaussianFidelity]]  # method key -> fidelity
    gaussian_diagnostics: NotRequired[GaussianDiagnostics]
    adversarial: NotRequired[AdversarialSection]
    cost: NotRequired[CostSection]
    toy: NotRequired[ToySection]
    active_learning: NotRequired[ActiveLearningSection]


_RESULTS: Final = TypeAdapter(EvaluationResults)
_SPEC: Final = TypeAdapter(SpecRecord)
R = TypeVar("R")


_ADAPTERS: Final[dict[object, TypeAdapter[Any]]] = {}


def _adapter(cls: Any) -> TypeAdapter[Any]:
    if cls not in _ADAPTERS:
        _ADAPTERS[cls] = TypeAdapter(cls)
    return _ADAPTERS[cls]


def as_record(obj: Any, record: type[R], exclude: Collection[str] = (), **extra: Any) -> R:
    """The dataclass ``obj`` as its ``record``: serialised by pydantic (enums as values,
    tuples as lists, paths as strings), less the fields in ``exclude``, plus ``extra``
    (values derived from the fields, or nested records), and validated against ``record``
    (strict), so a field the record lacks, or lacks a field of, fails here and not in the
    report."""
    data = _adapter(type(obj)).dump_python(obj, mode="json", exclude=set(exclude))
    return cast(R, _adapter(record).validate_python({**data, **extra}, strict=True))


def spec_record(spec_dict: dict[str, object]) -> SpecRecord:
    """:meth:`apd.networks.MLPSpec.to_dict` or :meth:`~apd.networks.CNNSpec.to_dict` as its
    record."""
    return _SPEC.validate_python(spec_dict, strict=True)


def load_results(path: Path) -> EvaluationResults:
    """Read ``results.json`` and check it against :class:`EvaluationResults`.

    Raises :class:`~training.errors.UserError` with one line naming the file and the first
    field that is missing, unexpected or of the wrong type."""
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise UserError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    try:
        return _RESULTS.validate_json(text, strict=True)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"])
        where = f"field {field}: " if field else ""
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise UserError(f"{path}: {where}{first['msg']}{more}") from None
