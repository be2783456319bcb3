"""Trials per hour with 1 and 2 worker processes on one PostgreSQL study (stories260K).

Each run is a fresh study of studies/stories260k.yaml; the wall clock covers the whole
launch (workers start, load the model, run the trials), as a user would see it.

    python scripts/bench_workers.py                     # 100 trials per run
    python scripts/bench_workers.py --trials 60 --storage postgresql+psycopg://user@host/db
"""

from __future__ import annotations

import argparse
import os
import time
import uuid
from pathlib import Path

import optuna

from qopt import study as qstudy

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument(
        "--storage", default=os.environ.get("QOPT_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
    )
    args = parser.parse_args()
    config = qstudy.StudyConfig.load(ROOT / "studies" / "stories260k.yaml")
    rates = {}
    for workers in (1, 2):
        name = f"bench-workers-{workers}-{uuid.uuid4().hex[:6]}"
        qstudy.create(name, config, args.storage)
        start = time.perf_counter()
        qstudy.launch(name, n_trials=args.trials, url=args.storage, progress=False, workers=workers)
        seconds = time.perf_counter() - start
        finished = sum(t.state.is_finished() for t in optuna.load_study(study_name=name, storage=args.storage).trials)
        rates[workers] = finished / seconds * 3600
        print(f"{workers} worker(s): {finished} trials in {seconds:.1f} s = {rates[workers]:.0f} trials/hour")
        optuna.delete_study(study_name=name, storage=args.storage)
    print(f"ratio 2 workers / 1 worker: {rates[2] / rates[1]:.2f}x on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
