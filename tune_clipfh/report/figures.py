"""The report's figures: one function per figure, dataframe in, ``plotly.graph_objects`` out.

Inputs come from ``report.tables`` (metrics already in percent). A function returns ``None``
when it has nothing to draw; the page then shows why instead. Every figure has a title and
axis titles with units; its one-sentence caption is in ``CAPTIONS``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from ..loss_table import loss_columns
from ..model.registry import THESIS_BACKBONES
from .reference import THESIS_LABEL
from .tables import (
    format_value,
    knob_columns,
    pareto_front,
    ranked,
    varying_knobs,
)

PALETTE = qualitative.Dark24 + qualitative.Light24
# a fixed colour per thesis backbone (strict: a new one needs its colour here); others fall back
BACKBONE_COLOURS = dict(zip(THESIS_BACKBONES, ("#1f77b4", "#d62728"), strict=True))
SEARCH_COLOUR = "#2ca02c"
THESIS_COLOUR = "#7f7f7f"
MAX_PARALLEL_DIMENSIONS = 30
LOSS_GRID_COLUMNS = 3
ZERO_SHOT_COLOURS = ("#8c564b", "#e377c2")  # ours, the thesis's
CAPTIONS = {
    "pareto": "Each point is one configuration's test Rank-1 against its test mAP (mean over "
              "the test splits and seeds, bars one standard deviation); points further up and "
              "right are better, and the dashed staircase joins the configurations no other "
              "beats on both.",
    "versus": "For each thesis version and backbone, our Rank-1 (left) and mAP (right) sit "
              "beside the thesis's published number for the same version; a taller bar is "
              "better and the whisker is one standard deviation over splits (and seeds).",
    "curves": "Validation Rank-1 (left) and mAP (right) after each image-stage epoch, one "
              "line per trial; the star marks the epoch each trial selected for testing.",
    "losses": "Epoch-mean training losses per trial (image stage, and the prompt stage's loss "
              "bottom right); read the trend, since the terms have different scales.",
    "parallel": "Each line is one trial running through its knob values to its best "
                "validation Rank-1 (last axis, also the colour); drag on an axis to keep only "
                "the trials in that range.",
    "importance": "How much of the variation in the search objective each sampled knob "
                  "explains, by fANOVA (left) and PED-ANOVA (right); a longer bar is a more "
                  "important knob, and disagreement between the two means weak evidence.",
    "history": "Each marker is one search trial's best validation metric (crosses: stopped "
               "early by ASHA or patience) and the line the best so far, by trial number "
               "(left) and by compute time spent (right); a flat line means the search stopped "
               "finding better configurations.",
    "cmc": "Cumulative match characteristic of the best configurations (chosen by validation "
           "Rank-1, never by test): the share of queries whose true identity is among the "
           "top k gallery matches, so a higher curve is better and the value at k = 1 is "
           "Rank-1.",
}


def _layout(fig: go.Figure, title: str, height: int = 480) -> go.Figure:
    fig.update_layout(title={"text": title, "x": 0.01}, height=height, template="plotly_white",
                      margin={"l": 60, "r": 20, "t": 70, "b": 60},
                      legend={"font": {"size": 11}})
    return fig


def _colour(index: int) -> str:
    return PALETTE[index % len(PALETTE)]


# ---------------------------------------------------------------------------------------------
# 1. Rank-1 against mAP, with the Pareto front
# ---------------------------------------------------------------------------------------------


def pareto_figure(configs: pd.DataFrame, reference: pd.DataFrame | None = None,
                  comparable: bool = False, note: str = "",
                  zero_shots: list[dict] = ()) -> go.Figure | None:
    """Test Rank-1 vs mAP per configuration; fixed versions labelled, search trials as
    diamonds, our Pareto front, the thesis as a third series when ``comparable``, and each
    zero-shot reference as a cross with a dotted Rank-1 line."""
    tested = configs.dropna(subset=["rank1", "mAP"]) if not configs.empty else configs
    if tested.empty:
        return None
    fig = go.Figure()
    fixed = tested[tested["kind"] == "fixed"]
    for backbone, group in fixed.groupby("backbone", sort=True):
        fig.add_trace(go.Scatter(
            x=group["mAP"], y=group["rank1"], mode="markers+text", text=group["version"],
            textposition="top center", name=f"fixed versions ({backbone})",
            marker={"symbol": "circle", "size": 10,
                    "color": BACKBONE_COLOURS.get(backbone, "#9467bd")},
            error_x=_errors(group["mAP_std"]), error_y=_errors(group["rank1_std"]),
            hovertext=[_hover(row) for _, row in group.iterrows()], hoverinfo="text"))
    search = tested[tested["kind"] != "fixed"]
    if len(search):
        fig.add_trace(go.Scatter(
            x=search["mAP"], y=search["rank1"], mode="markers", name="search trials",
            marker={"symbol": "diamond", "size": 10, "color": SEARCH_COLOUR,
                    "line": {"width": 1, "color": "#1a5e1a"}},
            error_x=_errors(search["mAP_std"]), error_y=_errors(search["rank1_std"]),
            hovertext=[_hover(row) for _, row in search.iterrows()], hoverinfo="text"))
    front = tested.iloc[pareto_front(list(zip(tested["mAP"], tested["rank1"], strict=True)))]
    front = front.sort_values("mAP")
    fig.add_trace(go.Scatter(
        x=front["mAP"], y=front["rank1"], mode="lines", line={"dash": "dash", "shape": "hv",
                                                              "color": "#444"},
        name=f"Pareto front, ours ({len(front)})", hovertext=list(front["label"]),
        hoverinfo="text"))
    if comparable and reference is not None and not reference.empty:
        _thesis_points(fig, reference, set(tested["backbone"].dropna()))
    elif note:
        _note(fig, "Thesis numbers not shown: the protocol differs (see the note above).")
    for index, ref in enumerate(zero_shots):
        fig.add_trace(go.Scatter(
            x=[ref["mAP"]], y=[ref["rank1"]], mode="markers", name=ref["label"],
            marker={"symbol": "x", "size": 12, "color": ZERO_SHOT_COLOURS[index % 2]},
            error_x=_errors(pd.Series([ref["mAP_std"]])),
            error_y=_errors(pd.Series([ref["rank1_std"]])),
            hovertext=[f"{ref['label']}: Rank-1 {ref['rank1']:.2f} %, mAP {ref['mAP']:.2f} % "
                       f"(no training)"], hoverinfo="text"))
        fig.add_hline(y=ref["rank1"], line={"dash": "dot", "width": 1,
                                            "color": ZERO_SHOT_COLOURS[index % 2]})
    fig.update_xaxes(title_text="test mAP (%), mean over splits and seeds")
    fig.update_yaxes(title_text="test Rank-1 (%), mean over splits and seeds")
    return _layout(fig, "Rank-1 against mAP on the test splits, with the Pareto front", 560)


def _thesis_points(fig: go.Figure, reference: pd.DataFrame, backbones: set) -> None:
    """The thesis's versions as stars, one series per backbone (those of ours, if any)."""
    shown = reference[reference["backbone"].isin(backbones)] if backbones else reference
    for backbone, group in shown.groupby("backbone", sort=True):
        fig.add_trace(go.Scatter(
            x=group["mAP"], y=group["rank1"], mode="markers+text", text=group["version"],
            textposition="bottom center", name=f"{THESIS_LABEL} ({backbone})",
            marker={"symbol": "star", "size": 12, "color": THESIS_COLOUR,
                    "line": {"width": 1, "color": BACKBONE_COLOURS.get(backbone, "#000")}},
            error_x=_errors(group["mAP_std"]), error_y=_errors(group["rank1_std"]),
            hovertext=[f"thesis {backbone} {r.version}: Rank-1 {r.rank1:.2f} %, mAP "
                       f"{r.mAP:.2f} % (table: {r.table_final_rank1} %)"
                       for r in group.itertuples()], hoverinfo="text"))


