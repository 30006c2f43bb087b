"""Shared fixtures: a real `optreg serve` process on a free loopback port."""
from __future__ import annotations

import io
import os
import pathlib
import resource
import subprocess
import sys
import tempfile

import pytest

from optreg.server.storage import memlog

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Tests live in folders by layer (tests/<layer>/); a few share fixtures across folders (test file names
# are unique), so every folder is importable whichever file pytest is given.
for _folder in sorted(p for p in (ROOT / "tests").iterdir() if p.is_dir() and p.name != "__pycache__"):
    if str(_folder) not in sys.path:
        sys.path.append(str(_folder))
SOURCE_ROOTS = [str(ROOT / d) for d in ("proto", "plugins", "server", "client", "app")]


class ServerProcess:
    """`python -m optreg.server serve --port 0 ...` in a child process; `.address` once it listens."""

    def __init__(self, *args: str, env: dict | None = None, nofile: int | None = None):
        """`nofile`: the child's descriptor limit (RLIMIT_NOFILE, soft and hard), as `ulimit -n` would set it."""
        full_env = dict(os.environ)
        # Never the user's ~/.local/share/optreg: a fresh data dir unless the test names one.
        self._tmp = tempfile.TemporaryDirectory(prefix="optreg-data-")
        full_env["OPTREG_DATA_DIR"] = self._tmp.name
        full_env.update(env or {})
        full_env["PYTHONPATH"] = os.pathsep.join(SOURCE_ROOTS + [full_env.get("PYTHONPATH", "")])
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "optreg.server", "serve", "--host", "127.0.0.1", "--port", "0",
             "--log-level", "warning", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env,
            preexec_fn=None if nofile is None else lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile)))
        line = self.proc.stdout.readline()
        if not line.startswith("optreg serving on "):
            self.proc.kill()
            raise RuntimeError(f"server did not start: {line!r} {self.proc.stderr.read()}")
        self.address = line.split()[-1]
        self.args = args

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
        finally:
            self._release()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self._release()

    def _release(self) -> None:
        """Close the pipes and remove the scratch data dir now, not when the garbage collector gets to it
        (its ResourceWarnings would land in whichever test runs then)."""
        for name in ("stdout", "stderr"):  # what is left stays readable, from memory
            f = getattr(self.proc, name)
            if f is not None and not isinstance(f, io.StringIO):
                rest = "" if f.closed else f.read()
                f.close()
                setattr(self.proc, name, io.StringIO(rest))
        memlog.remove(self._tmp.name)  # (a killed server's memory logs: the data dir goes)
        self._tmp.cleanup()


@pytest.fixture
def start_server():
    """Factory: start_server(*cli_args, env={...}) -> ServerProcess, stopped at teardown."""
    started = []

    def start(*args, env=None, nofile=None):
        s = ServerProcess(*args, env=env, nofile=nofile)
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()


@pytest.fixture
def slow_link():
    """Factory: slow_link(address_or_port, mbit=100, rtt_ms=20) -> bench.slowlink.SlowLink, whose `.address`
    reaches the target on loopback across a tbf-shaped veth pair between two namespaces and a delaying relay
    (issue 26); closed at teardown. Skips where namespaces or tc are not allowed."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from bench import slowlink
    if (why := slowlink.unavailable()) is not None:
        pytest.skip(why)
    made = []

    def make(target, mbit=100.0, rtt_ms=20.0):
        port = int(str(target).rsplit(":", 1)[-1])
        made.append(slowlink.SlowLink(port, mbit, rtt_ms))
        return made[-1]

    yield make
    for link in made:
        link.close()


@pytest.fixture(scope="module")
def server():
    s = ServerProcess()
    yield s
    s.stop()


@pytest.fixture
def client(server):
    from optreg.client import Client
    with Client(server.address, timeout=120) as c:
        yield c


# `pytest --quick`: a first check of the core promises in about three minutes on 2 cores (README), where
# the whole suite takes about fifteen. Whole files, so a file's shared server still starts once.
QUICK = {
    "test_service.py", "test_numerics.py", "test_book_dropin.py", "test_client_sessions.py", "test_fencing.py",
    "test_errors.py", "test_streaming.py", "test_small_step.py", "test_snapshot.py", "test_conformance.py",
    "test_shared_memory.py", "test_writer_lease.py", "test_client_errors.py", "test_torch_parity.py",
    "test_example_plugin.py", "test_generated.py", "test_client_transport.py", "test_telemetry.py",
    "test_hostile_numbers.py", "test_hostile_status.py", "test_lion.py",
}


def pytest_addoption(parser):
    parser.addoption("--quick", action="store_true",
                     help="run a quick subset (about 3 minutes on 2 cores): the core promises, end to end")


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--quick"):
        return
    keep = [item for item in items if item.path.name in QUICK]
    config.hook.pytest_deselected(items=[item for item in items if item.path.name not in QUICK])
    items[:] = keep
