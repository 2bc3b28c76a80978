"""``python -m metertwin_upgrade``: the operator's CLI for twin upgrades (talks to edge-upgrade-manager).

    python -m metertwin_upgrade --gateway http://edge-gw:8080 --signing-key-file secrets/token-signing-key \\
        start --to v2 --percent 5 --canary 20 --follow
    python -m metertwin_upgrade follow <op>        # drives the operation, shows progress
    python -m metertwin_upgrade promote <op>       # canary -> everyone (refused if the canary is unhealthy)
    python -m metertwin_upgrade rollback <op> --reason "..."
    python -m metertwin_upgrade pause|resume|status <op>;  list;  releases;  binding <meter>

The token is ``--token``, ``$METERTWIN_TOKEN``, or minted from ``--signing-key-file`` (admin scope).
Exit status: 0 done, 1 the manager refused (its message says what blocked), 2 bad usage or unreachable.

The entry point is ``metertwin_upgrade/__main__.py`` (outside the shared package, beside the
local-zone helper); this module needs only HTTP and a token, so it is part of the upgrade capability.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from metertwin.core.auth import operator_token
from metertwin.core.operator_cli import CliError, FunctionClient

TERMINAL = ("completed", "rolled_back")


class Client(FunctionClient):
    """The zone's ``upgrade-manager`` function."""

    def __init__(self, gateway: str, zone: str, token: str, timeout_s: float = 60.0) -> None:
        super().__init__(gateway, zone, "upgrade-manager", token, timeout_s)


def line(status: dict[str, Any]) -> str:
    """One progress line: state, counts, rate, readings, first blocker."""
    p, r = status["progress"], status["readings"]
    text = (f"[{status['state']}] {p['done']}/{p['selected']} switched ({p['percent_done']:.1f}%), "
            f"in flight {sum(p[s] for s in ('admitted', 'prepared', 'synced', 'rebinding', 'switched'))}, "
            f"failed {p['failed']}, skipped {p['skipped']}, {p['rate_per_s']}/s")
    if p.get("eta_s"):
        text += f", eta {p['eta_s']:.0f} s"
    if p["rolled_back"] or p["rb_confirming"]:
        text += f", rolled back {p['rolled_back']} (+{p['rb_confirming']} confirming)"
    text += f" | readings old {r['applied_by_old']} new {r['applied_by_new']} missing {r['missing']}"
    if status.get("blockers"):
        text += f" | {status['blockers'][0]}"
    return text


def follow(client: Client, op_id: str, out: TextIO, *, interval_s: float, timeout_s: float,
           stop_at_observing: bool = True) -> dict[str, Any]:
    """Advance the operation until it is over (or waits for the operator); print progress."""
    deadline = time.monotonic() + timeout_s
    last = ""
    while True:
        status = client.call("POST", f"/operations/{op_id}/advance", {"budget_s": 2.0})
        text = line(status)
        if text != last:
            out.write(text + "\n")
            out.flush()
            last = text
        state = status["state"]
        idle = not status["progress"]["rb_confirming"]
        if (state in TERMINAL and idle) or state == "paused" or (
                state == "observing" and stop_at_observing and not status["spec"].get("auto_promote")):
            return status
        if time.monotonic() > deadline:
            raise CliError(f"operation {op_id} still {state} after {timeout_s:.0f} s (it goes on; follow again)")
        time.sleep(interval_s)


def _token(args: argparse.Namespace) -> str:
    token = operator_token(args.token, args.signing_key_file, "upgrade-cli", {"admin"})
    if token is None:
        raise CliError("no token: pass --token, set METERTWIN_TOKEN, or --signing-key-file", 2)
    return token


