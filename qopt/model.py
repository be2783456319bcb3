"""Load a Hugging Face causal LM and find its quantizable matrices and their roles.

A *unit* is one weight matrix qopt can quantize: every `nn.Linear` (and GPT-2's
`Conv1D`, which stores its weight transposed as [in, out]), the token
embedding, and the output head. Tied embedding/head weights are one unit.
Roles name what a matrix does (q, k, v, o, qkv, gate, up, down, fc1, fc2,
embed, lm_head) across Llama/Qwen2, OPT, GPT-2 and GPT-NeoX naming.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from qopt.errors import QoptError, first_line

# Leaf module name -> role, where the name alone decides it.
_ROLE_BY_NAME = {
    "q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "out_proj": "o",
    "gate_proj": "gate", "up_proj": "up", "down_proj": "down",
    "fc1": "fc1", "fc2": "fc2", "c_fc": "fc1",
    "c_attn": "qkv", "query_key_value": "qkv", "qkv_proj": "qkv",
    "dense_h_to_4h": "fc1", "dense_4h_to_h": "fc2",
}  # fmt: skip
# Leaf names whose role depends on whether they sit in attention or in the MLP.
_AMBIGUOUS = {"c_proj": ("o", "fc2"), "dense": ("o", "fc2")}


@dataclass(eq=False)
class QuantUnit:
    """One quantizable weight matrix of a model.

    `out_features`/`in_features` are in the [out, in] convention qopt
    quantizes in, whatever the module's storage layout (`transposed` for
    Conv1D). An embedding [vocab, hidden] counts as out=vocab, in=hidden.
    """

    name: str
    role: str
    module: nn.Module
    out_features: int
    in_features: int
    is_embedding: bool = False
    transposed: bool = False
    aliases: tuple[str, ...] = ()

    @property
    def weight(self) -> nn.Parameter:
        return self.module.weight

    def read_weight(self) -> torch.Tensor:
        """The weight as [out, in] (a view for Linear/Embedding, a transpose for Conv1D)."""
        w = self.module.weight.detach()
        return w.T if self.transposed else w

    def write_weight(self, w: torch.Tensor) -> None:
        """Overwrite the weight in place from an [out, in] tensor."""
        target = self.module.weight.data
        target.copy_(w.T if self.transposed else w)


@dataclass(eq=False)
class LoadedModel:
    """A causal LM, its tokenizer, and its quantizable units."""

    model: nn.Module
    tokenizer: object
    name: str
    units: list[QuantUnit] = field(default_factory=list)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def context_length(self) -> int:
        config = self.model.config
        for attr in ("max_position_embeddings", "n_positions", "n_ctx"):
            value = getattr(config, attr, None)
            if isinstance(value, int) and value > 0:
                return value
        return 2048

    @property
    def other_params(self) -> int:
        """Parameters outside the units (norms, biases, position embeddings)."""
        unit_params = {id(u.weight) for u in self.units}
        return sum(p.numel() for p in self.model.parameters() if id(p) not in unit_params)

    def unit(self, name: str) -> QuantUnit:
        for u in self.units:
            if u.name == name:
                return u
        raise KeyError(name)


def pick_device(device: str | None = None) -> torch.device:
    """`device` if given, else CUDA when available, else CPU."""
    if device:
        try:
            return torch.device(device)
        except RuntimeError as exc:
            raise QoptError(f"device {device!r} is not a valid torch device") from exc
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(name_or_path: str, device: str | None = None, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a causal LM by hub name or local directory, on `device` (auto if None).

    Raises `QoptError` with one sentence for a missing path or an unloadable model.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _check_local_path(name_or_path)
    target = pick_device(device)
    # transformers logs at warning level for routine things (unused weights, long inputs).
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as exc:
        raise QoptError(f"could not load model {name_or_path!r}: {first_line(exc)}") from exc
    model.to(target).eval()
    return wrap_model(model, tokenizer, name_or_path)


def load_skeleton(name_or_path: str) -> LoadedModel:
    """The model's modules and shapes without its weights (on the meta device).

    Enough to build a search space, resolve a strategy or count its bits.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    _check_local_path(name_or_path)
    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as exc:
        raise QoptError(f"could not load model config {name_or_path!r}: {first_line(exc)}") from exc
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return wrap_model(model, tokenizer=None, name=name_or_path)


def wrap_model(model: nn.Module, tokenizer: object, name: str) -> LoadedModel:
    """A `LoadedModel` around an already built model (used by tests and benchmarks)."""
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, units=find_units(model))


def find_units(model: nn.Module) -> list[QuantUnit]:
    """Every quantizable matrix of `model`, in module order, tied weights once."""
    embed = model.get_input_embeddings()
    head = model.get_output_embeddings()
    tied = head is not None and embed is not None and head.weight is embed.weight
    units: list[QuantUnit] = []
    names = {id(m): n for n, m in model.named_modules()}
    for name, module in model.named_modules():
        if module is embed:
            aliases = (names[id(head)],) if tied else ()
            vocab, hidden = module.weight.shape
            units.append(QuantUnit(name, "embed", module, vocab, hidden, is_embedding=True, aliases=aliases))
        elif module is head:
            if not tied:
                out, inp = module.weight.shape
                units.append(QuantUnit(name, "lm_head", module, out, inp))
        elif isinstance(module, nn.Linear):
            out, inp = module.weight.shape
            units.append(QuantUnit(name, _role(name), module, out, inp))
        elif isinstance(module, Conv1D):
            inp, out = module.weight.shape
            units.append(QuantUnit(name, _role(name), module, out, inp, transposed=True))
    return units


def _check_local_path(name_or_path: str) -> None:
    looks_local = name_or_path.startswith((".", "/", "~")) or Path(name_or_path).exists()
    if looks_local and not Path(name_or_path).expanduser().is_dir():
        raise QoptError(f"model path {name_or_path} does not exist (give a local model directory or a hub name)")


def _role(name: str) -> str:
    parts = name.split(".")
    leaf = parts[-1]
    if leaf in _ROLE_BY_NAME:
        return _ROLE_BY_NAME[leaf]
    if leaf in _AMBIGUOUS:
        in_attention = any("attn" in p or "attention" in p for p in parts[:-1])
        attention_role, mlp_role = _AMBIGUOUS[leaf]
        return attention_role if in_attention else mlp_role
    return leaf
