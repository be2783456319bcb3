"""Measure a ladder of uniform strategies on a model and print a Markdown table.

    python scripts/preset_table.py                      # stories260K on TinyStories, eval part
    python scripts/preset_table.py --model M --data F --group 128

Every row is measured on the evaluation part of the text (never seen by a search).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from qopt.data import load_text
from qopt.evaluate import EvalSettings, Evaluator
from qopt.model import load_model
from qopt.strategy import Strategy, uniform

ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets"


def ladder(group: int) -> list[Strategy]:
    g = dict(group_size=group)
    return [
        Strategy(name="fp16 (unquantized)"),
        uniform(8, **g),
        uniform(6, **g),
        uniform(5, **g),
        uniform(4, **g),
        uniform(4, symmetric=True, **g),
        uniform(4, granularity="channel"),
        uniform(4, group_size=group // 2),
        uniform(4, scale="mse", **g),
        uniform(4, outliers="topk", topk_fraction=0.01, **g),
        uniform(4, outliers="rotate", **g),
        uniform(4, format="nf4", **g),
        uniform(4, format="fp", **g),
        uniform(8, format="fp", **g),
        uniform(8, act_format="int", **g),
        uniform(4, accumulation="bf16", **g),
        uniform(3, **g),
        uniform(3, group_size=group // 2),
        uniform(3, outliers="topk", topk_fraction=0.01, **g),
        uniform(2, **g),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ASSETS / "models" / "stories260K" / "hf"))
    parser.add_argument("--data", default=str(ASSETS / "data" / "tinystories" / "validation_head.txt"))
    parser.add_argument("--group", type=int, default=64, help="group size of the grouped rows")
    parser.add_argument("--windows", type=int, default=64, help="evaluation windows")
    args = parser.parse_args()
    lm = load_model(args.model)
    evaluator = Evaluator.from_text(lm, load_text(args.data), EvalSettings(eval_windows=args.windows))
    print("| strategy | bpw | KL (nats/token) | perplexity | top-1 |")
    print("|---|---:|---:|---:|---:|")
    for strategy in ladder(args.group):
        m = evaluator.evaluate(strategy, "eval")
        print(f"| {strategy.name} | {m.bpw:.3f} | {m.kl:.4f} | {m.ppl:.3f} | {m.top1:.1%} |")
    print(f"\n{m.tokens} tokens of the evaluation part; unquantized perplexity {m.fp_ppl:.3f}.")


if __name__ == "__main__":
    main()
