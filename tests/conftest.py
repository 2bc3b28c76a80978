"""Shared fixtures: real services on free loopback ports, stopped after use.

Service processes are session-scoped (starting them is the slow part); every
test gets a clean slate through ``redis_url`` (FLUSHALL before the test) and
unique meter ids, so no state is shared between tests.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
import redis

from metertwin.core import clients
from metertwin.core.settings import reset_settings
from storage.embedded import Mosquitto, MotoS3, RedisServer
from storage.redis_cluster import RedisCluster
from tests.redis_backends import BACKENDS, CLUSTER_MODULES
from tests.script_keys import guard_script_keys

TEST_SIGNING_KEY = "test-signing-key-" + uuid.uuid4().hex


@pytest.fixture(scope="session", autouse=True)
def _script_keys_share_the_meter_hash_tag() -> Iterator[None]:
    """Every in-process Lua script call is checked for Redis Cluster slot safety (tests/script_keys.py)."""
    with guard_script_keys():
        yield


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="session")
def mosquitto() -> Iterator[Mosquitto]:
    with Mosquitto() as broker:
        yield broker


@pytest.fixture(scope="session")
def s3_server() -> Iterator[MotoS3]:
    with MotoS3() as server:
        yield server


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    """A real 3-master Redis Cluster on free ports (started only if a ``[cluster]`` test runs)."""
    with RedisCluster() as cluster:
        yield cluster


@pytest.fixture
def redis_backend(request: pytest.FixtureRequest) -> str:
    """``single`` or ``cluster``: parametrized for tests/redis_backends.py's CLUSTER_MODULES."""
    return str(getattr(request, "param", "single"))


@pytest.fixture
def redis_url(request: pytest.FixtureRequest, redis_backend: str) -> str:
    """URL of a Redis (or Redis Cluster: every master) emptied for this test."""
    if redis_backend == "cluster":
        cluster: RedisCluster = request.getfixturevalue("redis_cluster")
        cluster.flushall()
        return cluster.url
    redis_server: RedisServer = request.getfixturevalue("redis_server")
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--redis-backends", default=",".join(BACKENDS),
                     help="backends the CLUSTER_MODULES run against (tests/redis_backends.py): single,cluster")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Run every test of a cluster module that uses ``redis_url`` once per backend."""
    if "redis_url" not in metafunc.fixturenames:
        return
    path = metafunc.definition.path
    rel = path.relative_to(metafunc.config.rootpath).as_posix() if path.is_relative_to(metafunc.config.rootpath) else ""
    if rel not in CLUSTER_MODULES:
        return
    chosen = [b for b in metafunc.config.getoption("--redis-backends").split(",") if b in BACKENDS]
    metafunc.parametrize("redis_backend", chosen or ["single"], indirect=True)


@pytest.fixture
def env(
    monkeypatch: pytest.MonkeyPatch, redis_url: str, mosquitto: Mosquitto, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, str]]:
    """Process environment for functions of one zone, pointing at the test services.

    Settings and long-lived clients are reset before and after, so each test
    sees its own configuration.
    """
    secrets_dir = tmp_path_factory.mktemp("secrets")
    (secrets_dir / "token-signing-key").write_text(TEST_SIGNING_KEY)
    (secrets_dir / "mqtt-password").write_text(mosquitto.service_password)
    values = {
        "ZONE": "edge",
        "REDIS_URL": redis_url,
        "MQTT_HOST": mosquitto.host,
        "MQTT_PORT": str(mosquitto.port),
        "MQTT_USERNAME": mosquitto.service_user,
        "SECRETS_DIR": str(secrets_dir),
    }
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    clients.close_all()
    reset_settings()
    yield values
    clients.close_all()
    reset_settings()


@pytest.fixture
def meter_id() -> str:
    return f"m-{uuid.uuid4().hex[:10]}"


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("METERTWIN_TEST", "1")
