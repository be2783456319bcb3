"""Every supported architecture family: roles, apply, restore, emulated forwards."""

from __future__ import annotations

import pytest
import torch

from qopt.quant import fake_quantize_weight
from qopt.quantizer import Quantizer
from qopt.strategy import LayerConfig, Strategy, uniform
from tests.conftest import random_split, tiny_model

EXPECTED_ROLES = {
    "llama": {"embed", "q", "k", "v", "o", "gate", "up", "down"},
    "qwen2": {"embed", "q", "k", "v", "o", "gate", "up", "down", "lm_head"},
    "opt": {"embed", "q", "k", "v", "o", "fc1", "fc2"},
    "gpt2": {"embed", "qkv", "o", "fc1", "fc2"},
    "gpt_neox": {"embed", "qkv", "o", "fc1", "fc2", "lm_head"},
}


def _logits(lm, ids):
    with torch.inference_mode():
        return lm.model(input_ids=ids).logits


def test_roles_per_family(arch):
    lm = tiny_model(arch)
    assert {u.role for u in lm.units} == EXPECTED_ROLES[arch]
    names = [u.name for u in lm.units]
    assert len(names) == len(set(names))


def test_apply_changes_output_and_restore_is_exact(arch):
    lm = tiny_model(arch)
    ids = random_split().eval
    before = _logits(lm, ids)
    quantizer = Quantizer(lm)
    strategy = Strategy(
        default=LayerConfig().evolve(bits=3, group_size=32),
        roles={"embed": LayerConfig().evolve(bits=4, group_size=32)},
    )
    report = quantizer.apply(strategy)
    assert report.cost.bpw == pytest.approx(3 + 32 / 32)
    during = _logits(lm, ids)
    assert not torch.allclose(during, before)
    quantizer.restore()
    assert torch.equal(_logits(lm, ids), before)
    # applying twice starts from pristine weights, not from the quantized ones
    quantizer.apply(strategy)
    assert torch.equal(_logits(lm, ids), during)
    quantizer.restore()


def test_conv1d_is_quantized_along_its_input_dimension():
    lm = tiny_model("gpt2")
    unit = lm.unit("transformer.h.0.mlp.c_proj")  # Conv1D weight stored [in=96, out=64]
    assert unit.transposed and unit.module.weight.shape == (96, 64)
    config = LayerConfig().evolve(bits=3, group_size=32)
    expected = fake_quantize_weight(unit.module.weight.detach().T.clone(), config.quantization()).T
    Quantizer(lm).apply(Strategy(layers={unit.name: config}))
    assert torch.equal(unit.module.weight.detach(), expected)


@pytest.mark.parametrize(
    "genes",
    [
        dict(act_format="int"),
        dict(act_format="fp"),
        dict(accumulation="bf16"),
        dict(outliers="rotate", act_format="int"),
    ],
    ids=["a-int8", "a-fp8", "acc-bf16", "rotate-a-int8"],
)
def test_emulated_forwards_are_installed_and_removed(arch, genes):
    lm = tiny_model(arch)
    ids = random_split().eval
    before = _logits(lm, ids)
    quantizer = Quantizer(lm)
    with quantizer.applied(uniform(8, group_size=32, **genes)):
        during = _logits(lm, ids)
        assert any("forward" in vars(u.module) for u in lm.units)
    assert not any("forward" in vars(u.module) for u in lm.units)
    assert torch.equal(_logits(lm, ids), before)
    assert torch.isfinite(during).all() and not torch.equal(during, before)
    # 8-bit weights with these emulations stay close to the original model
    ref, new = torch.log_softmax(before, -1), torch.log_softmax(during, -1)
    assert float((ref.exp() * (ref - new)).sum(-1).mean()) < 0.05


def test_smoothing_uses_calibration_statistics():
    from qopt.calibration import collect_activation_stats

    lm = tiny_model("llama")
    split = random_split()
    calls = []

    def calibrate(hessians: bool):
        calls.append(hessians)
        return collect_activation_stats(lm, split.search, hessians=hessians)

    quantizer = Quantizer(lm, calibrate=calibrate)
    strategy = uniform(8, group_size=32, outliers="smooth", act_format="int")
    quantizer.apply(strategy)
    quantizer.apply(strategy)
    assert calls == [False]  # computed once, then reused
    quantizer.apply(uniform(4, group_size=32, rounding="gptq"))
    quantizer.apply(strategy)
    assert calls == [False, True]  # Hessians collected once, when first needed
    quantizer.restore()
    stats = collect_activation_stats(lm, split.search)
    assert set(stats.absmax) == {u.name for u in lm.units if not u.is_embedding}
    assert stats.absmax["model.layers.0.mlp.down_proj"].shape == (96,)
