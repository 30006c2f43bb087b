"""Issue 22's file findings (2, 3, 8, 9, 14): export files and data-directory snapshots as a hostile or clumsy
user hands them over.

- An `optreg sessions export` file is a checked snapshot file: a flipped bit anywhere, a file cut short,
  one that claims more than it holds or never ends (/dev/zero), crafted metadata or tensors are refused by
  `optreg sessions import` in one line (no traceback, exit 1) and nothing is created; a shape-[] parameter
  stays [].
- A data-directory snapshot whose checksums hold but whose metadata values are unusable (step 2**70, a
  durability or reply that does not exist, a malformed worker setup) costs only that session: DATA_LOSS
  naming its file, while ListSessions and `optreg sessions list` go on. Its tensors get CreateSession's
  domain check when loaded: NaN parameters or a negative v quarantine it; v = +inf loads.
"""
from __future__ import annotations

import json
import pathlib
import subprocess

import grpc
import numpy as np
import pytest

from cli_helpers import assert_one_line_error, optreg, optreg_command, optreg_env
from optreg.app import sessionfile
from optreg.client import Client
from optreg.client.errors import OptregError
from optreg.server.storage import snapshot
from optreg.v1 import session_pb2, session_pb2_grpc

PARAMS = {"s": np.float32(0.5).reshape(()), "W": np.arange(6, dtype=np.float32).reshape(2, 3)}


