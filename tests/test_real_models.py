"""What real models need: GGUF sources, a compact reference, streamed calibration,
no copies of pristine weights, and a fast GPTQ that computes what the plain algorithm does."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from qopt import evaluate as qevaluate
from qopt import gguf_source
from qopt.calibration import collect_activation_stats
from qopt.errors import QoptError
from qopt.evaluate import EvalSettings, Evaluator
from qopt.model import load_model, load_skeleton, wrap_model
from qopt.quant.gptq import gptq_quantize
from qopt.quant.scales import block_range, quantize_in_range
from qopt.strategy import LayerConfig, Strategy, uniform
from tests.conftest import random_split, tiny_model

gguf = pytest.importorskip("gguf")


def write_tiny_gguf(path: Path, n_layers: int = 2, hidden: int = 64, mlp: int = 96, seed: int = 0) -> dict:
    """A random 2-layer Llama as a GGUF file with a byte-level BPE tokenizer; returns the float
    tensors written, by GGUF name."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    rng = np.random.default_rng(seed)
    merges = ["Ġ t", "h e", "Ġt he", "i n", "a n", "Ġ a"]
    tokens = list(bytes_to_unicode().values()) + [m.replace(" ", "") for m in merges] + ["<|endoftext|>"]
    heads, kv_heads = 4, 2
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(mlp)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_merges(merges)
    writer.add_token_types([1] * (len(tokens) - 1) + [3])
    writer.add_bos_token_id(len(tokens) - 1)
    writer.add_eos_token_id(len(tokens) - 1)
    written = {}

    def tensor(name: str, *shape: int, ones: bool = False) -> None:
        values = np.ones(shape, np.float32) if ones else (rng.standard_normal(shape) * 0.1).astype(np.float32)
        written[name] = values
        writer.add_tensor(name, values)

    tensor("token_embd.weight", len(tokens), hidden)
    kv = kv_heads * hidden // heads
    for i in range(n_layers):
        tensor(f"blk.{i}.attn_norm.weight", hidden, ones=True)
        tensor(f"blk.{i}.ffn_norm.weight", hidden, ones=True)
        tensor(f"blk.{i}.attn_q.weight", hidden, hidden)
        tensor(f"blk.{i}.attn_k.weight", kv, hidden)
        tensor(f"blk.{i}.attn_v.weight", kv, hidden)
        tensor(f"blk.{i}.attn_output.weight", hidden, hidden)
        tensor(f"blk.{i}.ffn_gate.weight", mlp, hidden)
        tensor(f"blk.{i}.ffn_up.weight", mlp, hidden)
        tensor(f"blk.{i}.ffn_down.weight", hidden, mlp)
    tensor("output_norm.weight", hidden, ones=True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return written


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> tuple[Path, dict]:
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    return path, write_tiny_gguf(path)


def test_a_gguf_file_loads_as_a_model_once_converted(tiny_gguf, monkeypatch):
    path, written = tiny_gguf
    lm = load_model(str(path), device="cpu")
    assert type(lm.model).__name__ == "LlamaForCausalLM" and len(lm.units) == 1 + 2 * 7
    down = lm.unit("model.layers.1.mlp.down_proj").read_weight()
    assert torch.equal(down, torch.from_numpy(written["blk.1.ffn_down.weight"]))
    assert "GGUF source in float" in lm.source_note
    assert lm.tokenizer("the cat")["input_ids"]
    assert load_skeleton(str(path)).unit("model.layers.0.self_attn.k_proj").out_features == 32

    def no_conversion(*_args, **_kwargs):
        raise AssertionError("the GGUF file was converted again instead of read from the cache")

    monkeypatch.setattr(gguf_source, "_load_with_transformers", no_conversion)
    again = load_model(str(path), device="cpu")
    assert torch.equal(again.unit("model.layers.1.mlp.down_proj").read_weight(), down)


def test_gguf_source_grid_is_reported(tiny_gguf, tmp_path):
    path, written = tiny_gguf
    assert gguf_source.source_grid(path) == {"F32": len(written)}
    (tmp_path / "source.json").write_text('{"gguf": "x.gguf", "tensor_types": {"Q4_1": 210, "F32": 61}}')
    assert "already quantized (210 x Q4_1, 61 x F32)" in gguf_source.describe_grid(tmp_path)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p.write_bytes(p.read_bytes()[:3000]), "not a readable GGUF file|could not load"),
        (lambda p: p.write_bytes(b"GGUF" + b"\0" * 20), "not a readable GGUF file"),
        (lambda p: p.unlink(), "does not exist"),
    ],
    ids=["truncated", "garbage", "missing"],
)
def test_bad_gguf_files_are_one_line_errors(tiny_gguf, tmp_path, make, message):
    path = tmp_path / "bad.gguf"
    path.write_bytes(tiny_gguf[0].read_bytes())
    make(path)
    with pytest.raises(QoptError, match=message):
        load_model(str(path), device="cpu")


