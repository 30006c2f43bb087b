"""TelemetryService: WatchSession (a resumable stream of each step's figures) and GetTelemetry (a range)."""
from __future__ import annotations

import json
import zlib

import grpc

from optreg.server.rpc import admission

from optreg.server.model import errors

from optreg.server.rpc import status
from optreg.server.model.errors import ResourceExhausted

from optreg.server.telemetry.hub import Alert, Record, SessionRing, TelemetryHub, visible
from optreg.v1 import telemetry_pb2, telemetry_pb2_grpc

SERVICE_NAME = telemetry_pb2.DESCRIPTOR.services_by_name["TelemetryService"].full_name
POLL_SECONDS = 1.0  # how often a waiting watcher checks that its caller is still there


def _short(text: str, limit: int = 64) -> str:
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def step_message(record: Record, names) -> telemetry_pb2.StepTelemetry:
    msg = telemetry_pb2.StepTelemetry(step=record.step, steps=record.steps, wall_time=record.wall_time,
                                      metrics=record.metrics, hyperparameters=record.hyperparameters)
    for name, f in record.tensor_figures(names).items():
        msg.tensors.add(name=name, grad_norm=f["grad_norm"], param_norm=f["param_norm"],
                        update_norm=f["update_norm"], update_ratio=f["update_ratio"],
                        grad_max_abs=f["grad_max_abs"], effective_lr=f["effective_lr"])
    return msg


def alert_message(a: Alert) -> telemetry_pb2.Alert:
    return telemetry_pb2.Alert(kind=a.kind, step=a.step, wall_time=a.wall_time, tensor=a.tensor, message=a.message)