def _errors(std: pd.Series) -> dict:
    return {"type": "data", "array": list(std.fillna(0)), "visible": True, "thickness": 1}


def _hover(row: pd.Series) -> str:
    head = (f"<b>{row['label']}</b> ({row.get('backbone')}, {row['experiment']})<br>"
            f"test Rank-1 {row['rank1']:.2f} ± {_num(row['rank1_std'])} %, "
            f"mAP {row['mAP']:.2f} ± {_num(row['mAP_std'])} %<br>"
            f"best val Rank-1 {_num(row['val_rank1'])} %, mAP {_num(row['val_mAP'])} %<br>"
            f"seeds {row['seeds']}; trials {row['trial_ids']}"
            + (f"<br>ran on {row['device']}" if row.get("device") else ""))
    return head + (f"<br>{row['knobs_html']}" if row.get("knobs_html") else "")


def _num(value: Any) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else f"{value:.2f}"


def _note(fig: go.Figure, text: str) -> None:
    fig.add_annotation(text=text, xref="paper", yref="paper", x=1, y=1.01, showarrow=False,
                       xanchor="right", yanchor="bottom", font={"size": 11, "color": "#a33"})


# ---------------------------------------------------------------------------------------------
# 2. Ours against the thesis, per version and backbone
# ---------------------------------------------------------------------------------------------


