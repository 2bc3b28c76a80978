"""REST fuzz (issue 10): schemathesis against each zone gateway's own /openapi.json, real services behind.

The embedded stack (three zone gateways as processes, Redis per zone, Mosquitto, moto S3) is
what ``make demo`` runs. For every operation of every function, schemathesis (4.x) generates
requests from the zone's document; each generated case is sent once with a token of each
scope. Checks: no 5xx (``not_a_server_error``) and no answer that violates the documented
schema (``response_schema_conformance``). Bounded: a fixed number of examples per operation,
derandomized, no shrinking; the whole module stays well under two minutes here.

Case counts per zone are printed (``-s``) and written to ``fuzz_counts.json`` in the test's
temporary folder.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import response_schema_conformance

from embedded.stack import EmbeddedStack

ZONES = ("edge", "fog", "cloud")
SCOPES = ("utility", "mdms", "billing", "ems", "consumer", "admin", "service")
#: Generated cases per operation; each is sent once per scope.
EXAMPLES = 8
CHECKS = [not_a_server_error, response_schema_conformance]
FUZZ_METER = "fuzz-meter-1"
_counts: Counter[str] = Counter()


@pytest.fixture(scope="module")
def stack() -> Iterator[EmbeddedStack]:
    with EmbeddedStack() as running:
        yield running


def _tokens(stack: EmbeddedStack) -> dict[str, str]:
    bound = {"consumer", "ems"}
    return {s: stack.token(s, meter=FUZZ_METER if s in bound else None, subject=f"fuzz-{s}") for s in SCOPES}


@pytest.mark.slow
@pytest.mark.parametrize("zone", ZONES)
def test_no_5xx_and_no_schema_violation(stack: EmbeddedStack, zone: str, tmp_path_factory: pytest.TempPathFactory
                                        ) -> None:
    base = stack.url(zone)
    admin = {"Authorization": f"Bearer {stack.token('admin', subject='fuzz-setup')}"}
    if zone == "edge":  # one real twin, so meter-bound tokens reach something
        httpx.post(f"{base}/function/edge-registry/meters", json={"meter_id": FUZZ_METER}, headers=admin, timeout=10)
    doc = httpx.get(f"{base}/openapi.json", timeout=10).json()
    schema = schemathesis.openapi.from_dict(doc)
    tokens = _tokens(stack)
    session = requests.Session()
    failures: list[str] = []
    operations = []
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), f"{zone} document: {result.err()}"  # an operation schemathesis cannot read
        if result.ok().path.startswith(f"/function/{zone}-"):
            operations.append(result.ok())
    assert operations, f"no function operation in the {zone} document"
    started = time.monotonic()
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        def run(case: Any) -> None:
            for scope, token in tokens.items():
                headers = {"Authorization": f"Bearer {token}"}
                _counts[zone] += 1
                try:
                    response = case.call(base_url=base, session=session, headers=headers, timeout=15)
                    case.validate_response(response, checks=CHECKS, headers=headers)
                except Exception as exc:  # recorded, not raised: one run reports every failing operation
                    failures.append(f"[{scope}] {case.method} {case.formatted_path}: {str(exc)[:600]}")

        run()
    took = time.monotonic() - started
    counts_file = tmp_path_factory.getbasetemp() / "fuzz_counts.json"
    known = json.loads(counts_file.read_text()) if counts_file.exists() else {}
    known[zone] = {"operations": len(operations), "cases": _counts[zone], "failures": len(failures),
                   "seconds": round(took, 1)}
    counts_file.write_text(json.dumps(known, indent=1))
    print(f"\nfuzz {zone}: {len(operations)} operations, {_counts[zone]} cases, {len(failures)} failures, "
          f"{took:.1f} s (counts in {Path(counts_file)})")
    assert not failures, "\n".join(failures[:20])
