"""The cluster's session hosts: connecting to Ray, one host actor per node (get-or-create by name),
placement of new sessions, listing sessions with the node that owns each, draining a node."""
from __future__ import annotations

import logging
import os
import pathlib
import site
import socket
import threading
import time

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

import optreg
from optreg.server.cluster.host import SessionHost
from optreg.server.cluster.ownership import Ownership

log = logging.getLogger("optreg.server.cluster")
NAMESPACE = "optreg"
HOST_PREFIX = "optreg-host-"
HOST_CONCURRENCY = 32  # calls a host serves at once (a threaded actor)
PLACE_GRAIN = 64 << 20  # bytes held: hosts within one grain of each other are equal for placement
Host = ray.remote(SessionHost)


def runtime_env() -> dict:
    """Workers import optreg from where this process did: from a checkout (not site-packages), its
    source roots go on their PYTHONPATH; an installed optreg needs nothing."""
    roots = [str(pathlib.Path(p).parent) for p in optreg.__path__]
    installed = {str(pathlib.Path(p).resolve()) for p in site.getsitepackages() + [site.getusersitepackages()]}
    local = [r for r in roots if str(pathlib.Path(r).resolve()) not in installed]
    if not local:
        return {}
    extra = os.environ.get("PYTHONPATH")
    return {"env_vars": {"PYTHONPATH": os.pathsep.join(local + ([extra] if extra else []))}}


def check_reachable(address: str, seconds: float = 3.0) -> None:
    """ConnectionError at once when nothing listens at a cluster address (a typo): ray.init would retry for
    minutes, printing warnings, deaf to SIGTERM. HOST[:PORT] is the head's GCS (port 6379 by default);
    ray://HOST[:PORT] its client server (10001). "auto" and "local" are Ray's to resolve."""
    if address in ("auto", "local"):
        return
    rest, default = (address[len("ray://"):], 10001) if address.startswith("ray://") else (address, 6379)
    host, sep, port = rest.rstrip("/").rpartition(":")
    if not sep or not port.isdigit():
        host, port = rest.rstrip("/"), default
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=seconds).close()
    except OSError as e:
        raise ConnectionError(f"no Ray cluster answers at {host}:{port} ({e.strerror or e}): check the "
                              "address (`ray status` on the head node), or give --ray alone to start a local "
                              "Ray") from None


def connect(address: str | None = None, **init_kwargs) -> None:
    """Join the Ray cluster at `address` ("auto": the local one), or start a local Ray when None."""
    if ray.is_initialized():
        return
    if address:
        check_reachable(address)
    ray.init(address=address, namespace=NAMESPACE, runtime_env=runtime_env() or None,
             log_to_driver=False, **init_kwargs)


def host_name(node_id: str) -> str:
    return f"{HOST_PREFIX}{node_id[:16]}"


STARTING_SECONDS = 120.0  # how long placement waits for the first host to answer


