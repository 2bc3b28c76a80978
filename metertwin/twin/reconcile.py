"""Reconcile a zone's twins with the broker's meter accounts, after a loss on either side.

The registry keeps the two in step (a twin and its meter's MQTT account are created
and removed together), but a loss breaks that: a Redis that lost its data leaves
accounts without twins, a broker that lost its dynamic-security file leaves twins
without accounts. :func:`reconcile` reports both; with ``fix`` it removes the
orphaned accounts (their sessions are disconnected) and gives every twin without an
account a new one, with a new password returned once, as provisioning does.

The registry exposes it as ``POST /reconcile?fix=false|true`` (admin); the CLI is::

    python -m metertwin.twin.reconcile [--fix]      # environment as for the registry function
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis

from metertwin.core.clients import StrRedis
from metertwin.core.errors import BackendUnavailable
from metertwin.twin import keys
from metertwin.twin.dynsec import DynSec, new_password


@dataclass
class Report:
    """What :func:`reconcile` found, and with ``fix``, what it did."""

    twins: int
    accounts: int
    twins_without_accounts: list[str]
    accounts_without_twins: list[str]
    fixed: bool = False
    #: Accounts created for twins that had none: ``{meter_id: password}`` (returned once).
    created: dict[str, str] = field(default_factory=dict)
    removed: list[str] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "twins": self.twins, "accounts": self.accounts,
            "twins_without_accounts": self.twins_without_accounts,
            "accounts_without_twins": self.accounts_without_twins,
            "fixed": self.fixed, "created": [{"meter_id": m, "password": p} for m, p in self.created.items()],
            "removed": self.removed, "errors": self.errors,
        }


def twin_ids(client: StrRedis) -> set[str]:
    """Every meter id in the zone's twin index."""
    try:
        return {str(m) for m in client.sscan_iter(keys.TWIN_INDEX, count=1000)}
    except redis.RedisError as exc:
        raise BackendUnavailable(f"Redis unavailable listing twins: {exc}") from exc


def reconcile(
    client: StrRedis, dynsec: DynSec, *, fix: bool = False,
    password: Callable[[], str] = new_password,
) -> Report:
    """Compare twins and meter accounts; with ``fix``, make them match (see module docstring)."""
    twins = twin_ids(client)
    accounts = dynsec.meter_accounts()
    report = Report(len(twins), len(accounts), sorted(twins - accounts), sorted(accounts - twins))
    if not fix:
        return report
    report.fixed = True
    if report.accounts_without_twins:
        done = dynsec.delete_meters(report.accounts_without_twins)
        report.removed = sorted(m for m, removed in done.items() if removed)
    if report.twins_without_accounts:
        passwords = {m: password() for m in report.twins_without_accounts}
        for meter_id, err in dynsec.create_meters(passwords).items():
            if err:
                report.errors[meter_id] = f"MQTT account not created: {err}"
            else:
                report.created[meter_id] = passwords[meter_id]
    return report


def main(argv: list[str] | None = None) -> int:
    """CLI: print the report as JSON; exit 1 if orphans remain (not fixed, or a fix failed)."""
    parser = argparse.ArgumentParser(prog="python -m metertwin.twin.reconcile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fix", action="store_true", help="remove orphaned accounts, create missing ones")
    args = parser.parse_args(argv)
    from metertwin.core.clients import get_redis
    from metertwin.twin.dynsec import get_dynsec

    report = reconcile(get_redis(), get_dynsec(), fix=args.fix)
    print(json.dumps(report.as_dict(), indent=2))
    clean = not (report.twins_without_accounts or report.accounts_without_twins)
    return 0 if clean or (report.fixed and not report.errors) else 1


if __name__ == "__main__":
    sys.exit(main())
