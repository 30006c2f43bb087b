"""The shared-memory transport: a segment (a sealed memfd) holding a session's parameters and
gradient buffers, registered with a server on the same host; only names and offsets cross gRPC.
The server opens the segment through /proc/<this pid>/fd/<its descriptor>, which stays open while
this object lives; it is sealed so that it can never shrink (the server maps it).

Two modes. Plain: the server keeps its own master copy and writes the updated parameters into
the segment after each step. Resident: the segment IS the master copy -- the server moved the
session's parameters into it at registration and updates them there in place, so a step
copies nothing; the client must not write the parameters (they are the server's to change).
"""
from __future__ import annotations

import fcntl
import mmap
import os
import uuid
import weakref

import numpy as np

from optreg.client.errors import OptregError, UsageError
from optreg.v1 import session_pb2, tensors

_ALIGN = 64


def _layout(info, dtype: np.dtype) -> tuple[dict, int]:
    """name -> (parameter offset, gradient offset), each 64-byte aligned; and the segment's size."""
    offsets, pos = {}, 0
    for name, shape in info.parameters.items():
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        p_off = pos
        pos = -(-(pos + size) // _ALIGN) * _ALIGN
        offsets[name] = (p_off, pos)
        pos = -(-(pos + size) // _ALIGN) * _ALIGN
    return offsets, max(pos, _ALIGN)


def _new_segment(size: int) -> tuple[str, int, mmap.mmap]:
    """A memfd of `size` bytes, sealed against any change of size (what the server requires), and its mapping."""
    key = f"optreg-{uuid.uuid4().hex}"
    fd = os.memfd_create(key, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
        mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except BaseException:
        os.close(fd)
        raise
    return key, fd, mm


class SharedMemory:
    """The segment, its registration call (open while the segment is in use), and the step sender."""

    def __init__(self, session, key: str, fd: int, mm, size: int, params: dict, grads: dict, offsets: dict, call,
                 resident: bool = False):
        self.session, self.key, self.fd, self.mm, self.size = session, key, fd, mm, size
        self.params, self.grads, self.offsets, self.call = params, grads, offsets, call
        self.resident = resident
        # The descriptor is how the server finds the segment (register_again after a restart too); it is
        # closed with close() or when this object is collected. The memory goes with the last descriptor
        # and mapping, so nothing outlives both processes.
        self._close_fd = weakref.finalize(self, os.close, fd)
        code = tensors.to_code(session.info.master_dtype)
        self.code = code
        self._param_msgs = [session_pb2.SharedMemoryTensor(name=n, dtype=code, shape=a.shape,
                                                           byte_offset=offsets[n][0]) for n, a in params.items()]

    @classmethod
    def create(cls, session, resident: bool = False) -> "SharedMemory":
        info = session.info
        dtype = np.dtype(info.master_dtype)
        offsets, size = _layout(info, dtype)
        key, fd, mm = _new_segment(size)
        try:
            params, grads = {}, {}
            for name, shape in info.parameters.items():
                p_off, g_off = offsets[name]
                count = int(np.prod(shape, dtype=np.int64))
                params[name] = np.frombuffer(mm, dtype, count, p_off).reshape(shape)
                grads[name] = np.frombuffer(mm, dtype, count, g_off).reshape(shape)
            if not resident:  # resident: the server fills the parameters from its master copy
                current = session.arrays if all(n in session.arrays for n in info.parameters) \
                    else session.read_parameters()
                for name in info.parameters:
                    np.copyto(params[name], current[name], casting="unsafe")
            call, step = cls._register(session, key, fd, size, params, offsets, resident)
        except BaseException:
            os.close(fd)
            raise
        self = cls(session, key, fd, mm, size, params, grads, offsets, call, resident)
        session.arrays = dict(params)
        if resident:
            session.step_count = step
        return self

    @staticmethod
    def _register(session, key, fd, size, params, offsets, resident):
        code = tensors.to_code(session.info.master_dtype)
        places = [session_pb2.SharedMemoryTensor(name=n, dtype=code, shape=a.shape, byte_offset=offsets[n][0])
                  for n, a in params.items()] if resident else []
        # The registration lives while this call is open (no deadline); the first reply acknowledges it.
        call = session.client.transport.stream_out("RegisterSharedMemory", session_pb2.RegisterSharedMemoryRequest(
            session_id=session.id, key=key, byte_size=size, resident=resident, parameters=places, pid=os.getpid(),
            fd=fd), timeout=None)
        try:
            ack = next(call)
        except StopIteration:
            raise OptregError("the server ended the shared-memory registration without acknowledging it") from None
        return call, ack.step

    @property
    def alive(self) -> bool:
        """False once the registration's call has ended (the server stopped, say)."""
        return not self.call.done()

    def register_again(self) -> bool:
        """After the server restarted: register this segment again (resident: the server refills the parameters
        from its recovered session). False once close() gave the segment up."""
        if not self._close_fd.alive:
            return False
        self.call, step = self._register(self.session, self.key, self.fd, self.size, self.params, self.offsets,
                                         self.resident)
        if self.resident:
            self.session.step_count = step
        return True

    def send(self, session, grads, fence: int, hyperparameters, metrics, timeout):
        msgs = []
        for name, g in grads.items():
            buf = self.grads.get(name)
            if buf is None:
                raise UsageError(f"unknown gradient {name!r}; the session's parameters are: " + ", ".join(self.grads))
            if g is not buf:
                # The shape must match exactly, as over gRPC: copyto would broadcast a (1,) or () gradient
                # over the whole buffer and the server would then step with it.
                if np.shape(g) != buf.shape:
                    raise UsageError(f"gradient {name!r}: shape {list(np.shape(g))}, but the session's is "
                                     f"{list(buf.shape)}; the step was not applied")
                self._check_dtype(name, np.asarray(g).dtype, buf.dtype)
                np.copyto(buf, g)  # one local copy; nothing large crosses gRPC
            msgs.append(session_pb2.SharedMemoryTensor(name=name, dtype=self.code, shape=buf.shape,
                                                       byte_offset=self.offsets[name][1]))
        reply = session.client.transport.unary("StepSharedMemory", session_pb2.StepSharedMemoryRequest(
            session_id=session.id, step=fence, key=self.key, gradients=msgs,
            parameters=[] if self.resident else self._param_msgs,
            hyperparameters=hyperparameters, metrics=metrics), timeout=timeout, **session.step_headers())
        session.lr = reply.lr
        return reply.replayed, reply.step, {}

    @staticmethod
    def _check_dtype(name: str, dtype: np.dtype, master: np.dtype) -> None:
        """What Step accepts: the master dtype or a narrower float. copyto would also round a float64 into a
        float32 segment, or take integers, where a step over gRPC is refused."""
        try:
            tensors.to_code(dtype)
        except ValueError:
            wire = False
        else:
            wire = dtype.itemsize <= master.itemsize
        if not wire:
            raise UsageError(f"gradient {name!r}: dtype {dtype} is not accepted here; send {master} (the session's "
                             "master dtype) or a narrower float (float16, bfloat16); the step was not applied")

    def close(self, unregister: bool = True) -> None:
        if unregister:
            try:
                self.session.client.transport.unary("UnregisterSharedMemory", session_pb2.UnregisterSharedMemoryRequest(
                    session_id=self.session.id, key=self.key), timeout=self.session.client.timeout)
            except OptregError:
                pass  # cancelling the registration below releases it as well
        self.call.cancel()
        self._close_fd()
        # The mapping stays while arrays view it; it is unmapped when the last one is collected.
