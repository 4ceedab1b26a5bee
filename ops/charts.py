"""Series -> an inline, accessible SVG chart, drawn on the server with matplotlib.

Why: the dashboard has no JavaScript (its Content-Security-Policy allows none), so a chart is
drawn where the data is and sent as SVG inside the page: it scales, prints, and its text stays
text (`svg.fonttype: none`). Each SVG carries role="img", a <title> and a <desc> naming the
latest and highest value of each series, so a screen reader gets what the eye gets. A chart
with nothing to show is a small SVG saying so, not empty axes that look like "all zero".

Any page may use it (the dashboard's trends, a model scorecard):

    chart = svg_chart("Images per hour", ["13:00", "14:00"], {"classified": [3, 5]},
                      x_label="hour (UTC)", y_label="images", empty_text="no images in the last 24 h")
"""

from __future__ import annotations

import functools
import io
import itertools
import math
import threading
from collections.abc import Mapping, Sequence
from html import escape

from markupsafe import Markup
from matplotlib import rc_context
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, PercentFormatter

# Colour-blind-safe (Okabe-Ito), in the order series are drawn.
COLOURS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000")
_ids = itertools.count(1)
# rc_context sets matplotlib's global settings and restores them on leaving: two threads of the
# dashboard's pool drawing at once would undo each other's (text drawn as paths, or settings left
# changed for good). Whoever draws with rc_context in the dashboard holds this lock.
DRAWING = threading.Lock()

Value = float | int | None


def _summary(series: Mapping[str, Sequence[Value]], x_labels: Sequence[str], fmt: str) -> str:
    """One sentence per series: its latest value and its highest, with when."""
    parts = []
    for name, values in series.items():
        points = [(x, v) for x, v in zip(x_labels, values, strict=True) if v is not None]
        if not points:
            parts.append(f"{name}: no values")
            continue
        last_x, last = points[-1]
        top_x, top = max(points, key=lambda point: point[1])
        parts.append(f"{name}: latest {fmt.format(last)} ({last_x}), highest {fmt.format(top)} ({top_x})")
    return "; ".join(parts)


def _wrap(svg: str, chart_id: str, title: str, desc: str) -> Markup:
    """The bare <svg> element (no XML prolog or DOCTYPE, which do not belong inside HTML) with
    role, title and description; the width follows the page, the height the aspect ratio."""
    start = svg.index("<svg")
    head_end = svg.index(">", start)
    head = svg[start:head_end]
    for attribute in ("width", "height"):  # fixed pt sizes: let CSS size it
        head = _drop_attribute(head, attribute)
    head += (f' role="img" aria-labelledby="{chart_id}-title {chart_id}-desc" class="chart"'
             f' id="{chart_id}"')
    body = svg[head_end + 1:]
    return Markup(f'{head}><title id="{chart_id}-title">{escape(title)}</title>'
                  f'<desc id="{chart_id}-desc">{escape(desc)}</desc>{body}')


def _drop_attribute(tag: str, name: str) -> str:
    marker = f' {name}="'
    at = tag.find(marker)
    if at < 0:
        return tag
    end = tag.index('"', at + len(marker))
    return tag[:at] + tag[end + 1:]


def empty_chart(title: str, text: str, width_px: int = 520, height_px: int = 90) -> Markup:
    """The empty-data state: the title and why there is nothing to draw."""
    chart_id = f"chart-{next(_ids)}"
    font = 'font-family="sans-serif"'
    return Markup(
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width_px} {height_px}" role="img" '
        f'class="chart empty" id="{chart_id}" aria-labelledby="{chart_id}-title {chart_id}-desc">'
        f'<title id="{chart_id}-title">{escape(title)}</title>'
        f'<desc id="{chart_id}-desc">{escape(text)}</desc>'
        f'<rect x="0.5" y="0.5" width="{width_px - 1}" height="{height_px - 1}" '
        f'fill="#fafafa" stroke="#ccc"/>'
        f'<text x="12" y="24" {font} font-size="13" font-weight="bold" fill="#222">{escape(title)}</text>'
        f'<text x="{width_px // 2}" y="{height_px // 2 + 14}" {font} font-size="12" fill="#555" '
        f'text-anchor="middle">{escape(text)}</text></svg>')


