"""Every function imports and serves in an environment holding only what its image would hold.

The python3-http image pip-installs the template's ``requirements.txt`` (flask, waitress), then the
function's own ``requirements.txt``, copies the handler folder to ``/home/app/function/`` with each
``configuration.copy`` path inside it, and ``index.py`` imports ``function.handler``. The local
gateway runs every function in the repository's one virtualenv, which hides a missing requirement
(edge-p2p-bid once died on OpenFaaS with ``No module named 'httpx'``). So, per function:

- a virtualenv with :data:`tests.python3_http.TEMPLATE_REQUIREMENTS` and then the function's
  requirements, installed in two pip runs as the Dockerfile does. Two differences from the image
  remain: the interpreter is this one (the template's default is ``PYTHON_VERSION=3.12``, alpine), and
  the function's requirements go into the same site-packages (the Dockerfile uses ``pip install
  --target=/home/app/python`` with that folder first on ``PYTHONPATH``, so a function pin of one of
  flask's own dependencies would shadow it there; none of the functions pins one). Identical requirement sets share one
  environment, cached under ``${XDG_CACHE_HOME:-~/.cache}/metertwin/fn-envs/<key>`` (override:
  ``METERTWIN_FN_ENVS``), where the key is a hash of the Python version and the normalised
  requirement set: a changed pin builds a new environment, an unchanged one is reused.
- a build folder laid out as the image's (``index.py`` = the template stand-in, ``function/`` = the
  handler folder, ``function/__init__.py``, ``function/metertwin/``), and one process per function
  that imports ``function.handler`` and serves through the stand-in: an unknown route answers JSON
  404, a call without a token JSON 401, and, with a valid token while Redis, the broker and S3 are
  closed ports, every route answers a JSON error.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from gateway.stack import FunctionSpec, load_stack, substitute
from storage.embedded import free_port
from tests import python3_http
from tests.conftest import TEST_SIGNING_KEY

ROOT = Path(__file__).resolve().parents[2]
STACK = load_stack(ROOT / "stack.yml", env={})
#: Bump to rebuild every cached environment (a change in how they are made).
ENV_FORMAT = "1"
_NAME_RE = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)(.*)$")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def requirement_lines(path: Path) -> tuple[str, ...]:
    """The requirements of a ``requirements.txt``, normalised (names lower case, ``_``/``.`` → ``-``), sorted."""
    out = set()
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = _NAME_RE.match(line)
        assert m is not None, f"{path}: cannot parse requirement {raw!r}"
        assert not line.startswith(("-", ".", "/")), f"{path}: {raw!r} (the image cannot install options or paths)"
        out.add(re.sub(r"[-_.]+", "-", m.group(1)).lower() + m.group(2).replace(" ", ""))
    return tuple(sorted(out))


def cache_root() -> Path:
    given = os.environ.get("METERTWIN_FN_ENVS")
    if given:
        return Path(given)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "metertwin" / "fn-envs"


def env_key(function_requirements: tuple[str, ...]) -> str:
    ident = {"format": ENV_FORMAT, "python": list(sys.version_info[:2]),
             "template": list(python3_http.TEMPLATE_REQUIREMENTS), "function": list(function_requirements)}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:20]


def _pip(python: Path, *args: str) -> None:
    # The outer environment's pip drives the target interpreter, so the envs need no pip of their own.
    done = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), *args, "-q",
                           "--disable-pip-version-check"], capture_output=True, text=True, timeout=800)
    assert done.returncode == 0, f"pip {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"


def ensure_env(function_requirements: tuple[str, ...]) -> Path:
    """The cached virtualenv for this requirement set, built (under a lock) if missing or incomplete."""
    root = cache_root()
    env_dir = root / env_key(function_requirements)
    complete = env_dir / ".metertwin-complete"
    if complete.is_file():
        return env_dir
    root.mkdir(parents=True, exist_ok=True)
    with (root / f"{env_dir.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another pytest may be building the same set
        if complete.is_file():
            return env_dir
        shutil.rmtree(env_dir, ignore_errors=True)  # a build that died half-way
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True, timeout=120)
        python = env_dir / "bin" / "python"
        (env_dir / "template-requirements.txt").write_text("\n".join(python3_http.TEMPLATE_REQUIREMENTS) + "\n")
        (env_dir / "function-requirements.txt").write_text("\n".join(function_requirements) + "\n")
        # Two steps, as the Dockerfile: the template's requirements, then the function's.
        _pip(python, "install", "-r", str(env_dir / "template-requirements.txt"))
        if function_requirements:
            _pip(python, "install", "-r", str(env_dir / "function-requirements.txt"))
        _pip(python, "check")
        complete.write_text(json.dumps({"template": python3_http.TEMPLATE_REQUIREMENTS,
                                        "function": function_requirements}))
    return env_dir


def copy_paths() -> list[str]:
    doc = yaml.safe_load(substitute((ROOT / "stack.yml").read_text(), {}))
    return list((doc.get("configuration") or {}).get("copy") or [])


def lay_out(spec: FunctionSpec, build: Path) -> Path:
    """``build/`` as the image's ``/home/app``: index.py and function/ with the copied paths inside."""
    function_dir = build / "function"
    shutil.copytree(spec.handler_dir, function_dir, ignore=shutil.ignore_patterns("__pycache__"))
    (function_dir / "__init__.py").touch()
    for item in copy_paths():
        source = (ROOT / item).resolve()
        shutil.copytree(source, function_dir / source.name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "tests" / "python3_http.py", build / "index.py")
    return build


