"""The sensitivity-based allocator: an exact budgeted choice, measured costs, the CLI."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from qopt.allocate import allocate, anchor, measure_costs, menu, output_error, proxy_fit, solve
from qopt.errors import QoptError
from qopt.evaluate import EvalSettings, Evaluator
from tests.conftest import random_split, tiny_model
from tests.test_cli import run

#: A small menu of every kind the default one has: RTN and GPTQ, abs-max and MSE scales,
#: unrotated and rotated, per channel and in groups of 32, at 2, 3 and 8 bits (+ 16-bit).
MENU = menu(32, bits=(2, 3, 8))


def _brute_force(bits: np.ndarray, error: np.ndarray, budget: int) -> float:
    best = np.inf
    for choice in itertools.product(*(range(bits.shape[1]) for _ in range(bits.shape[0]))):
        rows = np.arange(bits.shape[0])
        if bits[rows, list(choice)].sum() <= budget:
            best = min(best, error[rows, list(choice)].sum())
    return best


@pytest.mark.parametrize("seed", range(30))
def test_solve_equals_brute_force_and_fits_the_budget(seed):
    rng = np.random.default_rng(seed)
    bits = rng.integers(1, 40, size=(5, 4))
    error = rng.random((5, 4))
    budget = int(rng.integers(bits.min(axis=1).sum(), bits.max(axis=1).sum() + 1))
    choice = solve(bits, error, budget)
    rows = np.arange(5)
    assert bits[rows, choice].sum() <= budget
    assert error[rows, choice].sum() == pytest.approx(_brute_force(bits, error, budget))


@pytest.mark.parametrize("seed", range(10))
def test_solve_on_a_coarse_grid_never_exceeds_the_budget(seed):
    rng = np.random.default_rng(seed)
    bits = rng.integers(10_000, 400_000, size=(30, 8))
    error = rng.random((30, 8))
    budget = int(bits.mean(axis=1).sum())
    choice = solve(bits, error, budget, resolution=500)  # a step of thousands of bits
    assert bits[np.arange(30), choice].sum() <= budget


def test_solve_refuses_a_budget_nothing_fits():
    with pytest.raises(QoptError, match="no choice fits"):
        solve(np.array([[10, 20], [10, 20]]), np.zeros((2, 2)), 15)


@pytest.fixture(scope="module")
def costs_and_evaluator():
    evaluator = Evaluator(tiny_model("llama"), random_split(n_search=4, seq_len=32), EvalSettings(batch_size=4))
    return measure_costs(evaluator, MENU, progress=False), evaluator


def test_measured_costs_and_allocations(costs_and_evaluator):
    costs, evaluator = costs_and_evaluator
    assert costs.error.shape == costs.bits.shape == (14, len(costs.menu))
    fp16 = [j for j, c in enumerate(costs.menu) if not c.quantizes_weights]
    assert (costs.error[:, fp16] == 0).all() and (costs.bits[:, fp16] >= costs.bits).all()  # free, and dearest
    two_bit = [j for j, c in enumerate(costs.menu) if c.bits == 2 and c.rounding == "nearest"]
    eight_bit = [j for j, c in enumerate(costs.menu) if c.bits == 8 and c.rounding == "nearest"]
    assert costs.error[:, two_bit].mean() > costs.error[:, eight_bit].mean()  # the proxy sees precision
    previous = np.inf
    for budget in (3.0, 4.0, 6.0):
        strategy = allocate(costs, budget)
        measured = evaluator.evaluate(strategy, "search")
        assert measured.bpw <= budget
        predicted = costs.predicted([costs.menu.index(strategy.layers[name]) for name in costs.layers])
        assert predicted <= previous  # more bits never predicts worse
        previous = predicted
    rho, pairs = proxy_fit(evaluator, costs, n_samples=8, progress=False)
    assert len(pairs) == 8 and -1.0 <= rho <= 1.0


def test_output_error_is_the_mean_squared_output_error_per_token():
    torch.manual_seed(0)
    w, x = torch.randn(6, 8), torch.randn(50, 8)
    w_hat = w + 0.1 * torch.randn(6, 8)
    hessian = x.T @ x / len(x)
    per_token = ((x @ (w_hat - w).T) ** 2).sum(1).mean()
    assert output_error(w, w_hat, hessian) == pytest.approx(float(per_token), rel=1e-5)


def test_the_hessian_proxy_is_anchored_on_the_kl_proxy_and_ranks_like_it(costs_and_evaluator):
    """One single-layer KL per layer (the anchor config) scales the output errors into KL:
    the anchor column is the KL proxy's, and the other configs rank as the KL proxy ranks them."""
    kl_costs, evaluator = costs_and_evaluator
    costs = measure_costs(evaluator, MENU, proxy="hessian", progress=False)
    pivot = anchor(costs.menu)
    assert costs.menu[pivot].describe() == "int3 g32 asym"  # round-to-nearest, abs-max, unrotated
    assert costs.error[:, pivot] == pytest.approx(kl_costs.error[:, pivot], rel=1e-9)
    assert (costs.bits == kl_costs.bits).all()
    fp16 = [j for j, c in enumerate(costs.menu) if not c.quantizes_weights]
    assert (costs.error[:, fp16] == 0).all()
    plain = {"rounding": "nearest", "scale": "absmax", "outliers": "none"}
    for scaling in ("channel", "group"):  # fewer bits, more error, layer by layer
        columns = [
            j
            for j, c in enumerate(costs.menu)
            if c.granularity == scaling and all(getattr(c, gene) == value for gene, value in plain.items())
        ]
        assert (np.diff(costs.error[:, columns], axis=1) < 0).all()
    quantized = [j for j, c in enumerate(costs.menu) if c.quantizes_weights]
    a, b = costs.error[:, quantized].ravel(), kl_costs.error[:, quantized].ravel()
    rank_a, rank_b = a.argsort().argsort(), b.argsort().argsort()
    assert np.corrcoef(rank_a, rank_b)[0, 1] > 0.9


