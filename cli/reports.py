"""Enrichment's model report for people: the terminal table and the churn calibration plot
(reliability curve and the counts behind it) as a PNG or a self-contained HTML page."""

import html
import io
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, never a window

from matplotlib.figure import Figure  # after choosing the backend


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
    svg = io.StringIO()
    figure.savefig(svg, format="svg")
    table = html.escape("\n".join(model_lines(report)))
    path.write_text(
        "<!doctype html>\n<meta charset=utf-8>\n"
        f"<title>{html.escape(report.shop_id)}: churn calibration</title>\n"
        f"{svg.getvalue()[svg.getvalue().index('<svg') :]}\n<pre>{table}</pre>\n",
        encoding="utf-8",
    )
