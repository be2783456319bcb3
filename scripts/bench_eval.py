"""Forward-time overhead of fake quantization, measured as ratios within one run.

For each model: the unquantized forward time over a batch of windows, then for
each strategy the time to apply it (quantize every weight once) and its
forward time. Runs alternate fp / quantized and report medians, so machine
noise hits both sides of a ratio alike.

    python scripts/bench_eval.py            # stories260K + OPT-125m-shaped (random weights)
    python scripts/bench_eval.py --quick    # fewer repeats
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers

from qopt.model import LoadedModel, load_model, wrap_model
from qopt.quantizer import Quantizer
from qopt.strategy import Strategy, uniform

ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets"


def opt125m_shaped() -> LoadedModel:
    """OPT-125m's shapes (hidden 768, 12 layers, FFN 3072, vocab 50272), random weights."""
    config = transformers.OPTConfig(
        vocab_size=50272, hidden_size=768, ffn_dim=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=2048, word_embed_proj_dim=768,
    )  # fmt: skip
    torch.manual_seed(0)
    return wrap_model(transformers.AutoModelForCausalLM.from_config(config), tokenizer=None, name="opt-125m-shaped")


def _forward_seconds(lm: LoadedModel, ids: torch.Tensor) -> float:
    with torch.inference_mode():
        start = time.perf_counter()
        lm.model(input_ids=ids)
        return time.perf_counter() - start


def bench(lm: LoadedModel, strategies: dict[str, Strategy], ids: torch.Tensor, repeats: int) -> None:
    quantizer = Quantizer(lm)
    _forward_seconds(lm, ids)  # warm-up
    print(f"\n{lm.name}: {ids.shape[0]} windows x {ids.shape[1]} tokens, {torch.get_num_threads()} threads")
    print(f"{'strategy':<34}{'apply s':>9}{'fwd s':>9}{'fp fwd s':>10}{'fwd ratio':>11}{'(apply+fwd)/fp':>16}")
    for name, strategy in strategies.items():
        fp_times, q_times, apply_times = [], [], []
        for _ in range(repeats):
            fp_times.append(_forward_seconds(lm, ids))
            report = quantizer.apply(strategy)
            apply_times.append(report.seconds)
            q_times.append(_forward_seconds(lm, ids))
            quantizer.restore()
        fp, q, apply = (statistics.median(t) for t in (fp_times, q_times, apply_times))
        print(f"{name:<34}{apply:>9.3f}{q:>9.3f}{fp:>10.3f}{q / fp:>10.2f}x{(apply + q) / fp:>15.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 repeats instead of 7")
    args = parser.parse_args()
    repeats = 3 if args.quick else 7
    generator = torch.Generator().manual_seed(0)

    stories_path = ASSETS / "models" / "stories260K" / "hf"
    if not stories_path.is_dir():
        sys.exit(f"shared model not found at {stories_path}")
    stories = load_model(str(stories_path), device="cpu")
    g64 = dict(group_size=64)
    bench(
        stories,
        {
            "int4 g64 (weight-only)": uniform(4, **g64),
            "int3 g64 mse (weight-only)": uniform(3, scale="mse", **g64),
            "int4 g64 keep1% (weight-only)": uniform(4, outliers="topk", **g64),
            "int8 g64 + int8 activations": uniform(8, act_format="int", **g64),
            "int4 g64 + fp16 accumulation": uniform(4, accumulation="fp16", **g64),
        },
        torch.randint(0, 512, (8, 512), generator=generator),
        repeats,
    )
    opt = opt125m_shaped()
    bench(
        opt,
        {
            "int4 g128 (weight-only)": uniform(4),
            "int3 g128 mse (weight-only)": uniform(3, scale="mse"),
            "int8 g128 + int8 activations": uniform(8, act_format="int"),
        },
        torch.randint(0, 50272, (2, 512), generator=generator),
        max(2, repeats // 2),
    )
    print("\nfwd ratio: forward time of the fake-quantized model / the unquantized one (weight-only target <= 1.3x).")


if __name__ == "__main__":
    main()
