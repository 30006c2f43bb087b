"""A small tmpfs to run out of space on (needs root: mount(2)); tests skip with the reason otherwise."""
from __future__ import annotations

import contextlib
import pathlib
import subprocess
import tempfile

import pytest


@contextlib.contextmanager
def small_tmpfs(size: str = "1m"):
    d = pathlib.Path(tempfile.mkdtemp(prefix="optreg-tmpfs-"))
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        d.rmdir()
        pytest.skip(f"cannot mount a small tmpfs to fill (needs root): {r.stderr.strip() or r.returncode}")
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)
        d.rmdir()
