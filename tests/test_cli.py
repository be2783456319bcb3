"""The command line as a user runs it: presets, eval on the real model, error paths."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from qopt.cli import main
from qopt.strategy import Strategy
from tests.conftest import STORIES, TINYSTORIES


def run(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["qopt", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
        sys.exit(0)
    out, err = capsys.readouterr()
    return exit_info.value.code or 0, out, err


def tiny_study(monkeypatch, capsys, tmp_path, model_dir, text, settings: str, trials: int) -> str:
    """`qopt study create s` (tiny windows, group 32, plus `settings` YAML lines) and
    `qopt study launch s --n-trials trials` on a fresh SQLite file; returns its URL."""
    config = tmp_path / "s.yaml"
    config.write_text(
        f"model: {model_dir}\ndata: {text}\npopulation: 4\n{settings}"
        "search: {group_sizes: [32], base: {bits: 4, group_size: 32}}\n"
    )
    storage = f"sqlite:///{tmp_path / 'db.sqlite'}"
    assert run(monkeypatch, capsys, "study", "create", "s", "--config", str(config), "--storage", storage)[0] == 0
    assert run(monkeypatch, capsys, "study", "launch", "s", "--n-trials", str(trials), "--storage", storage)[0] == 0
    return storage


@pytest.fixture
def assets():
    if not STORIES.is_dir() or not TINYSTORIES.is_file():
        pytest.skip("shared assets not found (set QOPT_ASSETS)")
    return str(STORIES), str(TINYSTORIES)


def test_presets_write_valid_strategies(monkeypatch, capsys, tmp_path):
    target = tmp_path / "s.yaml"
    code, out, _ = run(
        monkeypatch, capsys, "strategy", "preset", "uniform", "--bits", "3", "--group", "64", "--sym", "-o", str(target)
    )
    assert code == 0 and "wrote" in out
    strategy = Strategy.load(target)
    assert (strategy.default.bits, strategy.default.group_size, strategy.default.symmetric) == (3, 64, True)
    code, out, _ = run(
        monkeypatch,
        capsys,
        "strategy",
        "preset",
        "uniform",
        "--bits",
        "4",
        "--format",
        "nf4",
        "--granularity",
        "channel",
    )
    assert code == 0 and yaml.safe_load(out)["default"]["format"] == "nf4"
    code, out, _ = run(monkeypatch, capsys, "strategy", "preset", "fp16", "-o", str(tmp_path / "fp.json"))
    assert code == 0 and Strategy.load(tmp_path / "fp.json") == Strategy(name="fp16")


def test_eval_json_on_the_real_model(monkeypatch, capsys, tmp_path, assets):
    model, data = assets
    strategy = tmp_path / "s.yaml"
    run(monkeypatch, capsys, "strategy", "preset", "uniform", "--bits", "4", "--group", "64", "-o", str(strategy))
    code, out, _ = run(
        monkeypatch, capsys, "eval", "-m", model, "-s", str(strategy), "-d", data, "--windows", "4", "--json"
    )
    assert code == 0
    metrics = json.loads(out)
    assert {"bpw", "ppl", "kl", "top1", "tokens", "seconds"} <= set(metrics)
    assert metrics["bpw"] == pytest.approx(4.514, abs=1e-3) and metrics["tokens"] == 4 * 512
    assert metrics["kl"] > 0 and metrics["ppl"] > metrics["fp_ppl"]


def test_strategy_show_lists_every_layer(monkeypatch, capsys, tmp_path, assets):
    model, _ = assets
    strategy = tmp_path / "s.yaml"
    run(monkeypatch, capsys, "strategy", "preset", "uniform", "--bits", "3", "--group", "32", "-o", str(strategy))
    code, out, _ = run(monkeypatch, capsys, "strategy", "show", str(strategy), "-m", model)
    assert code == 0
    # 64-wide layers: 3 + 32/32 = 4 bpw; down (172 = 5 x 32 + 12 inputs): 3 + 6 x 32/172 = 4.116 bpw
    assert "down        64x172   4.116 bpw  int3 g32 asym" in out
    assert "blocks 4.028 bpw" in out and "head tied to embed" in out


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing-model", "error: model path /no/such/model does not exist"),
        ("bad-yaml", "is not valid YAML: line 2"),
        ("missing-data", "error: data file /no/such/data.txt does not exist"),
        ("unknown-module", "layers.model.layers.9.mlp.down_proj: the model has no quantizable module"),
        ("group-too-wide", "default.group_size: 128 is larger than"),
        ("bad-gene", "default.format: 'fp' has no 3-bit grid"),
        ("bad-part", "--part must be one of search, validation, eval"),
    ],
)
def test_eval_errors_are_one_clear_line(monkeypatch, capsys, tmp_path, assets, case, message):
    model, data = assets
    good = _write(tmp_path, "good.yaml", "default: {bits: 4, group_size: 64}\n")
    args = {"model": model, "strategy": good, "data": data, "part": "eval"}
    if case == "missing-model":
        args["model"] = "/no/such/model"
    elif case == "bad-yaml":
        args["strategy"] = _write(tmp_path, "bad.yaml", "default: {bits: 4\n")
    elif case == "missing-data":
        args["data"] = "/no/such/data.txt"
    elif case == "unknown-module":
        args["strategy"] = _write(tmp_path, "s.yaml", "layers:\n  model.layers.9.mlp.down_proj: {bits: 3}\n")
    elif case == "group-too-wide":
        args["strategy"] = _write(tmp_path, "s.yaml", "default: {bits: 4, group_size: 128}\n")
    elif case == "bad-gene":
        args["strategy"] = _write(tmp_path, "s.yaml", "default: {bits: 3, format: fp}\n")
    elif case == "bad-part":
        args["part"] = "train"
    code, out, err = run(
        monkeypatch,
        capsys,
        "eval",
        "-m",
        args["model"],
        "-s",
        args["strategy"],
        "-d",
        args["data"],
        "--part",
        args["part"],
    )
    assert code == 2 and out == ""
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err


def test_study_commands_end_to_end(monkeypatch, capsys, tmp_path, tiny_llama_dir, small_text):
    config = tmp_path / "study.yaml"
    config.write_text(
        f"model: {tiny_llama_dir}\ndata: {small_text}\nbudget_bpw: 3.5\npopulation: 4\nbaselines: [3, 8]\n"
        "eval: {seq_len: 64, search_windows: 2, eval_windows: 2, calib_windows: 2, batch_size: 2}\n"
        "search: {group_sizes: [16, 32], base: {bits: 4, group_size: 32}}\n"
    )
    storage = f"sqlite:///{tmp_path / 'db.sqlite'}"
    code, out, _ = run(monkeypatch, capsys, "study", "create", "t", "--config", str(config), "--storage", storage)
    assert code == 0 and "2 trials" in out
    code, out, _ = run(monkeypatch, capsys, "study", "launch", "t", "--n-trials", "8", "--storage", storage)
    assert code == 0 and "8 trials ran in this launch: 8 completed" in out
    code, out, _ = run(monkeypatch, capsys, "study", "status", "t", "--storage", storage, "--json")
    assert json.loads(out)["trials"] == 8
    code, out, _ = run(monkeypatch, capsys, "study", "front", "t", "--storage", storage, "--json")
    members = json.loads(out)
    assert members and {"trial", "bpw", "eval_kl", "eval_ppl", "baseline"} <= set(members[0])
    best = tmp_path / "best.yaml"
    code, out, _ = run(
        monkeypatch, capsys, "study", "best", "t", "--max-bpw", "3.5", "-o", str(best), "--storage", storage
    )
    assert code == 0 and Strategy.load(best).layers
    html = tmp_path / "front.html"
    code, _, _ = run(monkeypatch, capsys, "study", "plot", "t", "-o", str(html), "--storage", storage)
    assert code == 0 and "Pareto front" in html.read_text()
    code, _, err = run(monkeypatch, capsys, "study", "launch", "nope", "--n-trials", "1", "--storage", storage)
    assert code == 2 and "error: no study named 'nope'" in err and "Traceback" not in err
    code, _, err = run(monkeypatch, capsys, "study", "launch", "t", "--storage", storage)
    assert code == 2 and "give --n-trials, --until or --timeout" in err


def test_compose_commands_are_real_cli_commands(monkeypatch, capsys):
    """docker-compose.yml runs exactly the commands the tests run natively: they must parse."""
    compose = yaml.safe_load((Path(__file__).parents[1] / "docker-compose.yml").read_text())
    commands = [s["command"] for s in compose["services"].values() if s.get("image") == "qopt:latest"]
    assert len(commands) == 3
    for command in commands:
        code, out, err = run(monkeypatch, capsys, *command, "--help")
        assert code == 0 and "Usage" in out, (command, err)
    assert compose["services"]["worker"]["environment"]["QOPT_STORAGE"].startswith("postgresql+psycopg://")
