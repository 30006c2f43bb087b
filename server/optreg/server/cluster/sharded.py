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

SERVED = ("CreateSession", "CreateSessionStream", "GetSession", "DeleteSession", "Step", "StepStream", "ReadParameters",
          "ReadParametersStream", "ReadState", "ReadStateStream")


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
    def call(self, method: str, messages: list[bytes], owner: str | None, remaining) -> list[bytes]:
        """The replies to a call on a sharded session (`messages`: the request, or a client stream's
        messages, gathered)."""
        parsed = [getattr(session_pb2, method + "Request").FromString(m) for m in messages] \
            if method in ("CreateSession", "CreateSessionStream", "Step", "StepStream") else None
        if method in ("CreateSession", "CreateSessionStream"):
            return [self.create(method, parsed, owner, remaining)]
        sid = wire.session_id(messages[0])
        lay = self.layout(sid)
        if method not in SERVED:
            raise self.Failed("FAILED_PRECONDITION", f"{method}: session {sid} is sharded (config.shards "
                              f"{len(lay['shards'])}), which serves {', '.join(SERVED)} so far")
        with self._lock(sid):
            if method in ("Step", "StepStream"):
                return self.step(method, sid, lay, parsed, owner, remaining)
            if method == "DeleteSession":
                return [self.delete(sid, lay, owner, remaining)]
            return self.read(sid, lay, method, messages[0], owner, remaining)

    def _fan(self, method: str, parts: list, owner: str | None, remaining) -> list:
        """Each shard's reply (parsed; a streamed reply: the list of its messages) to its part (a
        request, or a list of a client stream's messages), the calls in parallel; the first failure
        raised after every call has ended."""
        kind = getattr(session_pb2, method + "Response")
        streamed = method.endswith("Stream") and method != "CreateSessionStream"
        calls = [self.pool.submit(self.front.forward, method, [p] if isinstance(p, bytes) else p,
                                  remaining=remaining, owner=owner, whole=False) for p in parts]
        out, failure = [], None
        for c in calls:
            try:
                replies = [kind.FromString(bytes(m)) for m in _all(*c.result()[:2])]
                out.append(replies if streamed else replies[0])
            except self.Failed as f:
                out.append(None)
                failure = failure or f
        if failure is not None:
            raise failure
        return out

    def create(self, method: str, messages: list, owner: str | None, remaining) -> bytes:
        request = messages[0]
        config = request.config
        n = config.shards
        sizes: dict[str, int] = {}  # parameter -> bytes, in the request's order
        if method == "CreateSession":
            sizes = {t.name: len(t.data) for t in request.parameters}
        else:
            for m in messages:
                for t in m.chunks if not m.slot else ():
                    sizes[t.name] = sizes.get(t.name, 0) + len(t.data)
        if config.HasField("workers"):
            raise self.Failed("INVALID_ARGUMENT", "config.workers: a sharded session (config.shards) is single-writer")
        if n > len(sizes):
            raise self.Failed("INVALID_ARGUMENT", f"config.shards {n}: the session has {len(sizes)} tensors and "
                              "each shard holds whole tensors: give at most that many")
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
        for name in sorted(sizes, key=lambda k: -sizes[k]):
            i = held.index(min(held))
            assign[name] = i
            held[i] += sizes[name]
        shards = [ownership.shard_id(sid, i) for i in range(n)]
        layout = {"shards": shards, "names": list(sizes), "assign": assign,
                  "durability": int(config.durability)}
        try:  # the id taken first, atomically (a plain create of it is then ALREADY_EXISTS)
            self.directory.ownership.claim(sid, 0, {"host": "", "sharded": layout, "owner": owner})
        except EpochTaken:
            raise self.Failed("ALREADY_EXISTS", f"session {sid} already exists; attach to it, or delete it "
                              "first") from None
        ownership.start_commits(self.directory.ownership.dir, sid, request.initial_step)
        parts = []

        def config_of(i):
            def set_config(p):
                p.config.shards, p.config.session_id = 0, shards[i]
            return set_config

        for i in range(n if method == "CreateSessionStream" else 0):
            parts.append(_split(messages, assign, i, config_of(i)))
        for i in range(n if method == "CreateSession" else 0):
            part = session_pb2.CreateSessionRequest(initial_step=request.initial_step)
            part.config.CopyFrom(config)
            part.config.shards, part.config.session_id = 0, shards[i]
            part.parameters.extend(t for t in request.parameters if assign[t.name] == i)
            for slot in request.state:
                part.state.add(slot=slot.slot, tensors=[t for t in slot.tensors if assign.get(t.name) == i])
            parts.append(part.SerializeToString())
        calls = [self.pool.submit(self.front.forward, method, [p] if isinstance(p, bytes) else p,
                                  remaining=remaining, owner=owner, place=h) for p, h in zip(parts, hosts)]
        infos, made, failure = [], [], None
        for shard, c in zip(shards, calls):
            try:
                infos.append(session_pb2.CreateSessionResponse.FromString(bytes(_all(*c.result()[:2])[0])).session)
                made.append(shard)
            except self.Failed as f:  # (ALREADY_EXISTS: a session of that name that is not ours: kept)
                failure = failure or f
        if failure is not None:
            self.delete(sid, layout, owner, remaining, made)
            raise failure
        self.layouts[sid] = layout
        return getattr(session_pb2, method + "Response")(session=self._info(sid, layout, infos)).SerializeToString()

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

    def step(self, method: str, sid: str, layout: dict, messages: list, owner: str | None, remaining) -> list[bytes]:
        request = messages[0]
        for field in ("worker", "sparse", "compressed"):
            if field == "worker" and request.worker or field != "worker" and len(getattr(request, field, ())):
                raise self.Failed("INVALID_ARGUMENT", f"{field}: not on a sharded session (config.shards): send "
                                  "dense gradients")
        if not request.HasField("step"):
            raise self.Failed("INVALID_ARGUMENT", "step: a sharded session takes fenced steps only (set `step` "
                              "to the session's step count; the Python client does)")
        if method == "Step":
            names = [g.name for g in request.gradients]
        else:  # (a tensor comes in several chunks: each name once here)
            names = list(dict.fromkeys(t.name for m in messages for t in m.chunks))
        if sorted(names) != sorted(layout["names"]):
            missing = sorted(set(layout["names"]) - set(names))
            extra = sorted(set(names) - set(layout["names"]))
            field = "gradients" if method == "Step" else "chunks"
            raise self.Failed("INVALID_ARGUMENT", f"{field}: give one per parameter, by name, once (missing "
                              f"{missing}, unknown or repeated {extra or sorted(n for n in names if names.count(n) > 1)})")
        shards, assign = layout["shards"], layout["assign"]

        def part(i):
            if method == "StepStream":
                return _split(messages, assign, i, lambda p: setattr(p, "session_id", shards[i]))
            p = session_pb2.StepRequest(session_id=shards[i], step=request.step,
                                        gradients=[g for g in request.gradients if assign[g.name] == i])
            p.hyperparameters.update(request.hyperparameters)
            p.metrics.update(request.metrics)
            return p.SerializeToString()

        def final(reply):  # the message with the step's number and whether it was a replay
            return reply if method == "Step" else reply[-1]

        parts = [part(i) for i in range(len(shards))]
        c = self.committed(sid)
        for attempt in range(3):
            replies = self._fan_settled(method, sid, layout, parts, range(len(shards)), owner, remaining, c)
            ahead = [i for i, r in enumerate(replies) if final(r).replayed and final(r).step > c]
            if ahead:  # applied before the commit record was written (a failure between): undone, sent again
                self._roll_back(sid, layout, [shards[i] for i in ahead], c)
                for i, r in zip(ahead, self._fan_settled(method, sid, layout, parts, ahead, owner, remaining, c)):
                    replies[i] = r
            # A shard adopted since it answered (a drain) was adopted only up to the record (fenced.py):
            # then this step is not in it any more, and is sent again rather than committed.
            if all(self.directory.ownership.current(s)[0] == self.front.epochs.get(s) for s in shards):
                break
            self.settle(sid, layout, owner, c)
        else:
            raise self.Failed("UNAVAILABLE", f"session {sid}: its shards kept moving during step {c + 1}; retry")
        steps = {final(r).step for r in replies}
        if len(steps) != 1:
            self.settle(sid, layout, owner, c)
            raise self.Failed("DATA_LOSS", f"session {sid}: its shards answered steps {sorted(steps)} (commit "
                              f"record at {c}): retry")
        step = steps.pop()
        if step > c:
            ownership.append_commit(self.directory.ownership.dir, sid, step,
                                    layout["durability"] == session_pb2.DURABILITY_EVERY_STEP)
        replayed, lr = all(final(r).replayed for r in replies), final(replies[0]).lr
        if method == "Step":
            order = {n: k for k, n in enumerate(layout["names"])}
            out = session_pb2.StepResponse(step=step, replayed=replayed, lr=lr)
            out.tensors.extend(sorted((t for r in replies for t in r.tensors), key=lambda t: order[t.name]))
            answer = [out.SerializeToString()]
        else:  # every shard's answer as chunks of a committed step, then the step's message
            answer = []
            for r in replies:
                for m in _answer(r):
                    m.provisional, m.step, m.replayed = False, step, replayed
                    answer.append(m.SerializeToString())
            answer.append(session_pb2.StepStreamResponse(step=step, replayed=replayed, lr=lr).SerializeToString())
        body, _ = self.front._answered(sid, method, answer, None)
        return list(body)

    def _fan_settled(self, method, sid, layout, parts, which, owner, remaining, c):
        """The replies of the shards `which` to their parts; after a refusal or failure, every shard
        past the record is rolled back before the error is answered."""
        try:
            return self._fan(method, [parts[i] for i in which], owner, remaining)
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

    def read(self, sid: str, layout: dict, method: str, message: bytes, owner: str | None, remaining) -> list[bytes]:
        kind = getattr(session_pb2, method + "Request")
        request = kind.FromString(message)
        shards, assign = layout["shards"], layout["assign"]
        streamed = method.endswith("Stream")
        parts = []
        for i, s in enumerate(shards):
            p = kind()
            p.CopyFrom(request)
            p.session_id = s
            if method.startswith("ReadParameters") and request.names:
                del p.names[:]  # (a name no shard holds goes to shard 0, which answers as one server does)
                p.names.extend(n for n in request.names if assign.get(n, 0) == i)
                if not p.names:
                    continue  # this shard holds none of them (an empty list would read them all)
            parts.append(p.SerializeToString())

        def step_of(reply):
            head = reply[0] if streamed else reply
            return head.step if method.startswith("ReadParameters") else head.session.step

        for attempt in range(3):
            c = self.committed(sid)
            replies = self._fan(method, parts, owner, remaining)
            if all(step_of(r) == c for r in replies):
                break
            self.settle(sid, layout, owner, c)
        else:
            raise self.Failed("UNAVAILABLE", f"session {sid}: its shards did not settle at one step; retry")
        order = {n: k for k, n in enumerate(layout["names"])}
        if method == "ReadParametersStream":
            for r in replies:
                for m in r:
                    m.step = c
            return [m.SerializeToString() for r in replies for m in r]
        if method == "ReadStateStream":  # the merged info first, then every shard's chunks
            out = [session_pb2.ReadStateStreamResponse(
                session=self._info(sid, layout, [r[0].session for r in replies])).SerializeToString()]
            for r in replies:
                for m in r:
                    m.ClearField("session")
                    if m.chunks:
                        out.append(m.SerializeToString())
            return out
        if method == "GetSession":
            return [session_pb2.GetSessionResponse(session=self._info(sid, layout, [r.session for r in replies]))
                    .SerializeToString()]
        if method == "ReadParameters":
            out = session_pb2.ReadParametersResponse(step=c)
            out.parameters.extend(sorted((t for r in replies for t in r.parameters), key=lambda t: order[t.name]))
            return [out.SerializeToString()]
        out = session_pb2.ReadStateResponse(session=self._info(sid, layout, [r.session for r in replies]))
        out.parameters.extend(sorted((t for r in replies for t in r.parameters), key=lambda t: order[t.name]))
        slots: dict[str, list] = {}
        for r in replies:
            for st in r.state:
                slots.setdefault(st.slot, []).extend(st.tensors)
        for slot, ts in slots.items():
            out.state.add(slot=slot, tensors=sorted(ts, key=lambda t: order[t.name]))
        return [out.SerializeToString()]

    def delete(self, sid: str, layout: dict, owner: str | None, remaining, shards=None) -> bytes:
        """Every shard (or those named: a create that failed deletes only the shards it made), then
        the session's record."""
        for s in layout["shards"] if shards is None else shards:
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


def _all(body, ends) -> list:
    """A forwarded call's reply messages."""
    return list(body) if ends is None else unpack(body, ends)


def _split(messages: list, assign: dict, i: int, first) -> list[bytes]:
    """Shard i's part of a client stream: each message with only the chunks of shard i's tensors (a
    name no shard holds goes to shard 0, which answers as one server does); the first message always,
    changed by `first`; the others when they hold any of its chunks."""
    out = []
    for k, m in enumerate(messages):
        p = type(m)()
        p.CopyFrom(m)
        del p.chunks[:]
        p.chunks.extend(t for t in m.chunks if assign.get(t.name, 0) == i)
        if k == 0:
            first(p)
        elif not p.chunks:
            continue
        out.append(p.SerializeToString())
    return out


def _answer(replies: list) -> list:
    """The messages of a shard's StepStream reply that hold its answer: the provisional chunks, unless
    later messages that are not provisional carry chunks (then those: the protocol's rule,
    StepStreamResponse)."""
    kept, last = [], None
    for m in replies:
        if last is not None and last.provisional and not m.provisional and m.chunks:
            kept = []
        last = m
        if m.chunks:
            kept.append(m)
    return kept