def _run_all(commands: list[tuple[str, list[str]]], timeout: float = 600) -> dict[str, subprocess.CompletedProcess]:
    """Each CLI command in its own process, all at once (each one's start-up is most of its time)."""
    env = optreg_env()
    procs = [(name, subprocess.Popen(optreg_command(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=env)) for name, args in commands]
    done = {}
    try:
        for name, p in procs:
            out, err = p.communicate(timeout=timeout)  # a hang guard: /dev/zero never ended before
            done[name] = subprocess.CompletedProcess(p.args, p.returncode, out, err)
    finally:
        for _, p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return done


def _flip(data: bytes, byte: int, bit: int) -> bytes:
    b = bytearray(data)
    b[byte] ^= 1 << bit
    return bytes(b)


def _crafted(good: pathlib.Path, tmp: pathlib.Path) -> dict[str, pathlib.Path]:
    """Files whose checksums are right (written by snapshot.write) but whose content is not a usable session."""
    meta, arrays = snapshot.read(good)
    out = {}

    def write(name, m=None, a=None):
        path = tmp / f"{name}.safetensors"
        snapshot.write(path, meta if m is None else m, arrays if a is None else a)
        out[name] = path

    write("missing-tensor", a={k: v for k, v in arrays.items() if k != "params/s"})  # main: KeyError 'params/s'
    write("step-2e70", m=dict(meta, step=2 ** 70))
    write("reply-unknown", m=dict(meta, reply="sometimes"))
    write("durability-unknown", m=dict(meta, durability="sometimes"))
    write("dtype-float16", m=dict(meta, master_dtype="float16"))
    write("shape-wrong", a=dict(arrays, **{"params/s": np.zeros(1, np.float32)}))
    write("dtype-wrong", a=dict(arrays, **{"params/W": arrays["params/W"].astype(np.int32)}))
    write("workers-malformed", m=dict(meta, workers={"workers": "three"}))
    write("hyperparameter-named-durability", m=dict(meta, hyperparameters={"durability": 1.0}))
    write("tensors-table-malformed", m=dict(meta, tensors={"params/s": "params"}))
    write("not-an-export", m={"hello": 1})
    return out


def _damaged(good: pathlib.Path, tmp: pathlib.Path) -> dict[str, pathlib.Path]:
    """Files flipped, cut, padded, endless or not files at all."""
    data = good.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    rng = np.random.default_rng(22)
    # single bit flips: 12 in the tensors' bytes, 4 in the header (among them digits of the step and of lr
    # in the metadata JSON, which stay valid JSON), and 2 in the header length
    flips = [(int(b), int(rng.integers(8))) for b in rng.integers(header_end, len(data), 12)]
    text = data[:header_end]
    flips += [(text.index(b'\\"step\\":') + 9, 0), (text.index(b'\\"lr\\":') + 7, 1),
              (int(rng.integers(8, header_end)), 3), (int(rng.integers(8, header_end)), 6), (0, 4), (1, 0)]
    files = {f"flip-{byte}-{bit}": _flip(data, byte, bit) for byte, bit in flips}
    files.update({
        "empty": b"",
        "garbage": bytes(range(256)) * 4,  # main: SafetensorError
        "header-length-huge": (1 << 40).to_bytes(8, "little") + data[8:],
        "truncated": data[:len(data) // 2],
        "longer": data + b"\0" * 64,
    })
    out = {}
    for name, content in files.items():
        out[name] = tmp / f"{name}.safetensors"
        out[name].write_bytes(content)
    out["dev-zero"] = pathlib.Path("/dev/zero")  # main: read forever
    out["directory"] = tmp
    return out


def _export_source(c, address, tmp_path):
    src = c.create_session("adam", {k: v.copy() for k, v in PARAMS.items()}, session_id="src")
    for _ in range(3):
        src.step({"s": np.float32(0.25).reshape(()), "W": np.ones((2, 3), np.float32)})
    good = tmp_path / "src.safetensors"
    done = optreg("sessions", "export", "src", str(good), "--address", address)
    assert done.returncode == 0, done.stderr
    return src, good


def _import_all(address, files: dict[str, pathlib.Path], extra=()) -> dict[str, subprocess.CompletedProcess]:
    commands = [(name, ["sessions", "import", str(path), "--session-id", f"bad-{i}", "--address", address])
                for i, (name, path) in enumerate(sorted(files.items()))]
    return _run_all(list(extra) + commands)


def test_import_refuses_damaged_files_in_one_line_and_keeps_shapes(start_server, tmp_path):
    s = start_server("--memory-only")
    with Client(s.address, timeout=60) as c:
        src, good = _export_source(c, s.address, tmp_path)
        results = _import_all(s.address, _damaged(good, tmp_path),
                              [("good", ["sessions", "import", str(good), "--session-id", "copy", "--address",
                                         s.address])])
        good_run = results.pop("good")
        assert good_run.returncode == 0, good_run.stderr
        for name, done in results.items():
            assert_one_line_error(done, "optreg sessions import")
        assert sorted(i.session_id for i in c.list_sessions()) == ["copy", "src"]

        # The copy is the session: the scalar stays a scalar, and resume=True with the original arrays attaches.
        assert dict(c.get_session("copy").parameters) == {"s": (), "W": (2, 3)}
        a, b = src.read_state(), c.session("copy").read_state()
        for name in PARAMS:
            assert a.parameters[name].tobytes() == b.parameters[name].tobytes()
            for slot in a.state:
                assert a.state[slot][name].tobytes() == b.state[slot][name].tobytes()
        resumed = c.create_session("adam", {k: v.copy() for k, v in PARAMS.items()}, session_id="copy", resume=True)
        assert resumed.info.step == 3


def test_import_refuses_crafted_files_with_valid_checksums_in_one_line(start_server, tmp_path):
    s = start_server("--memory-only")
    with Client(s.address, timeout=60) as c:
        _, good = _export_source(c, s.address, tmp_path)
        for name, done in _import_all(s.address, _crafted(good, tmp_path)).items():
            line = assert_one_line_error(done, "optreg sessions import")
            assert name != "step-2e70" or "step" in line, line
        assert [i.session_id for i in c.list_sessions()] == ["src"]


def test_every_bit_flip_of_an_export_file_is_refused(start_server, tmp_path):
    """The reader's checks alone, exhaustively: one bit of every byte of a small file."""
    s = start_server("--memory-only")
    with Client(s.address, timeout=60) as c:
        sess = c.create_session("adam", {k: v.copy() for k, v in PARAMS.items()}, session_id="f")
        sess.step({"s": np.float32(1).reshape(()), "W": np.ones((2, 3), np.float32)})
        st = sess.read_state()
    good = tmp_path / "f.safetensors"
    sessionfile.write(good, st.info, st.parameters, st.state)
    meta, params, _ = sessionfile.read(good)
    assert meta["step"] == 1 and params["s"].shape == ()
    data = good.read_bytes()
    bad = tmp_path / "bad.safetensors"
    accepted = []
    for byte in range(len(data)):
        bad.write_bytes(_flip(data, byte, byte % 8))
        try:
            sessionfile.read(bad)
            accepted.append(byte)
        except ValueError:
            pass
    assert accepted == []


# -- the data directory --------------------------------------------------------------------------------
def _rewrite(path: pathlib.Path, meta_change=None, array_change=None) -> None:
    """The snapshot with its metadata or tensors changed and every checksum recomputed."""
    meta, arrays = snapshot.read(path)
    if meta_change:
        meta = dict(meta, **meta_change)
    if array_change:
        array_change(arrays)
    snapshot.write(path, meta, arrays)


def test_snapshots_with_unusable_values_quarantine_only_their_session(start_server, tmp_path):
    data = tmp_path / "data"
    s = start_server("--data-dir", str(data))
    bad_meta = {"step-2e70": {"step": 2 ** 70}, "durability": {"durability": "sometimes"},
                "reply": {"reply": "sometimes"}, "workers": {"workers": {"workers": 2, "mode": 7}},
                "slots": {"slots": ["m"]}, "hyperparameters": {"hyperparameters": {"lr": -1.0}}}

    def nan_param(a):
        a["params/w"][1] = np.nan

    def negative_v(a):
        a["state/v/w"][2] = -1.0

    def inf_v(a):
        a["state/v/w"][0] = np.inf
    bad_arrays = {"nan-param": nan_param, "negative-v": negative_v}
    with Client(s.address, timeout=60) as c:
        for sid in ["good", "inf-v", *bad_meta, *bad_arrays]:
            c.create_session("adam", {"w": np.ones(4, np.float32)}, session_id=sid).step({"w": np.ones(4, np.float32)})
    s.stop()
    snaps = data / "sessions"
    for sid, change in bad_meta.items():
        _rewrite(snaps / f"{sid}.safetensors", meta_change=change)
    for sid, change in bad_arrays.items():
        _rewrite(snaps / f"{sid}.safetensors", array_change=change)
    _rewrite(snaps / "inf-v.safetensors", array_change=inf_v)

    s = start_server("--data-dir", str(data))
    stub = session_pb2_grpc.SessionServiceStub(grpc.insecure_channel(s.address))
    listed = {i.session_id for i in stub.ListSessions(session_pb2.ListSessionsRequest(), timeout=60).sessions}
    assert {"good", "inf-v", *bad_arrays} <= listed and not listed & set(bad_meta), listed
    for sid in bad_meta:
        with pytest.raises(grpc.RpcError) as e:
            stub.GetSession(session_pb2.GetSessionRequest(session_id=sid), timeout=60)
        assert e.value.code() == grpc.StatusCode.DATA_LOSS, (sid, e.value.details())
        assert f"{sid}.safetensors" in e.value.details() and "metadata" in e.value.details(), e.value.details()
    with Client(s.address, timeout=60) as c:
        for sid in bad_arrays:
            with pytest.raises(OptregError) as e:
                c.session(sid).read_state()
            assert e.value.code == grpc.StatusCode.DATA_LOSS and f"{sid}.safetensors" in e.value.details, \
                e.value.details
        assert np.isposinf(c.session("inf-v").read_state().state["v"]["w"][0])  # in the domain: it loads
        assert c.session("good").step({"w": np.ones(4, np.float32)}).step == 2
    done = optreg("sessions", "list", "--json", "--address", s.address)
    assert done.returncode == 0, done.stderr
    assert {r["session_id"] for r in json.loads(done.stdout)} == listed