def versus_figure(comparison: pd.DataFrame, comparable: bool,
                  zero_shots: list[dict] = ()) -> go.Figure | None:
    """Grouped bars: ours and (when ``comparable``) the thesis, Rank-1 and mAP side by side;
    the title says when the thesis is left out (the page's note says why)."""
    rows = comparison.dropna(subset=["ours_rank1"]) if not comparison.empty else comparison
    if rows.empty:
        return None
    fig = make_subplots(rows=1, cols=2, subplot_titles=("Rank-1", "mAP"),
                        horizontal_spacing=0.08)
    for col, metric in ((1, "rank1"), (2, "mAP")):
        fig.add_trace(go.Bar(
            x=rows["label"], y=rows[f"ours_{metric}"], name="ours", marker_color="#1f77b4",
            error_y=_errors(rows[f"ours_{metric}_std"]), legendgroup="ours",
            showlegend=col == 1, hovertemplate="%{x}: %{y:.2f} %<extra>ours</extra>"),
            row=1, col=col)
        if comparable:
            fig.add_trace(go.Bar(
                x=rows["label"], y=rows[f"thesis_{metric}"], name=THESIS_LABEL,
                marker_color=THESIS_COLOUR, error_y=_errors(rows[f"thesis_{metric}_std"]),
                legendgroup="thesis", showlegend=col == 1,
                hovertemplate="%{x}: %{y:.2f} %<extra>thesis</extra>"), row=1, col=col)
        for index, ref in enumerate(zero_shots):  # what training has to beat
            # labelled once: an annotation position without a text makes plotly write
            # "new text" on the line
            label = {"annotation_text": ref["label"],
                     "annotation_position": "top left"} if col == 1 else {}
            fig.add_hline(y=ref[metric], row=1, col=col,
                          line={"dash": "dot", "width": 1.5,
                                "color": ZERO_SHOT_COLOURS[index % 2]}, **label)
    fig.update_layout(barmode="group")
    fig.update_xaxes(title_text="version and backbone")
    fig.update_yaxes(title_text="test Rank-1 (%)", row=1, col=1)
    fig.update_yaxes(title_text="test mAP (%)", row=1, col=2)
    title = "Ours against the thesis, per version and backbone" if comparable else \
        "Our results per version and backbone (thesis not comparable)"
    return _layout(fig, title, 480)


# ---------------------------------------------------------------------------------------------
# 3. Learning curves and loss breakdown
# ---------------------------------------------------------------------------------------------


