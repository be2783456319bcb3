"""Does GPTQ lower each layer's output error on SmolLM2, as it should?

For five linear layers of SmolLM2-135M (blocks 0, 15, 29), prints the calibration
output error tr((W - Q) H (W - Q)^T) of int3 g128 round-to-nearest and of GPTQ,
with H the layer's input Hessian on the calibration windows (8 x 512 WikiText-2
tokens of the search part, as `qopt baseline run --windows 8` collects them).

    python scripts/gptq_layer_error.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qopt.data import load_text  # noqa: E402
from qopt.evaluate import EvalSettings, Evaluator  # noqa: E402
from qopt.model import load_model  # noqa: E402
from qopt.quant.weight import fake_quantize_weight  # noqa: E402
from qopt.strategy import LayerConfig  # noqa: E402

ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets"
LAYERS = (
    "model.layers.0.self_attn.q_proj",
    "model.layers.0.mlp.down_proj",
    "model.layers.15.self_attn.v_proj",
    "model.layers.15.mlp.down_proj",
    "model.layers.29.mlp.up_proj",
)


def main() -> None:
    lm = load_model(str(ASSETS / "models" / "smollm2-135m" / "SmolLM2-135M-Instruct.Q4_1.gguf"), device="cpu")
    text = load_text(str(ASSETS / "data" / "wikitext-2-raw-v1" / "test_rows.json"))
    evaluator = Evaluator.from_text(lm, text, EvalSettings(search_windows=8, eval_windows=8))
    stats = evaluator.quantizer.activation_stats(hessians=True)
    rtn = LayerConfig(bits=3, group_size=128)
    gptq = rtn.evolve(rounding="gptq")
    print(f"{'layer':<36}{'RTN':>10}{'GPTQ':>10}{'ratio':>8}")
    for name in LAYERS:
        w, h = lm.unit(name).read_weight().float(), stats.hessian[name]

        def error(q: torch.Tensor, w=w, h=h) -> float:
            return float(torch.trace((w - q) @ h @ (w - q).T))

        e_rtn, e_gptq = (
            error(fake_quantize_weight(w, rtn.quantization())),
            error(fake_quantize_weight(w, gptq.quantization(), hessian=h)),
        )
        print(f"{name:<36}{e_rtn:>10.2f}{e_gptq:>10.2f}{e_rtn / e_gptq:>7.1f}x")


if __name__ == "__main__":
    main()
