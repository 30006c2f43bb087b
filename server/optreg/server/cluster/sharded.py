"""Sharded sessions: one session's tensors split over several session hosts, a step atomic across them.

Each shard is an ordinary fenced session, `<id>.shard<i>`, on its own host (placed on different hosts
at creation; moved, adopted and fenced like any session). The session itself is a record in storage:
epoch 1 of `<id>`, claimed first (so the id is taken, atomically), naming the shards and which
tensor each holds; and `DIR/sessions/<id>/commits`, the commit record, one line per committed step.

A step k: the front end sends each shard its tensors' part of k with the client's fence, in parallel;
when every shard has logged and applied it, k is appended to `commits` (synced as the session's
durability says), and only then answered. Invariants (docs/scale-out.md, "Sharded sessions"):
- the session's step is the last commit record C; every shard is at C or C+1 (it applied k = C+1
  before the record was written: the front end or a node died in between);
- a shard found past C (its reply is a replay of a step past C, or a reader sees it there) is rolled
  back before anything else is done: a host takes it over at its next epoch replaying its log only
  up to C (fenced.py), and the step is sent to it again: so the client's retry of k, with the same
  fence, is applied exactly once on every shard;
- readers see every shard at C (a shard past C is rolled back first), never shard A at k and B at k-1.
One front end steps a sharded session at a time (a lock here); two front ends stepping the same
sharded session at once is not supported.
"""
from __future__ import annotations

import os
import threading
import time
import uuid
from concurrent import futures

import ray

from optreg.server.cluster import ownership, wire
from optreg.server.cluster.directory import STARTING_SECONDS
from optreg.server.cluster.host import unpack
from optreg.server.cluster.ownership import Claim, EpochTaken
from optreg.server.model.errors import Refused
from optreg.server.sessions.factory import valid_id
from optreg.v1 import session_pb2

SERVED = ("CreateSession", "GetSession", "DeleteSession", "Step", "ReadParameters", "ReadState")


