"""Fixtures of the stream tests: a zone environment with fresh stream settings."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from metertwin.stream.events import _emitters
from metertwin.stream.settings import get_stream_settings


@pytest.fixture
def stream_env(env: dict[str, str]) -> Iterator[dict[str, str]]:
    """``env`` plus stream settings and emitters read afresh (tests set ``STREAM_*`` first)."""
    get_stream_settings.cache_clear()
    _emitters.clear()
    yield env
    get_stream_settings.cache_clear()
    _emitters.clear()