class TelemetryServicer(telemetry_pb2_grpc.TelemetryServiceServicer):
    """`owner(context)` gives the caller's token hash ("" without tokens); `check_session(id, owner)`,
    when given, raises the session service's own error for an unknown or another token's session
    (so a watcher of a fresh session with no step yet waits rather than getting NOT_FOUND)."""

    def __init__(self, hub: TelemetryHub, owner=lambda context: "", check_session=None, max_watchers: int = 16,
                 budget=None):
        self.hub, self.owner, self.check_session = hub, owner, check_session
        self.budget = budget  # the server's memory budget: an import's inflated bytes are counted there
        # An admission limit (each watch holds a few KiB while it waits for steps; on the asyncio server, rpc/aio.py,
        # no thread)
        self.watchers = admission.Limit(max_watchers, (
            f"this server is serving {max_watchers} WatchSession calls, its limit (--max-watchers): close a "
            "watch you no longer need, read past steps with GetTelemetry, or start the server with a larger "
            "--max-watchers"))

    def find_ring(self, session_id: str, owner: str) -> SessionRing | None:
        """The caller's session's ring (None: no step yet); the domain's refusal otherwise."""
        if not session_id:
            raise errors.InvalidArgument("session_id is empty: pass the id CreateSession returned")
        if self.check_session is not None:
            self.check_session(session_id, owner)
        ring = self.hub.ring(session_id)
        if ring is not None and not visible(ring.owner, owner, self.hub.auth):
            raise errors.PermissionDenied(f"session {_short(session_id)!r} does not exist or belongs to another token")
        return ring

    def _ring(self, session_id: str, context, owner: str) -> SessionRing | None:
        try:
            return self.find_ring(session_id, owner)
        except Exception as e:  # the domain's refusal, mapped by the servicers' one table
            t = status.translate(e)
            if t is None:
                raise
            context.abort(t[0], t[1])

    def GetTelemetry(self, request, context):
        owner = self.owner(context)
        if request.from_step < 0 or request.to_step < 0:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          "from_step and to_step must be >= 0 (0: unbounded on that side)")
        ring = self._ring(request.session_id, context, owner)
        if ring is None:
            if self.check_session is None:
                context.abort(grpc.StatusCode.NOT_FOUND,
                              f"no telemetry for session {_short(request.session_id)!r}: no step yet, or no such session")
            return telemetry_pb2.GetTelemetryResponse()
        records, alerts, _, ring = self.hub.snapshot(request.session_id, max(0, request.from_step - 1),
                                                     0, request.to_step)
        if ring is None:
            return telemetry_pb2.GetTelemetryResponse()
        return telemetry_pb2.GetTelemetryResponse(
            steps=[step_message(r, ring.names) for r in records],
            alerts=[alert_message(a) for a in alerts
                    if a.step >= request.from_step and (request.to_step <= 0 or a.step <= request.to_step)],
            first_step=ring.first_step, last_step=ring.last_step, full_resolution_from=ring.full_resolution_from)

    def ExportTelemetry(self, request, context):
        self._ring(request.session_id, context, self.owner(context))  # the caller's session, or refused
        return telemetry_pb2.ExportTelemetryResponse(data=self.hub.export(request.session_id) or b"")

    def ImportTelemetry(self, request, context):
        owner = self.owner(context)
        self._ring(request.session_id, context, owner)
        if not request.data:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "data is empty: send what ExportTelemetry returned")
        try:
            ring = self.hub.import_(request.session_id, request.data, owner=owner, budget=self.budget)
        except ResourceExhausted as e:  # the memory budget
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, e.message)
        except (ValueError, KeyError, TypeError, IndexError, zlib.error, json.JSONDecodeError) as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"data is not a telemetry ring written by ExportTelemetry ({type(e).__name__}: "
                          f"{_short(str(e), 200)}); nothing was changed")
        try:
            self.hub.save(request.session_id)  # on disk now, so it survives a crash right after
        except OSError as e:
            code, message, _ = status.translate(errors.write_failed(e, "the imported telemetry"))
            context.abort(code, message)
        return telemetry_pb2.ImportTelemetryResponse(last_step=ring.last_step)

    def WatchSession(self, request, context):
        try:
            slot = self.watchers.take()
        except ResourceExhausted as e:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, e.message)
        with slot:
            yield from self._watch(request, context)

    def _watch(self, request, context):
        owner = self.owner(context)
        if request.from_step < 0:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          "from_step must be >= 0 (0: only steps committed from now on)")
        session_id = request.session_id
        ring = self._ring(session_id, context, owner)
        if request.from_step > 0:
            after_step, after_alert = request.from_step - 1, None  # alerts from that step on
        else:  # from now on
            after_step = ring.last_step if ring is not None else 0
            after_alert = ring.alert_seq if ring is not None else 0
        version = None
        while context.is_active():
            records, alerts, now, ring = self.hub.snapshot(session_id, after_step, after_alert or 0)
            if ring is not None:
                try:
                    events, after_step, after_alert = self.events(records, alerts, ring, owner, request.from_step,
                                                                  after_step, after_alert)
                except errors.PermissionDenied as e:
                    context.abort(grpc.StatusCode.PERMISSION_DENIED, e.message)
                yield from events
            elif version is not None and version >= 0:
                return  # the session was deleted while we watched
            version = self.hub.wait(session_id, now, POLL_SECONDS)

    def events(self, records, alerts, ring, owner: str, from_step: int, after_step: int, after_alert):
        """(the watch's next messages, after_step, after_alert) from a snapshot of the ring."""
        if not visible(ring.owner, owner, self.hub.auth):
            raise errors.PermissionDenied(f"session {_short(ring.session_id)!r} does not exist or belongs to another "
                                          "token")
        seen = max([after_alert or 0] + [a.seq for a in alerts])
        if after_alert is None:  # first batch of a resumed watch: the alerts from its step on
            alerts = [a for a in alerts if a.step >= from_step - 1]
        # in step order; an alert comes after the step it is about
        events = sorted([((r.step, 0), r) for r in records] + [((a.step, 1), a) for a in alerts], key=lambda e: e[0])
        out = [telemetry_pb2.WatchSessionResponse(alert=alert_message(item)) if isinstance(item, Alert)
               else telemetry_pb2.WatchSessionResponse(step=step_message(item, ring.names)) for _, item in events]
        return out, (records[-1].step if records else after_step), seen


def add_to_server(servicer: TelemetryServicer, server) -> None:
    telemetry_pb2_grpc.add_TelemetryServiceServicer_to_server(servicer, server)
