"""A measured slow link between a client and a loopback server (issue 26): rate by the kernel, delay by a relay.

    with SlowLink(target_port, mbit=100, rtt_ms=20) as link:
        Client(link.address)          # 127.0.0.1:<port>; its bytes cross the shaped link to the target

Two network namespaces this makes (``optreg-slow-<pid>-<n>-a`` and ``-b``) joined by a veth pair,
each end shaped by ``tc ... tbf`` (the kernel here has no netem, so no delay qdisc). A relay process
(``python -m bench.slowlink``) listens on loopback, adds half the round trip each way, and forwards
over a socket made inside namespace a to a listener inside namespace b, which forwards to the target
port on loopback. Every address is on loopback or inside the two namespaces; both go at close.

Needs root, ``ip`` and ``tc``: ``SlowLink.unavailable()`` says why not, for a skip.
"""
from __future__ import annotations

import ctypes
import itertools
import os
import queue
import shutil
import socket
import subprocess
import sys
import threading
import time

CLONE_NEWNET = 0x40000000
CHUNK = 64 << 10
_count = itertools.count()


def unavailable() -> str | None:
    """Why a slow link cannot be made here, or None."""
    if os.geteuid() != 0:
        return "the slow link needs root (network namespaces, tc)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"the slow link needs `{tool}` (iproute2)"
    name = f"optreg-probe-{os.getpid()}-{next(_count)}"
    r = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if r.returncode != 0:
        return f"network namespaces not allowed here: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None


def _run(*cmd: str) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip()}")


class SlowLink:
    """A link of `mbit` Mbit/s each way and `rtt_ms` round trip from `.address` to 127.0.0.1:`target_port`."""

    def __init__(self, target_port: int, mbit: float = 100.0, rtt_ms: float = 20.0):
        self.mbit, self.rtt_ms = mbit, rtt_ms
        base = f"optreg-slow-{os.getpid()}-{next(_count)}"
        self.ns = (base + "-a", base + "-b")
        self.relay = None
        try:
            self._make_link()
            self.relay = subprocess.Popen(
                [sys.executable, "-m", "bench.slowlink", self.ns[0], self.ns[1], "10.0.0.2", str(target_port),
                 str(rtt_ms / 2e3)], stdout=subprocess.PIPE, stdin=subprocess.PIPE, text=True,
                cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
            line = self.relay.stdout.readline()
            if not line.startswith("relay "):
                raise RuntimeError(f"slow-link relay did not start: {line!r}")
            self.address = f"127.0.0.1:{int(line.split()[1])}"
        except BaseException:
            self.close()
            raise

    def _make_link(self) -> None:
        a, b = self.ns
        for ns in self.ns:
            _run("ip", "netns", "add", ns)
        # made inside the namespaces: no interface or address ever in the caller's namespace
        _run("ip", "link", "add", "slow0", "netns", a, "type", "veth", "peer", "name", "slow1", "netns", b)
        burst = max(32 << 10, int(self.mbit * 1e6 / 8 / 250))  # at least one kernel tick's worth of bytes
        for ns, dev, ip in ((a, "slow0", "10.0.0.1/24"), (b, "slow1", "10.0.0.2/24")):
            _run("ip", "-n", ns, "addr", "add", ip, "dev", dev)
            _run("ip", "-n", ns, "link", "set", dev, "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")
            _run("tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", f"{self.mbit}mbit",
                 "burst", str(burst), "latency", "200ms")

    def close(self) -> None:
        if self.relay is not None and self.relay.poll() is None:
            self.relay.stdin.close()
            try:
                self.relay.wait(10)
            except subprocess.TimeoutExpired:
                self.relay.kill()
                self.relay.wait()
        if self.relay is not None:
            self.relay.stdout.close()
        for ns in self.ns:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# -- the relay process ----------------------------------------------------------
_libc = ctypes.CDLL(None, use_errno=True)


def _socket_in(ns_fd: int, root_fd: int) -> socket.socket:
    """A TCP socket of another namespace: setns is per thread, and a socket keeps the namespace it was made in."""
    if _libc.setns(ns_fd, CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "setns")
    try:
        return socket.socket()
    finally:
        _libc.setns(root_fd, CLONE_NEWNET)


def _pump(src: socket.socket, dst: socket.socket, delay: float) -> None:
    """src to dst, each chunk held `delay` seconds (a bounded queue: the link's back pressure reaches src)."""
    q: queue.Queue = queue.Queue(16)

    def write():
        while (item := q.get()) is not None:
            due, data = item
            if (wait := due - time.monotonic()) > 0:
                time.sleep(wait)
            try:
                dst.sendall(data)
            except OSError:
                break
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    if delay > 0:
        threading.Thread(target=write, daemon=True).start()
    while True:
        try:
            data = src.recv(CHUNK)
        except OSError:
            data = b""
        if delay > 0:
            q.put(None if not data else (time.monotonic() + delay, data))
        elif data:
            try:
                dst.sendall(data)
            except OSError:
                data = b""
        if not data:
            if delay <= 0:
                try:
                    dst.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
            return


def _splice(a: socket.socket, b: socket.socket, delay: float) -> None:
    for s in (a, b):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    threading.Thread(target=_pump, args=(a, b, delay), daemon=True).start()
    threading.Thread(target=_pump, args=(b, a, delay), daemon=True).start()


def _serve(listener: socket.socket, connect, delay: float) -> None:
    while True:
        conn, _ = listener.accept()
        try:
            far = connect()
        except OSError:
            conn.close()
            continue
        _splice(conn, far, delay)


def relay(ns_a: str, ns_b: str, far_ip: str, target_port: int, one_way: float) -> None:
    root = os.open("/proc/self/ns/net", os.O_RDONLY)
    a, b = (os.open(f"/var/run/netns/{n}", os.O_RDONLY) for n in (ns_a, ns_b))
    near = socket.socket()
    near.bind(("127.0.0.1", 0))
    near.listen(64)
    far = _socket_in(b, root)
    far.bind((far_ip, 0))
    far.listen(64)
    far_port = far.getsockname()[1]

    def across():  # namespace a to namespace b: the shaped veth
        s = _socket_in(a, root)
        s.connect((far_ip, far_port))
        return s

    def target():
        return socket.create_connection(("127.0.0.1", target_port))

    threading.Thread(target=_serve, args=(near, across, one_way), daemon=True).start()
    threading.Thread(target=_serve, args=(far, target, 0.0), daemon=True).start()
    print(f"relay {near.getsockname()[1]}", flush=True)
    sys.stdin.read()  # until the parent closes our stdin


if __name__ == "__main__":
    relay(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5]))
