"""Knative Serving: secrets mounted as directories, ``PORT``, and scale labels as revision annotations."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import httpx
import pytest
import yaml

from gateway.stack import load_stack
from storage.embedded import free_port
from tests import python3_http
from tests.conftest import TEST_SIGNING_KEY
from tests.fixtures.gateway_support import ECHO_DIR
from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]


def mount_secret(root: Path, name: str, keys: dict[str, str]) -> Path:
    """Lay a Kubernetes Secret out as the kubelet's atomic writer does for a Knative volume mount.

    ``<root>/<name>/..<timestamp>/<key>`` holds the data, ``..data`` links to it and each key is a
    link ``<key> -> ..data/<key>``; the function sees ``/var/openfaas/secrets/<name>/<key>``.
    """
    mount = root / name
    stamp = mount / "..2026_01_01_00_00_00.000000001"
    stamp.mkdir(parents=True)
    for key, value in keys.items():
        (stamp / key).write_text(value + "\n")  # a trailing newline, as `kubectl create secret --from-file` keeps
    (mount / "..data").symlink_to(stamp.name)
    for key in keys:
        (mount / key).symlink_to(f"..data/{key}")
    return mount


@pytest.fixture
def knative_secrets(env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The zone's secrets as Knative mounts them (one directory per Secret, one key named after it)."""
    from metertwin.core import clients
    from metertwin.core.settings import reset_settings

    root = tmp_path / "var-openfaas-secrets"
    mqtt_password = (Path(env["SECRETS_DIR"]) / "mqtt-password").read_text()
    mount_secret(root, "token-signing-key", {"token-signing-key": TEST_SIGNING_KEY})
    mount_secret(root, "mqtt-password", {"mqtt-password": mqtt_password})
    mount_secret(root, "s3-access-key-id", {"s3-access-key-id": "AKIA-knative"})
    monkeypatch.setenv("SECRETS_DIR", str(root))
    clients.close_all()
    reset_settings()
    yield root
    clients.close_all()
    reset_settings()


def test_secrets_mounted_as_directories_are_read_without_warnings(knative_secrets: Path, env: dict[str, str]) -> None:
    from metertwin.core.settings import get_settings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # pydantic-settings' "found a directory instead" would fail here
        settings = get_settings()
    assert settings.token_signing_key.get_secret_value() == TEST_SIGNING_KEY
    assert settings.mqtt_password.get_secret_value() == (Path(env["SECRETS_DIR"]) / "mqtt-password").read_text()
    assert settings.s3_access_key_id.get_secret_value() == "AKIA-knative"
    assert settings.s3_secret_access_key.get_secret_value() == "testing"  # not mounted: the default


def test_a_valid_token_verifies_and_the_broker_accepts_the_password(knative_secrets: Path) -> None:
    """Through a real function and the template stand-in: a valid token is not 401; MQTT connects."""
    from metertwin.core import auth, clients

    handler = python3_http.import_handler(ROOT / "functions" / "registry" / "handler.py", "_knative_registry")
    client = python3_http.create_app(handler).test_client()
    token = auth.issue_token("knative-test", {"admin"})
    answer = client.get("/meters/m-knative-1", headers={"Authorization": f"Bearer {token}"})
    assert answer.status_code == 404, answer.data  # verified and authorised: the meter is simply unknown
    assert (answer.json or {}).get("error") == "unknown_meter"
    forged = auth.issue_token("knative-test", {"admin"}, key="not-the-mounted-key-" + "x" * 32)
    assert client.get("/meters/m-knative-1", headers={"Authorization": f"Bearer {forged}"}).status_code == 401
    clients.get_mqtt()  # the service user's password came from the directory mount: the broker took it


def test_file_and_directory_layouts_mix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from metertwin.core.settings import Settings

    (tmp_path / "token-signing-key").write_text("from-a-file\n")
    mount_secret(tmp_path, "mqtt-password", {"password": "only-key-of-another-name"})
    settings = Settings(_secrets_dir=str(tmp_path))  # type: ignore[call-arg]
    assert settings.token_signing_key.get_secret_value() == "from-a-file"
    assert settings.mqtt_password.get_secret_value() == "only-key-of-another-name"


def test_a_secret_directory_with_several_other_keys_is_an_error(tmp_path: Path) -> None:
    from pydantic_settings import SettingsError

    from metertwin.core.settings import Settings

    mount_secret(tmp_path, "token-signing-key", {"a": "1", "b": "2"})
    with pytest.raises(SettingsError, match="token_signing_key") as raised:
        Settings(_secrets_dir=str(tmp_path))  # type: ignore[call-arg]
    # pydantic-settings names the field; ours, kept as the cause, names the keys found.
    assert "holds keys ['a', 'b']" in str(raised.value.__cause__)


# ------------------------------------------------------------------ PORT


def test_listen_port_follows_port() -> None:
    assert python3_http.listen_port({}) == 5000
    assert python3_http.listen_port({"PORT": "8081"}) == 8081
    with pytest.raises(ValueError, match="not a TCP port"):
        python3_http.listen_port({"PORT": "70000"})