def test_cli_eval_takes_a_gguf_model(tiny_gguf, small_text):
    path, _ = tiny_gguf
    strategy = path.parent / "int4.yaml"
    uniform(4, group_size=32).save(strategy)
    result = subprocess.run(
        [sys.executable, "-m", "qopt", "eval", "-m", str(path), "-s", str(strategy), "-d", str(small_text),
         "--windows", "2", "--seq-len", "64", "--json"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "GGUF source in float" in result.stderr
    assert '"kl"' in result.stdout and "Traceback" not in result.stderr


def _large_vocab_llama(vocab: int = 4096) -> tuple:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False, initializer_range=0.05,
    )  # fmt: skip
    lm = wrap_model(transformers.AutoModelForCausalLM.from_config(config), None, "tiny-large-vocab")
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (8, 64), generator=generator)
    from qopt.data import TokenSplit

    return lm, TokenSplit(search=ids[:4], eval=ids[4:])


def test_reference_is_hidden_states_and_kl_is_exact_over_the_full_vocabulary():
    lm, split = _large_vocab_llama()
    evaluator = Evaluator(lm, split, EvalSettings(batch_size=2))
    windows = split.eval
    with torch.inference_mode():
        ref = torch.log_softmax(lm.model(input_ids=windows).logits.float(), -1)
    reference = evaluator.reference("eval")
    assert reference.hidden.shape == (4, 64, 64)  # hidden size, not vocabulary, per token
    assert reference.nbytes * 64 == ref.numel() * 4  # 4096 vocab / 64 hidden
    strategy = uniform(3, group_size=32)
    metrics = evaluator.evaluate(strategy, "eval")
    with evaluator.quantizer.applied(strategy), torch.inference_mode():
        q = torch.log_softmax(lm.model(input_ids=windows).logits.float(), -1)
    kl = float((ref.exp() * (ref - q)).sum()) / windows.numel()
    assert metrics.kl == pytest.approx(kl, rel=1e-5) and metrics.kl > 1e-3
    agree = float((ref.argmax(-1) == q.argmax(-1)).float().mean())
    assert metrics.top1 == pytest.approx(agree)
    assert evaluator.evaluate(Strategy(), "eval").kl == 0.0


def test_metrics_do_not_depend_on_the_logits_chunk(monkeypatch):
    lm, split = _large_vocab_llama(1024)
    settings = EvalSettings(batch_size=2)
    whole = Evaluator(lm, split, settings).evaluate(uniform(3, group_size=32), "eval")
    monkeypatch.setattr(qevaluate, "_LOGITS_CHUNK_BYTES", 4 * 1024 * 7)  # 7 positions per chunk
    chunked = Evaluator(lm, split, settings).evaluate(uniform(3, group_size=32), "eval")
    assert chunked.kl == pytest.approx(whole.kl, rel=1e-5) and chunked.top1 == whole.top1
    assert chunked.ppl == pytest.approx(whole.ppl, rel=1e-6)


