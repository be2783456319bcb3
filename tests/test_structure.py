"""The emergent-structure report: per-layer genes across the front, frequencies, protection."""

from __future__ import annotations

import optuna
import pytest

from qopt.space import SearchConfig, SearchSpace
from qopt.strategy import FP16
from qopt.structure import analyse, gene_value, summary
from tests.conftest import tiny_model
from tests.test_cli import run, tiny_study

BASE = FP16.evolve(bits=4, group_size=32)


def _trial(space: SearchSpace, genome, number: int, quality: float, **attrs) -> optuna.trial.FrozenTrial:
    params = space.encode(genome)
    return optuna.trial.create_trial(
        params=params,
        distributions={k: v for k, v in space.distributions().items() if k in params},
        values=[quality, space.bpw(genome)],
        user_attrs={"bpw": space.bpw(genome), **attrs},
    )


def test_gene_labels():
    assert gene_value(BASE, "granularity") == "g32" and gene_value(BASE, "bits") == "4"
    assert gene_value(FP16, "format") == "fp16" and gene_value(FP16, "granularity") == "-"
    assert gene_value(BASE.evolve(act_format="int", act_bits=8), "activations") == "int8"


def test_protected_layers_and_frequencies_from_known_genomes():
    space = SearchSpace(tiny_model("llama").units, SearchConfig(group_sizes=(32,), base=BASE))
    names = [g.name for g in space.groups]
    protected = names[3]
    low = {n: BASE.evolve(bits=3) for n in names}
    front = []
    for i, bits in enumerate((6, 8, 16)):  # the same layer kept high in every front member
        genome = {**low, protected: BASE.evolve(bits=bits) if bits < 16 else FP16}
        front.append(_trial(space, genome, i, quality=1.0 / (i + 1)))
    others = [_trial(space, {n: BASE.evolve(bits=2) for n in names}, 9, quality=5.0)]
    baseline = _trial(space, {n: BASE.evolve(bits=3) for n in names}, 10, quality=2.0, baseline="RTN int3 g32 asym")
    for number, t in enumerate(front + others + [baseline]):
        t.number = number
    structure = analyse(space, front, front + others + [baseline])
    assert structure.protection[0][0] == protected and structure.protection[0][2] == pytest.approx(1 / 3)
    assert [m.trial for m in structure.front] == sorted(
        (m.trial for m in structure.front), key=lambda n: front[n].user_attrs["bpw"]
    )
    share_front, share_population = structure.frequencies["bits"]["2"]
    assert share_front == 0 and share_population > 0
    assert all(c.baseline == "RTN int3 g32 asym" for c in structure.comparisons)
    text = summary(structure)
    assert "front: 3 strategies among 4 searched trials" in text and protected in text


def test_study_report_from_the_command_line(monkeypatch, capsys, tmp_path, tiny_llama_dir, small_text):
    settings = (
        "baselines: [3, 4]\nbudget_bpw: 4.5\n"
        "eval: {seq_len: 64, search_windows: 2, eval_windows: 2, calib_windows: 2, batch_size: 2}\n"
    )
    storage = tiny_study(monkeypatch, capsys, tmp_path, tiny_llama_dir, small_text, settings, trials=12)
    report = tmp_path / "report.html"
    code, out, err = run(monkeypatch, capsys, "study", "report", "s", "-o", str(report), "--storage", storage)
    assert code == 0, err
    assert out.startswith("front: ") and "protected layers" in out and f"wrote {report}" in out
    page = report.read_text()
    assert page.count("plotly.js v") == 1  # the library inline once: one self-contained file
    for title in ("bits per layer across the front", "outliers per layer", "which layers the search protects"):
        assert title in page
