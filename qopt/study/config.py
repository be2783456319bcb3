"""A study's configuration: what is searched, on which model and text, and the baselines.

`StudyConfig` is stored in the study's user attributes (`CONFIG_ATTR`) when
the study is created, so every worker rebuilds the same search from the
database alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna

from qopt.allocate import ALLOCATOR_OUTLIERS, ALLOCATOR_SCALES, PROXIES
from qopt.baselines import label
from qopt.errors import QoptError
from qopt.evaluate import EvalSettings
from qopt.io import read_document
from qopt.operators import VariationConfig
from qopt.space import SearchConfig
from qopt.strategy import FORMAT_BITS, FP16, LayerConfig, Strategy, drop_inactive_genes

QUALITY_OBJECTIVES = ("kl", "ppl")
EXTRA_OBJECTIVES = ("total_mib",)
#: The study user attribute holding the `StudyConfig` (as `to_dict`).
CONFIG_ATTR = "qopt:config"


@dataclass(frozen=True)
class StudyConfig:
    """Everything a study needs besides its storage.

    `objectives` are minimised: a quality (`kl` or `ppl`, on the search part),
    then `bpw`, then optionally `total_mib` (whole-model size, edges included).
    `budget_bpw` is a constraint: trials above it never enter the front.
    `collapse_kl` rejects a trial after one batch when its KL exceeds it.
    `screen_margin` is multi-fidelity screening: after the first batch
    (`eval.screen_windows` windows) a trial stops if some completed trial
    with no more bpw had a first-batch KL `screen_margin` times lower (0: off).
    KL is the screening statistic whichever quality objective is searched.
    `targets` are the bpw points refinement works at (default: the budget):
    with `variation.refine_prob` > 0 that share of trials are local moves from
    one of the best members at or under a target, screened after the first
    batch against the best there with the tighter `refine_margin`.
    `dtype` is what the model's weights are held and computed in (float32,
    bfloat16 or float16). `baselines` are enqueued as the first trials: each
    entry is a bit-width (uniform round-to-nearest), a mapping of genes laid over
    the search's `base` config (e.g. `{bits: 3, granularity: channel}` or
    `{bits: 3, rounding: gptq}`), or `{allocate: B}`: the sensitivity-based
    allocator's strategy at B true bits per weight (`qopt.allocate`, over the
    menu configs this search space can express; the first worker measures
    the per-layer sensitivities, on `windows` search windows if given, else
    all, and stores them in the study).
    """

    model: str
    data: str
    budget_bpw: float | None = None
    objectives: tuple[str, ...] = ("kl", "bpw")
    population: int = 24
    seed: int = 0
    collapse_kl: float = 4.0
    screen_margin: float = 1.25
    targets: tuple[float, ...] = ()
    refine_margin: float = 1.1
    baselines: tuple[int | Mapping[str, Any], ...] = (2, 3, 4, 8)
    device: str | None = None
    dtype: str = "float32"
    eval: EvalSettings = field(default_factory=EvalSettings)
    search: SearchConfig = field(default_factory=SearchConfig)
    variation: VariationConfig = field(default_factory=VariationConfig)

    def __post_init__(self) -> None:
        objectives = self.objectives
        if len(objectives) not in (2, 3) or objectives[0] not in QUALITY_OBJECTIVES or objectives[1] != "bpw":
            raise QoptError(
                f"objectives: {list(objectives)} must be [kl|ppl, bpw] plus optionally one of {list(EXTRA_OBJECTIVES)}"
            )
        if len(objectives) == 3 and objectives[2] not in EXTRA_OBJECTIVES:
            raise QoptError(f"objectives: third objective {objectives[2]!r} is not one of {list(EXTRA_OBJECTIVES)}")
        if self.population < 2:
            raise QoptError(f"population: {self.population} must be at least 2")
        if self.budget_bpw is not None and self.budget_bpw <= 0:
            raise QoptError(f"budget_bpw: {self.budget_bpw} must be positive")
        for key in ("screen_margin", "refine_margin"):
            margin = getattr(self, key)
            if margin != 0 and margin < 1:
                raise QoptError(f"{key}: {margin} must be 0 (off) or at least 1")
        for target in self.targets:
            if isinstance(target, bool) or not isinstance(target, (int, float)) or target <= 0:
                raise QoptError(f"targets: {target!r} must be a positive bpw")
            if self.budget_bpw is not None and target > self.budget_bpw:
                raise QoptError(f"targets: {target} is above budget_bpw {self.budget_bpw}: no trial may go there")
        baseline_strategies(self)  # reject a malformed baseline now, naming it
        allocator_seeds(self)
        from qopt.model import parse_dtype

        parse_dtype(self.dtype)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["search"]["base"] = self.search.base.to_dict()
        return _lists(data)

    @classmethod
    def from_dict(cls, data: Any, where: str = "study config") -> StudyConfig:
        if not isinstance(data, Mapping):
            raise QoptError(f"{where}: expected a mapping, got {type(data).__name__}")
        fields = _checked(cls, data, where)
        for key in ("model", "data"):
            if key not in fields:
                raise QoptError(f"{where}: {key} is required")
        if "eval" in fields:
            fields["eval"] = EvalSettings(**_checked(EvalSettings, fields["eval"], "eval"))
        if "search" in fields:
            search = _checked(SearchConfig, fields["search"], "search")
            if "base" in search:
                search["base"] = LayerConfig.from_dict(search["base"], where="search.base")
            fields["search"] = SearchConfig(**_tuples(search))
        if "variation" in fields:
            fields["variation"] = VariationConfig(**_checked(VariationConfig, fields["variation"], "variation"))
        try:
            return cls(**_tuples(fields))
        except TypeError as exc:
            raise QoptError(f"{where}: {exc}") from None

    @classmethod
    def load(cls, path: str | Path) -> StudyConfig:
        """Read a study YAML; relative model/data paths are relative to the file."""
        path = Path(path)
        config = cls.from_dict(read_document(path, "study config"), where=str(path))
        resolved = {}
        for key in ("model", "data"):
            value = getattr(config, key)
            candidate = (path.parent / value).resolve()
            if not Path(value).is_absolute() and not value.startswith("hf:") and candidate.exists():
                resolved[key] = str(candidate)
        return dataclasses.replace(config, **resolved)


@dataclass(frozen=True)
class AllocatorSeed:
    """A `{allocate: B}` baseline entry: the allocator's strategy at `budget_bpw`,
    its per-layer sensitivities measured with `proxy` (`qopt.allocate.PROXIES`) on
    `windows` search windows (None: all), over a menu with these scale rules and
    outlier policies (`qopt.allocate.menu`; fewer make the costs cheaper to measure:
    on SmolLM2-135M each GPTQ config with MSE scales costs seconds per layer)."""

    budget_bpw: float
    windows: int | None = None
    proxy: str = "kl"
    scales: tuple[str, ...] = ALLOCATOR_SCALES
    outliers: tuple[str, ...] = ALLOCATOR_OUTLIERS

    @property
    def menu_options(self) -> dict[str, tuple[str, ...]]:
        """The `qopt.allocate.menu` arguments of its menu."""
        return {"scales": self.scales, "outliers": self.outliers}

    @property
    def name(self) -> str:
        """The `baseline` user attribute of its trial (as `qopt.allocate.allocate` names it)."""
        return f"Allocator {self.budget_bpw:g} bpw"


def allocator_seeds(config: StudyConfig) -> list[AllocatorSeed]:
    """The `{allocate: B}` entries of the config's baselines."""
    seeds = []
    for i, entry in enumerate(config.baselines):
        if not (isinstance(entry, Mapping) and "allocate" in entry):
            continue
        unknown = set(entry) - {"allocate", "windows", "proxy", "scales", "outliers"}
        if unknown:
            raise QoptError(
                f"baselines[{i}]: an allocate entry takes only allocate, windows, proxy, scales and outliers, "
                f"not {sorted(unknown)}"
            )
        budget, windows, proxy = entry["allocate"], entry.get("windows"), entry.get("proxy", "kl")
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget <= 0:
            raise QoptError(f"baselines[{i}].allocate: {budget!r} must be a positive budget in bits per weight")
        if windows is not None and (isinstance(windows, bool) or not isinstance(windows, int) or windows < 1):
            raise QoptError(f"baselines[{i}].windows: {windows!r} must be a positive number of search windows")
        if proxy not in PROXIES:
            raise QoptError(f"baselines[{i}].proxy: {proxy!r} must be one of {', '.join(PROXIES)}")
        menu = {}
        for key, allowed in (("scales", ALLOCATOR_SCALES), ("outliers", ALLOCATOR_OUTLIERS)):
            chosen = entry.get(key, allowed)
            if isinstance(chosen, str) or not chosen or not set(chosen) <= set(allowed):
                raise QoptError(f"baselines[{i}].{key}: {chosen!r} must be a non-empty list of {', '.join(allowed)}")
            menu[key] = tuple(chosen)
        seeds.append(AllocatorSeed(float(budget), windows, proxy, **menu))
    return seeds


