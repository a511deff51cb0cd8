"""The sweep: Optuna proposes settings, the pipeline runs each trial, the tracker records it.

The only package that knows both Optuna and MLflow. Its modules, in the order data flows through them:
``objective`` (config metric names, the objective, constraints), ``sampling`` (the sampler and repeat replacement),
``orchestrate`` (``Sweep``: stores, preflight, the loop), ``runner`` (one trial: suggest, run, record), ``recorder``
(both stores' record of a trial), ``recording`` (background uploads), ``budget`` and ``storage`` (the study store),
``faults`` (signals, full disks, interrupted trials), ``observer`` (what a sweep reports).
"""

from hailo_sweep.sweep.budget import Budget, budget_used
from hailo_sweep.sweep.objective import Objective, check_metric, chosen_trial, metric_key, objective_of
from hailo_sweep.sweep.observer import NullObserver, SweepIds, SweepObserver, SweepSummary, TrialTiming
from hailo_sweep.sweep.orchestrate import Sweep
from hailo_sweep.sweep.storage import StaleTrialHandler, SweepStorage, open_storage, remove_dead_scratch

__all__ = [
    "Budget", "NullObserver", "Objective", "StaleTrialHandler", "Sweep", "SweepIds", "SweepObserver", "SweepStorage",
    "SweepSummary", "TrialTiming", "budget_used", "check_metric", "chosen_trial", "metric_key", "objective_of",
    "open_storage", "remove_dead_scratch",
]
