"""Reports for people: each section as terminal lines and as a picture, written as PNG files and
as one self-contained HTML page. A shop's report: lifecycle distribution, RFM grid, fatigue
posture, profile coverage, churn calibration (enrichment's model report). The agency roll-up:
coverage, lifecycle distribution and fatigue posture of every shop side by side, flagging the
shops where more than 60% of customers are at fatigue >= 0.7."""

import html
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, never a window

from matplotlib.figure import Figure  # after choosing the backend

from services.gate.rules import parse_fatigue  # the gate's own "0.70" -> 70

STAGES = ("new", "engaged", "converted", "loyal", "at_risk", "churned", "unscored")
CHANNELS = ("email", "sms", "whatsapp", "push")
# The posture the spec reports on: customers at fatigue >= 0.70, a shop flagged above 60% of them.
FATIGUED_AT = 70
FLAG_SHARE = 0.60
LEVELS = range(0, 101, 10)
DPI = 100
RED, BLUE, GREY = "#c0392b", "#2e86c1", "#95a5a6"


@dataclass(frozen=True)
class Section:
    """One part of a report: a title, its terminal lines, and its picture (saved as
    `<name>.png`)."""

    name: str
    title: str
    lines: list[str]
    figure: Figure | None


@dataclass(frozen=True)
class ShopFigures:
    """What a shop's report is made of: the profile's ShopReport, the gate's FatiguePosture
    and, for one shop, enrichment's ModelReport (None until a model is fitted)."""

    report: Any
    posture: Any
    model: Any = None

    @property
    def customers(self) -> int:
        return int(self.report.customers)

    def fatigue_levels(self) -> dict[int, int]:
        """Customers by fatigue in hundredths, 0.00 to 1.00; those the gate counted no message
        for are at 0.00 (never below 0 when the gate knows persons the profile does not)."""
        levels = dict.fromkeys(LEVELS, 0)
        for level in self.posture.levels:
            levels[parse_fatigue(level.fatigue)] += level.customers
        levels[0] = max(self.customers - sum(levels.values()), 0)
        return levels

    @property
    def fatigued(self) -> int:
        """Customers at fatigue >= 0.70."""
        return sum(n for level, n in self.fatigue_levels().items() if level >= FATIGUED_AT)

    @property
    def flagged(self) -> bool:
        """More than 60% of the customers at fatigue >= 0.70."""
        return self.customers > 0 and self.fatigued / self.customers > FLAG_SHARE


