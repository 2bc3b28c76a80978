"""The README renders: every API table has its own header row (checked with a CommonMark + GFM-tables renderer),
and its comparison line states the total-traffic figure beside the zone-1 one."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_no_table_row_renders_as_text() -> None:
    markdown_it = pytest.importorskip("markdown_it")
    html = markdown_it.MarkdownIt("commonmark").enable("table").render(README)
    paragraphs = re.findall(r"<p>(.*?)</p>", html, flags=re.S)
    leaked = [p[:80] for p in paragraphs if p.lstrip().startswith("|")]
    assert not leaked, f"rows outside any table: {leaked}"
    cells = " ".join(re.findall(r"<td>(.*?)</td>", html, flags=re.S))
    for function in ("edge-registry", "fog-mdms-ingest", "fog-mdms-query", "cloud-mdms-archive", "edge-p2p-market",
                     "edge-dr-event", "edge-upgrade-manager"):
        assert f"<code>{function}</code>" in cells, function


def test_zone_1_traffic_claim_names_total_traffic_too() -> None:
    sentence = README[README.index("traffic into zone-1 by 99 %"):][:200]
    assert "40.6 %" in sentence
