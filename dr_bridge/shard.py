"""Stable sharding of meters across bridge processes (and pods)."""

from __future__ import annotations

import hashlib


def shard_of(meter_id: str, shards: int) -> int:
    """The shard (0..shards-1) of a meter: a stable hash, the same in every process and release."""
    if shards < 1:
        raise ValueError(f"shards {shards} must be at least 1")
    digest = hashlib.blake2b(meter_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % shards


def in_shard(meter_id: str, index: int, shards: int) -> bool:
    return shard_of(meter_id, shards) == index


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` -> (i, n); StatefulSet pods pass ``$(POD_ORDINAL)/n``."""
    try:
        index_s, shards_s = text.split("/", 1)
        index, shards = int(index_s), int(shards_s)
    except ValueError:
        raise ValueError(f"shard {text!r} is not of the form i/n (e.g. 0/4)") from None
    if shards < 1 or not 0 <= index < shards:
        raise ValueError(f"shard {text!r}: need n >= 1 and 0 <= i < n")
    return index, shards
