"""The H1 experiment: do strategies found by search beat human-designed schemes at equal
true bits per weight?

On one model and one text (default: the demo study's, stories260K on TinyStories):
1. every baseline — RTN, GPTQ, AWQ, HQQ; symmetric and asymmetric; per-channel and
   the group sizes the model allows; abs-max and MSE-searched scales; with and
   without a Hadamard rotation — at 2, 3, 4 and 8 bits;
2. the sensitivity-based allocator (`qopt.allocate`, per-layer KL on all search
   windows) at each budget: the strongest non-search competitor;
3. qopt's search with the full genome, and as an ablation the bits-only genome
   (per-layer bit-width over fixed GPTQ rounding: the EvoPress-style space), each
   with 3 seeds and the same trial budget, budget 4.25 bpw, both starting from the
   same GPTQ base config, no seeds;
4. the product as shipped: the config's own study (`studies/stories260k.yaml`:
   human schemes and the allocator as seeds, refinement at 3.25 and 4.25 bpw),
   3 seeds, the config's trial count; its answer at a budget is what `qopt study
   best` returns (the 5 best by search KL, re-ranked on the validation part);
5. every front member and every baseline measured on the evaluation part (text
   no search saw);
6. for budgets 2.5, 3.0, 3.25 and 4.25 bpw: the best baseline and the best member
   of each search's front at or under the budget — each chosen without the
   held-out text, as a user would choose — and their held-out KL, perplexity and
   top-1 (searches: mean ± half the range over seeds, and every seed's KL).

With `--shipped-only` (for models where the full sweep costs CPU days) only step 4
runs, and the baselines and the allocator are the shipped study's own seed trials.

Writes `docs/results/<model>.md` and `docs/results/<model>-fronts.html` (plotly, the
library loaded from its CDN to keep the file small). Studies go to `runs/h1/`.

    python scripts/experiment_h1.py            # the committed run
    python scripts/experiment_h1.py --quick    # a smoke run: fewer trials, seeds and baselines
    python scripts/experiment_h1.py --config studies/smollm2-135m.yaml --name smollm2-135m-h1 \
        --shipped-only --budgets 3.3,4.3 --seeded-trials 60

Seeds of one run may go in parallel processes on the same database: beside a `--seeds 0` run,
`--seeds 1,2 --costs-from h1-seeded-0` (once seed 0 has stored its allocator costs), then
`--report-only --seeds 0,1,2` writes the report of all three (a `--costs-from` process measures only
its own answers on held-out text, not the seed trials again).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from pathlib import Path

import optuna
import plotly.graph_objects as go
import torch

from qopt import baselines as qbaselines
from qopt import study as qstudy
from qopt.allocate import allocate, measure_costs, menu
from qopt.data import load_text
from qopt.evaluate import Evaluator
from qopt.model import load_model
from qopt.strategy import LayerConfig
from qopt.study.allocation import COSTS_ATTR_PREFIX

ROOT = Path(__file__).resolve().parents[1]
BUDGETS = (2.5, 3.0, 3.25, 4.25)
SEARCHES = (
    ("bits-only", "bits-only search"),
    ("full", "full search, unseeded"),
    ("seeded", "seeded + refinement (the shipped config)"),
)
SEARCH_BUDGET = max(BUDGETS)
BASE = {"bits": 4, "granularity": "group", "group_size": 64, "symmetric": False, "rounding": "gptq"}


@dataclasses.dataclass(frozen=True)
class Point:
    """One measured strategy: where it came from, its bpw, search KL and held-out metrics."""

    source: str  # "baseline", "allocator", "bits-only", "full", "seeded"
    label: str
    seed: int | None
    bpw: float
    search_kl: float
    kl: float
    ppl: float
    top1: float
    fp_ppl: float = math.nan  # the unquantized model's perplexity on the same text, where recorded


def measure_baselines(config: qstudy.StudyConfig, quick: bool, budgets: tuple[float, ...]) -> list[Point]:
    """Every baseline scheme on both parts; group sizes are those the model's layers allow."""
    lm = load_model(config.model, device=config.device)
    evaluator = Evaluator.from_text(lm, load_text(config.data), config.eval)
    narrowest = min(u.in_features for u in lm.units if not u.is_embedding)
    groups = [g for g in (32, 64, 128) if g <= narrowest] + [None]  # None: per output channel
    methods, bits = (("rtn", "gptq"), (3, 4)) if quick else (("rtn", "gptq", "awq", "hqq"), (2, 3, 4, 8))
    chosen = [
        qbaselines.Scheme(method, b, group, symmetric, scale, rotate)
        for method in methods
        for b in bits
        for group in groups
        for symmetric in ((False,) if method == "hqq" else (False, True))
        for scale in qbaselines.SCHEME_SCALES
        for rotate in (False, True)
    ]
    costs = measure_costs(evaluator, menu(qbaselines.fitting_group_size(lm.units)))
    chosen += [qbaselines.Allocation(b, allocate(costs, b)) for b in budgets]
    points = []
    for result in qbaselines.run(evaluator, chosen):
        h = result.held_out
        source = "allocator" if isinstance(result.scheme, qbaselines.Allocation) else "baseline"
        points.append(Point(source, result.strategy.name, None, h.bpw, result.search.kl, h.kl, h.ppl, h.top1))
    return points


