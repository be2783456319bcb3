"""Packed checkpoints: bit packing, exact reload, true size, and the llama.cpp override list."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from qopt.evaluate import EvalSettings, Evaluator
from qopt.export import export_checkpoint, load_checkpoint, use_checkpoint
from qopt.llamacpp import override_file, tensor_types
from qopt.quant.packing import pack_bits, packed_size, unpack_bits
from qopt.strategy import FORMAT_BITS, FP16, Strategy
from tests.conftest import random_split, tiny_model
from tests.test_cli import run, tiny_study


@pytest.mark.parametrize("bits", list(range(1, 33)))
def test_pack_unpack_round_trip(bits):
    generator = torch.Generator().manual_seed(bits)
    for n in (1, 7, 64, 1001):
        values = torch.randint(0, 2**bits, (n,), generator=generator, dtype=torch.int64)
        packed = pack_bits(values, bits)
        assert packed.dtype == torch.uint8 and packed.numel() == packed_size(n, bits)
        assert torch.equal(unpack_bits(packed, bits, n), values)


def test_packing_refuses_values_that_do_not_fit():
    with pytest.raises(ValueError, match="in \\[0, 8\\)"):
        pack_bits(torch.tensor([8]), 3)


BASE = FP16.evolve(bits=4, group_size=32)
LAYER = "model.layers.1.mlp.down_proj"  # [64, 96]: a short last group with g64
# Every weight format and bit-width, then every other gene that changes what is stored.
CONFIGS = [BASE.evolve(format="int", bits=b, symmetric=sym) for b in FORMAT_BITS["int"] for sym in (True, False)]
CONFIGS += [BASE.evolve(format="fp", bits=b, symmetric=True) for b in FORMAT_BITS["fp"]]
CONFIGS += [BASE.evolve(format="nf4", bits=4, symmetric=True)]
CONFIGS += [
    BASE.evolve(granularity="channel"),
    BASE.evolve(granularity="tensor", symmetric=True),
    BASE.evolve(group_size=64, scale="mse"),
    BASE.evolve(scale="percentile", clip_percentile=99.0),
    BASE.evolve(outliers="topk", topk_fraction=0.01),
    BASE.evolve(outliers="smooth", smooth_alpha=0.5, act_format="int", act_bits=8),
    BASE.evolve(outliers="rotate", rounding="gptq"),
    BASE.evolve(bits=3, rounding="gptq", outliers="topk", topk_fraction=0.02),
    BASE.evolve(rounding="awq"),
    BASE.evolve(rounding="hqq"),
    BASE.evolve(rounding="stochastic", bits=2),
]


def _evaluator() -> Evaluator:
    return Evaluator(tiny_model("llama"), random_split(), EvalSettings(batch_size=2, screen_windows=1))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.describe()} {c.rounding} {c.outliers}")
def test_checkpoint_reloads_to_the_evaluated_weights_and_metrics(tmp_path, config):
    evaluator = _evaluator()
    strategy = Strategy(default=config, layers={LAYER: BASE.evolve(bits=8)}, name="mixed")
    expected = evaluator.evaluate(strategy, "eval")
    manifest = export_checkpoint(evaluator.quantizer, strategy, tmp_path, seed=evaluator.settings.seed)

    # Decoded weights equal the fake-quantized ones bit for bit.
    checkpoint = load_checkpoint(tmp_path)
    report = evaluator.quantizer.apply(strategy, seed=evaluator.settings.seed)
    for name, (w_hat, _) in checkpoint.weights.items():
        assert torch.equal(w_hat, evaluator.lm.unit(name).read_weight()), name
    evaluator.quantizer.restore()

    # A fresh evaluator on the same model, fed the checkpoint, scores exactly the same.
    fresh = _evaluator()
    use_checkpoint(fresh.quantizer, checkpoint)
    misses = fresh.quantizer.cache.misses
    again = fresh.evaluate(checkpoint.strategy, "eval")
    assert dataclasses.replace(again, seconds=0, quantize_seconds=0) == dataclasses.replace(
        expected, seconds=0, quantize_seconds=0
    )
    quantized = [u for u in fresh.lm.units if report.plan[u.name].quantizes_weights]
    assert fresh.quantizer.cache.misses == misses  # every quantized matrix came from the checkpoint
    assert set(checkpoint.weights) == {u.name for u in quantized}

    # What is stored is what true bpw counts, up to rounding each packed tensor to whole bytes.
    slack = 2 * len(quantized)
    assert 0 <= manifest["quantized_stored_bytes"] - manifest["quantized_counted_bytes"] <= slack
    assert manifest["bpw"] == pytest.approx(report.cost.bpw)


def test_a_checkpoint_from_another_model_is_refused(tmp_path):
    evaluator = _evaluator()
    export_checkpoint(evaluator.quantizer, Strategy(default=BASE), tmp_path)
    other = Evaluator(tiny_model("llama", seed=1), random_split(), evaluator.settings)
    with pytest.raises(Exception, match="exported from another model"):
        use_checkpoint(other.quantizer, load_checkpoint(tmp_path))


def test_tensor_type_list_of_a_known_strategy():
    lm = tiny_model("llama")
    strategy = Strategy(
        default=FP16.evolve(bits=4, group_size=32, symmetric=True),
        roles={"down": FP16.evolve(bits=3, group_size=64, rounding="gptq")},
        layers={"model.layers.0.self_attn.v_proj": FP16.evolve(bits=8, group_size=32, symmetric=True)},
    )
    types = tensor_types(lm.units, strategy.resolve(lm.units))
    by_name = {t.gguf_name: t for t in types}
    assert by_name["blk.0.attn_q.weight"].ggml_type == "q4_0" and by_name["blk.0.attn_q.weight"].lost == ()
    assert by_name["blk.0.attn_v.weight"].ggml_type == "q8_0"
    assert by_name["blk.1.ffn_down.weight"].ggml_type == "q3_k"
    assert by_name["blk.1.ffn_down.weight"].lost == (
        "granularity g64 (q3_k uses super-blocks of 256)",
        "rounding gptq (llama-quantize rounds from the float weights)",
    )
    assert by_name["token_embd.weight"].ggml_type == "f16"  # tied: no separate output tensor
    assert "output.weight" not in by_name
    text = override_file(types, "known")
    assert "^blk\\.0\\.attn_q\\.weight$=q4_0" in text.splitlines()
    assert "# 2 of 15 tensors lose genes" in text


def test_export_and_eval_checkpoint_from_the_command_line(monkeypatch, capsys, tmp_path, tiny_llama_dir, small_text):
    settings = (
        "baselines: [3, {bits: 4, rounding: gptq}]\n"
        "eval: {seq_len: 64, search_windows: 2, eval_windows: 3, calib_windows: 2, batch_size: 2}\n"
    )
    storage = tiny_study(monkeypatch, capsys, tmp_path, tiny_llama_dir, small_text, settings, trials=4)
    out_dir = tmp_path / "export"
    code, out, err = run(monkeypatch, capsys, "export", "s", "--trial", "1", "-o", str(out_dir), "--storage", storage)
    assert code == 0, err
    assert "llama-tensor-types.txt: 15 tensors" in out
    files = {p.name for p in out_dir.iterdir()}
    assert {"manifest.json", "model.safetensors", "strategy.yaml", "config.json", "llama-tensor-types.txt"} <= files
    code, out, err = run(monkeypatch, capsys, "eval", "--checkpoint", str(out_dir), "--json")
    assert code == 0, err
    from_checkpoint = json.loads(out)
    # The study's own held-out measurement of trial 1 (GPTQ, calibrated on the study's windows).
    code, out, err = run(monkeypatch, capsys, "study", "front", "s", "--json", "--storage", storage)
    assert code == 0, err
    measured = next(m for m in json.loads(out) if m["trial"] == 1)
    assert measured["baseline"] == "GPTQ int4 g32 asym"
    for key in ("kl", "ppl", "top1"):
        assert from_checkpoint[key] == pytest.approx(measured[f"eval_{key}"], rel=1e-6), key
    assert from_checkpoint["bpw"] == pytest.approx(measured["bpw"]) and from_checkpoint["tokens"] == 3 * 64