def test_the_model_never_makes_logits_for_every_position():
    lm, split = _large_vocab_llama(1024)
    shapes = []
    head = lm.model.get_output_embeddings()
    handle = head.register_forward_hook(lambda _m, _a, out: shapes.append(tuple(out.shape)))
    try:
        Evaluator(lm, split, EvalSettings(batch_size=2)).evaluate(uniform(4, group_size=32), "eval")
    finally:
        handle.remove()
    # the model's own call sees one position; the evaluator's chunks are [rows, vocab]
    assert all(len(s) == 2 or s[1] == 1 for s in shapes), shapes


def _deep_llama(n_layers: int):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=n_layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True, initializer_range=0.15,
    )  # fmt: skip
    return wrap_model(transformers.AutoModelForCausalLM.from_config(config), None, f"tiny-{n_layers}")


def test_streamed_hessians_hold_one_group_whatever_the_depth(tmp_path):
    one_block = 6 * 4 * 64**2 + 4 * 96**2  # q, k, v, o, gate, up (64 inputs) and down (96) of one layer, fp32
    peaks = {}
    for n_layers in (2, 8):
        lm = _deep_llama(n_layers)
        windows = random_split(n_search=4, seq_len=32).search
        folder = tmp_path / f"deep-{n_layers}"
        folder.mkdir()
        streamed = collect_activation_stats(lm, windows, 2, hessians=True, folder=folder, max_bytes=one_block)
        in_memory = collect_activation_stats(lm, windows, 2, hessians=True)
        peaks[n_layers] = streamed.peak_hessian_bytes
        assert len(list(folder.glob("hessian-*.safetensors"))) == n_layers
        assert set(streamed.hessian) == set(in_memory.hessian) and len(in_memory.hessian) == 7 * n_layers
        for name, h in in_memory.hessian.items():
            assert torch.allclose(streamed.hessian[name], h, rtol=1e-5, atol=1e-7), name
        assert in_memory.peak_hessian_bytes == n_layers * one_block
    assert peaks[2] == peaks[8] == one_block


def test_gptq_with_streamed_hessians_matches_in_memory(small_text, tiny_llama_dir):
    from qopt.data import load_text

    gptq = Strategy(default=LayerConfig(bits=3, granularity="channel", group_size=None, rounding="gptq"))
    lm = load_model(str(tiny_llama_dir), device="cpu")
    settings = EvalSettings(seq_len=64, search_windows=4, eval_windows=4, calib_windows=4, batch_size=2)
    text = load_text(str(small_text))
    streamed = Evaluator.from_text(lm, text, EvalSettings(**{**settings.__dict__, "calib_memory_mib": 1}))
    in_memory = Evaluator.from_text(lm, text, EvalSettings(**{**settings.__dict__, "calibration_cache": False}))
    a, b = streamed.evaluate(gptq, "eval"), in_memory.evaluate(gptq, "eval")
    assert a.kl == pytest.approx(b.kl, rel=1e-4) and a.kl > 0
    # read back from the cache folder, the statistics still say how much the collection held
    peak = streamed.quantizer.activation_stats(hessians=True).peak_hessian_bytes
    assert 0 < peak <= 2**20


def test_applying_a_strategy_neither_copies_nor_changes_the_pristine_weights():
    lm = tiny_model("llama")
    before = {name: p for name, p in lm.model.named_parameters()}
    values = {name: p.detach().clone() for name, p in before.items()}
    evaluator = Evaluator(lm, random_split(), EvalSettings(batch_size=2))
    quantizer = evaluator.quantizer
    with quantizer.applied(uniform(3, group_size=32)):
        down = lm.unit("model.layers.0.mlp.down_proj")
        assert down.weight is not before["model.layers.0.mlp.down_proj.weight"]
        assert not torch.equal(down.weight, values["model.layers.0.mlp.down_proj.weight"])
        assert all(not torch.equal(quantizer._pristine[n], down.weight) for n in quantizer._pristine)
    after = dict(lm.model.named_parameters())
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)
    assert all(torch.equal(after[n], values[n]) for n in before)


