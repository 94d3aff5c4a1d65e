"""The layer report's HTML page: real reports on synthetic features, checked as text and in a real browser.

Three reports from `influence.report.layer_report`: one with a noisy mask where middle layers carry the signal
(a recommendation), one without a mask (no NDR: "not available" notes), one near-chance model (warnings, no
recommendation). Each page is loaded in headless Chromium (`/usr/bin/chromium`, installed by `make browser`):
the dumped DOM must show the plots the page's script drew, and a screenshot must not be blank.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import re
import struct
import subprocess
import time
import zlib
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

from app.web.report_page import CONTENT_SECURITY_POLICY, render_report_html
from influence.layers import Layer, block_positions, block_range_groups
from influence.metrics import Cancellation
from influence.report import layer_report

CHROMIUM = Path("/usr/bin/chromium")
NUM_BLOCKS = 6
SIGNAL = ("block.2.attn.v", "block.3.attn.v")  # the middle third: these separate noisy rows
WEAK = "block.4.attn.q"  # some signal, buried in noise
N, M, K = 200, 30, 8
EVIL_TEXT = "<script>alert(1)</script>"
EVIL_GROUP = "</script><b>evil</b>"
EVIL_TITLE = "Report <img src=x onerror=alert(2)>"
# The only URL a page may contain: the SVG namespace name, an identifier that is never fetched.
SVG_NAMESPACE = "http://www.w3.org/2000/svg"


# ------------------------------------------------------------------------------------------ the reports


def make_layers() -> list[Layer]:
    """A 6-block encoder's units as layer discovery would name and group them: WE, q and v per block, CL."""
    positions, ranges = block_positions(NUM_BLOCKS), block_range_groups(NUM_BLOCKS)
    block_range = {b: name for name, blocks in ranges.items() for b in blocks}

    def unit(name: str, role: str, block: int | None, groups: tuple[str, ...]) -> Layer:
        kind = "embedding" if role == "embedding" else "linear"
        position = None if block is None else positions[block]
        rows = 50 if role == "embedding" else 2 if role == "head" else 16
        return Layer(name, name, kind, role, block, rows, 16, kind == "linear", False, position, groups)

    layers = [unit("embed", "embedding", None, ("total", "WE"))]
    for block in range(NUM_BLOCKS):
        for proj in ("q", "v"):
            groups = ("total", block_range[block], positions[block])
            layers.append(unit(f"block.{block}.attn.{proj}", "attention", block, groups))
    return [*layers, unit("head", "head", None, ("total", "CL"))]


