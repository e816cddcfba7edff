"""Assembling ``report.html``: one self-contained page, plotly.js embedded once (first figure).

The page works offline: the first figure carries the whole plotly library inline
(``include_plotlyjs=True``), later figures reuse it. No other script or style is fetched.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio

STYLE = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 0 auto;
       max-width: 1280px; padding: 0 24px 48px; color: #222; }
h1 { margin-top: 24px; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 4px;
     margin-top: 40px; }
table { border-collapse: collapse; font-size: 13px; margin: 8px 0; }
th, td { border: 1px solid #ddd; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f4f4f4; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.caption { color: #444; font-size: 14px; margin: 4px 0 18px; max-width: 1100px; }
.note { background: #fff6e5; border-left: 4px solid #e6a23c; padding: 6px 12px;
        margin: 8px 0; font-size: 14px; }
.notes li { margin: 2px 0; }
.sentences li { margin: 4px 0; font-size: 15px; }
.figure { margin: 12px 0 4px; }
.knobs { font-size: 12px; color: #555; }
div.table { overflow-x: auto; }
"""


@dataclass
class Panel:
    """One figure (or an HTML block such as a table) with its caption and notes."""

    figure: go.Figure | None = None
    html: str = ""
    caption: str = ""
    notes: list[str] = field(default_factory=list)
    missing: str = ""  # shown instead of the figure when there is nothing to draw


@dataclass
class Section:
    title: str
    panels: list[Panel]


def render_page(title: str, experiments: list[dict[str, Any]], notes: list[str],
                sections: list[Section], files: list[str], generated: str) -> str:
    """The whole page as a string."""
    parts = [f"<h1>{_e(title)}</h1>",
             f"<p>Generated {_e(generated)}. Metrics are percentages; test numbers are means "
             f"over the test splits (and seeds) of each configuration.</p>",
             "<h2>Experiments read</h2>", experiments_table(experiments)]
    if notes:
        parts.append("<h2>Notes: what is missing or not comparable</h2>")
        parts.append('<ul class="notes">' + "".join(f"<li>{_e(n)}</li>" for n in notes)
                     + "</ul>")
    if files:
        parts.append("<p>Tables written beside this page: " + ", ".join(
            f'<a href="{_e(f)}">{_e(f)}</a>' for f in files) + ".</p>")
    plotly_included = False
    count = 0
    for number, section in enumerate(sections, start=1):
        parts.append(f'<h2 id="section-{number}">{number}. {_e(section.title)}</h2>')
        for panel in section.panels:
            for note in panel.notes:
                parts.append(f'<div class="note">{_e(note)}</div>')
            if panel.figure is not None:
                count += 1
                parts.append('<div class="figure">' + pio.to_html(
                    panel.figure, include_plotlyjs=not plotly_included, full_html=False,
                    div_id=f"figure-{count}",
                    config={"displaylogo": False, "responsive": True}) + "</div>")
                plotly_included = True
            elif panel.html:
                parts.append(panel.html)
            elif panel.missing:
                parts.append(f'<div class="note">Not drawn: {_e(panel.missing)}</div>')
            if panel.caption and (panel.figure is not None or panel.html):
                parts.append(f'<p class="caption">{_e(panel.caption)}</p>')
    body = "\n".join(parts)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{_e(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n{body}\n"
            f"</body>\n</html>\n")


def experiments_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return '<div class="note">No experiment folder was given.</div>'
    return frame_table(pd.DataFrame(rows))


def sentence_list(items: list[str]) -> str:
    """Plain sentences as an HTML list (escaped)."""
    return '<ul class="sentences">' + "".join(f"<li>{_e(item)}</li>" for item in items) + "</ul>"


def frame_table(frame: pd.DataFrame, numeric_digits: int = 2,
                folded: tuple[str, ...] = ()) -> str:
    """A plain HTML table (escaped), numbers right-aligned with fixed decimals; the ``folded``
    columns (long ``a=1; b=2`` lists) open on a click."""
    head = "".join(f"<th>{_e(c)}</th>" for c in frame.columns)
    body = []
    for _, row in frame.iterrows():
        cells = []
        for column in frame.columns:
            value = row[column]
            if isinstance(value, float):
                text = "" if pd.isna(value) else f"{value:.{numeric_digits}f}"
                cells.append(f'<td class="num">{text}</td>')
            elif isinstance(value, int) and not isinstance(value, bool):
                cells.append(f'<td class="num">{value}</td>')
            elif column in folded and value:
                items = [item for item in str(value).split("; ") if item]
                cells.append(f'<td><details><summary>{len(items)} {_e(column)}</summary>'
                             f'<div class="knobs">{"<br>".join(map(_e, items))}</div>'
                             f"</details></td>")
            else:
                cells.append(f"<td>{_e('' if value is None else value)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (f'<div class="table"><table><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table></div>")


def _e(value: Any) -> str:
    return html.escape(str(value))