def search_config(base: qstudy.StudyConfig, families: tuple[str, ...], seed: int, genes: dict) -> qstudy.StudyConfig:
    search = dataclasses.replace(base.search, families=families, base=LayerConfig.from_dict(genes, where="--base"))
    return dataclasses.replace(base, budget_bpw=SEARCH_BUDGET, seed=seed, baselines=(), search=search)


def fresh_launch(config: qstudy.StudyConfig, name: str, url: str, trials: int, costs_from: str | None = None) -> float:
    """Create study `name` afresh (a rerun starts clean) and run `trials`; returns the seconds taken.

    `costs_from` names a study of the same model and data whose stored allocator costs are
    copied in first: they do not depend on the sampler seed, so later seeds skip measuring them.
    """
    try:
        optuna.delete_study(study_name=name, storage=url)
    except KeyError:
        pass
    qstudy.create(name, config, url)
    if costs_from is not None:
        source = optuna.load_study(study_name=costs_from, storage=url).user_attrs
        target = optuna.load_study(study_name=name, storage=url)
        for key, value in source.items():
            if key.startswith(COSTS_ATTR_PREFIX):
                target.set_user_attr(key, value)
    start = time.perf_counter()
    qstudy.launch(name, n_trials=trials, url=url, progress=True)
    return time.perf_counter() - start


def run_search(config: qstudy.StudyConfig, name: str, url: str, trials: int, source: str) -> list[Point]:
    """Create and run one study; measure its feasible front on the evaluation part."""
    seconds = fresh_launch(config, name, url, trials)
    members = qstudy.front(name, url, with_baselines=False)
    print(f"  {name}: {trials} trials in {seconds:.0f} s, {len(members)} on the front")
    return [
        Point(source, f"trial {m.trial}", config.seed, m.bpw, m.search_kl, m.eval_kl, m.eval_ppl, m.eval_top1)
        for m in members
    ]


def run_seeded(
    config: qstudy.StudyConfig,
    name: str,
    url: str,
    trials: int,
    budgets: tuple[float, ...],
    with_seeds: bool = False,
    costs_from: str | None = None,
    launch: bool = True,
) -> list[Point]:
    """The shipped study config at one seed; per budget, the point `qopt study best` returns.
    With `with_seeds`, also its seed trials (human schemes and allocator) as baseline points.
    With `launch=False` the study already holds its trials: only the points are read (held-out
    metrics the run stored are reused, so a rebuilt report matches the run's)."""
    if launch:
        seconds = fresh_launch(config, name, url, trials, costs_from)
        print(f"  {name}: {trials} trials in {seconds:.0f} s")
    study, _ = qstudy.load(name, url)
    measured = qstudy.PartMetrics(study, config, "eval")
    points = []
    if with_seeds:
        for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
            label = trial.user_attrs.get("baseline")
            if label is None:
                continue
            h = measured(trial)
            source = "allocator" if label.startswith("Allocator") else "baseline"
            points.append(_trial_point(source, label, None, trial, h))
    for budget in budgets:
        try:
            trial, _ = qstudy.best(name, budget, url, candidates=5)
        except Exception:  # noqa: BLE001 - nothing under this budget
            continue
        h = measured(trial)
        label = f"trial {trial.number} (≤ {budget})"
        points.append(_trial_point("seeded", label, config.seed, trial, h))
    return points


