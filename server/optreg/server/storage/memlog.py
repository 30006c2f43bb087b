"""Where `log` durability's memory logs live: a folder on a tmpfs (default /dev/shm) that outlives the
server process but not the machine, one per data directory.

The folder is named after the data directory (its real path and inode), so two data directories, and
so two servers (one per directory: datadir.py), never share one; DIR/memory-log is a symbolic link to
it, so the directory names its memory logs and whoever removes it can remove them too. A session's
memory logs are <folder>/<id>.wal and, while the disk catches up with it, <id>.wal.prev.
"""
from __future__ import annotations

import hashlib
import os
import pathlib

DEFAULT_BASE = "/dev/shm"
LINK = "memory-log"
MEMORY_FS = ("tmpfs", "ramfs")


def _fs_type(path: pathlib.Path) -> str:
    """The type of the file system holding `path`, from /proc/self/mounts ("" when unknown)."""
    best, kind = "", ""
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 3:
                    mount = fields[1].replace("\\040", " ")
                    if (str(path) == mount or str(path).startswith(mount.rstrip("/") + "/")) and len(mount) > len(best):
                        best, kind = mount, fields[2]
    except OSError:
        return ""
    return kind


def folder(root, base: str | None = DEFAULT_BASE) -> tuple[pathlib.Path | None, str, bool]:
    """(the memory-log folder of data directory `root`, created and linked as DIR/memory-log, "", lost) or
    (None, why not, False) when `base` is not a usable memory file system (then `log` writes to the disk as
    before). `lost`: DIR/memory-log named a folder that is gone (the machine restarted; a clean stop removes
    both). Folders of data directories that no longer link to them are removed on the way."""
    if not base:
        return None, "no memory-log folder given (--memory-log-dir '')", False
    root = pathlib.Path(root).resolve()
    base_path = pathlib.Path(base).resolve()
    kind = _fs_type(base_path)
    if kind not in MEMORY_FS:
        return None, f"{base} is not a memory file system ({kind or 'unknown'}; want {' or '.join(MEMORY_FS)})", False
    tag = hashlib.sha256(f"{root}\0{os.stat(root).st_ino}".encode()).hexdigest()[:16]
    path = base_path / f"optreg-{os.getuid()}-{tag}"
    link = root / LINK
    lost = link.is_symlink() and not path.is_dir()
    try:
        _remove_orphans(base_path)
        path.mkdir(mode=0o700, exist_ok=True)
        if not (link.is_symlink() and os.readlink(link) == str(path)):
            tmp = root / f".{LINK}.tmp"
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(path)
            os.replace(tmp, link)
        (path / OWNER).write_text(str(root))  # (after the link: _remove_orphans checks one against the other)
    except OSError as e:
        return None, f"{base} is not usable ({e})", False
    return path, "", lost


OWNER = ".data-dir"


def _remove_orphans(base: pathlib.Path) -> None:
    """Remove this user's memory-log folders whose data directory is gone or links elsewhere (deleted with
    the server killed, or moved): nothing can recover from them."""
    for p in base.glob(f"optreg-{os.getuid()}-*"):
        try:
            owner = (p / OWNER).read_text()
            if os.readlink(pathlib.Path(owner) / LINK) == str(p):
                continue
        except FileNotFoundError:
            if not (p / OWNER).exists():
                continue  # (being created) or not ours
        except OSError:
            continue
        _clear(p)


def _clear(p: pathlib.Path) -> None:
    for f in p.iterdir():
        f.unlink(missing_ok=True)
    try:
        p.rmdir()
    except OSError:
        pass


def remove(root) -> None:
    """Remove the memory-log folder DIR/memory-log names, and the link (a clean stop left it empty)."""
    link = pathlib.Path(root) / LINK
    try:
        target = pathlib.Path(os.readlink(link))
    except OSError:
        return
    if target.name.startswith("optreg-") and target.is_dir():
        _clear(target)
    link.unlink(missing_ok=True)


def allocated(path: pathlib.Path) -> int:
    """Bytes of memory a memory log holds (its pages, preallocated ones too); 0 when it is gone."""
    try:
        return os.stat(path).st_blocks * 512
    except OSError:
        return 0
