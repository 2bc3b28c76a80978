"""``python -m metertwin.jobs``: create and follow bulk jobs (talks to edge-jobs over HTTP).

    python -m metertwin.jobs --gateway http://edge-gw:8080 --signing-key-file secrets/token-signing-key \\
        create --filter feeder=F12 --command relay '{"state": "open"}' --rate 100 --max-in-flight 500 --follow
    python -m metertwin.jobs create --meters m-1,m-2 --topology '{"groups": ["pilot"]}'
    python -m metertwin.jobs create --filter group=pilot --upgrade '{"to": "v2"}'
    python -m metertwin.jobs list | show <job> | executions <job> --status failed
    python -m metertwin.jobs pause|resume|cancel <job> [--reason ...];  follow <job>   # progress bar

The token is ``--token``, ``$METERTWIN_TOKEN``, or minted from ``--signing-key-file`` (utility scope).
Exit status: 0 done, 1 the service refused (its message names the bad field), 2 bad usage or unreachable.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import httpx

from metertwin.core.auth import operator_token
from metertwin.core.operator_cli import CliError, FunctionClient

FINAL = ("completed", "cancelled", "aborted")
BAR = 30


class Client(FunctionClient):
    """The zone's ``jobs`` function."""

    def __init__(self, gateway: str, zone: str, token: str, timeout_s: float = 60.0,
                 http: httpx.Client | None = None) -> None:
        super().__init__(gateway, zone, "jobs", token, timeout_s, http)


def bar(job: dict[str, Any]) -> str:
    """``[#####.....]  45.0%  450/1000  ok 440 failed 3 ...  [running]``."""
    p = job["progress"]
    total = p["total"] or 1
    filled = int(BAR * p["finished"] / total)
    counts = " ".join(f"{name} {p[key]}" for name, key in (
        ("ok", "succeeded"), ("failed", "failed"), ("rejected", "rejected"), ("timed out", "timed_out"),
        ("cancelled", "cancelled"), ("in flight", "in_progress"), ("queued", "queued")) if p[key] or key == "succeeded")
    text = f"[{'#' * filled}{'.' * (BAR - filled)}] {p['percent_done']:5.1f}%  {p['finished']}/{p['total']}  " \
           f"{counts}  [{job['state']}]"
    return text + (f"  {job['reason']}" if job.get("reason") else "")


def follow(client: Client, job_id: str, out: TextIO, *, interval_s: float, timeout_s: float) -> dict[str, Any]:
    """Drive the job (one slice per call, as the cron does) and draw its progress until it ends."""
    deadline = time.monotonic() + timeout_s
    tty = out.isatty()
    last = ""
    while True:
        job = client.call("POST", f"/jobs/{job_id}/advance", {"budget_s": 1.0})
        text = bar(job)
        if text != last:
            out.write(("\r" + text) if tty else (text + "\n"))
            out.flush()
            last = text
        if job["finished_at"] or job["state"] == "paused":
            if tty:
                out.write("\n")
            return job
        if time.monotonic() > deadline:
            raise CliError(f"job {job_id} still {job['state']} after {timeout_s:.0f} s (it goes on; follow again)")
        time.sleep(interval_s)


def _token(args: argparse.Namespace) -> str:
    token = operator_token(args.token, args.signing_key_file, "jobs-cli", {"utility"})
    if token is None:
        raise CliError("no token: pass --token, set METERTWIN_TOKEN, or --signing-key-file", 2)
    return token


