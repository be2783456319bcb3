"""Plots of a study: the accuracy-versus-bits front against the baselines."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import optuna
import plotly.graph_objects as go
from optuna.trial import FrozenTrial

from qopt.study import FrontMember, StudyConfig, completed


def front_figure(study: optuna.Study, config: StudyConfig, members: Sequence[FrontMember] = ()) -> go.Figure:
    """Every completed trial, the feasible Pareto front, baselines, budget and fp16 reference.

    x: true bits per weight (with a budget, the range around it); y: the
    quality objective on the search part (log scale). Front members with
    held-out metrics also show their eval-part value (open circles).
    """
    quality = config.objectives[0]
    label = {"kl": "KL to the unquantized model (nats/token)", "ppl": "perplexity"}[quality]
    trials = completed(study)
    searched = [t for t in trials if "baseline" not in t.user_attrs]
    baselines = [t for t in trials if "baseline" in t.user_attrs]
    front = sorted((t for t in study.best_trials if "baseline" not in t.user_attrs), key=lambda t: t.user_attrs["bpw"])
    fig = go.Figure()
    fig.add_trace(
        _trial_points(
            searched, "searched strategies", mode="markers", marker=dict(color="rgba(120,120,120,0.45)", size=6)
        )
    )
    fig.add_trace(
        _trial_points(
            front,
            "Pareto front (search part)",
            mode="lines+markers",
            line_shape="hv",
            marker=dict(color="#1f77b4", size=9),
        )  # fmt: skip
    )
    held_out = [m for m in members if m.baseline is None]
    if held_out and quality == "kl":
        fig.add_trace(
            go.Scatter(
                x=[m.bpw for m in held_out],
                y=[m.eval_kl for m in held_out],
                mode="markers",
                name="front, evaluation part",
                marker=dict(color="#1f77b4", size=11, symbol="circle-open"),
                text=[f"trial {m.trial}" for m in held_out],
            )
        )
    fig.add_trace(
        _trial_points(
            baselines,
            "human baselines (RTN)",
            mode="markers+text",
            textposition="top center",
            marker=dict(color="#d62728", size=12, symbol="diamond"),
            text=[t.user_attrs["baseline"].removeprefix("RTN ") for t in baselines],
        )  # fmt: skip
    )
    if config.budget_bpw is not None:
        fig.add_vline(x=config.budget_bpw, line_dash="dash", annotation_text=f"budget {config.budget_bpw} bpw")
        # Focus on the budget's neighbourhood; far baselines (8-bit) stay in `qopt study front`.
        low = min([t.user_attrs["bpw"] for t in trials] + [config.budget_bpw])
        fig.update_xaxes(range=[low - 0.2, config.budget_bpw + 1.5])
    fig.add_annotation(
        text="fp16 reference: KL 0 at 16 bpw" if quality == "kl" else "fp16 reference at 16 bpw",
        xref="paper", yref="paper", x=1.0, y=1.06, showarrow=False,
    )  # fmt: skip
    fig.update_layout(
        title=f"{study.study_name}: {len(trials)} completed trials",
        xaxis_title="true bits per weight (block linear layers)",
        yaxis_title=label,
        height=650,
        yaxis_type="log",
        template="plotly_white",
    )
    return fig


def _trial_points(trials: Sequence[FrozenTrial], name: str, **style: Any) -> go.Scatter:
    """Trials as points at (true bpw, first objective), labelled with their numbers unless `text` is given."""
    style.setdefault("text", [f"trial {t.number}" for t in trials])
    return go.Scatter(x=[t.user_attrs["bpw"] for t in trials], y=[t.values[0] for t in trials], name=name, **style)