def _share(part: int, whole: int) -> float:
    return part / whole if whole else 0.0


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """Aligned lines: the first column left, the others right, counts with thousands
    separators and shares as percentages."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.1%}"
        if isinstance(value, int):
            return f"{value:,}"
        return str(value)

    widths = [max(len(cell(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [cell(v) for v in row]
        lines.append(
            "  ".join(
                [cells[0].ljust(widths[0])]
                + [c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)]
            ).rstrip()
        )
    return lines


# --- one shop ------------------------------------------------------------------------------------


def fatigue_headline(figures: ShopFigures) -> str:
    """ "30% of the list is at fatigue >= 0.7 (600 of 2,000 customers)"."""
    return (
        f"{_share(figures.fatigued, figures.customers):.0%} of the list is at fatigue >= 0.7 "
        f"({figures.fatigued:,} of {figures.customers:,} customers)"
    )


def _lifecycle(figures: ShopFigures) -> Section:
    counts = [int(figures.report.lifecycle.get(stage, 0)) for stage in STAGES]
    lines = _table(
        ("stage", "customers", "share"),
        [(s, n, _share(n, figures.customers)) for s, n in zip(STAGES, counts, strict=True)],
    )
    figure = Figure(figsize=(6.4, 3.6), layout="constrained")
    axes = figure.subplots()
    bars = axes.barh(STAGES[::-1], counts[::-1], color=BLUE)
    axes.bar_label(
        bars, labels=[f"{n:,} ({_share(n, figures.customers):.0%})" for n in counts[::-1]],
        padding=3,
    )  # fmt: skip
    axes.set(xlabel="customers", title=f"{figures.report.shop_id}: lifecycle stages")
    axes.margins(x=0.2)
    return Section("lifecycle", "Lifecycle distribution", lines, figure)


def _rfm(figures: ShopFigures) -> Section:
    grid = [[0] * 5 for _ in range(5)]  # grid[5 - r][f - 1]: R5 on top
    for cell in figures.report.rfm:
        grid[5 - cell.r][cell.f - 1] = int(cell.customers)
    lines = _table(
        ("R \\ F", "F1", "F2", "F3", "F4", "F5"),
        [(f"R{5 - i}", *row) for i, row in enumerate(grid)],
    )
    lines.append(f"no RFM score (no order, or too few customers to rank): "
                 f"{figures.report.rfm_unscored:,}")  # fmt: skip
    figure = Figure(figsize=(5.6, 4.8), layout="constrained")
    axes = figure.subplots()
    image = axes.imshow(grid, cmap="Blues")
    peak = max(max(row) for row in grid) or 1
    for i, row in enumerate(grid):
        for j, n in enumerate(row):
            axes.text(j, i, f"{n:,}", ha="center", va="center",
                      color="white" if n > peak / 2 else "black")  # fmt: skip
    axes.set_xticks(range(5), [f"F{f}" for f in range(1, 6)])
    axes.set_yticks(range(5), [f"R{r}" for r in range(5, 0, -1)])
    axes.set(
        xlabel="frequency (5 = most frequent)", ylabel="recency (5 = most recent)",
        title=f"{figures.report.shop_id}: RFM grid (customers)",
    )  # fmt: skip
    figure.colorbar(image, ax=axes, shrink=0.8)
    return Section(
        "rfm",
        "RFM grid: customers by recency (R) and frequency (F), 5 = the shop's best",
        lines,
        figure,
    )


def _fatigue(figures: ShopFigures) -> Section:
    levels = figures.fatigue_levels()
    rows = [(f"{level / 100:.2f}", n, _share(n, figures.customers)) for level, n in levels.items()]
    lines = [
        f"{fatigue_headline(figures)}; the shop's gate blocks at {figures.posture.threshold}",
        *_table(("fatigue", "customers", "share"), rows),
    ]
    figure = Figure(figsize=(6.4, 3.6), layout="constrained")
    axes = figure.subplots()
    axes.bar(
        [level / 100 for level in levels], list(levels.values()), width=0.08,
        color=[RED if level >= FATIGUED_AT else BLUE for level in levels],
    )  # fmt: skip
    axes.axvline(parse_fatigue(figures.posture.threshold) / 100 - 0.05, color=GREY, linestyle="--",
                 label=f"blocked from {figures.posture.threshold}")  # fmt: skip
    axes.set(
        xlabel="fatigue (messages in the last 7 days; 7 = 0.70)", ylabel="customers",
        title=f"{figures.report.shop_id}: {fatigue_headline(figures)}",
    )  # fmt: skip
    axes.title.set_fontsize(10)
    axes.legend(loc="upper right")
    return Section("fatigue", "Fatigue posture", lines, figure)


def coverage_rows(report: Any) -> list[tuple[str, int]]:
    """What the profiles cover, as (what, customers)."""
    c = report.coverage
    return [
        ("with email", c.with_email),
        ("with an order", c.with_order),
        *((f"opted in: {channel}", c.opted_in.get(channel, 0)) for channel in CHANNELS),
        ("reachable (any channel)", c.reachable),
        ("unsubscribed", c.unsubscribed),
        ("loyalty members", c.loyalty_members),
    ]


def _coverage(figures: ShopFigures) -> Section:
    rows = coverage_rows(figures.report)
    lines = _table(
        ("profiles", "customers", "share"),
        [(what, n, _share(n, figures.customers)) for what, n in rows],
    )
    figure = Figure(figsize=(6.4, 3.6), layout="constrained")
    axes = figure.subplots()
    shares = [_share(n, figures.customers) * 100 for _, n in rows]
    bars = axes.barh([what for what, _ in rows][::-1], shares[::-1], color=BLUE)
    axes.bar_label(bars, labels=[f"{s:.0f}%" for s in shares[::-1]], padding=3)
    axes.set(xlim=(0, 110), xlabel="% of customers",
             title=f"{figures.report.shop_id}: profile coverage")  # fmt: skip
    return Section("coverage", "Profile coverage", lines, figure)


def _calibration(figures: ShopFigures) -> Section:
    shop = figures.report.shop_id
    if figures.model is None:
        lines = [f"no model fitted yet: run `c360 enrich run --shop {shop}`"]
        return Section("calibration", "Churn calibration", lines, None)
    return Section(
        "calibration", "Churn calibration", model_lines(figures.model), _figure(figures.model)
    )


def shop_sections(figures: ShopFigures) -> list[Section]:
    """A shop's report, section by section."""
    return [
        _lifecycle(figures),
        _rfm(figures),
        _fatigue(figures),
        _coverage(figures),
        _calibration(figures),
    ]


# --- the agency roll-up --------------------------------------------------------------------------


def _shops_figure(shops: int) -> tuple[Figure, Any]:
    """A figure with one horizontal band per shop (and one for all shops)."""
    figure = Figure(figsize=(7.2, 1.6 + 0.45 * (shops + 1)), layout="constrained")
    return figure, figure.subplots()