def test_the_template_stand_in_serves_on_port(env: dict[str, str], tmp_path: Path) -> None:
    """``python index.py`` in an image-shaped folder, with ``PORT`` set as Knative sets it."""
    build = tmp_path / "home-app"
    shutil.copytree(ECHO_DIR, build / "function", ignore=shutil.ignore_patterns("__pycache__"))
    (build / "function" / "__init__.py").touch()
    shutil.copytree(ROOT / "metertwin", build / "function" / "metertwin", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "tests" / "python3_http.py", build / "index.py")
    port = free_port()
    environ = {**env, "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PORT": str(port), "HOSTNAME": "knative-pod"}
    proc = subprocess.Popen([sys.executable, "index.py"], cwd=build, env=environ,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        def answered() -> httpx.Response | None:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else "exited"
            try:
                return httpx.get(f"http://127.0.0.1:{port}/text", timeout=1.0)
            except httpx.TransportError:
                return None

        answer = wait_until(answered, timeout_s=20, what=f"the stand-in listening on PORT={port}")
        assert (answer.status_code, answer.text) == (200, "plain text")
        echoed = httpx.get(f"http://127.0.0.1:{port}/meters/m-1?a=1", timeout=2.0).json()
        assert (echoed["path"], echoed["query"], echoed["hostname"]) == ("/meters/m-1", {"a": "1"}, "knative-pod")
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# ------------------------------------------------------------------ scale labels → revision annotations


def _knative_tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("_deploy_knative", ROOT / "deploy" / "knative.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _generated(name: str, annotations: dict[str, str] | None) -> dict[str, object]:
    """A Service as faas-cli 0.18 ``generate --api=serving.knative.dev/v1`` writes it (commands/generate.go):
    function annotations on the top-level metadata, labels dropped, secrets as directory volumes."""
    meta: dict[str, object] = {"name": name, "namespace": "openfaas-fn"}
    if annotations:
        meta["annotations"] = annotations
    return {
        "apiVersion": "serving.knative.dev/v1", "kind": "Service", "metadata": meta,
        "spec": {"template": {"spec": {
            "containers": [{"image": f"ghcr.io/metertwin/{name}:0.1.0", "env": [{"name": "ZONE", "value": "edge"}],
                            "volumeMounts": [{"name": "token-signing-key", "readOnly": True,
                                              "mountPath": "/var/openfaas/secrets/token-signing-key"}]}],
            "volumes": [{"name": "token-signing-key", "secret": {"secretName": "token-signing-key"}}]}}},
    }


def test_scale_labels_become_revision_annotations(tmp_path: Path) -> None:
    stack = load_stack(ROOT / "stack.yml", env={})
    generated = tmp_path / "generated.yaml"
    generated.write_text(yaml.safe_dump_all(
        [_generated(name, fn.annotations or None) for name, fn in stack.functions.items()], explicit_start=True))
    out = tmp_path / "services.yaml"
    done = subprocess.run([sys.executable, str(ROOT / "deploy" / "knative.py"), "--stack", str(ROOT / "stack.yml"),
                           str(generated)], capture_output=True, text=True, timeout=60, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": ""})
    assert done.returncode == 0, done.stderr
    out.write_text(done.stdout)
    services = {d["metadata"]["name"]: d for d in yaml.safe_load_all(out.read_text())}
    assert set(services) == set(stack.functions)
    for name, fn in stack.functions.items():
        svc = services[name]
        revision = svc["spec"]["template"]["metadata"]["annotations"]
        # The pod label the zones' NetworkPolicies admit (OpenFaaS sets it on its own pods).
        assert svc["spec"]["template"]["metadata"]["labels"] == {"faas_function": name}
        assert revision["autoscaling.knative.dev/min-scale"] == fn.labels["com.openfaas.scale.min"], name
        assert revision["autoscaling.knative.dev/max-scale"] == fn.labels["com.openfaas.scale.max"], name
        # None on the Service's own metadata: Knative's webhook rejects them there.
        assert not any(k.startswith("autoscaling.knative.dev/") for k in svc["metadata"].get("annotations", {}))
        assert svc["metadata"].get("annotations", {}) == fn.annotations  # topic/schedule kept as generated
        container = svc["spec"]["template"]["spec"]["containers"][0]
        assert container["ports"] == [{"containerPort": 8080}]
        assert {"name": "port", "value": "8080"} in container["env"]
        assert container["volumeMounts"][0]["mountPath"] == "/var/openfaas/secrets/token-signing-key"
    read = services["edge-read"]["spec"]["template"]["metadata"]["annotations"]
    assert (read["autoscaling.knative.dev/metric"], read["autoscaling.knative.dev/target"]) == ("rps", "200")


def test_autoscaling_annotations_on_the_service_are_moved_to_the_revision() -> None:
    tool = _knative_tool()
    svc = _generated("edge-x", {"autoscaling.knative.dev/min-scale": "3", "topic": "t"})
    tool.finish_service(svc, {"com.openfaas.scale.max": "4"})
    assert svc["metadata"]["annotations"] == {"topic": "t"}  # type: ignore[index]
    assert svc["spec"]["template"]["metadata"]["annotations"] == {  # type: ignore[index]
        "autoscaling.knative.dev/min-scale": "3", "autoscaling.knative.dev/max-scale": "4"}
    with pytest.raises(ValueError, match="no Knative metric"):
        tool.autoscaling_annotations({"com.openfaas.scale.type": "memory"})
