"""Studies: a search configuration stored with its trials in an Optuna storage.

    config.py     StudyConfig (what is searched, on which model and text), baselines
    create.py     create a study (baselines enqueued first), load it, add measured baselines
    objective.py  SearchRun: one worker's model, evaluator and space; the per-trial objective
    workers.py    launch: worker processes, heartbeats, signals, database retries
    allocation.py the allocator's strategies (`{allocate: B}` baselines) enqueued as seeds
    queries.py    PartMetrics (held-out/validation metrics, measured once), front, best under a bpw
                  (validation re-ranking), status, structure

`create` once, then `launch` any number of times on any number of machines
sharing the storage (SQLite by default, PostgreSQL for several machines).
"""

from qopt.study.config import StudyConfig, baseline_strategies
from qopt.study.create import add_baselines, completed, create, load
from qopt.study.objective import SCREENED, SearchRun
from qopt.study.queries import (
    Candidate,
    FrontMember,
    PartMetrics,
    best,
    front,
    non_dominated,
    shortlist,
    status,
    structure,
    trial_strategy,
)
from qopt.study.workers import LaunchCounts, check_launch, launch

__all__ = [
    "SCREENED",
    "Candidate",
    "FrontMember",
    "LaunchCounts",
    "PartMetrics",
    "SearchRun",
    "StudyConfig",
    "add_baselines",
    "baseline_strategies",
    "best",
    "check_launch",
    "completed",
    "create",
    "front",
    "launch",
    "load",
    "non_dominated",
    "shortlist",
    "status",
    "structure",
    "trial_strategy",
]
