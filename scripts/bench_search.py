"""How many strategies a worker judges per minute, with and without qopt's fast paths.

"Fast" is everything issue #6 added: parameters written in one transaction
per trial, quantized weights cached per (layer, config), calibration
statistics cached on disk, and multi-fidelity screening (a trial stops after
its first batch when a trial of no more bpw was `screen_margin` times better
there). "Plain" turns all of them off: the code as it was before. Both modes
run in this one process, one after the other, on fresh SQLite studies with
the same config and seed, so the ratios compare like with like.

stories260K (the demo study, `studies/stories260k.yaml`): each mode runs for
`--seconds`; printed are trials judged per minute, how many reached full
fidelity, and the time until a searched strategy at <= 3.25 bpw first beats
the best uniform baseline the study seeds (on search-part KL, the objective).
From the plain run, which measures every trial in full, it also prints how
well first-batch KL predicts full KL (the evidence for the screening margin).

OPT-125m-shaped (random weights, the same study settings but population 8
and 4 windows of 256 tokens): seconds per trial for `--opt-trials` trials per
mode (generation 0 is 8 random strategies; the children after it share most
layers with their parents, which is where the weight cache pays).

    python scripts/bench_search.py                 # 120 s per mode, 24 OPT trials per mode
    python scripts/bench_search.py --quick         # 40 s per mode, 8 OPT trials per mode
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import optuna
import torch
import transformers
from optuna.trial import TrialState

from qopt import study as qstudy
from qopt.storage import connect

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT.parent / "shared" / "assets"
STORIES = ASSETS / "models" / "stories260K" / "hf"
BUDGET = 3.25


@dataclasses.dataclass
class RunResult:
    mode: str
    seconds: float
    trials: list[optuna.trial.FrozenTrial]
    setup_seconds: float

    @property
    def judged(self) -> list[optuna.trial.FrozenTrial]:
        return [t for t in self.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]

    def per_minute(self) -> float:
        return 60 * len(self.searched) / self.seconds

    @property
    def searched(self) -> list[optuna.trial.FrozenTrial]:
        return [t for t in self.judged if "baseline" not in t.user_attrs]

    def count(self, state: TrialState) -> int:
        return sum(t.state == state for t in self.searched)

    def screened(self) -> int:
        return sum("screened out" in t.user_attrs.get("rejected", "") for t in self.searched)


def _configure(config: qstudy.StudyConfig, fast: bool) -> qstudy.StudyConfig:
    if fast:
        return config
    plain_eval = dataclasses.replace(config.eval, weight_cache_mib=0, calibration_cache=False)
    return dataclasses.replace(config, eval=plain_eval, screen_margin=0)


def run_mode(config: qstudy.StudyConfig, fast: bool, folder: Path, seconds=None, n_trials=None) -> RunResult:
    """Create a study, measure its baselines, then search for `seconds` (or `n_trials`)."""
    config = _configure(config, fast)
    mode = "fast" if fast else "plain"
    url = f"sqlite:///{folder / f'{mode}-{time.monotonic_ns()}.db'}"
    qstudy.create("bench", config, url)
    storage = connect(url, batched=fast)
    start = time.perf_counter()
    run = qstudy.SearchRun(config)  # model, data, reference log-probs on first use
    study = optuna.load_study(study_name="bench", storage=storage, sampler=run.sampler(0))
    n_baselines = len(study.trials)
    study.optimize(run.objective, n_trials=n_baselines)  # baselines (and calibration) first, not timed
    setup = time.perf_counter() - start
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    begin = time.perf_counter()
    study.optimize(run.objective, n_trials=n_trials, timeout=seconds)
    elapsed = time.perf_counter() - begin
    return RunResult(mode, elapsed, study.get_trials(), setup)


def time_to_beat(result: RunResult) -> str:
    """Seconds of search until a searched trial at <= BUDGET bpw has lower search KL than
    every baseline at <= BUDGET bpw."""
    baselines = [t for t in result.trials if "baseline" in t.user_attrs and t.state == TrialState.COMPLETE]
    fitting = [t for t in baselines if t.user_attrs["bpw"] <= BUDGET]
    best = min(fitting, key=lambda t: t.values[0])
    start = min(t.datetime_start for t in result.searched)
    for t in sorted(result.searched, key=lambda t: t.datetime_complete):
        if t.state == TrialState.COMPLETE and t.user_attrs["bpw"] <= BUDGET and t.values[0] < best.values[0]:
            seconds = (t.datetime_complete - start).total_seconds()
            return (
                f"{seconds:.1f} s (trial {t.number}: KL {t.values[0]:.4f} at {t.user_attrs['bpw']:.3f} bpw "
                f"vs {best.user_attrs['baseline']}: {best.values[0]:.4f} at {best.user_attrs['bpw']:.3f})"
            )
    return f"not within {result.seconds:.0f} s (best baseline {best.user_attrs['baseline']}: KL {best.values[0]:.4f})"


def screening_evidence(plain: RunResult, margin: float) -> None:
    """How first-batch KL tracks full KL over the plain run's trials (each measured in full)."""
    done = [t for t in plain.judged if t.state == TrialState.COMPLETE and "screen_kl" in t.user_attrs]
    screen = np.array([t.user_attrs["screen_kl"] for t in done])
    full = np.array([t.values[0] for t in done])
    bpw = np.array([t.user_attrs["bpw"] for t in done])
    ranks = [np.argsort(np.argsort(x)) for x in (screen, full)]
    rho = np.corrcoef(*ranks)[0, 1]
    wrong = would = 0
    for i, t in enumerate(done):  # the screen as it would have run: against trials finished before this one
        earlier = [j for j, r in enumerate(done) if r.datetime_complete < t.datetime_start and bpw[j] <= bpw[i]]
        if earlier and screen[i] > margin * min(screen[j] for j in earlier):
            would += 1
            wrong += not any(full[j] <= full[i] for j in earlier)
    ratio = np.percentile(full / screen, [10, 50, 90])
    print(
        f"  first-batch KL vs full KL over {len(done)} fully measured trials: Spearman {rho:.3f}; "
        f"full/first ratio p10/p50/p90 {ratio[0]:.3f}/{ratio[1]:.3f}/{ratio[2]:.3f}"
    )
    print(
        f"  a {margin:g}x screen would have stopped {would} of them; {wrong} of those were not dominated at full"
        " fidelity by an earlier trial of no more bpw"
    )