def learning_curves_figure(history: pd.DataFrame, labels: dict) -> go.Figure | None:
    """Validation Rank-1 and mAP (percent) against image-stage epoch, one line per trial."""
    image = _image_rows(history)
    if image.empty or "val_rank1" not in image:
        return None
    fig = make_subplots(rows=1, cols=2, subplot_titles=("validation Rank-1",
                                                        "validation mAP"),
                        horizontal_spacing=0.08)
    for index, (key, rows) in enumerate(image.groupby(["experiment", "trial_id"], sort=False)):
        rows = rows.sort_values("stage_epoch")
        label, colour = labels.get(key, key[1]), _colour(index)
        best = rows[rows.get("is_best", pd.Series(0, index=rows.index)) == 1].tail(1)
        for col, metric in ((1, "val_rank1"), (2, "val_mAP")):
            fig.add_trace(go.Scatter(
                x=rows["stage_epoch"], y=100 * rows[metric], mode="lines+markers", name=label,
                legendgroup=label, showlegend=col == 1, line={"color": colour, "width": 1.5},
                marker={"size": 5},
                hovertemplate=f"{label}<br>epoch %{{x}}: %{{y:.2f}} %<extra></extra>"),
                row=1, col=col)
            if len(best):
                fig.add_trace(go.Scatter(
                    x=best["stage_epoch"], y=100 * best[metric], mode="markers",
                    legendgroup=label, showlegend=False,
                    marker={"symbol": "star", "size": 13, "color": colour,
                            "line": {"width": 1, "color": "#000"}},
                    hovertemplate=f"{label}: selected epoch %{{x}}<extra></extra>"),
                    row=1, col=col)
    fig.update_xaxes(title_text="image-stage epoch (count)", dtick=1 if _few_epochs(image)
                     else None)
    fig.update_yaxes(title_text="validation Rank-1 (%)", row=1, col=1)
    fig.update_yaxes(title_text="validation mAP (%)", row=1, col=2)
    return _layout(fig, "Learning curves: validation metrics per epoch", 480)


