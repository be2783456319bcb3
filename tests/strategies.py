"""Hypothesis strategies that draw valid layer configs and whole strategies."""

from __future__ import annotations

from hypothesis import strategies as st

from qopt.strategy import ACT_BITS, FORMAT_BITS, LayerConfig, Strategy


@st.composite
def layer_configs(draw, max_group: int = 256) -> LayerConfig:
    fmt = draw(st.sampled_from(["int", "fp", "nf4"]))
    bits = draw(st.sampled_from(FORMAT_BITS[fmt]))
    granularity = draw(st.sampled_from(["tensor", "channel", "group"]))
    outliers = draw(st.sampled_from(["none", "topk", "smooth", "rotate"]))
    act = draw(st.sampled_from(["none", "int", "fp"]))
    scale = draw(st.sampled_from(["absmax", "mse", "percentile"]))
    symmetric = True if fmt != "int" else draw(st.booleans())
    roundings = ["nearest", "stochastic", "gptq", "awq"] + ([] if symmetric else ["hqq"])
    return LayerConfig(
        bits=bits,
        format=fmt,
        granularity=granularity,
        group_size=draw(st.integers(16, max_group)) if granularity == "group" else None,
        symmetric=symmetric,
        scale=scale,
        clip_percentile=draw(st.floats(90.0, 100.0)) if scale == "percentile" else None,
        outliers=outliers,
        topk_fraction=draw(st.floats(0.0001, 0.1)) if outliers == "topk" else None,
        smooth_alpha=draw(st.floats(0.0, 1.0)) if outliers == "smooth" else None,
        act_format=act,
        act_bits=draw(st.sampled_from(ACT_BITS[act])) if act != "none" else None,
        accumulation=draw(st.sampled_from(["fp32", "fp16", "bf16"])),
        rounding=draw(st.sampled_from(roundings)),
    )


@st.composite
def strategies(draw, module_names: list[str] | None = None, roles: list[str] | None = None) -> Strategy:
    names = module_names or ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj"]
    role_names = roles or ["q", "down", "up"]
    return Strategy(
        default=draw(layer_configs()),
        roles=draw(st.dictionaries(st.sampled_from(role_names), layer_configs(), max_size=2)),
        layers=draw(st.dictionaries(st.sampled_from(names), layer_configs(), max_size=2)),
        name=draw(st.text(alphabet="abcdefghij -", max_size=12)),
    )