def _selection(args: argparse.Namespace) -> dict[str, Any]:
    if args.meters:
        return {"meters": [m.strip() for m in args.meters.split(",") if m.strip()]}
    if args.meters_file:
        return {"meters": [m.strip() for m in Path(args.meters_file).read_text().split() if m.strip()]}
    if args.percent is not None:
        return {"percent": args.percent}
    if args.zone_select:
        return {"zone": args.zone_select}
    if args.all:
        return {"all": True}
    raise CliError("select meters: --meters, --meters-file, --percent, --select-zone or --all", 2)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m metertwin_upgrade", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gateway", default=os.environ.get("METERTWIN_GATEWAY", "http://127.0.0.1:8080"))
    ap.add_argument("--zone", default="edge", help="function prefix of the zone (edge)")
    ap.add_argument("--token")
    ap.add_argument("--signing-key-file")
    ap.add_argument("--json", action="store_true", help="print the manager's JSON answers")
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("releases")
    sub.add_parser("list")
    st = sub.add_parser("start", help="start an upgrade operation")
    st.add_argument("--to", required=True)
    st.add_argument("--from", dest="source", default="v1")
    st.add_argument("--meters")
    st.add_argument("--meters-file")
    st.add_argument("--percent", type=float)
    st.add_argument("--select-zone", dest="zone_select")
    st.add_argument("--all", action="store_true")
    st.add_argument("--canary", type=int, default=0)
    st.add_argument("--canary-percent", type=float, default=0.0)
    st.add_argument("--batch", type=int, default=500)
    st.add_argument("--drain-s", type=float, default=5.0)
    st.add_argument("--resend-after-s", type=float, default=10.0)
    st.add_argument("--auto-promote", action="store_true")
    st.add_argument("--observe-s", type=float, default=60.0)
    st.add_argument("--option", action="append", default=[], metavar="NAME=JSON",
                    help="any other OperationSpec field, e.g. max_error_rate=0.02")
    st.add_argument("--follow", action="store_true")
    for name in ("status", "follow", "pause", "resume", "promote", "rollback"):
        p = sub.add_parser(name)
        p.add_argument("op")
        if name in ("pause", "rollback"):
            p.add_argument("--reason")
        if name == "promote":
            p.add_argument("--force", action="store_true")
        if name in ("follow", "promote", "resume", "rollback"):
            p.add_argument("--follow" if name != "follow" else "--no-stop", action="store_true",
                           help="then follow" if name != "follow" else "keep following through observing")
    for p in (st, *[sub.choices[n] for n in ("follow", "promote", "resume", "rollback")]):
        p.add_argument("--interval-s", type=float, default=0.5)
        p.add_argument("--timeout-s", type=float, default=3600.0)
    b = sub.add_parser("binding")
    b.add_argument("meter")
    return ap


def run(argv: list[str], out: TextIO | None = None) -> int:
    out = out or sys.stdout
    args = parser().parse_args(argv)
    try:
        client = Client(args.gateway, args.zone, _token(args))
        result = _dispatch(args, client, out)
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code
    if result is not None:
        if args.json or "progress" not in result:
            out.write(json.dumps(result, indent=2) + "\n")
        else:
            out.write(line(result) + "\n")
    return 0


def _dispatch(args: argparse.Namespace, client: Client, out: TextIO) -> dict[str, Any] | None:
    cmd = args.command
    if cmd == "releases":
        return client.call("GET", "/releases")
    if cmd == "list":
        ops = client.call("GET", "/operations")["operations"]
        for op in ops:
            out.write(f"{op['id']}  {op['from']}->{op['to']}  " + line(op) + "\n")
        return None
    if cmd == "binding":
        return client.call("GET", f"/meters/{args.meter}/binding")
    if cmd == "start":
        body: dict[str, Any] = {
            "to": args.to, "from": args.source, "select": _selection(args), "canary": args.canary,
            "canary_percent": args.canary_percent, "batch": args.batch, "drain_s": args.drain_s,
            "resend_after_s": args.resend_after_s, "auto_promote": args.auto_promote, "observe_s": args.observe_s,
        }
        for item in args.option:
            name, _, raw = item.partition("=")
            try:
                body[name] = json.loads(raw)
            except ValueError:
                body[name] = raw
        status = client.call("POST", "/operations", body)
        out.write(f"operation {status['id']} started: {args.source} -> {args.to}\n")
        if args.follow:
            return follow(client, status["id"], out, interval_s=args.interval_s, timeout_s=args.timeout_s)
        return status
    if cmd == "status":
        return client.call("GET", f"/operations/{args.op}")
    if cmd == "follow":
        status = follow(client, args.op, out, interval_s=args.interval_s, timeout_s=args.timeout_s,
                        stop_at_observing=not args.no_stop)
        if status["state"] == "observing":
            out.write(f"canary done; health: {json.dumps(client.call('GET', f'/operations/{args.op}').get('health'))}"
                      f"\nnext: promote {args.op}  (or rollback {args.op})\n")
        return status
    body = {}
    if cmd in ("pause", "rollback") and args.reason:
        body["reason"] = args.reason
    if cmd == "promote" and args.force:
        body["force"] = True
    status = client.call("POST", f"/operations/{args.op}/{cmd}", body or None)
    if getattr(args, "follow", False):
        return follow(client, args.op, out, interval_s=args.interval_s, timeout_s=args.timeout_s)
    return status
