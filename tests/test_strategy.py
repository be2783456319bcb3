"""The genome: validation, canonical form, YAML/JSON round trips, resolution."""

from __future__ import annotations

import pytest
from hypothesis import given, settings

from qopt.errors import QoptError
from qopt.strategy import FP16, LayerConfig, Strategy, uniform
from tests.conftest import tiny_model
from tests.strategies import layer_configs, strategies


@settings(max_examples=200, deadline=None)
@given(strategies())
def test_yaml_and_json_round_trip(tmp_path_factory, strategy):
    folder = tmp_path_factory.mktemp("rt")
    for suffix in (".yaml", ".json"):
        path = folder / f"s{suffix}"
        strategy.save(path)
        assert Strategy.load(path) == strategy


@settings(max_examples=200, deadline=None)
@given(layer_configs())
def test_dict_round_trip_and_evolve_identity(config):
    assert LayerConfig.from_dict(config.to_dict()) == config
    assert config.evolve() == config


@pytest.mark.parametrize(
    "genes, field",
    [
        ({"bits": 7}, "bits"),
        ({"bits": 3, "format": "fp"}, "format"),
        ({"bits": 8, "format": "nf4"}, "format"),
        ({"bits": 4, "format": "nf4", "symmetric": False}, "symmetric"),
        ({"bits": 4, "granularity": "diagonal"}, "granularity"),
        ({"bits": 4, "group_size": 8}, "group_size"),
        ({"bits": 4, "group_size": 512}, "group_size"),
        ({"bits": 4, "granularity": "channel", "group_size": 64}, "group_size"),
        ({"bits": 4, "scale": "minmax"}, "scale"),
        ({"bits": 4, "outliers": "topk", "topk_fraction": 0.5}, "topk_fraction"),
        ({"bits": 4, "smooth_alpha": 0.5}, "smooth_alpha"),
        ({"bits": 4, "act_format": "fp", "act_bits": 4}, "act_bits"),
        ({"bits": 4, "act_bits": 8}, "act_bits"),
        ({"bits": 4, "accumulation": "fp8"}, "accumulation"),
        ({"bits": 4, "rounding": "up"}, "rounding"),
        ({"bits": 4, "rounding": "hqq", "symmetric": True}, "rounding"),
        ({"bits": 4, "format": "nf4", "rounding": "hqq"}, "rounding"),
        ({"bits": 4, "colour": "red"}, "colour"),
        ({"bits": "four"}, "bits"),
        ({"bits": 4, "symmetric": "yes"}, "symmetric"),
    ],
)
def test_invalid_genes_are_rejected_naming_the_field(genes, field):
    with pytest.raises(QoptError, match=rf"^default\.{field}:"):
        Strategy.from_dict({"default": genes})


def test_conditional_genes_appear_and_vanish():
    config = LayerConfig().evolve(bits=4)
    assert config.group_size == 128
    channel = config.evolve(granularity="channel")
    assert channel.group_size is None
    assert channel.evolve(granularity="group").group_size == 128
    topk = config.evolve(outliers="topk")
    assert topk.topk_fraction == 0.01 and topk.evolve(outliers="none").topk_fraction is None
    assert config.evolve(act_format="int").act_bits == 8
    assert config.evolve(format="nf4").symmetric is True


def test_partial_overrides_are_laid_over_default():
    strategy = Strategy.from_dict(
        {
            "default": {"bits": 4, "group_size": 64},
            "roles": {"down": {"bits": 8}},
            "layers": {"lm_head": {"granularity": "channel"}},
        }
    )
    assert strategy.roles["down"] == strategy.default.evolve(bits=8)
    assert strategy.layers["lm_head"].group_size is None and strategy.layers["lm_head"].bits == 4


def test_resolution_order_and_edge_roles():
    strategy = Strategy(
        default=LayerConfig().evolve(bits=4, group_size=32),
        roles={"down": LayerConfig().evolve(bits=8, group_size=32)},
        layers={"model.layers.0.mlp.down_proj": LayerConfig().evolve(bits=3, group_size=32)},
    )
    lm = tiny_model("llama")
    plan = strategy.resolve(lm.units)
    assert plan["model.layers.0.mlp.down_proj"].bits == 3
    assert plan["model.layers.1.mlp.down_proj"].bits == 8
    assert plan["model.layers.1.mlp.up_proj"].bits == 4
    assert plan["model.embed_tokens"] == FP16  # edges stay 16-bit unless named


def test_resolution_errors():
    lm = tiny_model("llama")
    cases = [
        (
            Strategy(layers={"model.layers.7.mlp.up_proj": FP16}),
            r"^layers\.model\.layers\.7\.mlp\.up_proj: .*did you mean",
        ),
        (Strategy(layers={"lm_head": FP16}), r"^layers\.lm_head: this weight is tied to model\.embed_tokens"),
        (Strategy(roles={"fc1": FP16}), r"^roles\.fc1: the model has no layer of that role"),
        (uniform(4, group_size=128), r"^default\.group_size: 128 is larger than .* input dimension 64"),
        (Strategy(roles={"embed": FP16.evolve(act_format="int")}), r"^roles\.embed: .* embedding"),
        (Strategy(roles={"embed": FP16.evolve(bits=4, group_size=32, outliers="rotate")}), r"^roles\.embed\.outliers"),
    ]
    for strategy, message in cases:
        with pytest.raises(QoptError, match=message):
            strategy.resolve(lm.units)


def test_load_errors(tmp_path):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("default: {bits: 4\n")
    with pytest.raises(QoptError, match=r"not valid YAML: line 2"):
        Strategy.load(bad_yaml)
    not_mapping = tmp_path / "list.yaml"
    not_mapping.write_text("- 1\n- 2\n")
    with pytest.raises(QoptError, match="must be a mapping"):
        Strategy.load(not_mapping)
    unknown = tmp_path / "unknown.json"
    unknown.write_text('{"default": {}, "extra": 1}')
    with pytest.raises(QoptError, match="unknown strategy key"):
        Strategy.load(unknown)
    with pytest.raises(QoptError, match="does not exist"):
        Strategy.load(tmp_path / "missing.yaml")


def test_key_ignores_name():
    assert uniform(4, name="a").key() == uniform(4, name="b").key()
    assert uniform(4).key() != uniform(3).key()
