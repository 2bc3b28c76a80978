"""stack.yml loading: substitution, validation errors that name the key, zone selection, environment."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.functions import load_function, merged_environment
from gateway.stack import StackError, load_stack, substitute
from tests.fixtures.gateway_support import ECHO_DIR, STACK

HEADER = "version: 1.0\nprovider:\n  name: openfaas\n  gateway: http://127.0.0.1:8080\nfunctions:\n"


def write_stack(tmp_path: Path, functions: str, header: str = HEADER) -> Path:
    (tmp_path / "fn").mkdir(exist_ok=True)
    (tmp_path / "fn" / "handler.py").write_text("def handle(event, context):\n    return {'body': 'ok'}\n")
    path = tmp_path / "stack.yml"
    path.write_text(header + functions)
    return path


def test_substitution_like_faas_cli() -> None:
    env = {"SET": "v", "EMPTY": ""}
    assert substitute("${SET} ${SET:-d} ${SET-d}", env) == "v v v"
    assert substitute("${UNSET} ${UNSET:-d} ${UNSET-d}", env) == " d d"
    assert substitute("${EMPTY:-d}|${EMPTY-d}", env) == "d|"
    assert substitute("${URL:-http://127.0.0.1:8080}", {}) == "http://127.0.0.1:8080"
    assert substitute("$share/x and $HOME stay", env) == "$share/x and $HOME stay"


def test_test_stack_loads_and_selects_zones(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://example:1/0")
    monkeypatch.setenv("TEST_TOPIC_A", "t/a/+")
    stack = load_stack(STACK)
    assert stack.gateway == "http://127.0.0.1:8080"
    assert [f.name for f in stack.select("edge")] == ["edge-echo", "edge-echo-two"]
    assert [f.name for f in stack.select("fog")] == ["fog-echo"]
    assert len(stack.select("all")) == len(stack.functions) == 6
    echo = stack.functions["edge-echo"]
    assert echo.handler_dir == ECHO_DIR
    assert echo.environment["REDIS_URL"] == "redis://example:1/0"
    assert echo.environment["MAX_BODY_BYTES"] == "4096"  # YAML int kept as text
    assert echo.labels == {"com.openfaas.scale.min": "1"}
    assert echo.secrets == ("token-signing-key", "mqtt-password")
    listen = stack.functions["mqtt-listen"]
    assert listen.topics == ("t/a/+", "metertwin-test/b/#")  # comma-separated, as connector-sdk splits
    assert stack.functions["cron-tick"].schedule == "*/1 * * * * *"
    with pytest.raises(StackError, match="no function matches zone 'cloud'"):
        stack.select("cloud")


@pytest.mark.parametrize(
    ("header", "functions", "message"),
    [
        ("version: 2.0\nprovider:\n  name: openfaas\nfunctions:\n", "  a-b:\n    lang: x\n    handler: ./fn\n",
         "version must be '1.0'"),
        ("version: 1.0\nprovider:\n  name: faas\nfunctions:\n", "  a-b:\n    lang: x\n    handler: ./fn\n",
         "provider.name must be 'openfaas'"),
        (HEADER, "  Bad_Name:\n    lang: x\n    handler: ./fn\n", "functions.Bad_Name: function name 'Bad_Name'"),
        (HEADER, "  edge-a:\n    handler: ./fn\n", r"functions\.edge-a\.lang is required"),
        (HEADER, "  edge-a:\n    lang: python3-http\n", r"functions\.edge-a\.handler is required"),
        (HEADER, "  edge-a:\n    lang: python3-http\n    handler: ./missing\n",
         r"functions\.edge-a\.handler: folder './missing' does not exist"),
        (HEADER, "  edge-a:\n    lang: python3-http\n    handler: .\n",
         r"functions\.edge-a\.handler: folder '.' has no handler.py"),
        (HEADER, "  edge-a:\n    lang: python3-http\n    handler: ./fn\n    enviroment: {}\n",
         r"functions\.edge-a: unknown key\(s\) \['enviroment'\]"),
        (HEADER, "  edge-a:\n    lang: python3-http\n    handler: ./fn\n    environment: [a]\n",
         r"functions\.edge-a\.environment must be a mapping"),
        (HEADER, "  edge-a:\n    lang: python3-http\n    handler: ./fn\n    secrets: a\n",
         r"functions\.edge-a\.secrets must be a list"),
        (HEADER, "  edge-a: [\n", "not valid YAML"),
        ("version: 1.0\nprovider:\n  name: openfaas\nfunctions: {}\n", "", "functions must be a non-empty mapping"),
    ],
)
def test_validation_errors_name_the_key(tmp_path: Path, header: str, functions: str, message: str) -> None:
    path = write_stack(tmp_path, functions, header)
    with pytest.raises(StackError, match=message):
        load_stack(path)


def test_environment_file_and_missing_stack(tmp_path: Path) -> None:
    (tmp_path / "env.yml").write_text("environment:\n  A: from-file\n  B: from-file\n")
    path = write_stack(tmp_path, "  edge-a:\n    lang: python3-http\n    handler: ./fn\n"
                                 "    environment_file: [env.yml]\n    environment:\n      B: inline\n")
    assert load_stack(path).functions["edge-a"].environment == {"A": "from-file", "B": "inline"}
    with pytest.raises(StackError, match="cannot read stack file"):
        load_stack(tmp_path / "nope.yml")


def test_conflicting_environment_in_one_zone_names_both_functions(tmp_path: Path) -> None:
    path = write_stack(tmp_path, "  edge-a:\n    lang: python3-http\n    handler: ./fn\n    environment: {K: one}\n"
                                 "  edge-b:\n    lang: python3-http\n    handler: ./fn\n    environment: {K: two}\n"
                                 "  fog-c:\n    lang: python3-http\n    handler: ./fn\n    environment: {K: three}\n")
    stack = load_stack(path)
    with pytest.raises(StackError, match="K is 'one' for function edge-a but 'two' for function edge-b"):
        merged_environment(stack.select("edge"))
    assert merged_environment(stack.select("fog")) == {"K": "three"}


def test_handler_import_errors_are_clear(tmp_path: Path) -> None:
    path = write_stack(tmp_path, "  edge-a:\n    lang: python3-http\n    handler: ./fn\n")
    (tmp_path / "fn" / "handler.py").write_text("import not_a_module_anywhere\n")
    with pytest.raises(StackError, match=r"function edge-a: importing .* ModuleNotFoundError"):
        load_function(load_stack(path).functions["edge-a"])
    (tmp_path / "fn" / "handler.py").write_text("x = 1\n")
    with pytest.raises(StackError, match=r"defines no handle\(event, context\)"):
        load_function(load_stack(path).functions["edge-a"])


def test_cli_exits_2_with_the_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from gateway.__main__ import main

    path = write_stack(tmp_path, "  edge-a:\n    lang: python3-http\n    handler: ./fn\n"
                                 "    annotations: {schedule: 'every minute'}\n")
    assert main(["--stack", str(path), "--zone", "edge", "--port", "1"]) == 2
    assert "functions.edge-a.annotations.schedule: 'every minute' is not a cron expression" in capsys.readouterr().err


async def test_two_zones_with_different_environments_cannot_share_a_process(
    tmp_path: Path, env: dict[str, str]
) -> None:
    from tests.fixtures.gateway_support import gateway_client

    path = write_stack(tmp_path, "  edge-a:\n    lang: python3-http\n    handler: ./fn\n    environment: {K: one}\n"
                                 "  fog-b:\n    lang: python3-http\n    handler: ./fn\n    environment: {K: two}\n")
    async with gateway_client("edge", stack=path, background=False):
        with pytest.raises(StackError, match=r"gateway fog and gateway edge run in one process but set \['K'\]"):
            async with gateway_client("fog", stack=path, background=False):
                pass