def test_an_unknown_proxy_is_refused(monkeypatch, capsys, costs_and_evaluator):
    _, evaluator = costs_and_evaluator
    with pytest.raises(QoptError, match="unknown allocator proxy"):
        measure_costs(evaluator, MENU, proxy="fisher", progress=False)
    code, _, err = run(
        monkeypatch, capsys, "baseline", "run", "-m", "x", "-d", "y", "--methods", "allocate", "--budget", "3",
        "--proxy", "fisher",
    )  # fmt: skip
    assert code == 2 and "--proxy 'fisher'" in err


def test_baseline_run_allocates_at_each_budget(monkeypatch, capsys, tiny_llama_dir, small_text):
    code, out, err = run(
        monkeypatch, capsys, "baseline", "run", "-m", str(tiny_llama_dir), "-d", str(small_text),
        "--methods", "gptq,allocate", "--budget", "3.5,5", "--bits", "3", "--group", "32", "--windows", "2", "--json",
    )  # fmt: skip
    assert code == 0, err
    rows = json.loads(out)
    allocated = [r for r in rows if r["method"] == "allocate"]
    assert [r["bits"] for r in allocated] == [3.5, 5.0]
    assert all(r["bpw"] <= r["bits"] for r in allocated)
    code, _, err = run(monkeypatch, capsys, "baseline", "run", "-m", "x", "-d", "y", "--methods", "allocate")
    assert code == 2 and "--methods allocate needs --budget" in err


def test_allocations_seed_a_study(monkeypatch, capsys, tmp_path, tiny_llama_dir, small_text):
    from tests.test_baselines import _study

    storage = _study(monkeypatch, capsys, tmp_path, tiny_llama_dir, small_text, "bits, scaling, rounding")
    args = ["baseline", "run", "--study", "s", "--storage", storage, "--methods", "allocate", "--budget", "4"]
    code, out, err = run(monkeypatch, capsys, *args, "--group", "32", "--json")
    assert code == 0, err
    (row,) = json.loads(out)
    assert isinstance(row["trial"], int) and row["bpw"] <= 4.0
    code, out, _ = run(monkeypatch, capsys, "study", "front", "s", "--storage", storage, "--json")
    seeded = {m["trial"]: m for m in json.loads(out)}[row["trial"]]
    assert seeded["baseline"] == "Allocator 4 bpw" and seeded["bpw"] == pytest.approx(row["bpw"])


