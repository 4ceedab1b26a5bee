"""ops.charts: series become one inline SVG element a browser and a screen reader can use."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from ops.charts import svg_chart

SVG = "{http://www.w3.org/2000/svg}"
LABELS = ["10:00", "11:00", "12:00"]


def parse(markup: str) -> ET.Element:
    assert markup.startswith("<svg")  # no XML prolog or DOCTYPE inside HTML
    return ET.fromstring(str(markup))


@pytest.mark.parametrize("kind", ["line", "bar"])
def test_a_chart_is_titled_described_and_labelled(kind: str) -> None:
    series = {"classified": [3, None, 7], "failed": [0, 1, 0]}
    svg = parse(svg_chart("Images <per> hour & more", LABELS, series, x_label="hour (UTC)",
                          y_label="images", empty_text="none", kind=kind))
    assert svg.get("role") == "img" and "width" not in svg.attrib
    title_id, desc_id = svg.get("aria-labelledby").split()
    assert svg.find(f"{SVG}title").get("id") == title_id
    assert svg.find(f"{SVG}title").text == "Images <per> hour & more"
    desc = svg.find(f"{SVG}desc")
    assert desc.get("id") == desc_id
    assert desc.text == ("classified: latest 7 (12:00), highest 7 (12:00); "
                         "failed: latest 0 (12:00), highest 1 (11:00)")
    texts = " ".join(t.text or "" for t in svg.iter(f"{SVG}text"))  # text stays text
    assert "hour (UTC)" in texts and "images" in texts and "11:00" in texts


def test_percent_and_distinct_ids() -> None:
    first = svg_chart("Positive rate", LABELS, {"m": [0.25, 0.5, None]}, x_label="hour", y_label="positive",
                      empty_text="none", percent=True)
    second = svg_chart("Positive rate", LABELS, {"m": [0.25, 0.5, None]}, x_label="hour", y_label="positive",
                       empty_text="none", percent=True)
    assert "highest 50% (11:00)" in parse(first).find(f"{SVG}desc").text
    assert parse(first).get("id") != parse(second).get("id")  # two charts on one page


def test_empty_states() -> None:
    for chart in (svg_chart("Latency", LABELS, {"mean": [None] * 3}, x_label="hour", y_label="s",
                            empty_text="no SR delivered in the last 24 h"),
                  svg_chart("Images", LABELS, {"classified": [0, 0, 0]}, x_label="hour", y_label="images",
                            empty_text="no images in the last 24 h", empty=True)):
        svg = parse(chart)
        assert "empty" in svg.get("class")
        assert "in the last 24 h" in svg.find(f"{SVG}desc").text
        assert not list(svg.iter(f"{SVG}path"))  # no axes drawn


def test_a_series_must_match_the_labels() -> None:
    with pytest.raises(ValueError, match="2 values for 3 labels"):
        svg_chart("x", LABELS, {"s": [1, 2]}, x_label="x", y_label="y", empty_text="none")


def test_threads_drawing_at_once_keep_text_as_text_and_leave_settings_alone() -> None:
    """The dashboard draws in Starlette's thread pool; matplotlib's rc_context is global."""
    from concurrent.futures import ThreadPoolExecutor

    import matplotlib

    before = matplotlib.rcParams["svg.fonttype"]

    def draw(n: int) -> ET.Element:
        return parse(svg_chart(f"chart {n}", LABELS, {"s": [n, n + 1, n + 2]}, x_label="hour", y_label="n",
                               empty_text="none"))

    with ThreadPoolExecutor(8) as pool:
        charts = list(pool.map(draw, range(24)))
    for n, svg in enumerate(charts):
        assert f"chart {n}" in [t.text for t in svg.iter(f"{SVG}text")]  # not drawn as paths
    assert matplotlib.rcParams["svg.fonttype"] == before
