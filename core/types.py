"""Domain types shared by the coordinator, the device agent and simulations.

Everything here is a frozen dataclass or an enum: plain values, no behaviour that touches
the network, the database or torch. Validation of user-written task files lives in
:mod:`core.taskspec`; these types assume their values were validated there.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from core.experiments.assignment import TrafficSplit, assignment_unit
from core.experiments.spec import ExperimentSpec
from core.privacy.spec import PrivacySpec

#: Version of the device/admin wire API. Bumped on any incompatible change; a peer that
#: speaks another version is refused with FAILED_PRECONDITION, never a parse error.
API_VERSION = 1


class TaskState(enum.Enum):
    """Lifecycle of a task. RUNNING is the only state in which rounds open."""

    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    #: Differential privacy: the next round would have spent more than the task's epsilon
    #: budget, so none opened; the last committed model is within the budget.
    BUDGET_EXHAUSTED = "budget_exhausted"

    @property
    def is_final(self) -> bool:
        return self is not TaskState.RUNNING


class RoundState(enum.Enum):
    """Lifecycle of one round attempt; see :mod:`coordinator.rounds.lifecycle`."""

    SELECTING = "selecting"
    TRAINING = "training"
    AGGREGATING = "aggregating"
    COMMITTED = "committed"
    FAILED = "failed"

    @property
    def is_final(self) -> bool:
        return self in (RoundState.COMMITTED, RoundState.FAILED)


class ParticipantState(enum.Enum):
    SELECTED = "selected"
    REPORTED = "reported"
    REJECTED = "rejected"
    ERRORED = "errored"


class ServerOptimizerKind(enum.Enum):
    """Server optimizers over the pseudo-gradient (Reddi et al., 2021)."""

    FEDAVG = "fedavg"
    FEDAVGM = "fedavgm"
    FEDADAM = "fedadam"
    FEDYOGI = "fedyogi"


class LocalOptimizerKind(enum.Enum):
    SGD = "sgd"
    ADAM = "adam"


@dataclass(frozen=True)
class ModelSpec:
    """A registered architecture (see :mod:`core.models`) and its constructor arguments."""

    architecture: str
    arguments: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ArmFilter:
    """Admits only the devices an A/B experiment assigns to arm ``index``: those whose
    :func:`core.experiments.assignment.assign_arm` under ``salt`` and the traffic split
    ``weights`` (in the experiment's arm order) is ``index``. It is the assignment the
    experiment's comparison evaluates by, so a device trains and evaluates the same arm.
    ``fedctl experiment launch`` sets it on each arm's training task when the experiment
    says ``partition_training: true`` (:mod:`core.experiments.training`).

    The arm is a keyed hash of the device id alone: the devices admitted are a fixed
    sub-population (the same in every round, in any process, after a restart), not a
    per-round draw, so selection's sampling within them stays what the privacy accountant
    analyses. The salt is left out of ``repr`` (it lands in check-in messages and logs)."""

    salt: str = field(repr=False)
    weights: tuple[float, ...]
    index: int

    @cached_property
    def _split(self) -> TrafficSplit:
        return TrafficSplit(self.weights)

    def admits(self, device_id: str) -> bool:
        """Whether ``device_id`` is in arm ``index``. Raises ``ValueError`` for an empty id
        or salt, or weights that are no traffic split."""
        return self._split.arm_of(assignment_unit(device_id, self.salt)) == self.index


@dataclass(frozen=True)
class Eligibility:
    """What a device must be to be admitted to a round: device attributes it must have,
    and (``arm``, None: any) the experiment arm it must be in."""

    require_charging: bool = False
    require_unmetered: bool = False
    require_idle: bool = False
    arm: ArmFilter | None = None


@dataclass(frozen=True)
class DeviceAttributes:
    charging: bool = True
    unmetered: bool = True
    idle: bool = True
    population: str = "default"


@dataclass(frozen=True)
class LocalTraining:
    epochs: int = 1
    batch_size: int = 32
    optimizer: LocalOptimizerKind = LocalOptimizerKind.SGD
    learning_rate: float = 0.05
    momentum: float = 0.0


@dataclass(frozen=True)
class ServerOptimizer:
    """Optimizer applied to the pseudo-gradient ``-(weighted mean of client deltas)``.

    ``fedavg`` with ``learning_rate=1`` is plain FedAvg. ``epsilon`` is the adaptivity
    ``tau`` of FedAdam/FedYogi.
    """

    kind: ServerOptimizerKind = ServerOptimizerKind.FEDAVG
    learning_rate: float = 1.0
    momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.99
    epsilon: float = 1e-3


@dataclass(frozen=True)
class Evaluation:
    """Federated evaluation: the fraction of selected devices that also evaluate the model
    they received on their local held-out data and report loss/accuracy."""

    fraction: float = 0.0
    #: Data spec (see :mod:`core.data.spec`) the coordinator evaluates each committed model
    #: on, e.g. ``"digits:split=test"``; empty for none.
    server_data: str = ""


class TaskKind(enum.Enum):
    """What a task does each round: train the model, or only evaluate model versions."""

    TRAIN = "train"
    #: Selected devices evaluate the task's model versions on their local data, without
    #: training, and report sums (:mod:`core.evaluation`); no model version is trained.
    EVALUATE = "evaluate"


class EvaluationSplit(enum.Enum):
    """Which of a device's local examples an evaluation task uses."""

    TEST = "test"
    TRAIN = "train"
    ALL = "all"


@dataclass(frozen=True)
class MetricRange:
    """A device's value of a metric is clamped to [low, high] before it is summed: the bound
    on one device's influence, and the range secure aggregation and central DP scale by."""

    low: float = 0.0
    high: float = 1.0


@dataclass(frozen=True)
class HistogramBins:
    """Equal-width bins over [low, high] (None: the metric's range) of the devices' values of
    one metric; values outside fall in the end bins. Quantiles are read from it, within one
    bin width."""

    bins: int = 20
    low: float | None = None
    high: float | None = None


@dataclass(frozen=True)
class FederatedEvaluation:
    """The ``evaluate`` section of a task of kind ``evaluate``.

    ``source_task``: the task whose committed model versions are evaluated (empty: this
    task's own initial model, version 0, built from ``model`` and ``seed``); ``versions``:
    which of them (empty: the latest at launch). ``metrics``: the metrics the model's metrics
    hook declares, each with its range (``loss`` [0, 20] and ``accuracy`` [0, 1] are always
    reported; naming them here changes their range). ``histograms``: per metric, the bins of
    the device-level distribution. ``max_examples``: a device's example count is capped at
    this (its weight in example-weighted means). ``experiment``: an A/B experiment between
    the versions (each arm names its ``version``; a device evaluates only its arm's, chosen
    by :func:`core.experiments.assign_arm` with the experiment's salt), with its stop
    rules; the versions evaluated are then the arms'. ``sketch``: each device also sends a KLL
    sketch of its examples' loss (and of accuracy where it has a histogram), from which the
    coordinator reads per-example quantiles. Off unless asked for: a sketch holds up to about
    600 of a device's per-example values (every one for a device of few examples), in the
    clear; only a task whose reports are clear anyway (no secure aggregation, no DP, not an
    experiment) may ask."""

    source_task: str = ""
    versions: tuple[int, ...] = ()
    split: EvaluationSplit = EvaluationSplit.TEST
    max_examples: int = 1024
    metrics: Mapping[str, MetricRange] = field(default_factory=dict)
    histograms: Mapping[str, HistogramBins] = field(default_factory=dict)
    quantiles: tuple[float, ...] = (0.1, 0.5, 0.9)
    experiment: ExperimentSpec | None = None
    sketch: bool = False


class SecAggProtocol(enum.Enum):
    SECAGG_PLUS = "secagg+"  # Bell et al. 2020: k neighbours on a random graph
    SECAGG = "secagg"  # Bonawitz et al. 2017: the complete graph


class SecAggAdversary(enum.Enum):
    SEMI_HONEST = "semi-honest"
    SEMI_MALICIOUS = "semi-malicious"


@dataclass(frozen=True)
class SecureAggregation:
    """The ``secure_aggregation`` section of a task: the coordinator sees only the sum of the
    updates. None ("auto") fields are derived from the cohort size (core.secagg.params)."""

    protocol: SecAggProtocol = SecAggProtocol.SECAGG_PLUS
    neighbours: int | None = None
    #: Fraction of a device's k + 1 share holders needed to rebuild its secrets.
    threshold: float | None = None
    #: Each coordinate of a device's (weight-scaled) update is clipped to [-clip, clip].
    clip: float = 1.0
    #: Bits per quantized value; the ring adds ceil(log2 n) so that sums never wrap.
    bits: int | None = None
    #: Expected fraction of devices that drop out during the protocol.
    dropout: float = 0.1
    #: Fraction of devices that may collude with the coordinator.
    corrupt_fraction: float = 0.05
    adversary: SecAggAdversary = SecAggAdversary.SEMI_MALICIOUS
    #: A device's FedAvg weight is min(examples, weight_cap), summed as a masked value.
    weight_cap: int = 1024
    #: Deadline of each protocol stage after training.
    phase_timeout_s: float = 30.0


@dataclass(frozen=True)
class Robustness:
    """The ``robustness`` section of a task: how much one device's update can move the model,
    and what a model may look like before it is committed. The bounds hold on every path:

    * clear updates (plain FedAvg, local DP, central DP): the FedAvg weight is
      ``min(num_examples, weight_cap)`` (central DP weighs every update 1 anyway), and an
      update whose L2 norm (all tensors together) exceeds ``max_update_l2_norm`` is refused
      with INVALID_ARGUMENT naming the bound: refused rather than clipped, so a device that
      sends it learns why, and honest updates are never silently changed;
    * secure aggregation: ``secure_aggregation.weight_cap`` and ``secure_aggregation.clip``
      (per coordinate) bound each masked contribution the same way; the coordinator cannot
      see a masked update's norm;
    * every commit: a new model with a non-finite parameter or one above
      ``max_abs_parameter`` in magnitude is never committed; the round fails with the reason.
    """

    #: A clear update's FedAvg weight is min(num_examples, weight_cap); the same default as
    #: secure aggregation's, so one device's share of a round is at most
    #: weight_cap / (weight_cap + the others' weights) however many examples it claims.
    weight_cap: int = 1024
    #: A clear update with a larger L2 norm is refused. Honest updates of the example
    #: tasks are around 1-10.
    max_update_l2_norm: float = 1000.0
    #: A round whose new model has a parameter larger than this in magnitude fails.
    max_abs_parameter: float = 1e6


class AggregationMode(enum.Enum):
    SYNC = "sync"    # rounds: a cohort is drawn, its reports are aggregated together
    ASYNC = "async"  # FedBuff (Nguyen et al. 2022): devices train continuously, every
    #                  ``buffer`` uploads the server steps


class StalenessKind(enum.Enum):
    CONSTANT = "constant"      # every upload weighs the same, however stale
    POLYNOMIAL = "polynomial"  # weight (1 + staleness) ** -exponent (FedBuff, Papaya)


@dataclass(frozen=True)
class Staleness:
    """How an asynchronous upload is down-weighted by its staleness: the server version now
    minus the version the device trained on."""

    kind: StalenessKind = StalenessKind.POLYNOMIAL
    exponent: float = 0.5


class RobustKind(enum.Enum):
    MEAN = "mean"                  # example-weighted FedAvg (the default)
    MEDIAN = "median"              # coordinate-wise median
    TRIMMED_MEAN = "trimmed_mean"  # coordinate-wise mean without the trim_fraction extremes
    KRUM = "krum"                  # Blanchard et al. 2017: the update closest to its n-f-2
    MULTI_KRUM = "multi_krum"      # the mean of the multi_krum_m best by the Krum score
    NORM_BOUND = "norm_bound"      # every update scaled to at most a (fixed or adaptive) norm


@dataclass(frozen=True)
class RobustAggregation:
    """Defences against poisoned updates. Under secure aggregation only ``norm_bound``
    applies (devices clip before masking); the others need every update in the clear."""

    kind: RobustKind = RobustKind.MEAN
    #: trimmed_mean: the fraction of values dropped at each end of every coordinate.
    trim_fraction: float = 0.1
    #: krum / multi_krum: how many Byzantine devices the rule assumes (f).
    byzantine: int = 1
    #: multi_krum: how many updates are averaged; None: n - f.
    multi_krum_m: int | None = None
    #: norm_bound: a fixed L2 bound; None: adaptive, ``norm_multiplier`` times the median
    #: update norm of the round.
    norm_bound: float | None = None
    norm_multiplier: float = 2.0


@dataclass(frozen=True)
class Aggregation:
    """The ``aggregation`` section of a task: synchronous rounds (the default) or
    asynchronous buffered aggregation, and the rule that combines updates."""

    mode: AggregationMode = AggregationMode.SYNC
    #: async: the server optimizer steps (and a version is committed) every ``buffer`` uploads.
    buffer: int = 10
    #: async: at most this many devices train at once.
    max_concurrency: int = 100
    staleness: Staleness = field(default_factory=Staleness)
    #: async: an upload staler than this many versions is rejected as late.
    max_staleness: int = 20
    robust: RobustAggregation = field(default_factory=RobustAggregation)


@dataclass(frozen=True)
class DataSchema:
    """What a device's data looks like: the shape of one example's features (``[64]`` for
    flat digits, ``[1, 28, 28]`` for an image) and the number of classes. Agents report theirs
    at check-in; a task may declare the schema its model expects (``data_schema``), and the
    coordinator refuses at launch a task whose model or declaration does not fit the data its
    population reported."""

    feature_shape: tuple[int, ...]
    num_classes: int


@dataclass(frozen=True)
class TaskSpec:
    """What to train, how, and for how many rounds. Times are in seconds."""

    name: str
    model: ModelSpec
    rounds: int
    clients_per_round: int
    min_reports: int
    #: ``train`` (the default) or ``evaluate`` (then the ``evaluate`` section applies).
    kind: TaskKind = TaskKind.TRAIN
    population: str = "default"
    eligibility: Eligibility = field(default_factory=Eligibility)
    over_selection: float = 1.3
    round_deadline_s: float = 60.0
    selection_window_s: float = 1.0
    local: LocalTraining = field(default_factory=LocalTraining)
    server: ServerOptimizer = field(default_factory=ServerOptimizer)
    evaluation: Evaluation = field(default_factory=Evaluation)
    #: Largest update upload accepted, in bytes; 0 means "the model's own size".
    max_update_bytes: int = 0
    seed: int = 0
    #: None: updates are sent in the clear (over TLS in production).
    secure_aggregation: SecureAggregation | None = None
    #: Differential privacy (:mod:`core.privacy.spec`); None: off. Never a spec whose mode
    #: is ``off`` (the parser normalises that to None).
    privacy: PrivacySpec | None = None
    #: Bounds on one update's influence and on the committed model (:class:`Robustness`).
    robustness: Robustness = field(default_factory=Robustness)
    #: Synchronous or asynchronous (FedBuff) aggregation, and the robust rule (:class:`Aggregation`).
    aggregation: Aggregation = field(default_factory=Aggregation)
    #: The data the model expects (None: derived from the population's reports, unchecked).
    data_schema: DataSchema | None = None
    #: Kind ``evaluate``: what is evaluated and reported (:class:`FederatedEvaluation`).
    evaluate: FederatedEvaluation = field(default_factory=FederatedEvaluation)
    #: The ``simulation:`` section of a task file (population, heterogeneity, availability,
    #: engine): read by ``fedctl simulate`` (:mod:`simulations.config`), ignored and never
    #: sent to devices by the coordinator. Kept raw here: core does not know simulations.
    simulation: Mapping[str, Any] = field(default_factory=dict)

    @property
    def selection_target(self) -> int:
        """How many devices a round admits: the goal times the over-selection factor."""
        return max(self.clients_per_round, int(round(self.clients_per_round * self.over_selection)))