def _trial_point(source: str, label: str, seed: int | None, trial: optuna.trial.FrozenTrial, held_out: dict) -> Point:
    """A study trial as a Point; `held_out` is its `qstudy.PartMetrics` dict on the evaluation part."""
    h = held_out
    bpw, search_kl = trial.user_attrs["bpw"], trial.values[0]
    return Point(source, label, seed, bpw, search_kl, h["kl"], h["ppl"], h["top1"], h.get("fp_ppl", math.nan))


def best_under(points: list[Point], budget: float) -> Point | None:
    """The point with the lowest search-part KL at or under `budget` bpw."""
    fitting = [p for p in points if p.bpw <= budget + 1e-9]
    return min(fitting, key=lambda p: p.search_kl) if fitting else None


def _spread(values: list[float]) -> str:
    mean = statistics.fmean(values)
    return f"{mean:.4g} ± {(max(values) - min(values)) / 2:.2g}" if len(values) > 1 else f"{mean:.4g}"


def _took(minutes: float | None) -> str:
    if minutes is None:
        return "this report rebuilt from the run's stored studies (`--report-only`)"
    return f"{minutes:.0f} min on {torch.get_num_threads()} CPU threads"


def report(
    model: str,
    points: list[Point],
    seeds: list[int],
    trials: int | None,
    minutes: float | None,
    command: str,
    genes: dict,
    config: str,
    budgets: tuple[float, ...],
    shipped_trials: int,
) -> str:
    targets = " and ".join(f"{b:g}" for b in budgets)
    shipped = (
        f"The shipped config (`{config}`, {shipped_trials} trials per seed, seeds {seeds}) seeds its study with "
        f"human schemes and the allocator and refines at {targets} bpw; its row is what `qopt study best "
        "--max-bpw B` returns (the 5 best by search KL, re-ranked on the validation part)."
    )
    if trials is None:
        setup = (
            f"{shipped} The baseline and allocator rows are that study's seed trials (the allocator as the config "
            "describes it); the best baseline at a budget is the one with the least search KL, as a user would choose."
        )
    else:
        setup = (
            f"Unseeded searches: {trials} trials each, seeds {seeds}, budget {SEARCH_BUDGET} bpw, base config "
            f"`{genes}`, no human scheme as a seed; the bits-only space searches only per-layer bit-widths over "
            f"that base (the EvoPress-style ablation). {shipped} The allocator chooses per layer among bits 2-8 x "
            "{per-channel sym, g64 asym} x {RTN, GPTQ} by per-layer KL on all search windows."
        )
    lines = [
        f"# H1 on {model}: searched strategies vs human-designed schemes",
        "",
        f"`{command}` — {_took(minutes)}. {setup} All metrics below "
        "are on the evaluation part, which no search, no allocator and no calibration saw.",
        "",
    ]
    for budget in budgets:
        lines += [
            f"## ≤ {budget} bpw",
            "",
            "| strategy | bpw | eval KL (nats/token) | eval perplexity | eval top-1 "
            "| eval KL / perplexity (search KL), each seed |",
            "|---|---:|---:|---:|---:|---|",
        ]
        fp_ppl = next((p.fp_ppl for p in points if not math.isnan(p.fp_ppl)), None)
        if fp_ppl is not None:
            lines.append(f"| unquantized | 16 | 0 | {fp_ppl:.3f} | 100% | |")
        base = best_under([p for p in points if p.source == "baseline"], budget)
        if base is not None:
            b = base
            lines.append(
                f"| best baseline: {b.label} | {b.bpw:.3f} | {b.kl:.4f} | {b.ppl:.3f} | {b.top1:.1%} "
                f"| {b.kl:.4f} / {b.ppl:.2f} ({b.search_kl:.4f}) |"
            )
        name = f"Allocator {budget:g} bpw"
        a = next((p for p in points if p.source == "allocator" and p.label == name), None)
        if a is not None:
            lines.append(
                f"| allocator | {a.bpw:.3f} | {a.kl:.4f} | {a.ppl:.3f} | {a.top1:.1%} "
                f"| {a.kl:.4f} / {a.ppl:.2f} ({a.search_kl:.4f}) |"
            )
        for source, title in SEARCHES:
            if trials is None and source != "seeded":
                continue
            if source == "seeded":
                chosen = [
                    next(
                        (p for p in points if p.source == source and p.seed == s and p.label.endswith(f"(≤ {budget})")),
                        None,
                    )
                    for s in seeds
                ]
            else:
                chosen = [best_under([p for p in points if p.source == source and p.seed == s], budget) for s in seeds]
            found = [p for p in chosen if p is not None]
            if not found:
                lines.append(f"| {title} | – | none under the budget | | | |")
                continue
            lines.append(
                f"| {title} ({len(found)} of {len(seeds)} seeds) | {_spread([p.bpw for p in found])} | "
                f"{_spread([p.kl for p in found])} | {_spread([p.ppl for p in found])} | "
                f"{_spread([100 * p.top1 for p in found])}% | "
                f"{', '.join(f'{p.kl:.4f} / {p.ppl:.2f} ({p.search_kl:.4f})' for p in found)} |"
            )
        lines.append("")
    lines += ["## All baselines", "", "| scheme | bpw | search KL | eval KL | eval ppl | eval top-1 |"]
    lines.append("|---|---:|---:|---:|---:|---:|")
    for p in sorted((p for p in points if p.source == "baseline"), key=lambda p: (p.bpw, p.kl)):
        lines.append(f"| {p.label} | {p.bpw:.3f} | {p.search_kl:.4f} | {p.kl:.4f} | {p.ppl:.3f} | {p.top1:.1%} |")
    return "\n".join(lines) + "\n"


