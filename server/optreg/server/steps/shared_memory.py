"""Same-host shared memory: segments a client registers for a session, read and written in place.

A segment is a Linux memfd that the client created and mapped; the server opens it through
/proc/<client pid>/fd/<fd> and maps it too. A step then passes only names and byte offsets over
gRPC: the server reads the gradients from the segment and writes the updated parameters back
into it, so the client's arrays that live there change with no copy on the wire.

Why a sealed memfd: the server reads the segment through its mapping, and a page cut off by a
truncation kills the reader with SIGBUS -- a /dev/shm file's creator could take the whole server
down that way. A memfd sealed with F_SEAL_SHRINK can never shrink again (seals are irrevocable
and belong to the file, so checking them on the server's own descriptor cannot race), and that
is the only kind of segment registered.

Life cycle: a registration lives as long as its RegisterSharedMemory call (a server
stream the client keeps open). When that call ends for any reason -- the client
cancels it, its process dies and the connection drops, UnregisterSharedMemory, the
session is deleted, the server stops -- the server unmaps the segment; the memory goes with
the last descriptor and mapping, so a client killed with SIGKILL leaks nothing.

Locking: a region's lock is taken before its session's lock (steps, release); the
registry's lock only guards the index.

Resident registrations (resident.py) hold the session's master parameters themselves; the
release copies them back into the server's memory before the segment is unmapped.
"""
from __future__ import annotations

import fcntl
import ipaddress
import logging
import mmap
import os
import re
import threading
import urllib.parse

import numpy as np

from optreg.server.model.errors import (AlreadyExists, FailedPrecondition, InvalidArgument, NotFound,
                                  PermissionDenied, ResourceExhausted, shown)
from optreg.v1 import tensors

log = logging.getLogger("optreg.server.steps.shared_memory")

KEY_RE = re.compile(r"^optreg-[A-Za-z0-9_-]{8,200}$")


def is_local_peer(peer: str) -> bool:
    """gRPC's peer string ("ipv4:127.0.0.1:5", "ipv6:%5B::1%5D:5" quoted, "unix:...") names this host's loopback."""
    kind, _, rest = urllib.parse.unquote(peer).partition(":")
    if kind == "unix":
        return True
    host = rest.rpartition(":")[0].strip("[]")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return (getattr(ip, "ipv4_mapped", None) or ip).is_loopback


class Region:
    def __init__(self, key: str, session_id: str, owner: str, mm: mmap.mmap, size: int):
        self.key, self.session_id, self.owner = key, session_id, owner
        self.mm, self.size = mm, size
        self.lock = threading.Lock()
        self.closed = threading.Event()
        self.resident = None  # the session whose parameters live here (resident.py)
        self.detach = None  # called with the reason before the segment is unmapped (resident.detach)
        self.param_spans: list[tuple[int, int]] = []  # resident: the parameters' byte ranges

    def view(self, byte_offset: int, dtype: np.dtype, shape: tuple) -> np.ndarray:
        """An array over [byte_offset, +nbytes) of the segment; bounds and alignment already checked."""
        count = int(np.prod(shape, dtype=np.int64))
        return np.frombuffer(self.mm, dtype=dtype, count=count, offset=byte_offset).reshape(shape)


class SharedMemoryRegistry:
    def __init__(self, max_regions: int = 4):
        self.max_regions = max_regions  # each registration holds one server thread while it lives
        self._regions: dict[str, Region] = {}
        self._lock = threading.Lock()

    def __len__(self):
        return len(self._regions)

    def register(self, key: str, byte_size: int, session_id: str, owner: str, pid: int = 0, fd: int = -1) -> Region:
        if not KEY_RE.match(key):
            raise InvalidArgument(f"shared-memory key {shown(key)}: use 'optreg-' followed by 8-200 letters, digits, "
                                  "'_' or '-' (the memfd's name)")
        if byte_size < 0:
            raise InvalidArgument(f"byte_size {byte_size} is negative")
        if pid <= 0 or fd < 0:
            raise FailedPrecondition(f"shared-memory segment {shown(key)}: set pid and fd to a sealed memfd the client "
                                     "holds (a /dev/shm file can be shrunk under the server, so it is not taken)")
        with self._lock:
            if key in self._regions:
                raise AlreadyExists(f"shared-memory segment {shown(key)} is already "
                                    "registered; create a new segment for each registration")
            if len(self._regions) >= self.max_regions:
                raise ResourceExhausted(f"this server holds {self.max_regions} shared-memory registrations, its limit "
                                        "(each keeps a server thread); unregister one or use Step")
            mm, size = _map_sealed(key, byte_size, pid, fd)
            region = Region(key, session_id, owner, mm, size)
            self._regions[key] = region
        log.info("session %s: shared-memory segment %s registered (%d bytes)", session_id, key, size,
                 extra={"session_id": session_id})
        return region

    def get(self, key: str, session_id: str, owner: str) -> Region:
        region = self._regions.get(key)
        if region is None or region.session_id != session_id or region.owner != owner:
            raise FailedPrecondition(f"shared-memory segment {shown(key)} is not registered for session {shown(session_id)}: "
                               "call RegisterSharedMemory first (and keep its call open)")
        return region

    def release(self, region: Region, why: str = "") -> bool:
        """Unmap the segment; idempotent. Waits for a step using it to finish."""
        with self._lock:
            if self._regions.get(region.key) is not region:
                return False
            del self._regions[region.key]
        with region.lock:
            region.closed.set()
            keep = False
            if region.detach is not None:
                try:
                    keep = region.detach(why)
                except Exception:  # the session's parameters could not be copied back: it is unusable
                    log.exception("shared-memory segment %s: the resident parameters could not be copied back",
                                  region.key)
                    if region.resident is not None:
                        region.resident.quarantined = "its resident parameters could not be copied back"
                region.detach = None
            try:
                if not keep:
                    region.mm.close()
            except BufferError:  # a view is still referenced somewhere: unmapped when it is collected
                log.warning("shared-memory segment %s still referenced; unmapped later", region.key)
            # Kept: the session's parameters live in the mapping until they are replaced, and their arrays
            # hold it; without this reference it is unmapped with them (a deleted session's at once).
            region.mm = None
        log.info("session %s: shared-memory segment %s released%s", region.session_id, region.key,
                 f" ({why})" if why else "", extra={"session_id": region.session_id})
        return True

    def release_session(self, session_id: str) -> None:
        with self._lock:
            regions = [r for r in self._regions.values() if r.session_id == session_id]
        for r in regions:
            self.release(r, "session deleted")

    def close_all(self) -> None:
        with self._lock:
            regions = list(self._regions.values())
        for r in regions:
            self.release(r, "server stopping")


