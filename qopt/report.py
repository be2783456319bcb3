"""Plots of a study: the accuracy-versus-bits front against the baselines, and the
emergent-structure report (per-layer genes across the front, see `qopt.structure`)."""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

import optuna
import plotly.graph_objects as go
from optuna.trial import FrozenTrial

from qopt.structure import GENES, Structure
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
            "human baselines",
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


def structure_html(title: str, front: go.Figure, structure: Structure, summary_text: str, quality: str = "kl") -> str:
    """One self-contained HTML page: the front, per-layer gene heatmaps across the front
    (ordered by bpw), gene frequencies on the front vs the population, protected
    layers, and each front member against its nearest baseline."""
    figures = [front, *(_gene_heatmap(structure, gene) for gene in GENES)]
    figures += [_frequency_figure(structure), _protection_figure(structure), _comparison_table(structure, quality)]
    parts = [
        f"<html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head>",
        "<body style='font-family: sans-serif; max-width: 1400px; margin: auto'>",
        f"<h1>{html.escape(title)}</h1>",
        f"<pre>{html.escape(summary_text)}</pre>",
    ]
    for i, figure in enumerate(figures):
        parts.append(figure.to_html(full_html=False, include_plotlyjs=i == 0))  # the library once, inline
    parts.append("</body></html>")
    return "\n".join(parts)


def _member_labels(structure: Structure) -> list[str]:
    return [f"trial {m.trial} · {m.bpw:.3f} bpw" for m in structure.front]


def _gene_heatmap(structure: Structure, gene: str) -> go.Figure:
    """Rows: front members by bpw; columns: layers; colour: the gene's value."""
    labels = [m.genes[gene] for m in structure.front]
    if gene == "bits":
        z: list[list[float]] = [[float(v) for v in row] for row in labels]
        colorbar = dict(title="bits")
        colorscale = "Viridis"
    else:
        values = sorted({v for row in labels for v in row})
        index = {v: i for i, v in enumerate(values)}
        z = [[float(index[v]) for v in row] for row in labels]
        colorbar = dict(tickvals=list(range(len(values))), ticktext=values, title=gene)
        colorscale = "Turbo" if len(values) > 1 else "Greys"
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=structure.layers,
            y=_member_labels(structure),
            text=labels,
            hovertemplate="%{y}<br>%{x}<br>" + gene + ": %{text}<extra></extra>",
            colorscale=colorscale,
            colorbar=colorbar,
        )
    )
    fig.update_layout(
        title=f"{gene} per layer across the front (lowest bpw at the bottom)",
        height=220 + 22 * len(structure.front),
        xaxis=dict(tickangle=-60, tickfont=dict(size=9)),
        template="plotly_white",
    )
    return fig


def _frequency_figure(structure: Structure) -> go.Figure:
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=len(GENES), cols=1, subplot_titles=GENES, vertical_spacing=0.04)
    for row, gene in enumerate(GENES, start=1):
        shares = structure.frequencies[gene]
        values = list(shares)
        for j, (name, color) in enumerate((("front", "#1f77b4"), ("population", "#aaaaaa"))):
            fig.add_trace(
                go.Bar(
                    x=values,
                    y=[shares[v][j] for v in values],
                    name=name,
                    marker_color=color,
                    showlegend=row == 1,
                    legendgroup=name,
                ),
                row=row,
                col=1,
            )
        fig.update_yaxes(tickformat=".0%", row=row, col=1)
    fig.update_layout(
        title="gene values: share of layer slots on the front vs in the whole population",
        height=260 * len(GENES),
        barmode="group",
        template="plotly_white",
    )
    return fig


def _protection_figure(structure: Structure) -> go.Figure:
    by_layer = {layer: (excess, kept) for layer, excess, kept in structure.protection}
    excess = [by_layer.get(layer, (0.0, 0.0))[0] for layer in structure.layers]
    kept = [by_layer.get(layer, (0.0, 0.0))[1] for layer in structure.layers]
    fig = go.Figure(
        go.Bar(
            x=structure.layers,
            y=excess,
            customdata=kept,
            hovertemplate="%{x}<br>%{y:+.2f} bits vs the strategy's mean<br>16-bit in %{customdata:.0%}<extra></extra>",
        )
    )
    fig.update_layout(
        title="which layers the search protects: bits above each front member's mean, averaged over the front",
        yaxis_title="bits above the member's mean",
        xaxis=dict(tickangle=-60, tickfont=dict(size=9)),
        height=450,
        template="plotly_white",
    )
    return fig


def _comparison_table(structure: Structure, quality: str) -> go.Figure:
    rows = structure.comparisons
    fig = go.Figure(
        go.Table(
            header=dict(values=["trial", "bpw", quality, "nearest baseline", "its bpw", f"its {quality}", "ratio"]),
            cells=dict(
                values=[
                    [c.trial for c in rows],
                    [f"{c.bpw:.3f}" for c in rows],
                    [f"{c.quality:.4f}" for c in rows],
                    [c.baseline for c in rows],
                    [f"{c.baseline_bpw:.3f}" for c in rows],
                    [f"{c.baseline_quality:.4f}" for c in rows],
                    [f"{c.quality / c.baseline_quality:.2f}x" if c.baseline_quality else "-" for c in rows],
                ]
            ),
        )
    )
    fig.update_layout(
        title=f"each front member against the baseline nearest in bpw (search-part {quality})",
        height=160 + 26 * len(rows),
    )
    return fig
