"""Seconds each human-designed scheme takes to quantize a model, measured in one run.

For each model: the one-off calibration (input abs-maxes and Hessians of every
linear layer, from search-part windows), then each method's time to quantize
every weight once at 4 bits, as a median over repeats, and its ratio to
round-to-nearest's time in the same run. An unquantized forward pass over the
calibration windows is timed as a yardstick.

    python scripts/bench_baselines.py            # stories260K (real) + OPT-125m-shaped (random weights)
    python scripts/bench_baselines.py --quick    # stories260K only, one repeat
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from qopt.baselines import METHODS, Scheme
from qopt.calibration import collect_activation_stats
from qopt.data import load_text, tokenize
from qopt.model import LoadedModel, load_model
from qopt.quantizer import Quantizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_eval import opt125m_shaped  # noqa: E402

ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets"


def bench(lm: LoadedModel, windows: torch.Tensor, group_size: int, repeats: int) -> None:
    start = time.perf_counter()
    stats = collect_activation_stats(lm, windows, batch_size=4, hessians=True)
    calibrate = time.perf_counter() - start
    with torch.inference_mode():
        start = time.perf_counter()
        lm.model(input_ids=windows)
        forward = time.perf_counter() - start
    quantizer = Quantizer(lm, calibrate=lambda hessians: stats)
    print(f"\n{lm.name}: calibration on {windows.shape[0]} x {windows.shape[1]} tokens {calibrate:.2f} s "
          f"(a forward pass over them: {forward:.2f} s); {torch.get_num_threads()} threads")  # fmt: skip
    print(f"{'method':<13}{'scheme':<22}{'quantize s':>11}{'x RTN':>8}")
    rtn_seconds = None
    for method in METHODS:
        strategy = Scheme(method, 4, group_size).strategy()
        seconds = []
        for _ in range(repeats):
            seconds.append(quantizer.apply(strategy).seconds)
            quantizer.restore()
        median = statistics.median(seconds)
        rtn_seconds = rtn_seconds or median
        print(f"{method:<13}{strategy.name:<22}{median:>11.3f}{median / rtn_seconds:>8.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="stories260K only, one repeat")
    args = parser.parse_args()
    torch.manual_seed(0)
    stories = load_model(str(ASSETS / "models" / "stories260K" / "hf"), device="cpu")
    ids = tokenize(stories.tokenizer, load_text(str(ASSETS / "data" / "tinystories" / "validation_head.txt")))
    bench(stories, ids[: 8 * 512].view(8, 512), group_size=64, repeats=1 if args.quick else 3)
    if not args.quick:
        opt = opt125m_shaped()
        bench(opt, torch.randint(0, 50272, (8, 512)), group_size=128, repeats=1)


if __name__ == "__main__":
    main()