def figure(model: str, points: list[Point], budgets: tuple[float, ...]) -> go.Figure:
    fig = go.Figure()
    colors = {"bits-only": "#2ca02c", "full": "#1f77b4", "seeded": "#9467bd"}
    for source in ("bits-only", "full", "seeded"):
        for seed in sorted({p.seed for p in points if p.source == source}):
            front = sorted((p for p in points if p.source == source and p.seed == seed), key=lambda p: p.bpw)
            fig.add_trace(
                go.Scatter(
                    x=[p.bpw for p in front],
                    y=[p.kl for p in front],
                    mode="lines+markers",
                    line_shape="hv",
                    name=f"{source} search, seed {seed}",
                    marker=dict(color=colors[source]),
                    text=[p.label for p in front],
                )
            )
    allocated = sorted((p for p in points if p.source == "allocator"), key=lambda p: p.bpw)
    _markers(fig, allocated, "allocator", "#ff7f0e", "square")
    _markers(
        fig, [p for p in points if p.source == "baseline"], "baselines (RTN, GPTQ, AWQ, HQQ)", "#d62728", "diamond"
    )
    for budget in budgets:
        fig.add_vline(x=budget, line_dash="dot", line_color="#999")
    fig.update_layout(
        title=f"H1 on {model}: fronts and baselines, evaluation part",
        xaxis_title="true bits per weight (block linear layers)",
        yaxis_title="KL to the unquantized model (nats/token), held out",
        yaxis_type="log",
        xaxis_range=[2.0, 9.0],
        template="plotly_white",
        height=650,
    )
    return fig