def baseline_strategies(config: StudyConfig) -> list[Strategy]:
    """The configured uniform strategies: round-to-nearest with no outliers, fp32,
    unless an entry names other genes (e.g. `{bits: 3, rounding: gptq}`).
    `{allocate: B}` entries are not uniform: see `allocator_seeds`."""
    plain = {"outliers": "none", "act_format": "none", "accumulation": "fp32", "rounding": "nearest"}
    out = []
    for i, entry in enumerate(config.baselines):
        if isinstance(entry, Mapping) and "allocate" in entry:
            continue
        genes = {"bits": entry} if isinstance(entry, int) else dict(entry)
        merged = {**config.search.base.to_dict(), **plain, **genes}
        if merged["bits"] not in FORMAT_BITS[merged.get("format", "int")]:
            merged["format"] = "int"
        try:
            layer = FP16.evolve(**drop_inactive_genes(merged))
        except QoptError as exc:
            raise QoptError(f"baselines[{i}].{exc}") from None
        out.append(Strategy(default=layer, name=label(layer)))
    return out


def stored_config(storage: optuna.storages.BaseStorage, name: str) -> dict[str, Any] | None:
    """The config stored with study `name` (None if there is no such study)."""
    try:
        study_id = storage.get_study_id_from_name(name)
    except KeyError:
        return None
    attrs = storage.get_study_user_attrs(study_id)
    if CONFIG_ATTR not in attrs:
        raise QoptError(f"study {name!r} exists but was not made by qopt (no stored config)")
    return attrs[CONFIG_ATTR]


def _checked(cls: type, data: Any, where: str) -> dict[str, Any]:
    if not isinstance(data, Mapping):
        raise QoptError(f"{where}: expected a mapping, got {type(data).__name__}")
    allowed = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - allowed
    if unknown:
        raise QoptError(f"{where}: unknown key {sorted(unknown)[0]!r} (keys: {', '.join(sorted(allowed))})")
    return dict(data)


def _tuples(data: dict[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}


def _lists(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _lists(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_lists(v) for v in data]
    return data
