"""Issue 17 item 4: deploy/grafana/metertwin-gateways.json is valid and charts only metrics that exist.

Every metric name in a panel's ``expr`` must be one the gateway (``gateway.metrics``, rendered
after one invocation and one connector message) or the stream service (``GET /metrics``)
exposes, so a renamed metric breaks this test instead of leaving an empty panel.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from gateway.metrics import GatewayMetrics
from metertwin.stream.service import METRICS as STREAM_METRICS

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "metertwin-gateways.json"
#: PromQL words in the exprs that are not metric names.
PROMQL = {"sum", "by", "rate", "histogram_quantile", "max", "le", "function_name", "code", "job"}


def exported() -> set[str]:
    metrics = GatewayMetrics("edge", ["edge-read"])
    metrics.observe("edge-read", 200, 0.002)
    metrics.mqtt_lag.observe(0.01)
    metrics.scrape_state(mqtt=None, processed=1, queue_depth=0)
    names = {line.split("{")[0].split(" ")[0] for line in metrics.render().decode().splitlines()
             if line and not line.startswith("#")}
    return names | {name for name, *_ in STREAM_METRICS}


def panel_exprs(doc: dict[str, Any]) -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in doc["panels"] for t in p["targets"]]


def test_dashboard_json_is_well_formed() -> None:
    doc = json.loads(DASHBOARD.read_text())
    assert doc["uid"]
    assert doc["title"]
    assert isinstance(doc["schemaVersion"], int)
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids)) >= 8
    variables = {v["name"] for v in doc["templating"]["list"]}
    for panel in doc["panels"]:
        assert panel["targets"], panel["title"]
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"])
        for target in panel["targets"]:
            for used in re.findall(r"\$\{?(\w+)", json.dumps(target)):
                assert used in variables | {"__rate_interval"}, (panel["title"], used)
            expr = target["expr"]
            assert expr.count("(") == expr.count(")"), expr
            assert expr.count("{") == expr.count("}"), expr


def test_every_expr_names_an_exported_metric() -> None:
    doc = json.loads(DASHBOARD.read_text())
    names = exported()
    charted: set[str] = set()
    for title, expr in panel_exprs(doc):
        bare = re.sub(r'"[^"]*"', '""', expr)  # label values are no metric names
        bare = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", bare)
        words = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", bare)) - PROMQL
        words = {w for w in words if not re.fullmatch(r"\d.*", w)}
        assert words, (title, expr)
        missing = words - names
        assert not missing, f"panel {title!r} charts {sorted(missing)}, not exported (have {sorted(names)})"
        charted |= words
    # The list: invocations and latency per function, connector lag and retries, queue depth, clients.
    for needed in ("gateway_function_invocation_total", "gateway_functions_seconds_bucket",
                   "gateway_mqtt_lag_seconds_bucket", "gateway_mqtt_retries_total", "gateway_async_queue_depth",
                   "metertwin_stream_clients"):
        assert needed in charted, needed
