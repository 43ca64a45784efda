"""The main job's report opened in headless Chromium: every image loads, every metric table holds numbers.

Opt-in (marker ``browser``; ``make test`` runs it): it runs the main job on a small demo world and
needs Debian's ``chromium`` (``make chromium`` installs it).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.browser


class _Tables(HTMLParser):
    """Collects the text of every <td> per table and the <img> sources."""

    def __init__(self):
        super().__init__()
        self.tables: list[list[str]] = []
        self.images: list[str] = []
        self._in_td = False

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "td":
            self._in_td = True
            self.tables[-1].append("")
        elif tag == "img":
            self.images.append(dict(attrs).get("src", ""))

    def handle_endtag(self, tag):
        if tag == "td":
            self._in_td = False

    def handle_data(self, data):
        if self._in_td:
            self.tables[-1][-1] += data


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("main_job")
    proc = subprocess.run([sys.executable, "-m", "showcase", "--out", str(out), "--patients", "6"], cwd=REPO,
                          capture_output=True, text=True, timeout=2400)  # fmt: skip
    page = out / "report" / "index.html"
    assert page.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return page


def test_report_images_load_and_tables_hold_numbers(report, tmp_path):
    """In Chromium, every <img> of the report has loaded pixels and each table has numeric cells."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.fail("chromium is not installed: run `make chromium` (Debian's chromium package)")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", "--no-first-run", "--disable-quic", f"--user-data-dir={tmp_path / 'profile'}"]  # fmt: skip
    url = report.resolve().as_uri()
    dom = subprocess.run(
        [chromium, *flags, "--virtual-time-budget=10000", "--dump-dom", url],
        capture_output=True,
        text=True,
        timeout=180,
    ).stdout
    loaded = re.search(r'data-images-loaded="(\d+)"', dom)
    total = re.search(r'data-images-total="(\d+)"', dom)
    assert loaded and total, "the page's load script did not run in Chromium"
    parser = _Tables()
    parser.feed(report.read_text())
    assert int(total.group(1)) == len(parser.images) >= 6, f"expected the report's figures, found {total.group(1)}"
    assert loaded.group(1) == total.group(1), f"only {loaded.group(1)} of {total.group(1)} images loaded"
    assert len(parser.tables) >= 5
    for cells in parser.tables:
        numbers = [c for c in cells if re.fullmatch(r"-?\d+(\.\d+)?(e-?\d+)?", c.strip())]
        assert numbers, f"a table without numbers: {cells[:8]}"
    shot = tmp_path / "report.png"
    subprocess.run(
        [chromium, *flags, "--window-size=1200,2400", f"--screenshot={shot}", url], capture_output=True, timeout=180
    )
    assert shot.exists() and shot.stat().st_size > 10_000
