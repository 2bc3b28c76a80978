"""Duplicate keys are refused by the one JSON parser that REST bodies and MQTT readings go through."""

from __future__ import annotations

import json

import pytest

from metertwin.core import json_limits
from metertwin.core.destinations import DestinationPolicy


def test_duplicate_keys_are_refused_naming_the_key() -> None:
    with pytest.raises(json.JSONDecodeError, match="duplicate key 'seq'"):
        json_limits.loads(b'{"seq": 20, "ts": 1, "seq": 99999999999999}')
    with pytest.raises(json.JSONDecodeError, match="duplicate key 'a'"):
        json_limits.loads('[{"x": {"a": 1, "a": 2}}]')
    assert json_limits.loads(b'{"a": {"a": 1}, "b": [{"a": 2}]}') == {"a": {"a": 1}, "b": [{"a": 2}]}


@pytest.mark.parametrize("address", ["::127.0.0.2", "::ffff:0:7f00:1", "::10.0.0.1", "::ffff:0:a9fe:a9fe"])
def test_ipv6_forms_that_embed_an_ipv4_address_are_refused(address: str) -> None:
    assert DestinationPolicy().address_refusal(address) is not None