class Sharded:
    def __init__(self, front, failed, retryable):
        """`front`: the Frontend whose forward() reaches each shard; `failed`: its error class (code,
        message); `retryable`: the Ray errors after which another host is tried."""
        self.front, self.directory, self.Failed, self.retryable = front, front.directory, failed, retryable
        self.layouts: dict[str, dict] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        self.pool = futures.ThreadPoolExecutor(32, thread_name_prefix="optreg-shards")

    # -- what is sharded ------------------------------------------------------------------
    def layout(self, session_id: str) -> dict | None:
        if not session_id:
            return None
        found = self.layouts.get(session_id)
        if found is not None:
            return found
        if not ownership.has_commits(self.directory.ownership.dir, session_id):
            return None
        _, holder = self.directory.ownership.current(session_id)
        found = (holder or {}).get("sharded")
        if found:
            self.layouts[session_id] = found
        return found

    def _lock(self, session_id: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(session_id, threading.Lock())

    def committed(self, session_id: str) -> int:
        return ownership.last_commit(self.directory.ownership.dir, session_id)

    # -- calls ------------------------------------------------------------------------------
    def call(self, method: str, message: bytes, owner: str | None, remaining) -> list[bytes]:
        if method == "CreateSession":
            return [self.create(session_pb2.CreateSessionRequest.FromString(message), owner, remaining)]
        sid = wire.session_id(message)
        lay = self.layout(sid)
        if method not in SERVED:
            raise self.Failed("FAILED_PRECONDITION", f"{method}: session {sid} is sharded (config.shards "
                              f"{len(lay['shards'])}), which serves {', '.join(SERVED)} so far")
        with self._lock(sid):
            if method == "Step":
                return [self.step(sid, lay, session_pb2.StepRequest.FromString(message), owner, remaining)]
            if method == "DeleteSession":
                return [self.delete(sid, lay, owner, remaining)]
            return [self.read(sid, lay, method, message, owner, remaining)]

    def _fan(self, method: str, parts: list[bytes], owner: str | None, remaining) -> list:
        """Each shard's reply (parsed) to its part, the calls in parallel; the first failure raised
        after every call has ended."""
        kind = getattr(session_pb2, method + "Response")
        calls = [self.pool.submit(self.front.forward, method, [p], remaining=remaining, owner=owner, whole=False)
                 for p in parts]
        out, failure = [], None
        for c in calls:
            try:
                out.append(kind.FromString(_first(*c.result()[:2])))
            except self.Failed as f:
                out.append(None)
                failure = failure or f
        if failure is not None:
            raise failure
        return out

    def create(self, request, owner: str | None, remaining) -> bytes:
        config = request.config
        n = config.shards
        if config.HasField("workers"):
            raise self.Failed("INVALID_ARGUMENT", "config.workers: a sharded session (config.shards) is single-writer")
        if n > len(request.parameters):
            raise self.Failed("INVALID_ARGUMENT", f"config.shards {n}: the session has {len(request.parameters)} "
                              "tensors and each shard holds whole tensors: give at most that many")
        hosts, alive = [], len(self.directory.ensure_hosts())
        if n > alive:
            raise self.Failed("FAILED_PRECONDITION", f"config.shards {n}: the cluster has {alive} session hosts "
                              "(one a node, drained ones left out) to place shards on: give at most that many")
        end = time.monotonic() + STARTING_SECONDS  # (hosts of nodes that just joined may still be starting)
        while len(self.directory.infos(fresh=True)) < n and time.monotonic() < end:
            time.sleep(1.0)
        for _ in range(n):
            try:
                hosts.append(self.directory.place(exclude=frozenset(hosts)))
            except RuntimeError:
                raise self.Failed("UNAVAILABLE", f"config.shards {n}: only {len(hosts)} session hosts answered "
                                  "in time to place shards on: retry") from None
        sid = config.session_id or uuid.uuid4().hex
        if not valid_id(ownership.shard_id(sid, n - 1)):  # (before any path is made of it)
            raise self.Failed("INVALID_ARGUMENT", f"config.session_id {sid[:200]!r}: a sharded session's id is "
                              "1-120 characters of A-Z a-z 0-9 _ . - (its shards add .shard<i>), not starting "
                              "with . or -")
        # whole tensors, balanced by bytes: the largest first, each to the shard holding the fewest
        held, assign = [0] * n, {}
        for t in sorted(request.parameters, key=lambda t: -len(t.data)):
            i = held.index(min(held))
            assign[t.name] = i
            held[i] += len(t.data)
        shards = [ownership.shard_id(sid, i) for i in range(n)]
        layout = {"shards": shards, "names": [t.name for t in request.parameters], "assign": assign,
                  "durability": int(config.durability)}
        try:  # the id taken first, atomically (a plain create of it is then ALREADY_EXISTS)
            self.directory.ownership.claim(sid, 0, {"host": "", "sharded": layout, "owner": owner})
        except EpochTaken:
            raise self.Failed("ALREADY_EXISTS", f"session {sid} already exists; attach to it, or delete it "
                              "first") from None
        ownership.start_commits(self.directory.ownership.dir, sid, request.initial_step)
        parts = []
        for i in range(n):
            part = session_pb2.CreateSessionRequest(initial_step=request.initial_step)
            part.config.CopyFrom(config)
            part.config.shards, part.config.session_id = 0, shards[i]
            part.parameters.extend(t for t in request.parameters if assign[t.name] == i)
            for slot in request.state:
                part.state.add(slot=slot.slot, tensors=[t for t in slot.tensors if assign.get(t.name) == i])
            parts.append(part.SerializeToString())
        calls = [self.pool.submit(self.front.forward, "CreateSession", [p], remaining=remaining, owner=owner,
                                  place=h) for p, h in zip(parts, hosts)]
        infos, failure = [], None
        for c in calls:
            try:
                infos.append(session_pb2.CreateSessionResponse.FromString(_first(*c.result()[:2])).session)
            except self.Failed as f:
                failure = failure or f
        if failure is not None:
            self.delete(sid, layout, owner, remaining)
            raise failure
        self.layouts[sid] = layout
        return session_pb2.CreateSessionResponse(session=self._info(sid, layout, infos)).SerializeToString()

    def _info(self, sid: str, layout: dict, infos) -> session_pb2.SessionInfo:
        info = session_pb2.SessionInfo()
        info.CopyFrom(infos[0])
        info.session_id = sid
        order = {n: k for k, n in enumerate(layout["names"])}
        del info.parameters[:]
        info.parameters.extend(sorted((p for i in infos for p in i.parameters), key=lambda p: order[p.name]))
        info.persisted_step = min(i.persisted_step for i in infos)
        info.loaded = all(i.loaded for i in infos)
        return info

    def merge_listed(self, infos: list) -> list:
        """A listing's sessions with the shards of each sharded session replaced by that session (at
        its commit record's step) when every shard of it is listed; in id order."""
        out, shards = [], {}
        for info in infos:
            parent, sep, index = info.session_id.rpartition(ownership.SUFFIX)
            if sep and index.isdigit() and self.layout(parent):
                shards.setdefault(parent, []).append(info)
            else:
                out.append(info)
        for sid, found in shards.items():
            layout = self.layout(sid)
            if len(found) == len(layout["shards"]):
                info = self._info(sid, layout, found)
                info.step = self.committed(sid)
                out.append(info)
        return sorted(out, key=lambda i: i.session_id.encode())

    def step(self, sid: str, layout: dict, request, owner: str | None, remaining) -> bytes:
        for field in ("worker", "sparse", "compressed"):
            if (request.worker if field == "worker" else len(getattr(request, field))):
                raise self.Failed("INVALID_ARGUMENT", f"{field}: not on a sharded session (config.shards): send "
                                  "dense gradients in `gradients`")
        if not request.HasField("step"):
            raise self.Failed("INVALID_ARGUMENT", "step: a sharded session takes fenced steps only (set `step` "
                              "to the session's step count; the Python client does)")
        names = [g.name for g in request.gradients]
        if sorted(names) != sorted(layout["names"]):
            missing = sorted(set(layout["names"]) - set(names))
            extra = sorted(set(names) - set(layout["names"]))
            raise self.Failed("INVALID_ARGUMENT", f"gradients: give one per parameter, by name, once (missing "
                              f"{missing}, unknown or repeated {extra or sorted(n for n in names if names.count(n) > 1)})")
        shards, assign = layout["shards"], layout["assign"]

        def part(i):
            p = session_pb2.StepRequest(session_id=shards[i], step=request.step,
                                        gradients=[g for g in request.gradients if assign[g.name] == i])
            p.hyperparameters.update(request.hyperparameters)
            p.metrics.update(request.metrics)
            return p.SerializeToString()

        parts = [part(i) for i in range(len(shards))]
        c = self.committed(sid)
        for attempt in range(3):
            replies = self._fan_settled(sid, layout, parts, range(len(shards)), owner, remaining, c)
            ahead = [i for i, r in enumerate(replies) if r.replayed and r.step > c]
            if ahead:  # applied before the commit record was written (a failure between): undone, sent again
                self._roll_back(sid, layout, [shards[i] for i in ahead], c)
                for i, r in zip(ahead, self._fan_settled(sid, layout, parts, ahead, owner, remaining, c)):
                    replies[i] = r
            # A shard adopted since it answered (a drain) was adopted only up to the record (fenced.py):
            # then this step is not in it any more, and is sent again rather than committed.
            if all(self.directory.ownership.current(s)[0] == self.front.epochs.get(s) for s in shards):
                break
            self.settle(sid, layout, owner, c)
        else:
            raise self.Failed("UNAVAILABLE", f"session {sid}: its shards kept moving during step {c + 1}; retry")
        steps = {r.step for r in replies}
        if len(steps) != 1:
            self.settle(sid, layout, owner, c)
            raise self.Failed("DATA_LOSS", f"session {sid}: its shards answered steps {sorted(steps)} (commit "
                              f"record at {c}): retry")
        step = steps.pop()
        if step > c:
            ownership.append_commit(self.directory.ownership.dir, sid, step,
                           layout["durability"] == session_pb2.DURABILITY_EVERY_STEP)
        order = {n: k for k, n in enumerate(layout["names"])}
        out = session_pb2.StepResponse(step=step, replayed=all(r.replayed for r in replies), lr=replies[0].lr)
        out.tensors.extend(sorted((t for r in replies for t in r.tensors), key=lambda t: order[t.name]))
        body, _ = self.front._answered(sid, "Step", [out.SerializeToString()], None)
        return body[0]

    def _fan_settled(self, sid, layout, parts, which, owner, remaining, c):
        """The replies of the shards `which` to their parts; after a refusal or failure, every shard
        past the record is rolled back before the error is answered."""
        try:
            return self._fan("Step", [parts[i] for i in which], owner, remaining)
        except self.Failed:
            self.settle(sid, layout, owner, c)
            raise

    def settle(self, sid: str, layout: dict, owner: str | None, c: int | None = None) -> None:
        """Every shard past the commit record rolled back to it (after a failed step or before a read)."""
        c = self.committed(sid) if c is None else c
        infos = self._fan("GetSession", [session_pb2.GetSessionRequest(session_id=s).SerializeToString()
                                         for s in layout["shards"]], owner, None)
        ahead = [s for s, i in zip(layout["shards"], infos) if i.session.step > c]
        if ahead:
            self._roll_back(sid, layout, ahead, c)

    def _roll_back(self, sid: str, layout: dict, shard_ids: list[str], c: int) -> None:
        for sub in shard_ids:
            for attempt in range(20):
                epoch, holder = self.directory.ownership.current(sub)
                name = (holder or {}).get("host", "")
                if not name or self.directory.handle(name) is None:
                    name = self.directory.place()
                try:
                    new_epoch, _ = ray.get(self.directory.handle(name).rollback.remote(sub, epoch, c), timeout=120)
                except self.retryable:
                    self.directory.forget(name)
                    self.directory.stale_infos()
                    continue
                except EpochTaken:  # moved meanwhile: read the record again
                    continue
                except Refused as e:  # (DataLoss: its snapshot is past the commit record)
                    raise self.Failed("DATA_LOSS", f"session {sid}: shard {sub} could not be rolled back to "
                                      f"step {c}: {e}") from None
                with self.front._lock:
                    self.front.routes[sub], self.front.epochs[sub] = name, new_epoch
                break
            else:
                raise self.Failed("UNAVAILABLE", f"session {sid}: shard {sub} could not be rolled back; retry")

    def read(self, sid: str, layout: dict, method: str, message: bytes, owner: str | None, remaining) -> bytes:
        kind = getattr(session_pb2, method + "Request")
        request = kind.FromString(message)
        shards, assign = layout["shards"], layout["assign"]
        parts = []
        for i, s in enumerate(shards):
            p = kind()
            p.CopyFrom(request)
            p.session_id = s
            if method == "ReadParameters" and request.names:
                del p.names[:]  # (a name no shard holds goes to shard 0, which answers as one server does)
                p.names.extend(n for n in request.names if assign.get(n, 0) == i)
                if not p.names:
                    continue  # this shard holds none of them (an empty list would read them all)
            parts.append(p.SerializeToString())
        for attempt in range(3):
            c = self.committed(sid)
            replies = self._fan(method, parts, owner, remaining)
            steps = [r.step if method == "ReadParameters" else r.session.step for r in replies]
            if all(s == c for s in steps):
                break
            self.settle(sid, layout, owner, c)
        else:
            raise self.Failed("UNAVAILABLE", f"session {sid}: its shards did not settle at one step; retry")
        order = {n: k for k, n in enumerate(layout["names"])}
        if method == "GetSession":
            return session_pb2.GetSessionResponse(session=self._info(sid, layout, [r.session for r in replies])) \
                .SerializeToString()
        if method == "ReadParameters":
            out = session_pb2.ReadParametersResponse(step=c)
            out.parameters.extend(sorted((t for r in replies for t in r.parameters), key=lambda t: order[t.name]))
            return out.SerializeToString()
        out = session_pb2.ReadStateResponse(session=self._info(sid, layout, [r.session for r in replies]))
        out.parameters.extend(sorted((t for r in replies for t in r.parameters), key=lambda t: order[t.name]))
        slots: dict[str, list] = {}
        for r in replies:
            for st in r.state:
                slots.setdefault(st.slot, []).extend(st.tensors)
        for slot, ts in slots.items():
            out.state.add(slot=slot, tensors=sorted(ts, key=lambda t: order[t.name]))
        return out.SerializeToString()

    def delete(self, sid: str, layout: dict, owner: str | None, remaining) -> bytes:
        for s in layout["shards"]:
            try:
                self.front.forward("DeleteSession", [session_pb2.DeleteSessionRequest(session_id=s)
                                                     .SerializeToString()], remaining=remaining, owner=owner)
            except self.Failed as f:
                if f.code != "NOT_FOUND":
                    raise
        epoch, _ = self.directory.ownership.current(sid)
        path = self.directory.ownership.session_dir(sid) / f"epoch.{epoch}"
        try:
            self.directory.ownership.remove(Claim(sid, epoch, os.stat(path).st_ino))
        except (OSError, Refused):  # gone already (a create that failed, deleted twice)
            pass
        self.layouts.pop(sid, None)
        return session_pb2.DeleteSessionResponse().SerializeToString()



def _first(body, ends) -> bytes:
    return bytes(body[0]) if ends is None else bytes(unpack(body, ends)[0])