def bench_stories(folder: Path, seconds: float) -> None:
    config = qstudy.StudyConfig.load(ROOT / "studies" / "stories260k.yaml")
    print(
        f"stories260K, studies/stories260k.yaml, {seconds:.0f} s of search per mode, {torch.get_num_threads()} threads"
    )
    results = {fast: run_mode(config, fast, folder, seconds=seconds) for fast in (False, True)}
    header = f"{'mode':<6}{'setup s':>9}{'judged':>8}{'full':>6}{'screened':>9}{'collapsed':>10}{'trials/min':>12}"
    print(f"  {header}{'full/min':>10}")
    for r in results.values():
        collapsed = r.count(TrialState.PRUNED) - r.screened()
        full_rate = r.count(TrialState.COMPLETE) / r.seconds * 60
        print(
            f"  {r.mode:<6}{r.setup_seconds:>9.1f}{len(r.searched):>8}{r.count(TrialState.COMPLETE):>6}"
            f"{r.screened():>9}{collapsed:>10}{r.per_minute():>12.1f}{full_rate:>10.1f}"
        )
    plain, fast = results[False], results[True]
    print(f"  trials judged per minute, fast / plain: {fast.per_minute() / plain.per_minute():.2f}x")
    full_rate = [r.count(TrialState.COMPLETE) / r.seconds * 60 for r in (plain, fast)]
    print(f"  full-fidelity trials per minute, fast / plain: {full_rate[1] / full_rate[0]:.2f}x")
    for r in (plain, fast):
        print(f"  time to beat the best uniform baseline at <= {BUDGET} bpw, {r.mode}: {time_to_beat(r)}")
    screening_evidence(plain, config.screen_margin)


def opt125m_dir(folder: Path) -> Path:
    """OPT-125m's shapes with random weights, saved like a hub model (stories260K's tokenizer)."""
    config = transformers.OPTConfig(
        vocab_size=50272, hidden_size=768, ffn_dim=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=2048, word_embed_proj_dim=768,
    )  # fmt: skip
    torch.manual_seed(0)
    path = folder / "opt-125m-shaped"
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    transformers.AutoTokenizer.from_pretrained(STORIES).save_pretrained(path)
    return path


def bench_opt(folder: Path, n_trials: int) -> None:
    stories = qstudy.StudyConfig.load(ROOT / "studies" / "stories260k.yaml")
    config = dataclasses.replace(
        stories,
        model=str(opt125m_dir(folder)),
        budget_bpw=None,
        population=8,  # so that children (which share most layers with a parent) come within the trials
        search=dataclasses.replace(stories.search, group_sizes=(32, 64, 128)),
        eval=dataclasses.replace(stories.eval, seq_len=256, search_windows=4, calib_windows=4, batch_size=2),
    )
    print(f"\nOPT-125m-shaped (random weights), population 8, 4 windows x 256 tokens, {n_trials} trials per mode")
    results = [run_mode(config, fast, folder, n_trials=n_trials) for fast in (False, True)]
    for r in results:
        per_trial = r.seconds / max(1, len(r.searched))
        quantize = [t.user_attrs["seconds"] for t in r.searched if "seconds" in t.user_attrs]
        print(
            f"  {r.mode:<6} setup {r.setup_seconds:6.1f} s   {per_trial:6.2f} s/trial over {len(r.searched)} trials"
            f" ({r.count(TrialState.COMPLETE)} full, {r.screened()} screened); evaluate() median "
            f"{np.median(quantize) if quantize else float('nan'):.2f} s"
        )
    plain, fast = results
    ratio = (plain.seconds / len(plain.searched)) / (fast.seconds / len(fast.searched))
    print(f"  seconds per trial, plain / fast: {ratio:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=120, help="search time per mode on stories260K")
    parser.add_argument("--opt-trials", type=int, default=24, help="trials per mode on the OPT-125m-shaped model")
    parser.add_argument("--quick", action="store_true", help="40 s per mode and 8 OPT trials")
    parser.add_argument("--skip-opt", action="store_true", help="stories260K only")
    args = parser.parse_args()
    if not STORIES.is_dir():
        sys.exit(f"shared model not found at {STORIES}")
    seconds, opt_trials = (40, 8) if args.quick else (args.seconds, args.opt_trials)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["QOPT_CACHE_DIR"] = str(Path(tmp) / "cache")  # a cold calibration cache for each run
        bench_stories(Path(tmp), seconds)
        if not args.skip_opt:
            bench_opt(Path(tmp), opt_trials)


if __name__ == "__main__":
    main()
