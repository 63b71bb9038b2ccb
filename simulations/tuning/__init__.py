"""Federated tuning: an Optuna study over a task file's training configuration, each trial a
federated task (a simulation here; ``fedctl tune --coordinator`` launches tasks), weak
trials pruned by their evaluation curves. ``fedctl tune STUDY.yaml`` runs one.

- :mod:`simulations.tuning.spec`: study files (search space, objective, sampler, pruner);
- :mod:`simulations.tuning.study`: the study loop in waves, and simulated trials;
- :mod:`simulations.tuning.workers`: trials in worker processes;
- :mod:`simulations.tuning.outputs`: ``trials.csv``, ``best.yaml``, ``study.json``,
  ``trials.png``.
"""

from simulations.tuning.outputs import write_results
from simulations.tuning.spec import (
    Direction,
    Objective,
    Param,
    ParamKind,
    PrunerKind,
    PrunerSpec,
    SamplerKind,
    SamplerSpec,
    StudySpec,
    TaskCheck,
    load_study_file,
    simulation_check,
    study_from_dict,
)
from simulations.tuning.study import (
    RoundReport,
    SimulationTrials,
    StudyAborted,
    StudyResult,
    TrialBackend,
    TrialJob,
    TrialOutcome,
    TrialRecord,
    TrialState,
    as_summary,
    run_study,
)

__all__ = [
    "Direction", "Objective", "Param", "ParamKind", "PrunerKind", "PrunerSpec", "RoundReport",
    "SamplerKind", "SamplerSpec", "SimulationTrials", "StudyAborted", "StudyResult", "StudySpec", "TaskCheck",
    "TrialBackend", "TrialJob", "TrialOutcome", "TrialRecord", "TrialState", "as_summary",
    "load_study_file", "run_study", "simulation_check", "study_from_dict", "write_results",
]
