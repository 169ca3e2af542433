"""The HTML page in a real browser (headless chromium): what a person sees, and sorting by clicking.

A probe script is appended to a copy of the page. On ``load`` it records the computed visibility and
size of the table and the plot images, clicks column headers and records the row order, then writes
all of it into ``<pre id="probe">``, which ``--dump-dom`` prints. A screenshot must not be blank.
"""

from __future__ import annotations

import html
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from petlbench.report import build_report, render
from tests.report.conftest import require_tool
from tests.report.factory import HTML_HOSTILE, golden_records, make_record

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio"]

PROBE = r"""
<script>
window.addEventListener("load", function () {
  function box(el) {
    var r = el.getBoundingClientRect(), s = getComputedStyle(el);
    return {w: r.width, h: r.height, top: r.top + window.scrollY,
            visible: s.visibility === "visible" && s.display !== "none" && parseFloat(s.opacity) > 0};
  }
  function names(table) {
    return Array.prototype.map.call(table.tBodies[0].rows, function (r) { return r.cells[0].textContent; });
  }
  var out = {pwned: window.__pwned || null, scripts: document.scripts.length};
  var table = document.getElementById("table-accuracy");
  out.table = box(table);
  out.cells = table.querySelectorAll("tbody td").length;
  out.best = Array.prototype.map.call(table.querySelectorAll("td.best"), function (td) {
    return getComputedStyle(td.querySelector(".v")).fontWeight; });
  out.images = Array.prototype.map.call(document.querySelectorAll("figure img"), function (img) {
    var b = box(img); b.complete = img.complete; b.natural = img.naturalWidth; return b; });
  out.order = names(table);
  var ths = Array.prototype.slice.call(table.querySelectorAll("thead tr.cols th"));
  var cifar = ths.filter(function (th) { return th.textContent.trim() === "CIFAR-100"; })[0];
  cifar.click();
  out.cifar_first = names(table);
  out.cifar_aria = cifar.getAttribute("aria-sort");
  cifar.click();
  out.cifar_second = names(table);
  ths[0].click();
  out.by_name = names(table);
  var pre = document.createElement("pre");
  pre.id = "probe";
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>
"""


def _chromium(*args: str, tmp: Path) -> subprocess.CompletedProcess:
    exe = require_tool("chromium", "chromium-browser", "google-chrome")
    cmd = [exe, *FLAGS, f"--user-data-dir={tmp / 'profile'}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> Path:
    recs = golden_records() + [make_record(HTML_HOSTILE, "cifar", 0, 10.0)]
    report = build_report(recs, reference=None, on_warning=lambda m: None)
    path = tmp_path_factory.mktemp("html") / "report.html"
    path.write_text(render(report, "html"), encoding="utf-8")
    return path


def _probe(page: Path, tmp: Path) -> dict[str, Any]:
    probed = tmp / "probed.html"
    probed.write_text(page.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"), encoding="utf-8")
    proc = _chromium("--virtual-time-budget=10000", "--window-size=1400,1200", "--dump-dom", probed.as_uri(),
                     tmp=tmp)
    match = re.search(r'<pre id="probe">(.*?)</pre>', proc.stdout, re.S)
    assert match, f"no probe output; chromium said:\n{proc.stderr[-3000:]}"
    return json.loads(html.unescape(match.group(1)))


def test_page_is_self_contained(page):
    text = page.read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", text)  # no CDN, nothing fetched
    assert "Content-Security-Policy" in text
    assert text.count("data:image/png;base64,") == 3


def test_visible_table_plots_and_sorting(page, tmp_path):
    probe = _probe(page, tmp_path)
    assert probe["pwned"] is None  # the hostile method name did not run
    assert probe["table"]["visible"] and probe["table"]["w"] > 400 and probe["table"]["h"] > 100
    assert probe["cells"] > 50
    assert probe["best"] and all(int(w) >= 700 for w in probe["best"])  # bold is really bold
    assert len(probe["images"]) == 3
    for img in probe["images"]:
        assert img["visible"] and img["complete"] and img["natural"] > 300 and img["w"] > 300 and img["h"] > 200
    hostile = html.unescape(HTML_HOSTILE)
    # Display names; the legacy-protocol row (ARC†, selected on test) comes after the honest rows.
    assert probe["order"] == ["Linear probing", "LoRA", "my_m&th%d#1", hostile, "ARC†"]
    # CIFAR-100: linear 56.1, lora 64.1, arc 71.8, my_m&th%d#1 67.8, hostile 10.0. First click: best first.
    assert probe["cifar_aria"] == "descending"
    assert probe["cifar_first"] == ["ARC†", "my_m&th%d#1", "LoRA", "Linear probing", hostile]
    assert probe["cifar_second"] == list(reversed(probe["cifar_first"]))
    assert probe["by_name"] == ["ARC†", "Linear probing", "LoRA", "my_m&th%d#1", hostile]


def test_screenshot_is_not_blank(page, tmp_path):
    shot = tmp_path / "shot.png"
    proc = _chromium("--virtual-time-budget=10000", "--window-size=1400,2600", f"--screenshot={shot}",
                     page.as_uri(), tmp=tmp_path)
    assert shot.is_file(), proc.stderr[-3000:]
    import numpy as np
    from PIL import Image

    img = Image.open(shot).convert("RGB")
    assert img.size == (1400, 2600)
    pixels = np.asarray(img.resize((140, 260))).reshape(-1, 3).astype(int)
    non_white = (pixels.sum(axis=1) < 720).mean()
    assert non_white > 0.05  # text, table rules and plots
    colours = {tuple(p) for p in (pixels // 32).tolist()}
    assert len(colours) > 12  # the plots' colours, not just black text on white