def synthetic(layers: list[Layer], seed: int, signal: bool):
    """(train, reference, noisy): 20% noisy rows; with `signal`, noisy rows' gradients oppose the reference's."""
    rng = np.random.default_rng(seed)
    noisy = np.zeros(N, dtype=bool)
    noisy[rng.choice(N, N // 5, replace=False)] = True
    train = {layer.name: rng.standard_normal((N, K)).astype(np.float32) for layer in layers}
    reference = {layer.name: rng.standard_normal((M, K)).astype(np.float32) for layer in layers}
    if signal:
        direction = np.where(noisy, -1.0, 1.0)
        for name, noise in ((SIGNAL[0], 0.3), (SIGNAL[1], 0.5), (WEAK, 1.5)):
            train[name][:, 0] = direction + noise * rng.standard_normal(N)
            reference[name][:, 0] = 1.0 + 0.2 * rng.standard_normal(M)
    return train, reference, noisy


def json_round_trip(report) -> dict[str, Any]:
    return json.loads(json.dumps(report.to_dict(), allow_nan=False))


def build_reports() -> dict[str, dict[str, Any]]:
    layers = make_layers()
    names = [layer.name for layer in layers]
    cancellation = {name: Cancellation(1.0 + 0.3 * i, 20.0 + 2 * i, 64) for i, name in enumerate(names)}
    cancellation["head"] = Cancellation(float("inf"), float("inf"), 64)  # a zero gradient sum: null in JSON

    train, reference, noisy = synthetic(layers, seed=0, signal=True)
    correct = np.random.default_rng(1).random(M) < 0.85
    signal = layer_report(
        train,
        reference,
        layers=layers,
        noisy=noisy,
        reference_correct=correct,
        reference_accuracy=0.9,
        cancellation=cancellation,
        extra_groups={EVIL_GROUP: list(SIGNAL)},
        top_rows=8,
    )
    no_mask = layer_report(
        train,
        reference,
        layers=layers,
        noisy=None,
        reference_accuracy=0.9,
        cancellation=cancellation,
        estimators=("grad-dot",),
        top_rows=5,
    )
    train, reference, noisy = synthetic(layers, seed=3, signal=False)
    near_chance = layer_report(
        train,
        reference,
        layers=layers,
        noisy=noisy,
        reference_accuracy=0.52,
        estimators=("grad-dot", "cosine"),
        aggregations=("mean", "rank", "vote"),
        top_rows=5,
    )
    return {
        "signal": json_round_trip(signal),
        "no_mask": json_round_trip(no_mask),
        "near_chance": json_round_trip(near_chance),
    }


# ------------------------------------------------------------------------------------------ the browser


class Dom(HTMLParser):
    """The elements of a dumped DOM in document order: tag, attributes, the data-plot of the SVG they are in
    (or None) and their text content (without the <title> tooltips inside)."""

    VOID: ClassVar[frozenset[str]] = frozenset(
        ["area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"]
    )

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.elements: list[dict[str, Any]] = []
        self._open: list[dict[str, Any]] = []
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        attrs = {k: v or "" for k, v in attrs}
        inherited = self._open[-1]["plot"] if self._open else None
        element = {
            "tag": tag,
            "attrs": attrs,
            "plot": attrs.get("data-plot") if tag == "svg" else inherited,
            "text": "",
        }
        self.elements.append(element)
        if tag not in self.VOID:
            self._open.append(element)

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if tag not in self.VOID:
            self._open.pop()

    def handle_endtag(self, tag):
        for i in range(len(self._open) - 1, -1, -1):
            if self._open[i]["tag"] == tag:
                del self._open[i:]
                return

    def handle_data(self, data):
        if self._open and self._open[-1]["tag"] == "title":  # a tooltip is not part of its parent's text
            self._open[-1]["text"] += data
            return
        for element in self._open:
            element["text"] += data

    def find(self, tag: str | None = None, plot: str | None = None, cls: str | None = None, **attrs):
        """Elements by tag, enclosing plot, CSS class and exact attribute values (data_plot_na -> data-plot-na)."""
        out = []
        for e in self.elements:
            if (tag and e["tag"] != tag) or (plot and e["plot"] != plot):
                continue
            if cls and cls not in e["attrs"].get("class", "").split():
                continue
            if all(e["attrs"].get(k.replace("_", "-")) == v for k, v in attrs.items()):
                out.append(e)
        return out

    @property
    def body(self) -> dict[str, str]:
        return self.find("body")[0]["attrs"]


@dataclass
class Page:
    report: dict[str, Any]
    html: str
    dom: Dom | None = None
    screenshot: Path | None = None
    log: list[str] = field(default_factory=list)


def require_chromium() -> None:
    if not CHROMIUM.exists():
        pytest.fail(
            f"Chromium is not installed at {CHROMIUM}: run `make browser` (apt-get install chromium). The report "
            "page's plots are drawn by JavaScript and only a real browser can check them.",
            pytrace=False,
        )


def run_chromium(pages: dict[str, Page], folder: Path) -> None:
    """Load every page at once, one Chromium each (own profile): dump its DOM and take a screenshot."""
    runs = []
    for name, page in pages.items():
        path = folder / f"{name}.html"
        path.write_text(page.html, encoding="utf-8")
        page.screenshot = folder / f"{name}.png"
        command = [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--hide-scrollbars",
            f"--user-data-dir={folder / f'profile-{name}'}",
            "--window-size=1280,2000",
            "--virtual-time-budget=10000",
            "--dump-dom",
            f"--screenshot={page.screenshot}",
            path.as_uri(),
        ]
        runs.append(
            (page, subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        )
    deadline = time.monotonic() + 120
    for page, process in runs:
        try:
            stdout, stderr = process.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, stderr = process.communicate()
        page.log.append(f"chromium exited {process.returncode}; stderr ends:\n{stderr[-2000:]}")
        page.dom = Dom(stdout) if "<body" in stdout else None


@pytest.fixture(scope="module")
def pages(tmp_path_factory) -> dict[str, Page]:
    require_chromium()
    reports = build_reports()
    rows = {r["row_id"]: {"text": EVIL_TEXT, "label": "<i>pos</i>"} for r in reports["signal"]["detrimental"]}
    context = {
        "index_id": "idx_<1>",
        "model": "tiny-bert & co",
        "dataset": 'sst2 "noisy"',
        "created": "2025-01-01T00:00:00Z",
        "rows": rows,
    }
    out = {
        name: Page(
            report,
            render_report_html(report, title=EVIL_TITLE if name == "signal" else name, context=context),
        )
        for name, report in reports.items()
    }
    # A report the script cannot draw one plot of: its error must show, the other plots still draw.
    broken = json.loads(json.dumps(reports["signal"]))
    broken["layers"] = None
    out["broken"] = Page(broken, render_report_html(broken, title="broken"))
    run_chromium(out, tmp_path_factory.mktemp("chromium"))
    return out


def dom_of(page: Page) -> Dom:
    assert page.dom is not None, "Chromium dumped no DOM:\n" + "\n".join(page.log)
    return page.dom


def decode_png(path: Path) -> np.ndarray:
    """(height, width, channels) pixels of an 8-bit RGB / RGBA, non-interlaced PNG (what Chromium writes)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, chunks, header = 8, [], None
    while pos < len(data):
        (size,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + size]
        pos += 12 + size
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            chunks.append(body)
    width, height, depth, color, _, _, interlace = header
    assert depth == 8 and color in (2, 6) and interlace == 0, header
    channels = 3 if color == 2 else 4
    raw = np.frombuffer(zlib.decompress(b"".join(chunks)), np.uint8).reshape(height, 1 + width * channels)
    filters = raw[:, 0]
    assert filters.max() <= 4
    # A pixel's filter predicts it from its left, upper and upper-left neighbours, so the pixels of one
    # anti-diagonal (row + column = d) can be undone together. Stored skewed, skew[d, r + 1] = pixel (r, d - r),
    # those neighbours are the slices skew[d - 1, r + 1], skew[d - 1, r], skew[d - 2, r]; row -1 stays zero.
    skew = np.zeros((height + width, height + 1, channels), np.int16)
    filtered = np.zeros_like(skew)
    for r in range(height):
        filtered[r : r + width, r + 1] = raw[r, 1:].reshape(width, channels)
    sub, up, average, paeth = ((filters == kind)[:, None] for kind in (1, 2, 3, 4))
    zero = np.zeros((height, channels), np.int16)
    for d in range(height + width - 1):
        r0, r1 = max(0, d - width + 1), min(height, d + 1)
        a = skew[d - 1, r0 + 1 : r1 + 1] if d > 0 else zero[: r1 - r0]
        b = skew[d - 1, r0:r1] if d > 0 else zero[: r1 - r0]
        c = skew[d - 2, r0:r1] if d > 1 else zero[: r1 - r0]
        p = a + b - c
        pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
        nearest = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))
        rows = slice(r0, r1)
        predicted = np.where(
            sub[rows],
            a,
            np.where(up[rows], b, np.where(average[rows], (a + b) >> 1, np.where(paeth[rows], nearest, 0))),
        )
        skew[d, r0 + 1 : r1 + 1] = (filtered[d, r0 + 1 : r1 + 1] + predicted) & 255
    out = np.empty((height, width, channels), np.uint8)
    for r in range(height):
        out[r] = skew[r : r + width, r + 1]
    return out


# ------------------------------------------------------------------------------------------------ tests


def rec_view(report: dict[str, Any]) -> str:
    rec = report["recommendation"]
    return f"{rec['estimator']}, {rec['aggregation']}"


def test_pages_are_self_contained_and_escape_user_text(pages):
    for name, page in pages.items():
        text = page.html
        assert text.startswith("<!DOCTYPE html>") and text.count("<script") == 2, name
        # no resource from anywhere: no src/href/url() to a server, and a policy that forbids fetching at all
        assert set(re.findall(r"https?://[^\s\"'<>)]*", text)) <= {SVG_NAMESPACE}, name
        assert not re.search(r"<[^>]*\s(src|href)\s*=", text), name
        assert "@import" not in text and not re.search(r"url\((?!#)", text), name
        assert f'content="{html.escape(CONTENT_SECURITY_POLICY)}"' in text
        assert CONTENT_SECURITY_POLICY.startswith("default-src 'none';")
        # the policy lets exactly this page's script run
        script = text.rsplit("<script>", 1)[1].split("</script>", 1)[0]
        digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
        assert f"'sha256-{digest}'" in CONTENT_SECURITY_POLICY
        # the embedded JSON is the report, and nothing in it can close its script element
        data = text.split('<script type="application/json" id="report-data">', 1)[1].split("</script>", 1)[0]
        assert "<" not in data and json.loads(data) == page.report, name

    signal = pages["signal"].html
    assert EVIL_TEXT not in signal and html.escape(EVIL_TEXT) in signal
    assert "<img" not in signal and html.escape(EVIL_TITLE) in signal
    assert "<i>pos</i>" not in signal and "&lt;i&gt;pos&lt;/i&gt;" in signal
    assert "<b>evil</b>" not in signal and html.escape(EVIL_GROUP) in signal  # the group's name in the tables
    assert "idx_&lt;1&gt;" in signal and "tiny-bert &amp; co" in signal and "sst2 &quot;noisy&quot;" in signal


def test_server_rendered_text_reads_without_javascript(pages):
    signal, no_mask, near = (pages[n] for n in ("signal", "no_mask", "near_chance"))
    rec = signal.report["recommendation"]
    assert rec is not None and rec["layers"]["name"] in {*SIGNAL, "middle", "blocks.02-03", EVIL_GROUP}
    assert "No layers are recommended" not in signal.html and 'class="box warnings"' not in signal.html
    assert (
        "Accuracy on the reference set" in signal.html and "90.0%" in signal.html and "50.0%" in signal.html
    )
    assert "Every metric could be computed." in signal.html and 'tr class="rec"' in signal.html

    for reason in no_mask.report["unavailable_reasons"].values():
        assert html.escape(reason) in no_mask.html
    assert "no noisy mask was given" in no_mask.html and "needs reference_correct" in no_mask.html
    assert "No layers are recommended." in no_mask.html

    assert len(near.report["warnings"]) == 2 and near.report["recommendation"] is None
    for warning in near.report["warnings"]:
        assert html.escape(warning) in near.html
    box = near.html.split('class="box warnings"', 1)[1].split("</section>", 1)[0]
    assert "near chance" in box and "no layers are recommended" in box
    assert 'badge bad">near chance' in near.html and "No layers are recommended." in near.html


def test_signal_page_draws_every_plot_in_chromium(pages):
    page = pages["signal"]
    dom, report = dom_of(page), page.report
    assert dom.body.get("data-plots-drawn") == "4" and "data-plot-error" not in dom.body, page.log
    for plot in ("ndr-curves", "layer-bars", "heatmap", "cancellation"):
        (svg,) = dom.find("svg", data_plot=plot)
        assert dom.find("title", plot=plot) and svg["attrs"].get("role") == "img" and svg["attrs"]["viewbox"]

    # NDR curves: the best 4 layer sets per estimator, each a path through (0, 0) and every NDR@p
    curves = dom.find("path", plot="ndr-curves", cls="curve")
    assert len(curves) == 4 * len(report["estimators"])
    for curve in curves:
        points = re.findall(r"[ML]([\d.]+),([\d.]+)", curve["attrs"]["d"])
        assert len(points) == len(report["percents"]) + 1 and len({y for _, y in points}) > 2
    assert dom.find("path", plot="ndr-curves", cls="random") and dom.find(
        "path", plot="ndr-curves", cls="band"
    )
    assert len(dom.find("circle", plot="ndr-curves")) == len(curves) * len(report["percents"])
    assert any(c["attrs"]["data-layers"] in SIGNAL for c in curves)

    # per-layer bars (the recommended estimator / aggregation): one per layer, the signal layers tallest
    bars = dom.find("rect", plot="layer-bars", cls="bar")
    assert [b["attrs"]["data-layer"] for b in bars] == report["layers"]
    heights = {b["attrs"]["data-layer"]: float(b["attrs"]["height"]) for b in bars}
    assert len(set(heights.values())) > 3
    assert set(sorted(heights, key=heights.get)[-2:]) == set(SIGNAL)
    assert any("random" in t["text"] for t in dom.find("text", plot="layer-bars"))
    assert dom.find("title", plot="layer-bars")[0]["text"].endswith(f"({rec_view(report)})")

    # heat map: one coloured cell per (layer set, estimator, aggregation), the recommended one outlined
    cells = dom.find("rect", plot="heatmap", cls="cell")
    sets = {(e["layers"]["kind"], e["layers"]["name"]) for e in report["entries"]}
    assert len(cells) == len(report["entries"]) == len(sets) * len(report["estimators"]) * 5
    fills = [c["attrs"]["fill"] for c in cells]
    assert all(re.fullmatch(r"#[0-9a-f]{6}", f) for f in fills) and len(set(fills)) > 20
    assert len([c for c in cells if c["attrs"]["stroke"] == "#000"]) == 1
    assert dom.find("rect", plot="heatmap", cls="legend-bar") and dom.find("stop", plot="heatmap")
    # a user-named group is text in the heat map, never markup
    assert any(t["text"] == EVIL_GROUP for t in dom.find("text", plot="heatmap")) and not dom.find("b")

    # cancellation: L1/L1 and L1/L2 bars for the finite layers, "n/a" for the head (a zero gradient sum)
    canc = dom.find("rect", plot="cancellation", cls="bar")
    assert len(canc) == 2 * (len(report["layers"]) - 1)
    assert len({b["attrs"]["height"] for b in canc}) > 5
    assert sum(t["text"] == "n/a" for t in dom.find("text", plot="cancellation")) == 2
    # the rows table: the malicious text arrived as text
    cells = [e["text"] for e in dom.find("td", cls="text")]
    assert cells and all(c == EVIL_TEXT for c in cells) and len(dom.find("script")) == 2


def test_no_mask_page_shows_not_available_notes(pages):
    dom = dom_of(pages["no_mask"])
    assert dom.body.get("data-plots-drawn") == "1" and "data-plot-error" not in dom.body, pages["no_mask"].log
    for plot in ("ndr-curves", "layer-bars", "heatmap"):
        assert not dom.find("svg", data_plot=plot)
        (note,) = dom.find("p", data_plot_na=plot)
        assert note["text"].startswith("not available: no noisy mask was given"), note["text"]
    assert len(dom.find("rect", plot="cancellation", cls="bar")) == 2 * (1 + 2 * NUM_BLOCKS)


def test_near_chance_page_warns_and_draws_what_it_has(pages):
    dom, report = dom_of(pages["near_chance"]), pages["near_chance"].report
    assert dom.body.get("data-plots-drawn") == "3" and "data-plot-error" not in dom.body, pages[
        "near_chance"
    ].log
    (note,) = dom.find("p", data_plot_na="cancellation")
    assert note["text"] == "not available: no cancellation was computed for this report"
    (box,) = dom.find("section", cls="warnings")
    assert "near chance" in box["text"] and "no layers are recommended" in box["text"]
    cells = dom.find("rect", plot="heatmap", cls="cell")
    assert len(cells) == len(report["entries"]) and not any(c["attrs"]["stroke"] == "#000" for c in cells)
    bars = dom.find("rect", plot="layer-bars", cls="bar")
    assert len(bars) == len(report["layers"]) and len({b["attrs"]["height"] for b in bars}) > 3
    # no recommendation: the bars show rank (rank-c was not asked for) of the first estimator
    assert dom.find("title", plot="layer-bars")[0]["text"].endswith("(grad-dot, rank)")


def test_a_plot_that_fails_is_reported_and_the_others_still_draw(pages):
    dom = dom_of(pages["broken"])
    assert "data-plots-drawn" not in dom.body
    assert dom.body.get("data-plot-error", "").startswith("layer-bars:")
    assert not dom.find("svg", data_plot="layer-bars") and dom.find("p", cls="error")
    assert all(dom.find("svg", data_plot=p) for p in ("ndr-curves", "heatmap", "cancellation"))


def test_screenshots_are_not_blank(pages):
    for name, colours in (
        # colours the page draws in the first 2000 pixels: boxes (server-rendered) and plots (drawn by the script)
        ("signal", ["#dafbe1", "#0072b2", "#d55e00"]),  # recommendation box; the first two NDR curves
        ("near_chance", ["#fff8c5", "#cf222e", "#0072b2"]),  # warnings box, near-chance meter; an NDR curve
        ("no_mask", ["#ffebe9", "#8250df"]),  # "no layers are recommended"; the cancellation bars
    ):
        page = pages[name]
        assert page.screenshot is not None and page.screenshot.exists(), "\n".join(page.log)
        pixels = decode_png(page.screenshot)
        assert pixels.shape[:2] == (2000, 1280)
        rgb = pixels[:, :, :3].astype(np.int32)
        packed = (rgb[..., 0] << 16 | rgb[..., 1] << 8 | rgb[..., 2]).ravel()
        distinct, counts = np.unique(packed, return_counts=True)
        assert len(distinct) > 50, (name, len(distinct))
        assert distinct[counts.argmax()] == 0xFFFFFF  # a white page with things drawn on it
        assert counts.max() < 0.9 * packed.size, name
        for colour in colours:
            assert int(colour[1:], 16) in distinct, (name, colour)
