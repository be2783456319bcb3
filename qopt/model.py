"""Load a Hugging Face causal LM and find its quantizable matrices and their roles.

A *unit* is one weight matrix qopt can quantize: every `nn.Linear` (and GPT-2's
`Conv1D`, which stores its weight transposed as [in, out]), the token
embedding, and the output head. Tied embedding/head weights are one unit.
Roles name what a matrix does (q, k, v, o, qkv, gate, up, down, fc1, fc2,
embed, lm_head) across Llama/Qwen2, OPT, GPT-2 and GPT-NeoX naming.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from qopt.errors import QoptError, first_line
from qopt.gguf_source import converted_folder, describe_grid, is_gguf

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
    alias_modules: tuple[nn.Module, ...] = ()

    @property
    def weight(self) -> nn.Parameter:
        return self.module.weight

    def read_weight(self) -> torch.Tensor:
        """The weight as [out, in] (a view for Linear/Embedding, a transpose for Conv1D)."""
        w = self.module.weight.detach()
        return w.T if self.transposed else w

    def swap_weight(self, weight: nn.Parameter | torch.Tensor) -> nn.Parameter:
        """Make `weight` the module's parameter (and its tied aliases'); returns the one it replaced.

        A tensor is taken as [out, in] and wrapped without a copy; a Parameter as the
        module stores it. The replaced parameter is untouched: swapping it back
        restores the model exactly, with no copy of the pristine weight kept anywhere.
        """
        if not isinstance(weight, nn.Parameter):
            weight = nn.Parameter(weight.T if self.transposed else weight, requires_grad=False)
        replaced = self.module.weight
        for module in (self.module, *self.alias_modules):
            module.weight = weight
        return replaced


@dataclass(eq=False)
class LoadedModel:
    """A causal LM, its tokenizer, and its quantizable units.

    `source_note` says, for a model read from an already quantized file (GGUF),
    what its weights were stored as; None otherwise.
    """

    model: nn.Module
    tokenizer: object
    name: str
    units: list[QuantUnit] = field(default_factory=list)
    source_note: str | None = None

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


class HeadInput:
    """While entered, the output head's input (the model's final hidden states,
    [batch, seq_len, hidden]) is kept in `hidden`, and the head computes logits for
    the first position only.

    A caller that needs every position's distribution applies the head itself, a
    chunk of positions at a time, instead of the model making a [batch, seq_len,
    vocab] tensor (805 MB for 8 x 512 tokens of a 49k vocabulary); a caller that
    needs none (calibration) saves that time and memory.
    """

    def __init__(self, model: nn.Module) -> None:
        self.head = model.get_output_embeddings()
        self.hidden: torch.Tensor | None = None
        self._handle = None

    def _hook(self, _module, args):
        self.hidden = args[0]
        return (args[0][..., :1, :], *args[1:])

    def __enter__(self) -> HeadInput:
        self._handle = self.head.register_forward_pre_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()
        self._handle = None


def pick_device(device: str | None = None) -> torch.device:
    """`device` if given, else CUDA when available, else CPU."""
    if device:
        try:
            chosen = torch.device(device)
        except RuntimeError as exc:
            raise QoptError(f"device {device!r} is not a valid torch device") from exc
        if chosen.type == "cuda":
            if not torch.cuda.is_available():
                raise QoptError(f"device {device!r}: this torch build or machine has no CUDA GPU; use --device cpu")
            if chosen.index is not None and chosen.index >= torch.cuda.device_count():
                raise QoptError(f"device {device!r}: there are only {torch.cuda.device_count()} CUDA devices")
        return chosen
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


#: The model dtypes a user can ask for (`--dtype`, `dtype:` in a study config).
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    """The torch dtype named `name` (one of `DTYPES`)."""
    if name not in DTYPES:
        raise QoptError(f"dtype {name!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


def load_model(name_or_path: str, device: str | None = None, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a causal LM by hub name, local directory or `.gguf` file, on `device` (auto if None).

    `dtype` is what the weights are held and computed in: float32 is the fast
    choice on CPUs without bf16 arithmetic, bfloat16 halves the memory.
    Raises `QoptError` with one sentence for a missing path, an unloadable model,
    or a checkpoint whose weights do not cover the model its config describes.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve_model_path(name_or_path)
    target = pick_device(device)
    if target.type == "cpu":
        check_memory(load_skeleton(folder), dtype, name_or_path)
    # transformers logs at warning level for routine things (unused weights, long inputs).
    logging.getLogger("transformers").setLevel(logging.ERROR)
    compressed = _is_compressed_tensors(folder)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype, trust_remote_code=False, output_loading_info=True
        )
        if compressed:
            model = _decompressed(model, dtype)
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except Exception as exc:  # a missing, foreign or damaged checkpoint raises many types
        raise QoptError(f"could not load model {name_or_path!r}: {first_line(exc)}") from None
    missing = info.get("missing_keys") or []
    if missing:
        raise QoptError(
            f"model {name_or_path!r} lacks {len(missing)} weights its config needs (e.g. {sorted(missing)[0]}): "
            "its weight files are missing or belong to another model"
        )
    model.to(target).eval()
    lm = wrap_model(model, tokenizer, name_or_path)
    lm.source_note = describe_grid(Path(folder)) if Path(folder).is_dir() else None
    return lm


def _is_compressed_tensors(folder: str) -> bool:
    """Whether `folder` is a compressed-tensors checkpoint (e.g. `qopt export --format compressed-tensors`)."""
    config = Path(folder) / "config.json"
    try:
        quantization = json.loads(config.read_text()).get("quantization_config") or {}
    except (OSError, ValueError):
        return False
    if quantization.get("quant_method") != "compressed-tensors":
        return False
    import importlib.util

    if importlib.util.find_spec("compressed_tensors") is None:
        raise QoptError(f"{folder} is a compressed-tensors checkpoint: pip install 'qopt[compressed-tensors]'")
    return True


def _decompressed(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A compressed-tensors model as a plain one with float weights: what qopt measures and
    quantizes (the package's quantized forward would re-round any other strategy's weights)."""
    from transformers import AutoModelForCausalLM

    model.hf_quantizer.compressor.decompress_model(model)
    side = ("weight_scale", "weight_zero_point", "weight_shape", "weight_global_scale")
    state = {k: v for k, v in model.state_dict().items() if not k.endswith(side)}
    config = model.config
    del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, _ = plain.load_state_dict(state, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight")}
    if set(missing) - tied:
        raise QoptError(f"the compressed-tensors checkpoint lacks {sorted(set(missing) - tied)[0]}")
    plain.tie_weights()
    return plain


#: What a worker holds besides the weights, as a multiple of the weights' bytes: the
#: quantized copies of the current strategy and the weight cache (at most about one more
#: copy by default), activations and Python/torch overhead. Measured: 2.2 GiB peak for
#: SmolLM2-135M's 0.54 GB of fp32 weights (scripts/bench_scale.py).
_MEMORY_FACTOR = 3.0


def check_memory(skeleton: LoadedModel, dtype: torch.dtype, name: str) -> None:
    """Refuse, in one sentence, a model that cannot fit in this machine's available memory."""
    available = _available_bytes()
    if available is None:
        return
    n_params = sum(p.numel() for p in skeleton.model.parameters())
    weights = n_params * torch.empty((), dtype=dtype).element_size()
    needed = weights * _MEMORY_FACTOR
    if needed > available:
        smaller = "; or --dtype bfloat16 to halve the weights" if dtype == torch.float32 else ""
        raise QoptError(
            f"model {name!r} ({n_params / 1e9:.2f}B parameters, {weights / 2**30:.1f} GiB of {str(dtype)[6:]} "
            f"weights) needs about {needed / 2**30:.0f} GiB to quantize and evaluate, and {available / 2**30:.1f} "
            f"GiB are available: lower eval.weight_cache_mib and eval.batch_size, or use a machine with more "
            f"memory{smaller}"
        )


def _available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), else None (no check)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def load_skeleton(name_or_path: str) -> LoadedModel:
    """The model's modules and shapes without its weights (on the meta device).

    Enough to build a search space, resolve a strategy or count its bits.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = resolve_model_path(name_or_path)
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise QoptError(f"could not load model config {name_or_path!r}: {first_line(exc)}") from exc
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return wrap_model(model, tokenizer=None, name=name_or_path)


def resolve_model_path(name_or_path: str) -> str:
    """What transformers should load for `name_or_path`: a GGUF file's converted folder
    (converted on first use), else the directory or hub name itself."""
    if is_gguf(name_or_path):
        return str(converted_folder(name_or_path))
    looks_local = name_or_path.startswith((".", "/", "~")) or Path(name_or_path).exists()
    if looks_local and not Path(name_or_path).expanduser().is_dir():
        raise QoptError(
            f"model path {name_or_path} does not exist (give a local model directory, a .gguf file or a hub name)"
        )
    return name_or_path


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
            units.append(
                QuantUnit(
                    name, "embed", module, vocab, hidden, is_embedding=True, aliases=aliases,
                    alias_modules=(head,) if tied else (),
                )
            )  # fmt: skip
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