def test_costs_merge_over_groups_and_survive_a_round_trip(costs_and_evaluator):
    costs, _ = costs_and_evaluator
    half = len(costs.layers) // 2
    merged = costs.merged({"a": costs.layers[:half], "b": costs.layers[half:]})
    assert merged.layers == ("a", "b")
    np.testing.assert_array_equal(merged.bits[0], costs.bits[:half].sum(0))
    np.testing.assert_allclose(merged.error[1], costs.error[half:].sum(0))
    again = type(costs).from_dict(json.loads(json.dumps(costs.to_dict())))
    assert again.menu == costs.menu and again.layers == costs.layers
    np.testing.assert_array_equal(again.bits, costs.bits)
    np.testing.assert_array_equal(again.error, costs.error)


def test_low_fidelity_costs_score_only_the_first_windows(costs_and_evaluator):
    _, evaluator = costs_and_evaluator
    strategy = allocate(measure_costs(evaluator, menu(32)[:2] + menu(32)[-1:], progress=False), 6.0)
    full, first = evaluator.evaluate(strategy, "search"), evaluator.evaluate(strategy, "search", windows=1)
    assert first.tokens == full.tokens // len(evaluator.split.search)
    assert first.kl == pytest.approx(first.screen_kl) and first.kl != full.kl
    with pytest.raises(QoptError, match="at least 1"):
        evaluator.evaluate(strategy, "search", windows=0)


@pytest.mark.parametrize("windows", [2, 3])
def test_low_fidelity_scores_end_inside_a_batch(windows):
    """First batch 1 window, then batches of 4: scoring 2 or 3 of 4 windows ends inside the
    second batch, and each window is still compared with its own reference."""
    evaluator = Evaluator(
        tiny_model("llama"), random_split(n_search=4, seq_len=32), EvalSettings(batch_size=4, screen_windows=1)
    )
    from qopt.strategy import FP16, Strategy

    blocks = [u.name for u in evaluator.lm.units if ".mlp." in u.name]
    unquantized = evaluator.evaluate(Strategy(layers=dict.fromkeys(blocks, FP16)), "search", windows=windows)
    assert unquantized.tokens == windows * 32 and abs(unquantized.kl) < 1e-4
    quantized = Strategy(layers=dict.fromkeys(blocks, menu(32)[0]))  # int2 per channel
    assert evaluator.evaluate(quantized, "search", windows=windows).kl > 1e-3