def _map_sealed(key: str, byte_size: int, pid: int, fd: int) -> tuple[mmap.mmap, int]:
    """Map descriptor `fd` of process `pid`: the memfd named `key`, sealed against shrinking."""
    path = f"/proc/{pid}/fd/{fd}"
    try:
        own = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotFound(f"no descriptor {fd} in process {pid}: is the client on the server's host, and does it keep "
                       "the segment's memfd open?") from None
    except OSError as e:
        raise PermissionDenied(f"cannot open {path}: {e.strerror} (the client must run as the server's user)") from None
    try:  # every check on the server's own descriptor: what the client does to its own cannot change them
        if os.readlink(f"/proc/self/fd/{own}") != f"/memfd:{key} (deleted)":
            raise FailedPrecondition(f"descriptor {fd} of process {pid} is not the memfd named {shown(key)}: create "
                                     "the segment with memfd_create(key, MFD_ALLOW_SEALING)")
        try:
            seals = fcntl.fcntl(own, fcntl.F_GET_SEALS)
        except OSError:
            seals = 0
        if not seals & fcntl.F_SEAL_SHRINK:
            raise FailedPrecondition(f"shared-memory segment {shown(key)} is not sealed against shrinking: add "
                                     "F_SEAL_SHRINK (fcntl F_ADD_SEALS) before registering")
        st = os.fstat(own)
        size = byte_size or st.st_size
        if size <= 0 or size > st.st_size:
            raise InvalidArgument(f"byte_size {byte_size}, but segment {shown(key)} has {st.st_size} bytes")
        try:
            return mmap.mmap(own, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE), size
        except OSError as e:  # F_SEAL_WRITE or F_SEAL_FUTURE_WRITE
            raise FailedPrecondition(f"shared-memory segment {shown(key)} cannot be mapped for writing "
                                     f"({e.strerror}): leave out the write seals") from None
    finally:
        os.close(own)


class SegmentTensor:
    """A tensor in a registered segment, shaped like a wire Tensor (name, dtype, shape, offset, data) so the
    step's one tensor check (tensors.ChunkTracker) takes it as it takes any source's."""
    __slots__ = ("name", "dtype", "shape", "offset", "data", "byte_offset")

    def __init__(self, name, dtype, shape, data, byte_offset=0):
        self.name, self.dtype, self.shape, self.offset, self.data = name, dtype, shape, 0, data
        self.byte_offset = byte_offset


def tensors_in(region: Region, items, master_code: int, what: str) -> list[SegmentTensor]:
    """SharedMemoryTensors as views of the segment, each inside its bounds and aligned; names, dtypes and
    shapes are the ChunkTracker's to check."""
    try:
        whole = memoryview(region.mm)  # None or closed: released meanwhile
    except (TypeError, ValueError):
        raise FailedPrecondition(f"shared-memory segment {shown(region.key)} was unregistered") from None
    out = []
    for t in items:
        code = t.dtype or master_code
        itemsize = tensors.numpy_dtype(code).itemsize
        nbytes = tensors.element_count(tuple(t.shape), f"{what} {shown(t.name)}") * itemsize
        off = t.byte_offset
        if off < 0 or off + nbytes > region.size:
            raise InvalidArgument(f"{what} {shown(t.name)}: bytes [{off}, {off + nbytes}) lie outside segment "
                                  f"{shown(region.key)} of {region.size} bytes")
        if off % itemsize:
            raise InvalidArgument(f"{what} {shown(t.name)}: byte_offset {off} is not a multiple of the dtype's "
                                  f"{itemsize} bytes")
        out.append(SegmentTensor(t.name, code, tuple(t.shape), whole[off:off + nbytes], off))
    return out
