"""One-file ROI report (self-contained HTML with interactive charts, or Markdown) to hand to a manager."""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from datetime import datetime, timezone

import pandas as pd
import plotly.graph_objects as go

from saten_core.roi import RoiResult, RoiTerms, roi_table

BASE_CAVEATS = (
    "Short-term numbers come from one measured run on the device its assumptions name; a different GPU, batch size or "
    "serving stack changes absolute speed.",
    "Mid-term numbers are a projection from bytes and multiply-adds, not a measurement: they hold once kernels "
    "that read only the compressed bytes exist for your GPU.",
    "Perplexity on the bundled held-out text is a proxy: test the compressed model on real prompts.",
    "A compressed model that decodes slower than the original needs more replicas, which this report counts.",
)


@dataclass
class ReportInput:
    """Everything a report shows; figures are plotly Figures titled in their layout."""

    title: str
    run_label: str
    terms: RoiTerms
    runs: pd.DataFrame = field(default_factory=pd.DataFrame)  # run history table (one row per run)
    figures: list[go.Figure] = field(default_factory=list)
    caveats: list[str] = field(default_factory=list)


def dollars(amount: float) -> str:
    """-584.2 -> '-$584' (a manager reads '$-584' as a typo); 1234 -> '$1,234'."""
    return f"{'-' if amount < 0 else ''}${abs(amount):,.0f}"


def decision_line(roi: RoiResult) -> str:
    """The go/no-go in one sentence, with each criterion's limit and measured value (page banner, report top)."""
    return f"Decision: {'GO' if roi.go else 'NO-GO'} for this PoC ({'; '.join(roi.criteria)})."


def summary(terms: RoiTerms) -> list[str]:
    """The reports' summary: each term's decision first, then what holds for both (e.g. the free 16-bit cast)."""
    return [f"{roi.term}: {decision_line(roi)}" for roi in (terms.short, terms.mid)] + terms.notes


def headline(roi: RoiResult) -> list[str]:
    """Short sentences that say one term's result in plain words (size, speed, quality, money)."""
    lines = [
        f"Model size: {roi.size_ratio:.0%} of the original (as stored).",
        f"Speed vs the original: {roi.speed}.",
        f"Monthly saving: {dollars(roi.monthly_saving)} (engineering cost {dollars(roi.engineering_cost)}).",
        "Payback: " + (f"{roi.payback_months:.1f} months." if roi.payback_months is not None
                       else "never at this traffic (no saving)."),
    ]
    if roi.ppl_ratio is not None:
        lines.insert(2, f"Quality: perplexity {roi.ppl_ratio:.2f}x the original (lower is better; 1.00 = same).")
    return lines


def _caveats(data: ReportInput) -> list[str]:
    extra = []
    if data.terms.short.speedup < 1:
        extra.append("The compressed model is slower than the original on the measured device.")
    if data.terms.mid.speedup < 1:
        extra.append("Even with kernels that read only its bytes, the compressed model is projected slower: it "
                     "stores more bytes or multiply-adds than the original.")
    return [*BASE_CAVEATS, *extra, *data.caveats]


def _stamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def markdown_table(df: pd.DataFrame) -> str:
    """GitHub-style table; written here so the report needs no extra package (pandas wants tabulate)."""
    cells = [[str(c).replace("|", "\\|") for c in row] for row in df.astype(object).itertuples(index=False)]
    header = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells])


def _markdown_term(roi: RoiResult) -> list[str]:
    """One term's section: decision, headline, cost table, the formulas with their numbers, its assumptions."""
    table = markdown_table(pd.DataFrame(roi_table(roi), dtype=object))
    return [f"## {roi.term}", f"**{decision_line(roi)}**", *[f"- {line}" for line in headline(roi)],
            "Cost comparison:", table, "Formulas:", *[f"- {f}" for f in roi.formulas],
            "Assumptions of this term:", *[f"- {a}" for a in roi.assumptions]]


def to_markdown(data: ReportInput) -> str:
    """Markdown report: decisions, one section per term, run history, assumptions, caveats (charts in the HTML)."""
    parts = [f"# {data.title}", f"Run: **{data.run_label}** — generated {_stamp()}", "## Summary",
             *[f"- {line}" for line in summary(data.terms)],
             *_markdown_term(data.terms.short), *_markdown_term(data.terms.mid)]
    if len(data.runs):
        parts += ["## Runs", markdown_table(data.runs)]
    if data.figures:
        parts += ["## Charts", "Interactive charts are in the HTML version of this report: "
                  + ", ".join(_figure_title(f) for f in data.figures) + "."]
    parts += ["## Assumptions (both terms)", *[f"- {a}" for a in data.terms.assumptions],
              "## Caveats", *[f"- {c}" for c in _caveats(data)]]
    return "\n\n".join(parts) + "\n"


def _figure_title(fig: go.Figure) -> str:
    return fig.layout.title.text or "chart"


def _html_list(items: list[str]) -> str:
    return "<ul>" + "".join(f"<li>{html.escape(i)}</li>" for i in items) + "</ul>"


def _html_table(df: pd.DataFrame) -> str:
    return df.to_html(index=False, border=0, classes="t", escape=True)


STYLE = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
         "table.t{border-collapse:collapse;margin:1em 0}table.t td,table.t th{border-bottom:1px solid #ddd;"
         "padding:4px 10px;text-align:right}table.t th{background:#f4f4f4}h1{color:#8a1538}")


def _html_term(roi: RoiResult) -> list[str]:
    """One term's section, as in the Markdown report."""
    return [f"<h2>{html.escape(roi.term)}</h2>", f"<p><b>{html.escape(decision_line(roi))}</b></p>",
            _html_list(headline(roi)), "<h3>Cost comparison</h3>",
            _html_table(pd.DataFrame(roi_table(roi), dtype=object)),
            "<h3>Formulas</h3>", _html_list(roi.formulas), "<h3>Assumptions of this term</h3>",
            _html_list(roi.assumptions)]


def to_html(data: ReportInput) -> str:
    """Self-contained HTML (plotly.js inlined once, so it opens offline) with charts, tables and caveats."""
    body = [f"<h1>{html.escape(data.title)}</h1>",
            f"<p>Run: <b>{html.escape(data.run_label)}</b> — generated {_stamp()}</p>",
            "<h2>Summary</h2>", _html_list(summary(data.terms)),
            *_html_term(data.terms.short), *_html_term(data.terms.mid)]
    if len(data.runs):
        body += ["<h2>Runs</h2>", _html_table(data.runs)]
    for i, fig in enumerate(data.figures):
        body.append(fig.to_html(full_html=False, include_plotlyjs=(i == 0)))
    body += ["<h2>Assumptions (both terms)</h2>", _html_list(data.terms.assumptions),
             "<h2>Caveats</h2>", _html_list(_caveats(data))]
    head = f"<meta charset='utf-8'><title>{html.escape(data.title)}</title><style>{STYLE}</style>"
    return f"<!doctype html><html><head>{head}</head><body>{''.join(body)}</body></html>"