def _json_arg(raw: str, what: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise CliError(f"{what}: {raw[:80]!r} is not JSON ({exc})", 2) from None


def _body(args: argparse.Namespace) -> dict[str, Any]:
    if args.meters or args.meters_file:
        text = args.meters.replace(",", " ") if args.meters else Path(args.meters_file).read_text()
        target: dict[str, Any] = {"meters": text.split()}
    else:
        filt: dict[str, Any] = {}
        for item in args.filter:
            name, sep, value = item.partition("=")
            if not sep:
                raise CliError(f"--filter {item!r}: expected NAME=VALUE", 2)
            if name in ("group", "tag"):
                filt.setdefault(name, []).append(value)
            else:
                filt[name] = value
        target = {"filter": filt}
    if args.command:
        action = {"type": "command", "kind": args.command[0], "params": _json_arg(args.command[1], "--command")}
    elif args.desired:
        action = {"type": "desired", "fields": _json_arg(args.desired, "--desired")}
    elif args.dr_preferences:
        action = {"type": "dr_preferences", "preferences": _json_arg(args.dr_preferences, "--dr-preferences")}
    elif args.topology:
        action = {"type": "topology", "patch": _json_arg(args.topology, "--topology")}
    elif args.upgrade:
        action = {"type": "upgrade", "upgrade": _json_arg(args.upgrade, "--upgrade")}
    else:
        raise CliError("an action: --command KIND PARAMS, --desired, --dr-preferences, --topology or --upgrade", 2)
    rollout: dict[str, Any] = {"rate_per_s": args.rate, "max_in_flight": args.max_in_flight,
                               "timeout_s": args.timeout_per_twin_s}
    if args.abort_percent is not None:
        rollout["abort"] = {"failed_percent": args.abort_percent, "min_executed": args.abort_min}
    return {"target": target, "action": action, "rollout": rollout,
            **({"description": args.description} if args.description else {})}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m metertwin.jobs", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gateway", default=os.environ.get("METERTWIN_GATEWAY", "http://127.0.0.1:8080"))
    ap.add_argument("--zone", default="edge", help="function prefix of the zone (edge)")
    ap.add_argument("--token")
    ap.add_argument("--signing-key-file")
    ap.add_argument("--json", action="store_true", help="print the service's JSON answers")
    sub = ap.add_subparsers(dest="cmd", required=True)
    cr = sub.add_parser("create", help="create a job")
    cr.add_argument("--filter", action="append", default=[], metavar="NAME=VALUE",
                    help="a fleet-search filter (repeat; group/tag may repeat)")
    cr.add_argument("--meters", help="comma-separated meter ids")
    cr.add_argument("--meters-file", help="a file of meter ids")
    cr.add_argument("--command", nargs=2, metavar=("KIND", "PARAMS_JSON"))
    cr.add_argument("--desired", metavar="JSON")
    cr.add_argument("--dr-preferences", metavar="JSON")
    cr.add_argument("--topology", metavar="JSON")
    cr.add_argument("--upgrade", metavar="JSON")
    cr.add_argument("--rate", type=float, default=50.0, help="twins started per second")
    cr.add_argument("--max-in-flight", type=int, default=500)
    cr.add_argument("--timeout-per-twin-s", type=int, default=300)
    cr.add_argument("--abort-percent", type=float)
    cr.add_argument("--abort-min", type=int, default=10)
    cr.add_argument("--description")
    cr.add_argument("--follow", action="store_true")
    sub.add_parser("list")
    for name in ("show", "follow", "pause", "resume", "cancel", "executions"):
        p = sub.add_parser(name)
        p.add_argument("job")
        if name in ("pause", "cancel"):
            p.add_argument("--reason")
        if name == "executions":
            p.add_argument("--status")
            p.add_argument("--limit", type=int, default=100)
            p.add_argument("--cursor")
    for p in (cr, sub.choices["follow"]):
        p.add_argument("--interval-s", type=float, default=0.5)
        p.add_argument("--timeout-s", type=float, default=3600.0)
    return ap


def run(argv: list[str], out: TextIO | None = None, http: httpx.Client | None = None) -> int:
    out = out or sys.stdout
    args = parser().parse_args(argv)
    try:
        client = Client(args.gateway, args.zone, _token(args), http=http)
        result = _dispatch(args, client, out)
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code
    if result is not None:
        out.write((json.dumps(result, indent=2) if args.json or "progress" not in result else bar(result)) + "\n")
    return 0


def _dispatch(args: argparse.Namespace, client: Client, out: TextIO) -> dict[str, Any] | None:
    cmd = args.cmd
    if cmd == "create":
        job = client.call("POST", "/jobs", _body(args))
        out.write(f"job {job['id']} created: {job['progress']['total']} twins\n")
        if args.follow:
            return follow(client, job["id"], out, interval_s=args.interval_s, timeout_s=args.timeout_s)
        return job
    if cmd == "list":
        for job in client.call("GET", "/jobs")["jobs"]:
            out.write(f"{job['id']}  {job['spec']['action']['type']:<14} {bar(job)}\n")
        return None
    if cmd == "show":
        return client.call("GET", f"/jobs/{args.job}")
    if cmd == "follow":
        return follow(client, args.job, out, interval_s=args.interval_s, timeout_s=args.timeout_s)
    if cmd == "executions":
        params = {"limit": str(args.limit), **({"status": args.status} if args.status else {}),
                  **({"cursor": args.cursor} if args.cursor else {})}
        page = client.call("GET", f"/jobs/{args.job}/executions", params=params)
        if args.json:
            return page
        for e in page["executions"]:
            out.write(f"{e['meter_id']}  {e['status']:<11} {e['reason'] or ''}\n")
        if page["next_cursor"]:
            out.write(f"more: --cursor {page['next_cursor']}\n")
        return None
    body = {"reason": args.reason} if getattr(args, "reason", None) else None
    return client.call("POST", f"/jobs/{args.job}/{cmd}", body)
