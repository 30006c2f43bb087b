"""A small tmpfs to run out of space on (needs root: mount(2)); tests skip with the reason otherwise."""
from __future__ import annotations

import contextlib
import errno
import os
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


def fill(directory: pathlib.Path, leave: int = 0) -> pathlib.Path:
    """Fill the file system holding `directory` to the last byte, then free `leave` bytes."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        block, size = b"\0" * (1 << 20), 1 << 20
        while size:
            try:
                os.write(fd, block[:size])
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
                size //= 2
        if leave:
            os.ftruncate(fd, max(0, os.fstat(fd).st_size - leave))
    finally:
        os.close(fd)
    return filler