def loss_figure(history: pd.DataFrame, labels: dict) -> go.Figure | None:
    """The loss breakdown per trial: stage-2 terms against image epoch, the prompt loss
    against prompt epoch."""
    if history.empty or "stage" not in history:
        return None
    # one panel per loss column the trials logged, as the loss table names them
    present = [item for item in loss_columns() if item[0] in history
               and history[item[0]].notna().any()]
    if not present:
        return None
    rows_needed = math.ceil(len(present) / LOSS_GRID_COLUMNS)
    fig = make_subplots(rows=rows_needed, cols=LOSS_GRID_COLUMNS,
                        subplot_titles=[title for _, title, _ in present],
                        horizontal_spacing=0.07, vertical_spacing=0.32 / rows_needed)
    groups = list(history.groupby(["experiment", "trial_id"], sort=False))
    for index, (key, rows) in enumerate(groups):
        label, colour = labels.get(key, key[1]), _colour(index)
        first = True
        for slot, (column, _, stage) in enumerate(present):
            if column not in rows:
                continue
            part = rows[(rows["stage"] == stage) & rows[column].notna()].sort_values(
                "stage_epoch")
            if part.empty:
                continue
            fig.add_trace(go.Scatter(
                x=part["stage_epoch"], y=part[column], mode="lines+markers", name=label,
                legendgroup=label, showlegend=first, line={"color": colour, "width": 1.2},
                marker={"size": 4},
                hovertemplate=f"{label}<br>epoch %{{x}}: %{{y:.4f}}<extra>{column}</extra>"),
                row=slot // LOSS_GRID_COLUMNS + 1, col=slot % LOSS_GRID_COLUMNS + 1)
            first = False
    for slot, (_, _, stage) in enumerate(present):
        where = {"row": slot // LOSS_GRID_COLUMNS + 1, "col": slot % LOSS_GRID_COLUMNS + 1}
        fig.update_xaxes(title_text=f"{stage}-stage epoch (count)", **where)
        fig.update_yaxes(title_text="loss (epoch mean, unitless)"
                         if slot % LOSS_GRID_COLUMNS == 0 else None, **where)
    return _layout(fig, "Loss breakdown per epoch", 320 * rows_needed)


def _image_rows(history: pd.DataFrame) -> pd.DataFrame:
    if history.empty or "stage" not in history:
        return history.iloc[:0] if not history.empty else history
    return history[history["stage"] == "image"]


def _few_epochs(rows: pd.DataFrame) -> bool:
    return rows["stage_epoch"].max() <= 12 if len(rows) else True


# ---------------------------------------------------------------------------------------------
# 4. Parallel coordinates
# ---------------------------------------------------------------------------------------------


def parallel_figure(trials: pd.DataFrame, title: str,
                    metric: str = "best_val_rank1") -> go.Figure | None:
    """Knobs -> best validation metric, one line per trial with a metric; None with fewer than
    two such trials or no knob that differs between them.

    Search trials: every sampled knob; fixed trials: the knobs that differ between them.
    Learning rates and decays spanning more than a decade are drawn as log10. A conditional
    knob a trial did not sample is drawn at an extra ``n/a`` tick.
    """
    rows = trials.dropna(subset=[metric]) if metric in trials else trials.iloc[:0]
    if len(rows) < 2:
        return None
    kinds = set(rows["kind"])
    columns = knob_columns(rows) if kinds == {"search"} else varying_knobs(rows)
    columns = [c for c in columns if _distinct(rows[c]) > 1][:MAX_PARALLEL_DIMENSIONS]
    if not columns:  # e.g. one version over seeds: a lone metric axis would show nothing
        return None
    dimensions = [_dimension(c.split("/", 1)[1], rows[c]) for c in columns]
    values = 100 * rows[metric].astype(float)
    label = "best val Rank-1 (%)" if metric == "best_val_rank1" else f"{metric} (%)"
    dimensions.append({"label": label, "values": list(values)})
    fig = go.Figure(go.Parcoords(
        line={"color": list(values), "colorscale": "Viridis", "showscale": True,
              "colorbar": {"title": {"text": label}}},
        dimensions=dimensions, labelangle=-30, labelside="top"))
    fig = _layout(fig, title, 600)
    fig.update_layout(margin={"l": 70, "r": 70, "t": 190, "b": 40},
                      title={"y": 0.98, "yanchor": "top"})
    return fig


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _distinct(values: pd.Series) -> int:
    return len({format_value(v) for v in values})


def _dimension(name: str, values: pd.Series) -> dict:
    present = [v for v in values if not _is_missing(v)]
    is_numeric = bool(present) and all(
        isinstance(v, (int, float, np.integer, np.floating))
        and not isinstance(v, (bool, np.bool_)) for v in present)
    if not is_numeric:
        labels = [format_value(v) for v in values]
        names = sorted(set(labels))
        return {"label": name, "values": [names.index(label) for label in labels],
                "tickvals": list(range(len(names))), "ticktext": names}
    numeric = pd.to_numeric(values.map(lambda v: np.nan if _is_missing(v) else v))
    log = (numeric.dropna() > 0).all() and numeric.max() / max(numeric.min(), 1e-300) > 10
    shown = np.log10(numeric) if log else numeric
    low, high = float(shown.min()), float(shown.max())
    ticks = list(np.linspace(low, high, 4)) if high > low else [low]
    text = [f"{(10 ** t if log else t):.3g}" for t in ticks]
    if numeric.isna().any():
        sentinel = low - 0.15 * ((high - low) or 1.0)
        shown = shown.fillna(sentinel)
        ticks, text = [sentinel, *ticks], ["n/a", *text]
    return {"label": f"{name} (log scale)" if log else name, "values": list(shown),
            "tickvals": ticks, "ticktext": text}


# ---------------------------------------------------------------------------------------------
# 5. Parameter importance
# ---------------------------------------------------------------------------------------------


def importance_figure(importances: dict[str, dict[str, float]], title: str) -> go.Figure | None:
    """Horizontal bars per evaluator (fANOVA, PED-ANOVA), knobs in the first one's order."""
    evaluators = [name for name, values in importances.items() if values]
    if not evaluators:
        return None
    order = sorted(importances[evaluators[0]], key=importances[evaluators[0]].get)
    fig = make_subplots(rows=1, cols=len(evaluators), subplot_titles=evaluators,
                        shared_yaxes=True, horizontal_spacing=0.04)
    for col, name in enumerate(evaluators, start=1):
        values = importances[name]
        fig.add_trace(go.Bar(
            x=[values.get(p, 0.0) for p in order], y=order, orientation="h", name=name,
            marker_color=_colour(col - 1),
            hovertemplate="%{y}: %{x:.3f}<extra>" + name + "</extra>"), row=1, col=col)
        fig.update_xaxes(title_text="importance (share of total, 0-1)", row=1, col=col)
    fig.update_yaxes(title_text="knob", row=1, col=1)
    return _layout(fig, title, max(360, 24 * len(order) + 140))


# ---------------------------------------------------------------------------------------------
# 6. Optimisation history
# ---------------------------------------------------------------------------------------------


def history_figure(histories: dict[str, pd.DataFrame], title: str) -> go.Figure | None:
    """Per objective metric: each trial's value and the best so far, by trial number and by
    cumulative compute time; trials stopped early drawn as crosses."""
    histories = {k: v for k, v in histories.items() if not v.empty}
    if not histories:
        return None
    fig = make_subplots(rows=1, cols=2, subplot_titles=("by trial number",
                                                        "by compute time"),
                        horizontal_spacing=0.08)
    for index, (metric, frame) in enumerate(histories.items()):
        colour = _colour(index)
        for col, x, best in ((1, "number", "best_by_number"), (2, "compute_s", "best_by_time")):
            ordered = frame.sort_values(x)
            for stopped, part in ordered.groupby("stopped_early"):
                fig.add_trace(go.Scatter(
                    x=part[x], y=part["value"], mode="markers",
                    name=f"{metric}: {'stopped early' if stopped else 'ran to the end'}",
                    legendgroup=f"{metric}-{stopped}", showlegend=col == 1,
                    marker={"symbol": "x" if stopped else "circle", "size": 9,
                            "color": "#d62728" if stopped else colour},
                    hovertext=[f"trial {r.trial_id} (#{r.number}): {r.value:.2f} %, {r.status}"
                               for r in part.itertuples()], hoverinfo="text"), row=1, col=col)
            fig.add_trace(go.Scatter(
                x=ordered[x], y=ordered[best], mode="lines", line={"shape": "hv",
                                                                   "color": colour},
                name=f"{metric}: best so far", legendgroup=f"{metric}-best",
                showlegend=col == 1, hoverinfo="skip"), row=1, col=col)
    fig.update_xaxes(title_text="trial number (in start order)", row=1, col=1)
    fig.update_xaxes(title_text="cumulative compute time (s, sum over finished trials)",
                     row=1, col=2)
    fig.update_yaxes(title_text="best validation metric (%)", row=1, col=1)
    return _layout(fig, title, 460)


# ---------------------------------------------------------------------------------------------
# 7. CMC curves
# ---------------------------------------------------------------------------------------------


def cmc_figure(configs: pd.DataFrame, top: int = 5) -> go.Figure | None:
    """CMC (rank 1..20) of the ``top`` configurations by validation Rank-1 that have a test."""
    columns = [f"cmc_{k}" for k in range(1, 21)]
    if configs.empty or not set(columns) <= set(configs.columns):
        return None
    best = ranked(configs.dropna(subset=["cmc_1"]), "val_rank1").head(top)
    if best.empty:
        return None
    fig = go.Figure()
    for index, (_, row) in enumerate(best.iterrows()):
        name = f"{row['label']} ({row.get('backbone')}, {row['experiment']})"
        fig.add_trace(go.Scatter(
            x=list(range(1, 21)), y=[row[c] for c in columns], mode="lines+markers",
            name=name, line={"color": _colour(index)},
            hovertemplate=f"{name}<br>rank %{{x}}: %{{y:.2f}} %<extra></extra>"))
    fig.update_xaxes(title_text="rank k (gallery position)", dtick=1)
    fig.update_yaxes(title_text="test CMC: matches within the top k (%)")
    return _layout(fig, f"CMC curves of the {len(best)} best configurations (by validation)",
                   460)