class Directory:
    """What a front end (and `python -m optreg.server.cluster`) knows of the cluster."""

    def __init__(self, root, memory_budget_mb: float | None = None, info_seconds: float = 2.0,
                 answer_seconds: float = 5.0):
        self.root = pathlib.Path(root)
        self.ownership = Ownership(root)
        self.drained_dir = self.root / "drained"
        self.drained_dir.mkdir(parents=True, exist_ok=True)
        self.memory_budget_mb = memory_budget_mb
        self.info_seconds = info_seconds
        self.answer_seconds = answer_seconds
        self._infos: dict[str, dict] = {}
        self._infos_at = 0.0
        self._lock = threading.Lock()
        self._handles: dict = {}

    # -- hosts -------------------------------------------------------------------------------
    def host_for_node(self, node_id: str):
        """Get or create the node's host: a detached actor named after the node, pinned there, restarted
        (on that node) and its calls retried without end. When the node dies the host dies with it and
        its sessions are adopted by the hosts of the surviving nodes (frontend.py). Soft affinity, which
        would let Ray restart it elsewhere, put 2 of 3 hosts off their nodes here, again and again."""
        return Host.options(
            name=host_name(node_id), namespace=NAMESPACE, get_if_exists=True, lifetime="detached",
            max_restarts=-1, max_task_retries=-1, max_concurrency=HOST_CONCURRENCY, num_cpus=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
        ).remote(host_name(node_id), str(self.root), self.memory_budget_mb)

    def drained(self) -> set[str]:
        return {p.name for p in self.drained_dir.iterdir()}

    def ensure_hosts(self) -> list[str]:
        """A host on every alive node that is not drained; their names."""
        drained = self.drained()
        nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive") and n["NodeID"] not in drained]
        for node in nodes:
            self.host_for_node(node)
        return [host_name(node) for node in nodes]

    @staticmethod
    def host_names() -> list[str]:
        return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                      if a["namespace"] == NAMESPACE and a["name"].startswith(HOST_PREFIX))

    def handle(self, name: str):
        """The host actor called `name`, or None when it is gone (drained, or never made). Cached: a
        lookup is a round trip to Ray's control store; `forget` it when a call finds the actor dead."""
        h = self._handles.get(name)
        if h is not None:
            return h
        try:
            h = self._handles[name] = ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:
            return None
        return h

    def forget(self, name: str) -> None:
        self._handles.pop(name, None)

    def infos(self, fresh: bool = False) -> dict[str, dict]:
        """Each live host's load (sessions, bytes held), refreshed every `info_seconds`."""
        with self._lock:
            if not fresh and time.monotonic() - self._infos_at < self.info_seconds and self._infos:
                return self._infos
        names = set(self.ensure_hosts()) | set(self.host_names())
        refs = {n: h.info.remote() for n in names if (h := self.handle(n)) is not None}
        # A host that does not answer in a few seconds (its node stopped, not yet found dead) gets no
        # new sessions this round: placement never waits on it.
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=self.answer_seconds)
        if not ready and refs:  # none up yet (a fresh front end; a host's process takes ~5-20 s to start on
            # a loaded machine): wait for the first rather than refuse the call
            ready, _ = ray.wait(list(refs.values()), num_returns=1, timeout=STARTING_SECONDS)
        infos = {}
        for name, ref in refs.items():
            if ref not in ready:
                continue
            try:
                info = ray.get(ref)
            except ray.exceptions.RayError:
                self.forget(name)
                continue
            if not info["draining"] and info["node"] not in self.drained():
                infos[name] = info
        with self._lock:
            self._infos, self._infos_at = infos, time.monotonic()
        return infos

    def stale_infos(self) -> None:
        """A host failed: read the hosts' loads again before the next placement."""
        with self._lock:
            self._infos_at = 0.0

    def place(self, exclude: frozenset = frozenset()) -> str:
        """The host for a new session: the one holding the fewest bytes, counted in PLACE_GRAIN steps, then
        the fewest sessions (the estimate is bumped at once, so a burst of creates spreads before the next
        refresh). The grain keeps a few MB on one host from sending every small session elsewhere."""
        infos = self.infos()
        with self._lock:
            choices = [i for n, i in infos.items() if n not in exclude]
            if not choices:
                raise RuntimeError("no session host is available on the cluster")
            best = min(choices, key=lambda i: (i["bytes"] // PLACE_GRAIN, i["sessions"]))
            best["sessions"] += 1
            return best["host"]

    # -- operations ------------------------------------------------------------------------------
    def sessions(self) -> list[dict]:
        """Every session in storage: owner host and node, epoch, step (when loaded), loaded or not."""
        loaded = {}
        for name in self.host_names():
            h = self.handle(name)
            if h is None:
                continue
            try:
                for row in ray.get(h.sessions.remote(), timeout=60):
                    loaded[row["session_id"]] = dict(row, loaded=True)
            except ray.exceptions.RayError:
                continue
        rows = []
        for sid in self.ownership.session_ids():
            if sid in loaded:
                rows.append(loaded[sid])
                continue
            epoch, holder = self.ownership.current(sid)
            if epoch and not (holder or {}).get("deleted"):
                rows.append({"session_id": sid, "epoch": epoch, "host": (holder or {}).get("host", ""),
                             "node": (holder or {}).get("node", ""), "step": None, "loaded": False})
        return rows

    def drain(self, node_id: str) -> dict[str, str]:
        """Move every session off a node (none of its steps lost: each is flushed by its owner, then
        adopted by another host at the next epoch); stop its host. {session id: new host}."""
        (self.drained_dir / node_id).touch()
        with self._lock:
            self._infos_at = 0.0
        victims = []
        for name in self.host_names():
            h = self.handle(name)
            try:
                if h is not None and ray.get(h.info.remote(), timeout=60)["node"] == node_id:
                    victims.append((name, h))
            except ray.exceptions.RayError:
                continue
        moved = {}
        for name, h in victims:
            released = ray.get(h.drain.remote())
            ray.kill(h, no_restart=True)
            self.forget(name)
            refs = {}
            for sid, epoch in released:
                target = self.place(exclude=frozenset({name}))
                refs[sid] = (target, self.handle(target).adopt.remote(sid, epoch))
            for sid, (target, ref) in refs.items():
                try:
                    ray.get(ref)
                    moved[sid] = target
                except ray.exceptions.RayTaskError:  # a front end's call had it adopted first: fine
                    moved[sid] = (self.ownership.current(sid)[1] or {}).get("host", "")
            log.info("node %s drained: %d sessions moved off %s", node_id, len(released), name)
        return moved

    def undrain(self, node_id: str) -> None:
        (self.drained_dir / node_id).unlink(missing_ok=True)
