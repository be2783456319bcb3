"""Fixtures: tiny randomly initialised models of each supported family, and the
real stories260K model from ../shared/assets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import transformers

from qopt.data import TokenSplit
from qopt.model import LoadedModel, load_model, wrap_model

ASSETS = Path(os.environ.get("QOPT_ASSETS", Path(__file__).resolve().parents[2] / "shared" / "assets"))
STORIES = ASSETS / "models" / "stories260K" / "hf"
TINYSTORIES = ASSETS / "data" / "tinystories" / "validation_head.txt"
VOCAB = 96

# Small but non-trivial shapes: hidden 64, MLP 96 (not a multiple of 64), 2 layers.
_CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    ),
    "qwen2": lambda: transformers.Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    ),
    "opt": lambda: transformers.OPTConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        ffn_dim=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        word_embed_proj_dim=64,
    ),
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=VOCAB,
        n_embd=64,
        n_inner=96,
        n_layer=2,
        n_head=4,
        n_positions=128,
        bos_token_id=0,
        eos_token_id=0,
    ),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    ),
}
ARCHITECTURES = tuple(_CONFIGS)


def tiny_model(arch: str, seed: int = 0) -> LoadedModel:
    """A freshly initialised 2-layer model of family `arch` (no tokenizer).

    The init scale is raised from the usual 0.02 so the next-token
    distributions are peaked, as a trained model's are, and quantization
    visibly moves them.
    """
    torch.manual_seed(seed)
    config = _CONFIGS[arch]()
    config.initializer_range = 0.15
    model = transformers.AutoModelForCausalLM.from_config(config)
    return wrap_model(model, tokenizer=None, name=f"tiny-{arch}")


def random_split(n_search: int = 4, n_eval: int = 4, seq_len: int = 32, seed: int = 0) -> TokenSplit:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n_search + n_eval, seq_len), generator=generator)
    return TokenSplit(search=ids[:n_search], eval=ids[n_search:])


@pytest.fixture(params=ARCHITECTURES)
def arch(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def stories() -> LoadedModel:
    if not STORIES.is_dir():
        pytest.skip(f"shared model not found at {STORIES} (set QOPT_ASSETS)")
    return load_model(str(STORIES), device="cpu")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A 2-layer Llama with stories260K's tokenizer (vocab 512), saved like a hub model."""
    if not STORIES.is_dir():
        pytest.skip(f"shared model not found at {STORIES} (set QOPT_ASSETS)")
    folder = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, initializer_range=0.15,
    )  # fmt: skip
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(STORIES).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def small_text(tmp_path_factory) -> Path:
    """The first 40 KB of the TinyStories text."""
    if not TINYSTORIES.is_file():
        pytest.skip(f"shared data not found at {TINYSTORIES} (set QOPT_ASSETS)")
    path = tmp_path_factory.mktemp("text") / "stories.txt"
    path.write_text(TINYSTORIES.read_text()[:40_000])
    return path


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache_dir(tmp_path_factory):
    """On-disk caches of the whole test session (and its subprocesses) go to a temporary folder."""
    previous = os.environ.get("QOPT_CACHE_DIR")
    os.environ["QOPT_CACHE_DIR"] = str(tmp_path_factory.mktemp("qopt-cache"))
    yield
    if previous is None:
        os.environ.pop("QOPT_CACHE_DIR", None)
    else:
        os.environ["QOPT_CACHE_DIR"] = previous
