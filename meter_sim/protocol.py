"""What a simulated meter says on the wire: its topics, the wire messages, request/response and acks.

Read requests are answered on the MQTT v5 response topic with the correlation data;
commands are validated, applied through :meth:`meter_sim.device.MeterDevice.apply` and
answered with a :class:`~metertwin.twin.messages.CommandAck` (remembered, so a
redelivered command gets the same ack again); EMS messages are handed to the local
EMS untouched and the EMS's messages forwarded up; control messages (ping, rebind)
are obeyed. :class:`MeterProtocol` is a base of :class:`meter_sim.meter.SimMeter`.
"""

from __future__ import annotations

import collections
import json
import time
from collections.abc import Callable
from typing import Any

import aiomqtt
import pydantic

from meter_sim.device import MeterDevice, Rejected
from meter_sim.session import MeterSession, Outgoing
from metertwin.core import topics
from metertwin.twin import messages

#: How many command acks a meter remembers to answer redeliveries identically.
ACK_MEMORY = 256


class MeterProtocol(MeterSession, MeterDevice):
    """The topics a meter serves and the messages it answers with."""

    # Set by SimMeter.__init__ (declared here for the type checker).
    commands_applied: int
    commands_rejected: int
    commands_expired: int
    commands_duplicate: int
    ems_received: int
    controls: int
    _ems_n: int

    def _init_protocol(self) -> None:
        """The meter's topics, what handles each, and the ack memory."""
        meter_id = self.meter_id
        self._acks: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        topic_handlers: dict[str, Callable[[aiomqtt.Message], None]] = {
            topics.commands(meter_id): self._on_command,
            topics.read_requests(meter_id): self._on_read,
            topics.ems_down(meter_id): self._on_ems_down,
            topics.control(meter_id): self._on_control,
        }
        self._handlers = topic_handlers
        self._t_readings = topics.readings(meter_id)
        self._t_acks = topics.command_acks(meter_id)
        self._t_ems_up = topics.ems_up(meter_id)
        self._t_status = topics.status(meter_id)

    def send_ems(self, payload: dict[str, Any], msg_id: str | None = None) -> str:
        """Forward a message from the local EMS up to the twin; returns its id."""
        self._ems_n += 1
        ems_id = msg_id or f"{self.meter_id[:40]}-ems-{self._ems_n}"
        msg = messages.EmsMessage(id=ems_id, payload=payload, ts=time.time())
        self._enqueue(Outgoing(self._out_due(), self._t_ems_up, msg.model_dump_json().encode(), "ems"))
        return ems_id

    def _on_read(self, msg: aiomqtt.Message) -> None:
        response_topic = getattr(msg.properties, "ResponseTopic", None)
        correlation = getattr(msg.properties, "CorrelationData", None)
        if not response_topic:
            self.malformed += 1
            return
        if msg.payload:
            try:
                messages.ReadRequest.model_validate_json(_as_bytes(msg.payload))
            except pydantic.ValidationError:
                self.malformed += 1  # still answer: the measurement is all a meter can give
        answer = messages.ReadResponse(**self.measure())
        self._enqueue(Outgoing(
            self._out_due(), response_topic, answer.model_dump_json().encode(), "response",
            correlation=correlation if isinstance(correlation, bytes) else None,
        ))

    def _on_ems_down(self, msg: aiomqtt.Message) -> None:
        payload = _as_bytes(msg.payload)
        self.ems_received += 1
        self.to_ems(payload)

    def _ack(self, ack: messages.CommandAck) -> None:
        payload = ack.model_dump_json().encode()
        self._acks[ack.id] = payload
        while len(self._acks) > ACK_MEMORY:
            self._acks.popitem(last=False)
        self._enqueue(Outgoing(self._out_due(), self._t_acks, payload, "ack"))

    def _on_command(self, msg: aiomqtt.Message) -> None:
        raw = _as_bytes(msg.payload)
        try:
            cmd = messages.Command.model_validate_json(raw)
        except pydantic.ValidationError as exc:
            self.malformed += 1
            cmd_id = _find_id(raw)
            if cmd_id is None:
                return  # nothing to answer to
            if cmd_id in self._acks:
                self._resend_ack(cmd_id)
                return
            self.commands_rejected += 1
            self._ack(self._make_ack(cmd_id, "rejected", f"malformed command: {_summary(exc)}"))
            return
        if cmd.id in self._acks:
            self._resend_ack(cmd.id)
            return
        if cmd.expires_at < time.time():
            self.commands_rejected += 1
            self.commands_expired += 1
            self._ack(self._make_ack(cmd.id, "rejected", "expired"))
            return
        try:
            extra = self.apply(cmd.kind, cmd.params)
        except Rejected as exc:
            self.commands_rejected += 1
            self._ack(self._make_ack(cmd.id, "rejected", str(exc)))
            return
        self.commands_applied += 1
        self._ack(self._make_ack(cmd.id, "applied", None, extra))

    def _resend_ack(self, cmd_id: str) -> None:
        self.commands_duplicate += 1
        self._acks.move_to_end(cmd_id)
        self._enqueue(Outgoing(self._out_due(), self._t_acks, self._acks[cmd_id], "ack"))

    def _make_ack(
        self, cmd_id: str, status: str, reason: str | None, extra: dict[str, Any] | None = None
    ) -> messages.CommandAck:
        reported = self.settings()
        if extra:
            reported.update(extra)
        return messages.CommandAck(
            id=cmd_id[:64], status=status, reason=None if reason is None else reason[:500],  # type: ignore[arg-type]
            reported=reported, ts=time.time(),
        )

    def _on_control(self, msg: aiomqtt.Message) -> None:
        self.controls += 1
        try:
            ctl = messages.Control.model_validate_json(_as_bytes(msg.payload))
        except pydantic.ValidationError:
            self.malformed += 1
            return
        ack_id = ctl.params.get("id")
        ack_id = ack_id if isinstance(ack_id, str) and 0 < len(ack_id) <= 64 else None
        if ctl.action == "ping":
            response_topic = getattr(msg.properties, "ResponseTopic", None)
            if response_topic:
                correlation = getattr(msg.properties, "CorrelationData", None)
                body = {"action": "pong", "meter_id": self.meter_id, "binding": self.binding, "ts": time.time()}
                self._enqueue(Outgoing(
                    self._out_due(), response_topic, json.dumps(body).encode(), "control",
                    correlation=correlation if isinstance(correlation, bytes) else None,
                ))
            if ack_id:
                self._ack(self._make_ack(ack_id, "applied", None, {"pong": True, "binding": self.binding}))
            return
        # rebind
        ack_id = ack_id or f"rebind-{ctl.params.get('version')}"[:64]
        if "version" not in ctl.params:
            self._ack(self._make_ack(ack_id, "rejected", "rebind needs params.version"))
            return
        self.binding = ctl.params["version"]
        self._ack(self._make_ack(ack_id, "applied", None, {"binding": self.binding}))


def _as_bytes(payload: Any) -> bytes:
    if isinstance(payload, bytes | bytearray):
        return bytes(payload)
    if isinstance(payload, str):
        return payload.encode()
    return b"" if payload is None else str(payload).encode()


def _find_id(raw: bytes) -> str | None:
    """The id of a command that failed validation, if one can be found to answer to."""
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    cmd_id = data.get("id") if isinstance(data, dict) else None
    return cmd_id if isinstance(cmd_id, str) and 0 < len(cmd_id) <= 64 else None


def _summary(exc: pydantic.ValidationError) -> str:
    parts = []
    for err in exc.errors()[:3]:
        where = ".".join(str(p) for p in err["loc"]) or "payload"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)
