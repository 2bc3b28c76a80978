"""TLS with client certificates and signed messages (ECDSA P-256 and RSA), and the VTN fingerprint check."""

from __future__ import annotations

from pathlib import Path

import pytest

from dr_bridge import Bridge, BridgeConfig, handler_invoker
from dr_bridge.demo import UtilityVtn, wait_until
from dr_bridge.security import make_pki
from tests.dr.test_dr_event import SERVICE, CommandObserver, commands_seen, dr_env, handler, make_twin

__all__ = ["commands_seen", "dr_env"]


@pytest.mark.parametrize("kind", ["ecdsa", "rsa"])
async def test_tls_signed_event_round_trip(kind: str, tmp_path: Path, dr_env: dict[str, str],
                                           commands_seen: CommandObserver, meter_id: str) -> None:
    pki = make_pki(tmp_path, kind=kind)
    make_twin(meter_id)
    vtn = UtilityVtn(poll_s=1.0, ven_fingerprint=pki.ven_fingerprint, http_cert=str(pki.vtn_cert),
                     http_key=str(pki.vtn_key), http_ca_file=str(pki.ca_cert), cert=str(pki.vtn_cert),
                     key=str(pki.vtn_key))
    await vtn.start()
    assert vtn.url.startswith("https://")
    config = BridgeConfig(vtn_url=vtn.url, cert=str(pki.ven_cert), key=str(pki.ven_key), ca_file=str(pki.ca_cert),
                          vtn_fingerprint=pki.vtn_fingerprint, due_poll_s=0.1)
    bridge = Bridge([meter_id], config, handler_invoker(handler, SERVICE))
    try:
        await bridge.start()
        event_id = vtn.issue([meter_id], intervals=[(1.0, 2.0, 2)])
        await wait_until(lambda: vtn.answers_for(event_id), 10)
        assert vtn.answers_for(event_id)[meter_id].opt_type == "optIn"
        await wait_until(lambda: commands_seen.commands(meter_id), 10)
    finally:
        await bridge.stop()
        await vtn.stop()


async def test_wrong_vtn_fingerprint_is_not_trusted(tmp_path: Path, dr_env: dict[str, str], meter_id: str) -> None:
    pki = make_pki(tmp_path / "a")
    other = make_pki(tmp_path / "b")
    make_twin(meter_id)
    vtn = UtilityVtn(poll_s=1.0, ven_fingerprint=pki.ven_fingerprint, http_cert=str(pki.vtn_cert),
                     http_key=str(pki.vtn_key), http_ca_file=str(pki.ca_cert), cert=str(pki.vtn_cert),
                     key=str(pki.vtn_key))
    await vtn.start()
    config = BridgeConfig(vtn_url=vtn.url, cert=str(pki.ven_cert), key=str(pki.ven_key), ca_file=str(pki.ca_cert),
                          vtn_fingerprint=other.vtn_fingerprint, register_retry_max_s=1.0)
    bridge = Bridge([meter_id], config, handler_invoker(handler, SERVICE))
    try:
        await bridge.start(wait=False)
        # The VTN accepts the registration, but the VEN rejects every answer signed by an unexpected
        # certificate and keeps retrying: it never considers itself registered.
        await wait_until(lambda: vtn.registration_attempts >= 2, 15)
        assert not bridge.vens[meter_id].registered.is_set()
        assert bridge.vens[meter_id].registration_id is None
    finally:
        await bridge.stop()
        await vtn.stop()
