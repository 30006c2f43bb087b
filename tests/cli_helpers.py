"""Running the `optreg` command as a user does: a child process, its exit code and its two streams."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

from conftest import SOURCE_ROOTS


def optreg_env(**extra) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(SOURCE_ROOTS + [env.get("PYTHONPATH", "")])
    for key in ("OPTREG_ADDRESS", "OPTREG_TOKEN"):  # the test decides
        env.pop(key, None)
    env.update(extra)
    return env


def optreg_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "optreg.app", *args]


def optreg(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(optreg_command(*args), capture_output=True, text=True, env=env or optreg_env(),
                          timeout=timeout)


def assert_one_line_error(done: subprocess.CompletedProcess, *words: str) -> str:
    """Non-zero exit, exactly one line on stderr, no traceback; the line contains every word given."""
    lines = done.stderr.splitlines()
    assert done.returncode != 0, (done.args, done.stdout, done.stderr)
    assert len(lines) == 1, (done.args, done.stderr)
    assert "Traceback" not in done.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def free_port() -> int:
    """A port nothing listens on (bound and released: connecting to it is refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