def test_allocate_entries_seed_a_study_at_launch(tmp_path, tiny_llama_dir, small_text):
    """`{allocate: B}` baselines: the first launch measures the costs once, stores them in the
    study and enqueues the allocator's strategy at each budget; a relaunch reuses them."""
    import optuna

    from qopt import study as qstudy
    from qopt.space import SearchConfig
    from qopt.strategy import FP16
    from qopt.study.allocation import COSTS_ATTR_PREFIX, space_menu

    config = qstudy.StudyConfig(
        model=str(tiny_llama_dir),
        data=str(small_text),
        budget_bpw=4.5,
        population=4,
        baselines=(
            3,
            {"allocate": 3.5, "windows": 1},
            {"allocate": 4.5, "windows": 1, "proxy": "hessian", "scales": ["absmax"], "outliers": ["none"]},
        ),
        eval=EvalSettings(seq_len=64, search_windows=2, eval_windows=2, calib_windows=2, batch_size=2),
        search=SearchConfig(
            families=("bits", "rounding"), group_sizes=(32,), base=FP16.evolve(bits=4, group_size=32, rounding="gptq")
        ),
    )
    url = f"sqlite:///{tmp_path / 's.db'}"
    qstudy.create("s", config, url)
    qstudy.launch("s", n_trials=3, url=url, progress=False)
    study = optuna.load_study(study_name="s", storage=url)
    names = [t.user_attrs.get("baseline") for t in study.trials]
    assert names[:3] == ["RTN int3 g32 asym", "Allocator 3.5 bpw", "Allocator 4.5 bpw"]  # the first trials
    for trial, budget in zip(study.trials[1:3], (3.5, 4.5), strict=True):
        assert trial.state.name == "COMPLETE" and trial.user_attrs["bpw"] <= budget
    stored = study.user_attrs[f"{COSTS_ATTR_PREFIX}1"]
    narrow = study.user_attrs[f"{COSTS_ATTR_PREFIX}hessian:1:absmax+none"]  # each proxy's and menu's, apart
    assert [c["bits"] for c in narrow["menu"]] == [c["bits"] for c in stored["menu"]]  # nothing to drop here
    space = qstudy.SearchRun(config).space
    # The menu is what this space can express: its bits, its base's scaling, both roundings.
    assert len(stored["menu"]) == len(space_menu(space)) == 6 * 2 + 1
    qstudy.launch("s", n_trials=1, url=url, progress=False)  # nothing to measure or enqueue again
    assert sum("baseline" in t.user_attrs for t in optuna.load_study(study_name="s", storage=url).trials) == 3


def test_the_menu_offers_what_the_space_can_hold(tiny_llama_dir, small_text):
    """The default menu refines every bit-width and scaling with MSE scales and rotation;
    a study's allocator keeps only the configs its search space can express."""
    from qopt import study as qstudy
    from qopt.space import SearchConfig
    from qopt.study.allocation import space_menu

    full = menu(32)
    assert len(full) == 6 * 2 * 2 * 2 * 2 + 1 and len(set(full)) == len(full)
    assert {(c.scale, c.outliers) for c in full if c.quantizes_weights} == {
        ("absmax", "none"), ("absmax", "rotate"), ("mse", "none"), ("mse", "rotate"),
    }  # fmt: skip
    spaces = {}
    for families, kinds, size in (
        (("bits", "scaling", "outliers", "rounding"), 4, 6 * 2 * 2 * 4),
        (("bits", "scaling", "rounding"), 2, 6 * 2 * 2 * 2),  # no rotation
        (("bits", "rounding"), 1, 6 * 2),  # the base's scaling only: int per channel, abs-max
    ):
        config = qstudy.StudyConfig(
            model=str(tiny_llama_dir), data=str(small_text),
            search=SearchConfig(families=families, group_sizes=(32,), base=menu(32)[0].evolve(bits=4)),
        )  # fmt: skip
        spaces[families] = qstudy.SearchRun(config).space
        quantized = [c for c in space_menu(spaces[families]) if c.quantizes_weights]
        assert len({(c.scale, c.outliers) for c in quantized}) == kinds and len(quantized) == size
    full_space = spaces["bits", "scaling", "outliers", "rounding"]
    narrow = [c for c in space_menu(full_space, scales=("absmax",), outliers=("rotate",)) if c.quantizes_weights]
    assert {(c.scale, c.outliers) for c in narrow} == {("absmax", "rotate")} and len(narrow) == 6 * 2 * 2


def test_malformed_allocate_entries_are_refused(tiny_llama_dir, small_text):
    from qopt import study as qstudy

    for entry, message in (
        ({"allocate": -1}, "positive budget"),
        ({"allocate": 3, "windows": 0}, "positive number of search windows"),
        ({"allocate": 3, "bits": 4}, "only allocate, windows, proxy, scales and outliers"),
        ({"allocate": 3, "scales": ["mse", "percentile"]}, "non-empty list of absmax, mse"),
        ({"allocate": 3, "outliers": []}, "non-empty list of none, rotate"),
        ({"allocate": 3, "proxy": "fisher"}, "must be one of kl, hessian"),
    ):
        with pytest.raises(QoptError, match=message):
            qstudy.StudyConfig(model=str(tiny_llama_dir), data=str(small_text), baselines=(entry,))
