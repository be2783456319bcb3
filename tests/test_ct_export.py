"""compressed-tensors export: the folder transformers loads computes what qopt measured;
layers vLLM fuses share one scheme (in the search with fused_groups, refused otherwise)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qopt.ct_export import export_compressed_tensors, fused_mismatches, scheme_args
from qopt.errors import QoptError
from qopt.evaluate import EvalSettings, Evaluator
from qopt.model import load_model
from qopt.space import SearchConfig, SearchSpace
from qopt.strategy import FP16, Strategy

pytest.importorskip("compressed_tensors")


def _fused_strategy(lm) -> Strategy:
    """Per block: q/k/v int4 g32 symmetric GPTQ, o int8 per channel, gate/up int3 g32 asymmetric, down 16-bit."""
    by_role = {
        "q": FP16.evolve(bits=4, group_size=32, symmetric=True, rounding="gptq"),
        "o": FP16.evolve(bits=8, granularity="channel", group_size=None, symmetric=True),
        "gate": FP16.evolve(bits=3, group_size=32, symmetric=False),
        "down": FP16.evolve(bits=2, granularity="channel", group_size=None, symmetric=True, rounding="gptq"),
    }
    by_role |= {"k": by_role["q"], "v": by_role["q"], "up": by_role["gate"]}
    return Strategy(roles=by_role, name="mixed")


def test_transformers_loads_the_export_and_computes_what_qopt_measured(tmp_path, tiny_llama_dir, small_text):
    from qopt.data import load_text

    lm = load_model(str(tiny_llama_dir), device="cpu")
    settings = EvalSettings(seq_len=64, search_windows=4, eval_windows=4, calib_windows=4, batch_size=4)
    evaluator = Evaluator.from_text(lm, load_text(str(small_text)), settings)
    strategy = _fused_strategy(lm)
    summary = export_compressed_tensors(evaluator.quantizer, strategy, tmp_path / "ct")
    assert summary["groups"] == {"int4 g32 sym": 6, "int8 channel sym": 2, "int3 g32 asym": 4, "int2 channel sym": 2}
    measured = evaluator.evaluate(strategy, "eval")
    # `qopt eval --model DIR`: the folder loads (decompressed) as the quantized model itself
    again = load_model(str(tmp_path / "ct"), device="cpu")
    reread = Evaluator(again, evaluator.split, settings).evaluate(Strategy(), "eval")
    assert reread.ppl == pytest.approx(measured.ppl, rel=1e-4)
    # and its logits are qopt's fake-quantized model's: KL to them is ~0
    windows = evaluator.split.eval
    with torch.inference_mode(), evaluator.quantizer.applied(strategy, seed=settings.seed):
        ours = lm.model(input_ids=windows).logits.float().log_softmax(-1)
    theirs = again.model(input_ids=windows).logits.float().log_softmax(-1)
    kl = (ours.exp() * (ours - theirs)).sum(-1).mean().item()
    reference_kl = (ours.exp() * (ours - lm.model(input_ids=windows).logits.float().log_softmax(-1))).sum(-1).mean()
    assert kl <= 1e-3 * reference_kl.item()
    config = (tmp_path / "ct" / "config.json").read_text()
    assert '"quant_method": "compressed-tensors"' in config and "re:^model.layers.0.self_attn.q_proj$" in config


def test_what_no_scheme_holds_and_broken_fusion_are_refused_by_name(tmp_path, tiny_llama_dir):
    lm = load_model(str(tiny_llama_dir), device="cpu")
    quantizer = Evaluator(lm, _split()).quantizer
    assert scheme_args(FP16.evolve(bits=4, format="nf4", group_size=32), 64)[0] is None
    assert scheme_args(FP16.evolve(bits=4, group_size=32, outliers="topk", topk_fraction=0.01), 64)[0] is None
    with pytest.raises(QoptError, match=r"layers have no compressed-tensors scheme.*\n  model\.layers\.0"):
        export_compressed_tensors(
            quantizer, Strategy(default=FP16.evolve(bits=4, format="fp", group_size=32)), tmp_path / "a"
        )
    split_qkv = Strategy(default=FP16.evolve(bits=4, group_size=32), roles={"k": FP16.evolve(bits=8, group_size=32)})
    assert fused_mismatches(lm.units, quantizer.plan(split_qkv))[0].startswith("model.layers.0: q_proj int4")
    with pytest.raises(QoptError, match="fused by vLLM but quantized differently"):
        export_compressed_tensors(quantizer, split_qkv, tmp_path / "b")


def _split():
    from tests.conftest import random_split

    return random_split(n_search=2, n_eval=2, seq_len=32)


@pytest.mark.parametrize("resolution", ["module", "role"])
def test_fused_groups_give_fused_layers_one_gene_set(tiny_llama_dir, resolution):
    lm = load_model(str(tiny_llama_dir), device="cpu")
    space = SearchSpace(lm.units, SearchConfig(resolution=resolution, fused_groups="auto", entropy=1.0))
    names = [g.name for g in space.groups]
    assert ("model.layers.0.q+k+v" in names) if resolution == "module" else ("q+k+v" in names and "gate+up" in names)
    rng = np.random.RandomState(0)
    for _ in range(5):
        plan = space.strategy(space.random_genome(rng)).resolve(space.units)
        assert fused_mismatches(space.units, plan) == []
    with pytest.raises(QoptError, match="fused_groups"):
        SearchConfig(fused_groups="all")


def test_export_command_writes_a_folder_that_qopt_eval_reads_back(
    monkeypatch, capsys, tmp_path, tiny_llama_dir, small_text
):
    from tests.test_cli import run, tiny_study

    settings = "budget_bpw: 9\nbaselines: [{bits: 4, symmetric: true}]\n"
    storage = tiny_study(monkeypatch, capsys, tmp_path, tiny_llama_dir, small_text, settings, 4)
    out = tmp_path / "ct"
    args = ["export", "s", "--trial", "0", "--storage", storage, "--format", "compressed-tensors", "-o", str(out)]
    code, stdout, err = run(monkeypatch, capsys, *args)
    assert code == 0, err
    assert "14 x int4 g32 sym" in stdout
    code, _, err = run(monkeypatch, capsys, *args)
    assert code == 2 and "pass --force" in err
    # `qopt eval --model DIR` with no quantization measures what was exported: the trial's own perplexity
    common = ["--data", str(small_text), "--windows", "2", "--seq-len", "64", "--json"]
    exported = _eval(monkeypatch, capsys, str(out), Strategy(default=FP16), tmp_path / "fp16.yaml", common)
    trial = Strategy(default=FP16.evolve(bits=4, group_size=32, symmetric=True))
    measured = _eval(monkeypatch, capsys, str(tiny_llama_dir), trial, tmp_path / "trial.yaml", common)
    assert exported["ppl"] == pytest.approx(measured["ppl"], rel=1e-4)


def _eval(monkeypatch, capsys, model: str, strategy: Strategy, path, common: list[str]) -> dict:
    import json

    from tests.test_cli import run

    strategy.save(path)
    code, stdout, err = run(monkeypatch, capsys, "eval", "--model", model, "--strategy", str(path), *common)
    assert code == 0, err
    return json.loads(stdout)
