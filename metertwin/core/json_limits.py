"""Depth-bounded JSON parsing: every body and message metertwin accepts goes through :func:`loads`.

CPython's ``json`` decoder recurses once per nesting level, so a 100,000-deep ``[[[[...`` body
raises ``RecursionError`` (a 500, and on the MQTT path a lost message) long before any size cap
helps: 1,500 levels fit in 3 KB. :func:`check_depth` rejects such documents before the decoder
sees them, with one pass that costs next to nothing on ordinary payloads:

* fast path: a document with at most ``max_depth`` brackets in all cannot be deeper than that
  (``bytes.count`` runs in C; a 300-byte reading has one or two);
* otherwise strings are cut out with one regex substitution and everything but brackets with
  ``bytes.translate`` (both in C); a Python loop counts depth over the brackets that remain and
  stops at the first level past the limit (a 100,000-deep body costs ``max_depth`` steps).

The string pattern is possessive and also matches an unterminated string to the end, so every
scan is linear in the input (no backtracking on ``"\\"\\"...``). Malformed JSON is left to the
decoder, which reports it as before.
"""

from __future__ import annotations

import json
import re
from typing import Any

from metertwin.core.errors import InvalidInput

#: Deepest nesting accepted anywhere. Meter messages are 1-2 levels deep and REST bodies at most
#: ~5 (tariff periods, EMS payloads); 64 leaves room for any client while staying far below the
#: interpreter's recursion limit (1,000) in ``json`` and in pydantic's validators.
MAX_DEPTH = 64

_STRINGS = re.compile(rb'"(?:[^"\\]++|\\.)*+(?:"|\\?\Z)', re.DOTALL)
_NOT_BRACKETS = bytes(c for c in range(256) if c not in b"[]{}")
_OPEN = frozenset(b"[{")


class JsonTooDeep(InvalidInput):
    """A JSON document nests deeper than the limit (a 400 on REST, a dead letter on MQTT)."""

    code = "json_too_deep"


def check_depth(doc: bytes | bytearray | str, max_depth: int = MAX_DEPTH) -> None:
    """Raise :class:`JsonTooDeep` if ``doc`` nests arrays/objects deeper than ``max_depth``."""
    raw = doc.encode("utf-8", "surrogatepass") if isinstance(doc, str) else bytes(doc)
    if raw.count(b"[") + raw.count(b"{") <= max_depth:
        return
    if b'"' in raw:
        raw = _STRINGS.sub(b"", raw)  # brackets inside strings do not nest
    depth = 0
    for c in raw.translate(None, _NOT_BRACKETS):  # C does the scanning; Python sees brackets only
        if c in _OPEN:
            depth += 1
            if depth > max_depth:
                raise JsonTooDeep(f"JSON nests deeper than the limit of {max_depth} levels", max_depth=max_depth)
        elif depth:
            depth -= 1  # unbalanced closers are the decoder's to report


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An object's members as a dict; a key given twice is an error, not "the last one wins".

    Parsers disagree on duplicate keys (RFC 8259 leaves it open): the edge and the fog must
    read one message the same way, so neither accepts it.
    """
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise json.JSONDecodeError(f"duplicate key {key!r} in a JSON object", "", 0)
            seen.add(key)
    return obj


def loads(doc: bytes | bytearray | str, max_depth: int = MAX_DEPTH) -> Any:
    """``json.loads`` with the nesting bound and no duplicate keys; every other failure is a
    ``json.JSONDecodeError`` (or ``UnicodeDecodeError``) as from ``json.loads`` itself, so callers
    keep one ``except``."""
    check_depth(doc, max_depth)
    try:
        return json.loads(doc, object_pairs_hook=_unique_keys)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise
    except ValueError as exc:
        # An integer literal over sys.get_int_max_str_digits() (4,300) digits: bad input, not a bug.
        raise json.JSONDecodeError(f"number out of range: {str(exc)[:120]}", "", 0) from None
    except RecursionError:  # not reachable after check_depth; kept so no input can crash a caller
        raise JsonTooDeep(f"JSON nests deeper than the limit of {max_depth} levels", max_depth=max_depth) from None
