"""Bad input, as a hostile but fair user gives it: one line on stderr, a non-zero exit, no
traceback, and nothing destroyed or created where it should not be."""

from __future__ import annotations

import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qopt.strategy import uniform


def qopt(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "qopt", *args], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_llama_dir, small_text) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad")
    garbage = root / "garbage.bin"
    garbage.write_bytes(bytes(range(256)) * 64)
    strategy = root / "int4.yaml"
    uniform(4, group_size=32).save(strategy)
    pickled = root / "pickled-model"
    shutil.copytree(tiny_llama_dir, pickled)
    (pickled / "model.safetensors").unlink()
    (pickled / "pytorch_model.bin").write_bytes(pickle.dumps({"not": "weights"}) + b"\x00garbage")
    missing = root / "no-weights"
    shutil.copytree(tiny_llama_dir, missing)
    (missing / "model.safetensors").unlink()
    occupied = root / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("keep me")
    a_file = root / "a-file.txt"
    a_file.write_text("keep me")
    config = root / "study.yaml"
    config.write_text(f"model: {tiny_llama_dir}\ndata: {garbage}\nbudget_bpw: 4\n")
    return {
        "model": tiny_llama_dir, "data": small_text, "garbage": garbage, "strategy": strategy, "pickled": pickled,
        "missing": missing, "occupied": occupied, "a_file": a_file, "config": config, "root": root,
    }  # fmt: skip


def _eval(f, *extra: str) -> list[str]:
    return ["eval", "-m", str(f["model"]), "-s", str(f["strategy"]), "-d", str(f["data"]), "--windows", "1", *extra]


def _export(f, output: Path | str, *extra: str) -> list[str]:
    return ["export", "-s", str(f["strategy"]), "-m", str(f["model"]), "-o", str(output), *extra]


CASES = {
    "binary data": (lambda f: _eval(f)[:-4] + ["-d", str(f["garbage"])], "is not UTF-8 text"),
    "binary data at create": (lambda f: ["study", "create", "s", "-c", str(f["config"]), "--storage",
                                         f"sqlite:///{f['root']}/create.db"], "is not UTF-8 text"),
    "device cuda:7": (lambda f: _eval(f, "--device", "cuda:7"), "cuda:7"),
    "pickled weights": (lambda f: _eval(f)[:1] + ["-m", str(f["pickled"])] + _eval(f)[3:], "could not load model"),
    "weights missing": (lambda f: _eval(f)[:1] + ["-m", str(f["missing"])] + _eval(f)[3:], "could not load|lacks"),
    "export unwritable": (lambda f: _export(f, "/proc/qopt-out"), "cannot write output"),
    "export under a file": (lambda f: _export(f, f["a_file"] / "out"), "cannot write output"),
    "export onto a file": (lambda f: _export(f, f["a_file"]), "is a file"),
    "export into the model": (lambda f: _export(f, f["model"], "--force"), "source model's folder"),
    "export into a full folder": (lambda f: _export(f, f["occupied"]), "already holds files; pass --force"),
    "n-trials 0": (lambda f: ["study", "launch", "s", "--n-trials", "0", "--storage",
                              f"sqlite:///{f['root']}/launch.db"], "at least 1"),
    "status, no database": (lambda f: ["study", "status", "s", "--storage",
                                       f"sqlite:///{f['root']}/nowhere/x.db"], "no study database"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_a_non_zero_exit(files, case):
    make, message = CASES[case]
    result = qopt(*make(files))
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-2000:]
    import re

    assert re.search(message, errors[0]), errors[0]


def test_nothing_was_destroyed_or_created(files):
    for case in ("export onto a file", "export into a full folder", "status, no database", "export into the model"):
        qopt(*CASES[case][0](files))
    assert files["a_file"].read_text() == "keep me"
    assert [p.name for p in files["occupied"].iterdir()] == ["notes.txt"]
    assert not (files["root"] / "nowhere").exists()
    assert (files["model"] / "model.safetensors").is_file()
    assert not list(files["root"].glob(".*.partial"))


def test_export_with_force_replaces_a_folder_whole(files, tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    result = qopt(*_export(files, target, "--force"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert not (target / "stale.txt").exists() and (target / "model.safetensors").is_file()


@pytest.mark.parametrize(
    "option, value", [("--until", "0"), ("--timeout", "-1"), ("--heartbeat", "0"), ("--workers", "0")]
)
def test_launch_numbers_are_checked_before_any_work(files, tmp_path, option, value):
    url = f"sqlite:///{tmp_path}/s.db"
    config = tmp_path / "ok.yaml"
    config.write_text(f"model: {files['model']}\ndata: {files['data']}\nbudget_bpw: 4\n")
    assert qopt("study", "create", "s", "-c", str(config), "--storage", url).returncode == 0
    result = qopt("study", "launch", "s", "--n-trials", "5", option, value, "--storage", url)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert option.lstrip("-") in result.stderr and "Loading weights" not in result.stderr
