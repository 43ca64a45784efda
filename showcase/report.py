"""The HTML report: one page, a section per bundle (metrics, curves, pictures) and the stage times."""

from __future__ import annotations

import html
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Table", "Section", "write_report"]


@dataclass
class Table:
    caption: str
    header: list[str]
    rows: list[list[object]]


@dataclass
class Section:
    """One part of the page: a bundle or the data preparation."""

    title: str
    intro: str = ""
    tables: list[Table] = field(default_factory=list)
    images: list[tuple[str, Path]] = field(default_factory=list)  # (caption, PNG path)
    errors: list[str] = field(default_factory=list)


CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#1f2937;line-height:1.45}
h1{margin-bottom:.2em} h2{border-bottom:2px solid #e5e7eb;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.6em 0 1.2em} caption{text-align:left;font-weight:600;padding:.3em 0}
td,th{border:1px solid #d1d5db;padding:.25em .6em;text-align:right;font-variant-numeric:tabular-nums}
th{background:#f3f4f6} td:first-child,th:first-child{text-align:left}
.ok{color:#15803d;font-weight:600} .failed{color:#b91c1c;font-weight:600} .skipped{color:#a16207;font-weight:600}
.error{background:#fef2f2;border-left:4px solid #b91c1c;padding:.5em 1em;white-space:pre-wrap;\
font-family:monospace;font-size:.85em}
figure{margin:1em 0} figcaption{font-size:.9em;color:#4b5563} img{max-width:100%;border:1px solid #e5e7eb}
.note{color:#4b5563;font-size:.92em}
"""


def _cell(value: object) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.0f}"
    return html.escape(str(value))


def _table(t: Table) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in t.header)
    body = "".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>" for row in t.rows)
    return (
        f"<table><caption>{html.escape(t.caption)}</caption><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    )


def write_report(
    out_html: Path, stages_json: Path, sections: list[Section], title: str = "Lung bundles on the demo world"
) -> Path:
    """Write the page; image paths are made relative to the page's folder.

    Args:
        out_html: the page to write (its folder also holds the PNGs).
        stages_json: ``stages.json`` of the :class:`~showcase.stages.StageRunner`.
        sections: the page's sections, in order.
        title: page title.
    """
    stages = (
        json.loads(Path(stages_json).read_text()) if Path(stages_json).exists() else {"stages": [], "total_seconds": 0}
    )
    parts = [
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p class='note'>Written {time.strftime('%Y-%m-%d %H:%M')}. Everything here ran on CPU on the synthetic "
        "demo world (phantom CTs that reuse real LIDC-IDRI geometry and nodule outlines): the numbers show that the "
        "pipeline works end to end after a brief training, not what the models reach on real data (see each "
        "bundle's docs/README.md).</p>",
    ]
    n_failed = sum(s["status"] != "ok" for s in stages["stages"])
    parts.append(
        f"<p>{len(stages['stages'])} stages, {n_failed} not ok, "
        f"{stages.get('total_seconds', 0) / 60:.1f} min in all.</p>"
    )
    for sec in sections:
        parts.append(f"<section><h2>{html.escape(sec.title)}</h2>")
        if sec.intro:
            parts.append(f"<p class='note'>{html.escape(sec.intro)}</p>")
        for err in sec.errors:
            parts.append(f"<div class='error'>{html.escape(err)}</div>")
        parts.extend(_table(t) for t in sec.tables)
        for caption, png in sec.images:
            rel = os.path.relpath(png, out_html.parent)
            parts.append(
                f"<figure><img src='{html.escape(rel)}' alt='{html.escape(caption)}'>"
                f"<figcaption>{html.escape(caption)}</figcaption></figure>"
            )
        parts.append("</section>")
    rows = [
        [s["name"], f"<span class='{s['status']}'>{s['status']}</span>", f"{s['seconds']:.1f}", s.get("log", "")]
        for s in stages["stages"]
    ]
    parts.append(
        "<section><h2>Stages and their time</h2>"
        "<table><caption>each stage of the main job (logs under the output folder)</caption>"
        "<thead><tr><th>stage</th><th>status</th><th>seconds</th><th>log</th></tr></thead><tbody>"
    )
    for name, status, secs, log in rows:
        parts.append(
            f"<tr><td>{html.escape(name)}</td><td>{status}</td><td>{secs}</td><td>{html.escape(log)}</td></tr>"
        )
    parts.append("</tbody></table>")
    for s in stages["stages"]:
        if s["status"] != "ok" and s.get("error"):
            parts.append(
                f"<p><b>{html.escape(s['name'])}</b> ({s['status']}):</p>"
                f"<div class='error'>{html.escape(s['error'][-2000:])}</div>"
            )
    # Lets a headless browser report whether every picture loaded (tests/showcase/test_report_browser.py).
    parts.append(
        "</section><script>window.addEventListener('load',function(){"
        "var im=Array.prototype.slice.call(document.images);"
        "document.body.setAttribute('data-images-total',im.length);document.body.setAttribute('data-images-loaded',"
        "im.filter(function(i){return i.complete&&i.naturalWidth>0;}).length);});</script></body></html>"
    )
    out_html.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_html.with_suffix(".tmp")
    tmp.write_text("\n".join(parts))
    tmp.replace(out_html)
    return out_html