def _markers(fig: go.Figure, points: list[Point], name: str, color: str, symbol: str) -> None:
    fig.add_trace(
        go.Scatter(
            x=[p.bpw for p in points],
            y=[p.kl for p in points],
            mode="markers",
            name=name,
            marker=dict(color=color, symbol=symbol, size=9),
            text=[p.label for p in points],
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "studies" / "stories260k.yaml"), help="model, data, settings")
    parser.add_argument("--trials", type=int, default=None, help="trials per search (default 800; quick 80)")
    parser.add_argument(
        "--seeded-trials",
        type=int,
        default=None,
        help="trials of each shipped-config study (default 450, as make demo)",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 80 trials, 2 seeds, RTN/GPTQ at 3-4 bits")
    parser.add_argument("--name", default="stories260k", help="report name under docs/results/")
    parser.add_argument(
        "--budgets", default=",".join(f"{b:g}" for b in BUDGETS), help="comma-separated bpw budgets to report"
    )
    parser.add_argument(
        "--shipped-only",
        action="store_true",
        help="only the shipped config's studies; baselines and allocator are their seed trials",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="with --shipped-only: rebuild the report from the studies a finished run left in runs/h1/",
    )
    parser.add_argument("--seeds", default=None, help="comma-separated sampler seeds (default 0,1,2; quick 0,1)")
    parser.add_argument(
        "--costs-from",
        default=None,
        help="with --shipped-only: a study in the same database (e.g. h1-seeded-0 of a run still going) whose "
        "allocator costs the first seed copies instead of measuring them",
    )
    parser.add_argument(
        "--base",
        default="{}",
        help='JSON genes over the default base (4-bit GPTQ g64 asym), e.g. \'{"granularity": "channel"}\'',
    )
    args = parser.parse_args()
    if args.report_only and not args.shipped_only:
        parser.error("--report-only rebuilds --shipped-only runs only")
    genes = {**BASE, **json.loads(args.base)}
    if genes.get("granularity") != "group":
        genes.pop("group_size", None)
    started = time.perf_counter()
    base = qstudy.StudyConfig.load(args.config)
    trials = args.trials or (80 if args.quick else 800)
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else ([0, 1] if args.quick else [0, 1, 2])
    budgets = tuple(float(b) for b in args.budgets.split(","))
    runs = ROOT / "runs" / "h1"
    runs.mkdir(parents=True, exist_ok=True)
    database = f"{args.name}-quick.db" if args.quick else f"{args.name}.db"
    url = f"sqlite:///{runs / database}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    points: list[Point] = []
    if not args.shipped_only:
        print("baselines")
        points = measure_baselines(base, args.quick, budgets)
        print(f"  {len(points)} schemes measured")
        for families, source in (
            (("bits",), "bits-only"),
            (("bits", "scaling", "format", "outliers", "rounding", "arithmetic"), "full"),
        ):
            for seed in seeds:
                config = search_config(base, families, seed, genes)
                points += run_search(config, f"h1-{source}-{seed}", url, trials, source)
    shipped = args.seeded_trials or (80 if args.quick else 450)
    for i, seed in enumerate(seeds):
        config = dataclasses.replace(base, seed=seed)
        # Seed trials are the same strategies in every seed's study: the first seed's measure them, and a
        # process beside another (--costs-from) leaves them to that one's report (or to --report-only).
        with_seeds = args.shipped_only and i == 0 and args.costs_from is None
        costs_from = f"h1-seeded-{seeds[0]}" if i else args.costs_from
        points += run_seeded(
            config, f"h1-seeded-{seed}", url, shipped, budgets, with_seeds, costs_from, launch=not args.report_only
        )

    out = ROOT / "docs" / "results"
    out.mkdir(parents=True, exist_ok=True)
    name = f"{args.name}-quick" if args.quick else args.name
    minutes = None if args.report_only else (time.perf_counter() - started) / 60
    command = " ".join(["python scripts/experiment_h1.py", *(a for a in sys.argv[1:] if a != "--report-only")])
    model = base.model.rstrip("/").split("/")[-2]
    searched = None if args.shipped_only else trials
    text = report(model, points, seeds, searched, minutes, command, genes, args.config, budgets, shipped)
    (out / f"{name}.md").write_text(text)
    figure(name, points, budgets).write_html(out / f"{name}-fronts.html", include_plotlyjs="cdn")
    print(f"wrote {out / f'{name}.md'} and {out / f'{name}-fronts.html'} ({_took(minutes)})")


if __name__ == "__main__":
    main()
