"""Seconds the allocator's Hessian proxy costs per layer, for a study's menu and the full one.

The "hessian" proxy (`qopt.allocate.measure_costs`) quantizes every block linear
layer in every config of its menu, measures each config's output error, and
scales them into KL by one single-layer KL evaluation. This script times that
work on the linear layers of one transformer block of the config's model, with
the config's calibration and search windows, in one run:

- for each allocator entry's menu in the config (e.g. GPTQ/RTN with MSE scales and
  rotation, 25 configs) and for the full menu (`qopt.allocate.menu`'s default,
  97 configs): seconds to quantize the layer in every config and measure its
  output error; GPTQ's inverse-Hessian factors are reused across a menu's configs
  and across layers that share an input (q/k/v, gate/up), as in the allocator;
- seconds of the one single-layer KL evaluation (the anchor config; the same for every menu);
- the estimate for the whole model: the block's total times the number of blocks
  (every block has the same shapes).

    python scripts/bench_allocator.py                                  # SmolLM2-135M, the middle block
    python scripts/bench_allocator.py --config studies/stories260k.yaml --block 0
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qopt.allocate import anchor, layer_output_errors  # noqa: E402
from qopt.space import block_index  # noqa: E402
from qopt.strategy import EDGE_ROLES, LayerConfig, Strategy  # noqa: E402
from qopt.study import StudyConfig  # noqa: E402
from qopt.study.allocation import space_menu  # noqa: E402
from qopt.study.config import allocator_seeds  # noqa: E402
from qopt.study.objective import SearchRun  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def menu_seconds(run: SearchRun, units, configs: list[LayerConfig]) -> list[float]:
    """Per unit: seconds to quantize it in every config of `configs` and measure the output errors."""
    stats = run.evaluator.quantizer.activation_stats(hessians=True)
    seconds = []
    for unit in units:
        start = time.perf_counter()
        layer_output_errors(unit.name, unit.read_weight().float(), configs, stats)
        seconds.append(time.perf_counter() - start)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "studies" / "smollm2-135m.yaml"))
    parser.add_argument("--block", type=int, default=None, help="transformer block index (default: the middle one)")
    args = parser.parse_args()

    config = StudyConfig.load(args.config)
    run = SearchRun(config)
    units = [u for u in run.lm.units if u.role not in EDGE_ROLES]
    blocks = sorted({block_index(u.name) for u in units} - {None})
    block = blocks[len(blocks) // 2] if args.block is None else args.block
    chosen = [u for u in units if block_index(u.name) == block]
    if not chosen:
        raise SystemExit(f"no block {block}: the model has blocks {blocks[0]}..{blocks[-1]}")

    start = time.perf_counter()
    run.evaluator.quantizer.activation_stats(hessians=True)
    calibration_s = time.perf_counter() - start

    menus: dict[str, list[LayerConfig]] = {}
    for seed in allocator_seeds(config):  # the config's own menus first, each once
        configs = space_menu(run.space, **seed.menu_options)
        if configs not in menus.values():
            menus["+".join((*seed.scales, *seed.outliers))] = configs
    full = space_menu(run.space)
    menus = {n: c for n, c in menus.items() if c != full} | {"full": full}
    timings = {name: menu_seconds(run, chosen, configs) for name, configs in menus.items()}

    names = list(menus)
    windows = next((s.windows for s in allocator_seeds(config)), 2)
    pivot = menus[names[0]][anchor(menus[names[0]])]
    run.evaluator.evaluate(Strategy(layers={chosen[0].name: pivot}), "search", windows=windows)  # the reference
    kl_s = []
    for unit in chosen:
        start = time.perf_counter()
        run.evaluator.evaluate(Strategy(layers={unit.name: pivot}), "search", windows=windows)
        kl_s.append(time.perf_counter() - start)

    print(
        f"{Path(args.config).name}: block {block} of {len(blocks)}, {torch.get_num_threads()} torch threads; "
        f"calibration (every layer's Hessian) {calibration_s:.1f} s"
    )
    header = " | ".join(f"{n} ({len(menus[n]) - 1} configs) s" for n in names)
    print(f"| layer | shape | {header} | single-layer KL ({windows} windows) s |")
    print("|---|---|" + "---:|" * (len(names) + 1))
    for i, unit in enumerate(chosen):
        cells = " | ".join(f"{timings[n][i]:.2f}" for n in names)
        print(f"| {unit.name} | {unit.out_features}x{unit.in_features} | {cells} | {kl_s[i]:.2f} |")
    totals = {n: sum(timings[n]) + sum(kl_s) for n in names}
    print("block total, KL included: " + ", ".join(f"{n} {totals[n]:.1f} s" for n in names))
    print(
        f"whole model (x {len(blocks)} blocks): "
        + ", ".join(f"{n} {totals[n] * len(blocks) / 60:.1f} min" for n in names)
        + f"; full / {names[0]}: {totals['full'] / totals[names[0]]:.2f}x"
    )
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


if __name__ == "__main__":
    main()