def svg_chart(
    title: str,
    x_labels: Sequence[str],
    series: Mapping[str, Sequence[Value]],
    *,
    x_label: str,
    y_label: str,
    empty_text: str,
    kind: str = "line",
    percent: bool = False,
    empty: bool | None = None,
    size_in: tuple[float, float] = (5.6, 2.5),
) -> Markup:
    """A line (or stacked bar, `kind="bar"`) chart of `series` (name -> one value per x label;
    None where there is no value, drawn as a gap) as inline SVG markup for a Jinja template.

    Empty (the `empty_text` state) when `empty` is True, or, by default, when no series has a
    value. `percent`: values are fractions, shown 0-100 %. Labels are thinned to fit.
    """
    if empty is None:
        empty = not any(v is not None for values in series.values() for v in values)
    if empty:
        return empty_chart(title, empty_text)
    for name, values in series.items():
        if len(values) != len(x_labels):
            raise ValueError(f"series {name!r} has {len(values)} values for {len(x_labels)} labels")
    fmt = "{:.0%}" if percent else "{:.4g}"
    frozen = tuple((name, tuple(values)) for name, values in series.items())
    body = _draw(title, tuple(x_labels), frozen, x_label, y_label, kind, percent, size_in)
    return _wrap(body, f"chart-{next(_ids)}", title, _summary(series, x_labels, fmt))


@functools.lru_cache(maxsize=64)
def _draw(title: str, x_labels: tuple[str, ...], series: tuple[tuple[str, tuple[Value, ...]], ...],
          x_label: str, y_label: str, kind: str, percent: bool, size_in: tuple[float, float]) -> str:
    """The SVG text. Cached: a page refreshed every 15 s on a quiet night draws nothing new.
    Fixed margins, not matplotlib's constrained layout, which doubled the time of a chart."""
    width, plot_height = size_in
    names = [name for name, _ in series]
    legend = len(series) > 1 or kind == "bar"
    ncols = min(len(names), 3 if max(map(len, names)) <= 16 else 2)
    header = 0.32 + (0.17 * math.ceil(len(names) / ncols) if legend else 0.0)  # inches above the plot
    height = plot_height + header
    with DRAWING, rc_context({"svg.fonttype": "none", "font.size": 8, "axes.spines.top": False,
                              "axes.spines.right": False}):
        figure = Figure(figsize=(width, height))
        figure.subplots_adjust(left=0.62 / width, right=1 - 0.12 / width, bottom=0.5 / height,
                               top=1 - header / height)
        axes = figure.add_subplot()
        positions = list(range(len(x_labels)))
        bottom = [0.0] * len(x_labels)
        for (name, values), colour in zip(series, itertools.cycle(COLOURS), strict=False):
            numbers = [math.nan if v is None else float(v) for v in values]
            if kind == "bar":
                heights = [0.0 if math.isnan(v) else v for v in numbers]
                axes.bar(positions, heights, bottom=bottom, label=name, color=colour, width=0.8)
                bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
            else:
                axes.plot(positions, numbers, label=name, color=colour, marker="o", markersize=2.5,
                          linewidth=1.4)
        figure.text(0.08 / width, 1 - 0.06 / height, title, ha="left", va="top", fontsize=10,
                    fontweight="bold")
        axes.set_xlabel(x_label)
        axes.set_ylabel(y_label)
        step = max(1, math.ceil(len(x_labels) / 8))
        axes.set_xticks(positions[::step], [x_labels[i] for i in positions[::step]])
        axes.set_xlim(-0.6, len(x_labels) - 0.4)
        axes.set_ylim(0, max(axes.get_ylim()[1], 1e-9) * 1.08)  # headroom over the highest value
        if percent:
            axes.set_ylim(0, 1)
            axes.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
        else:
            axes.yaxis.set_major_locator(MaxNLocator(nbins=5, integer=kind == "bar"))
        axes.grid(axis="y", color="#e5e5e5", linewidth=0.6)
        axes.set_axisbelow(True)
        if legend:  # under the title, above the plot: never over the data
            figure.legend(loc="upper left", bbox_to_anchor=(0.5 / width, 1 - 0.3 / height), fontsize=7,
                          frameon=False, ncols=ncols, borderaxespad=0, handlelength=1.2,
                          columnspacing=1.2)
        buffer = io.StringIO()
        figure.savefig(buffer, format="svg", metadata={"Date": None})
    return buffer.getvalue()
