"""How long do `qopt study status` and `qopt study best` take on a big study?

Builds a study of N trials (default 5,000) of the stories260K full-genome space
(each draws its genes at random: about 300 parameters), completed with random
(KL, bpw) instead of measurements, on SQLite and (if reachable) PostgreSQL, then
times, in one process:

- `status` and `best` (targeted queries: values and a few attributes, then one
  trial's parameters);
- Optuna's `study.get_trials()` (what status read before: every parameter of
  every trial), for the ratio.

    python scripts/bench_queries.py [--trials 5000] [--postgres URL]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import optuna
import sqlalchemy

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qopt import study as qstudy  # noqa: E402
from qopt.storage import connect  # noqa: E402

ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets"


def build(url: str, name: str, n_trials: int) -> int:
    """A qopt study with `n_trials` completed trials; returns parameters per trial.

    One trial draws its genes through Optuna; the others are copies of its rows with
    random (KL, bpw), inserted in bulk on Optuna's schema (asking 5,000 trials one by
    one would take most of an hour)."""
    from optuna.storages._rdb import models

    from qopt.model import load_skeleton
    from qopt.space import SearchSpace

    config = qstudy.StudyConfig(
        model=str(ASSETS / "models" / "stories260K" / "hf"), data=str(ASSETS / "data" / "tinystories" / "x.txt"),
        budget_bpw=4.0, baselines=(),
    )  # fmt: skip
    storage = connect(url, create=True)
    space = SearchSpace(load_skeleton(config.model).units, config.search)
    study = optuna.create_study(
        study_name=name, storage=storage, directions=["minimize", "minimize"], sampler=optuna.samplers.RandomSampler(0)
    )
    study.set_user_attr("qopt:config", config.to_dict())
    template = study.ask()
    space.sample(template)
    template.set_user_attr("bpw", 3.0)
    study.tell(template, [0.5, 3.0])
    rng = np.random.default_rng(0)
    kinds = (models.TrialModel, models.TrialParamModel, models.TrialValueModel, models.TrialUserAttributeModel)
    tables = {m.__tablename__: m.__table__ for m in kinds}
    with storage.engine.begin() as db:
        trials, params = tables["trials"], tables["trial_params"]
        first = db.execute(sqlalchemy.select(sqlalchemy.func.max(trials.c.trial_id))).scalar() + 1
        row = db.execute(sqlalchemy.select(trials).where(trials.c.trial_id == first - 1)).mappings().one()
        gene_rows = db.execute(sqlalchemy.select(params).where(params.c.trial_id == first - 1)).mappings().all()
        ids = range(first, first + n_trials - 1)
        db.execute(trials.insert(), [{**row, "trial_id": i, "number": i - first + 1} for i in ids])
        if db.dialect.name == "postgresql":  # explicit ids do not move the sequence later inserts draw from
            db.execute(sqlalchemy.text("SELECT setval(pg_get_serial_sequence('trials', 'trial_id'), :last)"),
                       {"last": first + n_trials - 2})  # fmt: skip
        db.execute(
            params.insert(),
            [{**{k: v for k, v in g.items() if k != "param_id"}, "trial_id": i} for i in ids for g in gene_rows],
        )
        kl, bpw = rng.random(len(ids)), 2 + 3 * rng.random(len(ids))
        db.execute(
            tables["trial_values"].insert(),
            [{"trial_id": i, "objective": k, "value": float(v[n]), "value_type": "FINITE"}
             for n, i in enumerate(ids) for k, v in enumerate((kl, bpw))],
        )  # fmt: skip
        db.execute(
            tables["trial_user_attributes"].insert(),
            [{"trial_id": i, "key": "bpw", "value_json": repr(float(bpw[n]))} for n, i in enumerate(ids)],
        )
    return len(gene_rows)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=5000)
    parser.add_argument("--postgres", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        urls = {"SQLite": f"sqlite:///{tmp}/bench.db"}
        try:
            with sqlalchemy.create_engine(args.postgres).connect():
                urls["PostgreSQL"] = args.postgres
        except Exception as exc:
            print(f"PostgreSQL skipped: {str(exc).splitlines()[0]}")
        print(f"{'storage':<12}{'build s':>9}{'status s':>10}{'best s':>8}{'get_trials s':>14}{'ratio':>8}")
        for kind, url in urls.items():
            name = f"bench-{uuid.uuid4().hex[:8]}"
            start = time.perf_counter()
            n_params = build(url, name, args.trials)
            build_s = time.perf_counter() - start
            status_s = timed(lambda n=name, u=url: qstudy.status(n, u))
            best_s = timed(lambda n=name, u=url: qstudy.best(n, 3.0, u))
            full_s = timed(lambda n=name, u=url: optuna.load_study(study_name=n, storage=u).get_trials(deepcopy=False))
            print(f"{kind} study: {args.trials} trials x {n_params} parameters")
            print(f"{kind:<12}{build_s:>9.1f}{status_s:>10.2f}{best_s:>8.2f}{full_s:>14.2f}{full_s / status_s:>7.0f}x")
            if kind == "PostgreSQL":
                optuna.delete_study(study_name=name, storage=url)


if __name__ == "__main__":
    main()