PROBE = r"""
import json, re
from function import handler
import index
import metertwin
from metertwin.core import auth

client = index.create_app(handler).test_client()

def answer(method, path, headers=None):
    r = client.open(path, method=method, data=b"{}", headers=headers or {})
    return {"status": r.status_code, "type": r.headers.get("Content-Type"), "json": r.get_json(silent=True)}

def concrete(route):
    pattern = route.regex.pattern.removeprefix("^").removesuffix("/?$")
    return re.sub(r"\(\?P<(\w+)>\[\^/\]\+\)", lambda m: "m-env-1" if m.group(1) == "meter_id" else "x1",
                  pattern) or "/"

routes = [(r.method, concrete(r), r.scopes is not None) for r in handler.router._routes]
token = auth.issue_token("fn-env-probe", {"admin"})
out = {
    "metertwin": metertwin.__file__,
    "missing": answer("GET", "/no/such/route"),
    "unauthenticated": [answer(m, p) for m, p, scoped in routes if scoped][:1],
    "down": {f"{m} {p}": answer(m, p, {"Authorization": "Bearer " + token}) for m, p, _ in routes},
}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def timings() -> Iterator[dict[str, float]]:
    spent: dict[str, float] = {}
    yield spent
    # Shown with -s / -rP: how long environments took (first run builds, later runs reuse).
    print(f"\nfunction environments: {json.dumps({k: round(v, 2) for k, v in spent.items()})}")


@pytest.mark.parametrize("name", sorted(STACK.functions))
def test_function_serves_in_its_own_minimal_environment(name: str, tmp_path: Path, timings: dict[str, float]) -> None:
    spec = STACK.functions[name]
    requirements = requirement_lines(spec.handler_dir / "requirements.txt")
    started = time.monotonic()
    env_dir = ensure_env(requirements)
    timings[f"env {env_dir.name}"] = timings.get(f"env {env_dir.name}", 0.0) + time.monotonic() - started

    build = lay_out(spec, tmp_path / "home-app")
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    for secret in spec.secrets:
        (secrets / secret).write_text(TEST_SIGNING_KEY if secret == "token-signing-key" else f"{secret}-value")
    closed = free_port()
    environ = {
        **spec.environment,
        "PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HOSTNAME": f"{name}-7d9f", "SECRETS_DIR": str(secrets),
        # The zone's backends are down: every call that reaches one must still answer JSON.
        "REDIS_URL": f"redis://127.0.0.1:{closed}/0", "HOT_REDIS_URL": f"redis://127.0.0.1:{closed}/0",
        "MQTT_HOST": "127.0.0.1", "MQTT_PORT": str(closed), "MQTT_CONNECT_TIMEOUT_S": "1",
        "S3_ENDPOINT_URL": f"http://127.0.0.1:{closed}", "GATEWAY_URL": f"http://127.0.0.1:{closed}",
        "REDIS_TIMEOUT_S": "0.5",
    }
    started = time.monotonic()
    done = subprocess.run([str(env_dir / "bin" / "python"), "-c", PROBE], cwd=build, env=environ,
                          capture_output=True, text=True, timeout=120)
    timings[f"probe {name}"] = time.monotonic() - started
    assert done.returncode == 0, f"{name} does not start with only {list(requirements)}:\n{done.stderr[-3000:]}"
    out = json.loads(done.stdout.strip().splitlines()[-1])

    # The copy beside the handler was imported, never the repository's package.
    assert Path(out["metertwin"]).resolve() == (build / "function" / "metertwin" / "__init__.py").resolve()
    json_type = "application/json"
    assert (out["missing"]["status"], out["missing"]["type"]) == (404, json_type), out["missing"]
    assert out["unauthenticated"], f"{name} has no route that needs a token"
    unauth = out["unauthenticated"][0]
    assert (unauth["status"], unauth["type"], unauth["json"]["error"]) == (401, json_type, "unauthorized"), unauth
    for where, answer in out["down"].items():
        assert answer["type"] == json_type, f"{name} {where}: {answer}"
        assert answer["status"] >= 400, f"{name} {where}: {answer}"
        assert "error" in (answer["json"] or {}), f"{name} {where}: {answer}"
    assert any(a["status"] >= 500 for a in out["down"].values()), f"{name}: no route reached a backend"


def test_requirement_sets_are_shared_and_keyed_by_content(tmp_path: Path) -> None:
    """Same set (order, case, comments aside) → one key; a changed pin → another key."""
    a = tmp_path / "a.txt"
    b = tmp_path / "b.txt"
    a.write_text("# deps\nredis==8.1.0\nPyJWT==2.15.1\n")
    b.write_text("pyjwt==2.15.1   # signing\n\nredis==8.1.0\n")
    assert requirement_lines(a) == requirement_lines(b) == ("pyjwt==2.15.1", "redis==8.1.0")
    assert env_key(requirement_lines(a)) == env_key(requirement_lines(b))
    b.write_text("pyjwt==2.15.0\nredis==8.1.0\n")
    assert env_key(requirement_lines(a)) != env_key(requirement_lines(b))
    sets = {requirement_lines(spec.handler_dir / "requirements.txt") for spec in STACK.functions.values()}
    assert len(sets) < len(STACK.functions)  # the stack's 14 functions share a few environments


#: Flask's and waitress's own distributions (flask 3.1 requires werkzeug, jinja2, itsdangerous, click,
#: blinker, markupsafe).
TEMPLATE_DISTRIBUTIONS = {"flask", "waitress", "werkzeug", "jinja2", "itsdangerous", "click", "blinker", "markupsafe"}


def test_no_function_pins_a_distribution_of_the_template() -> None:
    """In the image a function's pin of one of these would shadow the template's copy (``--target`` folder
    first on ``PYTHONPATH``), which these one-site-packages environments would not show."""
    for name, spec in sorted(STACK.functions.items()):
        pinned = {re.split(r"[<>=!~\[;@ ]", line, maxsplit=1)[0]
                  for line in requirement_lines(spec.handler_dir / "requirements.txt")}
        assert not pinned & TEMPLATE_DISTRIBUTIONS, f"{name} pins {sorted(pinned & TEMPLATE_DISTRIBUTIONS)}"