def _roll_up(shops: Sequence[ShopFigures]) -> Section:
    names = [s.report.shop_id for s in shops]
    counts = [[int(s.report.coverage.with_email), int(s.report.coverage.with_order),
               int(s.report.coverage.reachable), int(s.report.coverage.unsubscribed)]
              for s in shops]  # fmt: skip
    customers = [s.customers for s in shops]
    rows = [
        (name, total, *(_share(n, total) for n in row))
        for name, total, row in zip(
            [*names, "all shops"],
            [*customers, sum(customers)],
            [*counts, [sum(column) for column in zip(*counts, strict=True)] or [0] * 4],
            strict=True,
        )
    ]
    lines = _table(("shop", "customers", "email", "ordered", "reachable", "unsubscribed"), rows)
    figure, axes = _shops_figure(len(rows))
    labels = [str(row[0]) for row in rows][::-1]
    for k, (what, color) in enumerate(
        (("with email", BLUE), ("with an order", GREY), ("reachable", "#27ae60"))
    ):
        axes.barh(
            [i - (k - 1) * 0.27 for i in range(len(rows))],
            [float(row[2 + k]) * 100 for row in rows][::-1],
            height=0.27, color=color, label=what,
        )  # fmt: skip
    axes.set_yticks(range(len(rows)), labels)
    axes.set(xlim=(0, 100), xlabel="% of the shop's customers", title="Profile coverage by shop")
    axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.25), ncols=3)
    return Section("coverage", "Profile coverage by shop", lines, figure)


def _stages(shops: Sequence[ShopFigures]) -> Section:
    per_shop = [[int(s.report.lifecycle.get(stage, 0)) for stage in STAGES] for s in shops]
    rows = [
        (name, sum(counts), *(_share(n, sum(counts)) for n in counts))
        for name, counts in zip(
            [*(s.report.shop_id for s in shops), "all shops"],
            [*per_shop, [sum(column) for column in zip(*per_shop, strict=True)] or [0] * 7],
            strict=True,
        )
    ]
    lines = _table(("shop", "customers", *STAGES), rows)
    figure, axes = _shops_figure(len(rows))
    labels = [str(row[0]) for row in rows][::-1]
    left = [0.0] * len(rows)
    palette = ("#aed6f1", "#5dade2", "#58d68d", "#239b56", "#f5b041", RED, GREY)
    for k, (stage, color) in enumerate(zip(STAGES, palette, strict=True)):
        shares = [float(row[2 + k]) * 100 for row in rows][::-1]
        axes.barh(labels, shares, left=left, color=color, label=stage)
        left = [a + b for a, b in zip(left, shares, strict=True)]
    axes.set(xlim=(0, 100), xlabel="% of the shop's customers", title="Lifecycle stages by shop")
    axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.25), ncols=4)
    return Section("lifecycle", "Lifecycle distribution by shop", lines, figure)


def _posture(shops: Sequence[ShopFigures]) -> Section:
    flagged = [s.report.shop_id for s in shops if s.flagged]
    customers = sum(s.customers for s in shops)
    fatigued = sum(s.fatigued for s in shops)
    rows = [
        (s.report.shop_id, s.customers, s.fatigued, _share(s.fatigued, s.customers),
         "FLAGGED" if s.flagged else "")
        for s in shops
    ] + [("all shops", customers, fatigued, _share(fatigued, customers), "")]  # fmt: skip
    lines = [
        *_table(("shop", "customers", "fatigue >= 0.7", "share", "flag"), rows),
        f"flagged (more than {FLAG_SHARE:.0%} of customers at fatigue >= 0.7): "
        + (", ".join(flagged) if flagged else "none"),
    ]
    figure, axes = _shops_figure(len(rows))
    axes.barh(
        [str(row[0]) for row in rows][::-1], [float(row[3]) * 100 for row in rows][::-1],
        color=[RED if row[4] else BLUE for row in rows][::-1],
    )  # fmt: skip
    axes.axvline(FLAG_SHARE * 100, color=GREY, linestyle="--", label="flagged above 60%")
    axes.set(xlim=(0, 100), xlabel="% of customers at fatigue >= 0.7",
             title="Fatigue posture by shop")  # fmt: skip
    axes.legend(loc="lower right")
    return Section("fatigue", "Fatigue posture by shop", lines, figure)


def agency_sections(shops: Sequence[ShopFigures]) -> list[Section]:
    """The roll-up of several shops, one row per shop and one for all of them together:
    profile coverage, lifecycle distribution and fatigue posture (flagging the shops with
    more than 60% of their customers at fatigue >= 0.7)."""
    return [_roll_up(shops), _stages(shops), _posture(shops)]


