"""A guard for every Lua script the tests run in-process: one meter's keys share its hash tag.

On Redis Cluster a script may only touch keys of one slot. metertwin's rule is that every
key naming a meter carries the meter id as its hash tag (``mt:twin:{m-1}``); a script call
whose keys name a tag's id outside the braces (``mt:x:m-1``) would land in another slot.
The guard wraps redis-py's ``Script.__call__`` (sync and async) and fails the call at once.
It also fails a call whose keys hash to more than one cluster slot (what a Redis Cluster
answers with ``CROSSSLOT``), so a script mixing a meter's keys with a zone-global key
(``mt:twins``) fails on a single Redis too.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from redis.commands.core import AsyncScript, Script
from redis.crc import key_slot

_TAG = re.compile(r"\{([^}]*)\}")


def untagged_mentions(keys: Sequence[Any]) -> list[str]:
    """Keys of one script call that name one of the call's hash-tag ids outside braces."""
    names = [k.decode() if isinstance(k, bytes) else str(k) for k in keys]
    tags = {m.group(1) for name in names for m in _TAG.finditer(name) if m.group(1)}
    bad = []
    for name in names:
        bare = _TAG.sub("", name)
        if any(re.search(rf"(?<![\w.-]){re.escape(tag)}(?![\w.-])", bare) for tag in tags):
            bad.append(name)
    return bad


def cross_slot(keys: Sequence[Any]) -> dict[int, list[str]]:
    """The keys of one call grouped by cluster slot, when there is more than one slot (else empty)."""
    slots: dict[int, list[str]] = {}
    for k in keys:
        raw = k if isinstance(k, bytes) else str(k).encode()
        slots.setdefault(key_slot(raw), []).append(raw.decode())
    return slots if len(slots) > 1 else {}


def _check(keys: Sequence[Any] | None) -> None:
    bad = untagged_mentions(keys or [])
    if bad:
        raise AssertionError(f"Lua script keys name a meter outside its hash tag: {bad} (all keys: {list(keys or [])})")
    slots = cross_slot(keys or [])
    if slots:
        raise AssertionError(f"Lua script keys span {len(slots)} cluster slots (CROSSSLOT on Redis Cluster): "
                             f"{list(slots.values())}")


@contextmanager
def guard_script_keys() -> Iterator[None]:
    """Check the keys of every ``Script``/``AsyncScript`` call made while the context is open."""
    sync_call, async_call = Script.__call__, AsyncScript.__call__

    def checked(self: Script, keys: Sequence[Any] | None = None, args: Any = None, client: Any = None) -> Any:
        _check(keys)
        return sync_call(self, keys, args, client)

    async def checked_async(self: AsyncScript, keys: Sequence[Any] | None = None, args: Any = None,
                            client: Any = None) -> Any:
        _check(keys)
        return await async_call(self, keys, args, client)

    Script.__call__ = checked  # type: ignore[method-assign]
    AsyncScript.__call__ = checked_async  # type: ignore[method-assign]
    try:
        yield
    finally:
        Script.__call__ = sync_call  # type: ignore[method-assign]
        AsyncScript.__call__ = async_call  # type: ignore[method-assign]