def test_tied_head_follows_a_quantized_embedding():
    lm = tiny_model("llama")
    strategy = Strategy(default=uniform(4, group_size=32).default, roles={"embed": LayerConfig(bits=4, group_size=32)})
    quantizer = Evaluator(lm, random_split(), EvalSettings(batch_size=2)).quantizer
    embed, head = lm.model.get_input_embeddings(), lm.model.get_output_embeddings()
    original = embed.weight
    with quantizer.applied(strategy):
        assert embed.weight is head.weight and embed.weight is not original
    assert embed.weight is head.weight is original


def _plain_gptq(w: torch.Tensor, hessian: torch.Tensor, config: LayerConfig, damp: float = 0.01) -> torch.Tensor:
    """GPTQ as the paper's Algorithm 1 states it, without lazy batching: quantize column i,
    spread its error over every later column through the Cholesky factor of H^-1."""
    w = w.clone().double()
    h = hessian.clone().double()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * torch.mean(torch.diag(h)) * torch.eye(h.shape[0], dtype=h.dtype)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    group = config.group_size if config.granularity == "group" else None
    if group is None:
        lo, hi = block_range(w.float(), config.grid())
    q = torch.zeros_like(w)
    for i in range(w.shape[1]):
        if group and i % group == 0:
            lo, hi = block_range(w[:, i : i + group].float(), config.grid())
        q[:, i] = quantize_in_range(w[:, i : i + 1].float(), lo, hi, config.grid())[:, 0].double()
        err = (w[:, i] - q[:, i]) / u[i, i]
        w[:, i:] -= err[:, None] * u[i, i:][None, :]
    return q.float()


@pytest.mark.parametrize(
    "config",
    [
        LayerConfig(bits=3, granularity="channel", group_size=None, symmetric=True, rounding="gptq"),
        LayerConfig(bits=4, granularity="group", group_size=32, symmetric=False, rounding="gptq"),
        LayerConfig(bits=4, format="nf4", granularity="group", group_size=64, symmetric=True, rounding="gptq"),
    ],
    ids=["int3-chan-sym", "int4-g32-asym", "nf4-g64"],
)
def test_blocked_gptq_equals_the_plain_algorithm(config):
    generator = torch.Generator().manual_seed(0)
    w = torch.randn(48, 200, generator=generator)
    x = torch.randn(512, 200, generator=generator) * torch.linspace(0.2, 3.0, 200)
    hessian = x.T @ x / 512
    fast = gptq_quantize(w, hessian, config.grid())[0]
    plain = _plain_gptq(w, hessian, config)
    # Rounding decisions may flip where float error lands a value on a rounding boundary.
    mismatch = (fast - plain).abs() > 1e-4
    assert mismatch.float().mean() < 0.01, float(mismatch.float().mean())
    assert ((fast - w) ** 2).sum() == pytest.approx(float(((plain - w) ** 2).sum()), rel=0.02)


def test_fitting_group_size_is_the_largest_that_fits(stories):
    from qopt.baselines import fitting_group_size

    assert fitting_group_size(stories.units) == 64
    assert fitting_group_size(tiny_model("llama").units) == 64
    assert fitting_group_size(_large_vocab_llama()[0].units) == 64


def test_dtype_option_loads_bfloat16(tiny_llama_dir):
    from qopt.model import parse_dtype

    lm = load_model(str(tiny_llama_dir), device="cpu", dtype=parse_dtype("bfloat16"))
    assert next(lm.model.parameters()).dtype == torch.bfloat16
    with pytest.raises(QoptError, match="dtype 'fp8'"):
        parse_dtype("fp8")


def test_a_model_folder_without_its_weights_is_refused(tiny_llama_dir, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama_dir, broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(QoptError):
        load_model(str(broken), device="cpu")


def test_a_model_too_big_for_memory_is_refused_before_loading(tiny_llama_dir, monkeypatch):
    from qopt import model as qmodel

    monkeypatch.setattr(qmodel, "_available_bytes", lambda: 10_000)  # 10 kB free
    with pytest.raises(QoptError, match=r"needs about .* GiB .* are available: lower eval.weight_cache_mib"):
        load_model(str(tiny_llama_dir), device="cpu")
    monkeypatch.setattr(qmodel, "_available_bytes", lambda: 2**40)
    assert load_model(str(tiny_llama_dir), device="cpu").units