# --- pictures and pages --------------------------------------------------------------------------


def _svg(figure: Figure) -> str:
    drawn = io.StringIO()
    figure.savefig(drawn, format="svg")
    text = drawn.getvalue()
    return text[text.index("<svg") :]


def write_report(title: str, sections: Sequence[Section], folder: Path) -> list[Path]:
    """Writes each section's picture as `<name>.png` and `report.html`: every section's title,
    picture (inline SVG) and table on one self-contained page. Returns the files written."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    parts = [
        "<!doctype html>\n<meta charset=utf-8>\n",
        f"<title>{html.escape(title)}</title>\n",
        "<style>body{font-family:sans-serif;max-width:64rem;margin:1rem auto}"
        "svg{max-width:100%;height:auto}</style>\n",
        f"<h1>{html.escape(title)}</h1>\n",
    ]
    for section in sections:
        parts.append(f"<h2>{html.escape(section.title)}</h2>\n")
        if section.figure is not None:
            png = folder / f"{section.name}.png"
            section.figure.savefig(png, format="png", dpi=DPI)
            written.append(png)
            parts.append(_svg(section.figure) + "\n")
        parts.append(f"<pre>{html.escape(chr(10).join(section.lines))}</pre>\n")
    page = folder / "report.html"
    page.write_text("".join(parts), encoding="utf-8")
    return [page, *written]


# --- enrichment's model report -------------------------------------------------------------------


def model_lines(report: Any) -> list[str]:
    """The report as terminal lines."""
    c = report.calibration
    lines = [
        f"shop {report.shop_id}: fitted {report.fitted_at.ToDatetime():%Y-%m-%d %H:%M} UTC "
        f"as of {report.as_of.ToDatetime():%Y-%m-%d}, {report.customers} customers "
        f"({report.repeat_customers} repeat), LTV model {report.ltv_model}",
    ]
    if report.HasField("bgnbd"):
        b, g = report.bgnbd, report.gamma_gamma
        lines.append(
            f"BG/NBD r={b.r:.4f} alpha={b.alpha:.4f} a={b.a:.4f} b={b.b:.4f} "
            f"log-likelihood={b.log_likelihood:.1f}; Gamma-Gamma p={g.p:.4f} q={g.q:.4f} "
            f"gamma={g.gamma:.4f}"
        )
    lines.append(
        f"churn calibration ({c.method}, {c.horizon_days}-day horizon, {c.samples} customers): "
        f"Brier {c.brier_score:.4f} (seed score {c.baseline_brier_score:.4f}), "
        f"ECE {c.expected_calibration_error:.4f}"
    )
    lines.append(f"{'predicted':>10} {'observed':>10} {'customers':>10}")
    lines += [
        f"{b.mean_predicted:>10.3f} {b.observed_rate:>10.3f} {b.count:>10}" for b in c.reliability
    ]
    return lines


def _figure(report: Any) -> Figure:
    c = report.calibration
    figure = Figure(figsize=(6.4, 6.4), layout="constrained")
    curve, counts = figure.subplots(2, 1, height_ratios=(3, 1), sharex=True)
    predicted = [b.mean_predicted for b in c.reliability]
    curve.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfectly calibrated")
    curve.plot(predicted, [b.observed_rate for b in c.reliability], marker="o", label=c.method)
    curve.set(
        xlim=(0, 1), ylim=(0, 1), ylabel="observed churn rate",
        title=f"{report.shop_id}: churn risk calibration ({c.horizon_days}-day horizon)",
    )  # fmt: skip
    curve.legend(loc="upper left")
    curve.text(
        0.98, 0.02,
        f"Brier {c.brier_score:.4f} (seed {c.baseline_brier_score:.4f})\n"
        f"ECE {c.expected_calibration_error:.4f}, {c.samples} customers",
        ha="right", va="bottom", transform=curve.transAxes,
    )  # fmt: skip
    counts.bar(predicted, [b.count for b in c.reliability], width=0.06)
    counts.set(xlabel="predicted churn risk", ylabel="customers")
    return figure


def write_plot(report: Any, path: Path) -> None:
    """The calibration plot as PNG (a .png path) or as an HTML page with the plot inline (SVG)
    and the report's lines beside it."""
    figure = _figure(report)
    if path.suffix.lower() == ".png":
        figure.savefig(path, format="png", dpi=120)
        return
    table = html.escape("\n".join(model_lines(report)))
    path.write_text(
        "<!doctype html>\n<meta charset=utf-8>\n"
        f"<title>{html.escape(report.shop_id)}: churn calibration</title>\n"
        f"{_svg(figure)}\n<pre>{table}</pre>\n",
        encoding="utf-8",
    )
