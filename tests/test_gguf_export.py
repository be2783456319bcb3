"""GGUF export with qopt's own codes: every block type decodes (by the `gguf` package's own
reference dequantizer) to the weights qopt evaluated; the file loads and runs in llama.cpp
with the perplexity qopt measured; what no type can hold is refused by name."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qopt.errors import QoptError
from qopt.evaluate import EvalSettings, Evaluator
from qopt.gguf_export import BLOCK_TYPES, export_gguf, gguf_type, llama_rows
from qopt.model import load_model
from qopt.quant.weight import quantize_matrix
from qopt.strategy import FP16, Strategy
from tests.conftest import ASSETS, STORIES, TINYSTORIES

gguf = pytest.importorskip("gguf")
SMOLLM2 = ASSETS / "models" / "smollm2-135m" / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.parametrize(("bits", "symmetric"), sorted(BLOCK_TYPES))
@pytest.mark.parametrize("rounding", ["nearest", "gptq"])
def test_blocks_decode_to_the_weights_qopt_evaluated(bits, symmetric, rounding):
    from qopt.gguf_export import encode_blocks

    torch.manual_seed(bits)
    w = torch.randn(8, 64) * torch.rand(8, 1)
    config = FP16.evolve(bits=bits, group_size=32, symmetric=symmetric, rounding=rounding)
    x = torch.randn(256, 64)
    stored = quantize_matrix(w, config.grid(), rounding, hessian=x.T @ x if rounding == "gptq" else None)
    ggml_type = BLOCK_TYPES[(bits, symmetric)]
    assert gguf_type(config, 64) == (ggml_type, [])
    decoded = gguf.quants.dequantize(encode_blocks(stored, ggml_type), gguf.GGMLQuantizationType[ggml_type])
    assert decoded.shape == (8, 64)
    if symmetric:  # d and the codes are what qopt stored: bit for bit
        np.testing.assert_array_equal(decoded, stored.values.numpy())
    else:  # m = -scale * zero is rounded to fp16: within half an fp16 ulp of the offset
        offset = (stored.scale * stored.zero).abs().max().item()
        np.testing.assert_allclose(decoded, stored.values.numpy(), rtol=0, atol=offset * 2**-11 + 1e-7)


def test_configs_no_type_holds_are_named_with_the_reason():
    cases = {
        FP16.evolve(bits=4, granularity="channel", group_size=None): "granularity channel",
        FP16.evolve(bits=3, group_size=32): "int3 asymmetric",
        FP16.evolve(bits=8, group_size=32, symmetric=False): "int8 asymmetric",
        FP16.evolve(bits=4, group_size=64): "group_size 64",
        FP16.evolve(bits=4, group_size=32, rounding="awq"): "rounding awq",
        FP16.evolve(bits=4, group_size=32, outliers="topk", topk_fraction=0.01): "outliers topk",
        FP16.evolve(bits=4, format="nf4", group_size=32): "format nf4",
    }
    for config, reason in cases.items():
        ggml_type, reasons = gguf_type(config, 64)
        assert ggml_type is None and any(reason in r for r in reasons), (config, reasons)
    assert gguf_type(FP16.evolve(bits=4, group_size=32), 172)[0] is None  # 172 inputs: no whole blocks
    assert gguf_type(FP16, 172) == ("F16", [])


@pytest.fixture(scope="module")
def smollm2():
    if not SMOLLM2.is_file():
        pytest.skip(f"shared model not found at {SMOLLM2}")
    return load_model(str(SMOLLM2), device="cpu")


def test_query_rows_are_permuted_back_to_the_source_files_order(smollm2):
    """transformers un-permutes llama.cpp's query/key rows on load; the exporter permutes them
    again: the dequantized source tensor is recovered exactly."""
    reader = gguf.GGUFReader(str(SMOLLM2))
    source = {t.name: t for t in reader.tensors}
    config = smollm2.model.config
    for name, heads in (("q_proj", config.num_attention_heads), ("k_proj", config.num_key_value_heads)):
        hf = getattr(smollm2.model.model.layers[0].self_attn, name).weight.detach().numpy()
        tensor = source[f"blk.0.attn_{name[0]}.weight"]
        original = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        np.testing.assert_array_equal(llama_rows(heads)(hf), original)


def test_a_strategy_no_type_holds_is_refused_listing_the_matrices(tmp_path, stories):
    strategy = Strategy(default=FP16.evolve(bits=3, granularity="channel", group_size=None))
    with pytest.raises(QoptError, match=r"35 matrices have no GGUF type.*\n  model\.layers\.0\.self_attn\.q_proj"):
        export_gguf(Evaluator(stories, _windows(stories, 1)).quantizer, strategy, tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []  # nothing written


def _windows(lm, n: int, seq_len: int = 256):
    from qopt.data import split_windows, tokenize

    ids = tokenize(lm.tokenizer, TINYSTORIES.read_text()[:200_000])
    return split_windows(ids, seq_len, 0.5, (n, n))


def _deployable(lm) -> Strategy:
    """A mixed strategy every block type appears in; layers whose inputs are not whole blocks stay 16-bit."""
    kinds = [dict(bits=4, symmetric=False, rounding="gptq"), dict(bits=4, symmetric=True), dict(bits=5),
             dict(bits=5, symmetric=True, rounding="gptq"), dict(bits=8, symmetric=True)]  # fmt: skip
    layers = {}
    for i, unit in enumerate(u for u in lm.units if not u.is_embedding and u.role != "lm_head"):
        genes = kinds[i % len(kinds)]
        layers[unit.name] = FP16.evolve(group_size=32, **genes) if unit.in_features % 32 == 0 else FP16
    return Strategy(layers=layers, name="mixed")


def test_exported_gguf_runs_in_llama_cpp_with_qopts_perplexity(tmp_path, stories):
    """stories260K: the file llama.cpp loads gives the perplexity qopt measured, within 1%."""
    pytest.importorskip("llama_cpp")
    from qopt.engine import llamacpp_perplexity

    split = _windows(stories, 4)
    evaluator = Evaluator(stories, split, EvalSettings(seq_len=256, batch_size=4, calib_windows=4))
    strategy = _deployable(stories)
    summary = export_gguf(evaluator.quantizer, strategy, tmp_path / "m.gguf")
    assert set(summary["types"]) == {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "F16"}
    measured = evaluator.evaluate(strategy, "eval")
    assert summary["bpw"] == pytest.approx(measured.bpw, rel=1e-9)  # the file's bits are qopt's true bits
    engine = llamacpp_perplexity(tmp_path / "m.gguf", split.eval)
    assert engine == pytest.approx(measured.ppl, rel=0.01)
    # and it is the strategy's own perplexity, not the unquantized model's
    assert abs(engine - measured.fp_ppl) > 2 * abs(engine - measured.ppl)
    # qopt reads the file back (transformers dequantizes it): unquantized, it is the strategy
    again = load_model(str(tmp_path / "m.gguf"), device="cpu")
    reread = Evaluator(again, split, evaluator.settings).evaluate(Strategy(), "eval")
    assert reread.ppl == pytest.approx(measured.ppl, rel=1e-3)


def test_smollm2_gguf_runs_in_llama_cpp_with_qopts_perplexity(tmp_path, smollm2):
    pytest.importorskip("llama_cpp")
    from qopt.data import split_windows, tokenize
    from qopt.engine import llamacpp_perplexity

    text = (ASSETS / "data" / "wikitext-2-raw-v1" / "test.joined.txt").read_text()[:60_000]
    split = split_windows(tokenize(smollm2.tokenizer, text), 256, 0.5, (2, 2))
    evaluator = Evaluator(smollm2, split, EvalSettings(seq_len=256, batch_size=2, calib_windows=2))
    strategy = Strategy(default=FP16.evolve(bits=4, group_size=32, symmetric=True), name="q4_0")
    summary = export_gguf(evaluator.quantizer, strategy, tmp_path / "s.gguf")
    assert summary["types"] == {"Q4_0": 210} and summary["bpw"] == pytest.approx(4.5)
    measured = evaluator.evaluate(strategy, "eval")
    assert llamacpp_perplexity(tmp_path / "s.gguf", split.eval) == pytest.approx(measured.ppl, rel=0.01)


@pytest.mark.parametrize("seed", range(10))
def test_a_deploy_space_only_holds_exportable_genomes(seed):
    """search.deploy: llamacpp: random genomes, NSGA-II children, refinement and budget fitting
    never leave what GGUF stores exactly (stories260K's 172-input down projections stay 16-bit)."""
    from qopt.gguf_export import offenders
    from qopt.model import load_skeleton
    from qopt.operators import GenomeVariation, VariationConfig, refine
    from qopt.space import SearchConfig, SearchSpace

    if not STORIES.is_dir():
        pytest.skip(f"shared model not found at {STORIES}")
    space = SearchSpace(load_skeleton(str(STORIES)).units, SearchConfig(entropy=0.8, deploy="llamacpp"))
    rng = np.random.RandomState(seed)
    variation = GenomeVariation(space, VariationConfig(scaling_rate=0.5, outlier_rate=0.5, rounding_rate=0.5), 5.0, rng)
    genomes = [space.random_genome(rng) for _ in range(4)]
    genomes += [variation.child(genomes) for _ in range(8)]
    genomes += [refine(g, space, rng, 4.6) for g in genomes[:4]]
    for genome in genomes:
        plan = space.strategy(genome).resolve(space.units)
        assert offenders(space.units, plan) == []
        assert space.decode(space.encode(genome)) == genome
    assert {genome[g.name].bits for genome in genomes for g in space.groups if "down" in g.name} == {16}
    assert space.min_bpw() == pytest.approx(space.bpw(space.fit_budget(genomes[0], 0.1, rng)))
    with pytest.raises(QoptError, match="has none of the widths llamacpp stores"):
        SearchConfig(bits=(2, 3), deploy="llamacpp")


def test_export_command_writes_a_gguf_from_a_deploy_study_and_refuses_bad_output(
    monkeypatch, capsys, tmp_path, tiny_llama_dir, small_text
):
    from tests.test_cli import run, tiny_study

    settings = "budget_bpw: 9\nbaselines: [4]\n"
    storage = tiny_study(monkeypatch, capsys, tmp_path, tiny_llama_dir, small_text, settings, 6)
    code, _, err = run(monkeypatch, capsys, "export", "s", "--trial", "0", "--storage", storage,
                       "--format", "gguf", "-o", str(tmp_path / "m.gguf"))  # fmt: skip
    assert code == 0, err
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    assert {t.tensor_type.name for t in reader.tensors if t.name.startswith("blk.") and len(t.shape) == 2} == {"Q4_1"}
    again = ["export", "s", "--trial", "0", "--storage", storage, "--format", "gguf", "-o", str(tmp_path / "m.gguf")]
    code, _, err = run(monkeypatch, capsys, *again)
    assert code == 2 and "exists; pass --force" in err
    code, _, err = run(monkeypatch, capsys, *again[:-2], "-o", str(tmp_path / "x.onnx"), "--format", "onnx")
    assert code == 2 and "--format must be qopt, gguf or compressed-tensors" in err
    strategy = tmp_path / "chan.yaml"
    Strategy(default=FP16.evolve(bits=4, granularity="channel", group_size=None)).save(strategy)
    code, _, err = run(monkeypatch, capsys, "export", "--strategy", str(strategy), "--model", str(tiny_llama_dir),
                       "--format", "gguf", "-o", str(tmp_path / "c.gguf"))  # fmt: skip
    assert code == 2 and "have no GGUF type that stores their config exactly" in err
    assert not (tmp_path / "c.gguf").exists() and not list(tmp_path.glob(".c.gguf*"))


def test_nearest_stores_what_no_type_holds_re_rounded_and_measures_the_change(
    monkeypatch, capsys, tmp_path, tiny_llama_dir, small_text
):
    from tests.test_cli import run

    strategy = tmp_path / "s.yaml"
    Strategy(default=FP16.evolve(bits=3, granularity="channel", group_size=None, symmetric=True)).save(strategy)
    args = ["export", "--strategy", str(strategy), "--model", str(tiny_llama_dir), "--data", str(small_text),
            "--format", "gguf", "-o", str(tmp_path / "n.gguf"), "--nearest"]  # fmt: skip
    code, _, err = run(monkeypatch, capsys, *args)
    assert code == 0, err
    changed = [line for line in err.splitlines() if line.startswith("changed: ")]
    assert len(changed) == 14 and all(line.endswith("-> Q4_0 (re-rounded from float weights)") for line in changed)
    assert "held-out perplexity" in err and "file" in err
    reader = gguf.GGUFReader(str(tmp_path / "n.gguf"))
    assert {t.tensor_type.name for t in reader.tensors if t.name.startswith("blk.") and len(t.shape) == 2} == {"Q4_0"}
