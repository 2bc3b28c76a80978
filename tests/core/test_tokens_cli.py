"""``python -m metertwin.tokens``: issue, inspect, revoke, with the key read as the functions read it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from metertwin.core import auth, revocation
from metertwin.tokens import main

ROOT = Path(__file__).resolve().parents[2]


def test_issue_inspect_revoke_in_a_fresh_process(env: dict[str, str]) -> None:
    """As an operator runs it: a new process, the key from SECRETS_DIR, the deny-list in REDIS_URL."""
    run_env = {**os.environ, **env}

    def cli(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "metertwin.tokens", *args], cwd=ROOT, env=run_env,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout

    token = cli("issue", "--scope", "consumer", "--meter", "m-7", "--subject", "household", "--ttl", "600").strip()
    p = auth.verify_token(token)  # the functions' key (the same secrets folder) verifies it
    assert (p.subject, p.meter, sorted(p.scopes)) == ("household", "m-7", ["consumer"])
    assert 590 <= p.expires_at - time.time() <= 600
    info = json.loads(cli("inspect", token))
    assert info["jti"] == p.token_id
    assert info["revoked"] == {env["REDIS_URL"]: None}
    assert "revoked:" in cli("revoke", token, "--reason", "moved out")
    info = json.loads(cli("inspect", token))
    assert info["revoked"] == {env["REDIS_URL"]: "moved out"}


def test_issue_refuses_what_the_functions_would_refuse(env: dict[str, str]) -> None:
    with pytest.raises(SystemExit, match="need a meter"):
        main(["issue", "--scope", "consumer"])
    with pytest.raises(SystemExit, match="--ttl 0 must be a positive"):
        main(["issue", "--scope", "utility", "--ttl", "0"])


def test_inspect_names_a_bad_token(env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "not-a-token", "--offline"]) == 2
    assert "bearer token is invalid" in capsys.readouterr().err


def test_revoke_by_id_when_the_token_is_gone(env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    token = auth.issue_token("x", {"mdms"}, ttl_s=300)
    p = auth.verify_token(token)
    assert main(["revoke", "--jti", p.token_id or "", "--expires-at", str(p.expires_at)]) == 0
    from metertwin.core import clients

    assert revocation.revocation_reason(clients.get_redis(), p.token_id or "", cache_s=0) == "revoked by operator"
    with pytest.raises(SystemExit, match="needs a TOKEN"):
        main(["revoke", "--jti", "abc"])


def test_secrets_dir_option(
    env: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SECRETS_DIR", env["SECRETS_DIR"])  # main() sets it; restored after the test
    (tmp_path / "token-signing-key").write_text("another-zone-key-of-32-bytes-or-more")
    assert main(["--secrets-dir", str(tmp_path), "issue", "--scope", "utility"]) == 0
    token = capsys.readouterr().out.strip()
    assert auth.verify_token(token, "another-zone-key-of-32-bytes-or-more").subject == "cli"
