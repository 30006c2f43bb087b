"""Sessions through a real server: get-or-create (resume=True) and its checks, keep=, typed
results, a server that stops mid-run, and a run that continues across a server restart."""
from __future__ import annotations

import datetime
import threading
import time

import numpy as np
import pytest

from optreg.client import (Client, NotFound, RetryPolicy, SessionInfo, SessionState, StepResult, Unavailable,
                           UsageError)


def test_resume_attaches_to_the_existing_session_and_fills_the_arrays(client):
    p = {"W": np.ones((2, 3)), "b": np.zeros(3)}
    s = client.create_session("momentum", p, lr=0.1, session_id="resume-me", resume=True)  # none yet: created
    assert not s.resumed and s.step_count == 0
    s.step({"W": np.ones((2, 3)), "b": np.ones(3)})
    s.step({"W": np.ones((2, 3)), "b": np.ones(3)})
    fresh = {"W": np.zeros((2, 3)), "b": np.zeros(3)}
    again = client.create_session("momentum", fresh, lr=0.5, session_id="resume-me", resume=True)
    assert again.resumed and again.step_count == 2 and again.info.hyperparameters["lr"] == 0.1  # the session's
    np.testing.assert_array_equal(fresh["W"], p["W"])
    np.testing.assert_array_equal(fresh["b"], p["b"])
    again.step({"W": np.ones((2, 3)), "b": np.ones(3)})
    s.refresh()
    s.step({"W": np.ones((2, 3)), "b": np.ones(3)})  # both objects step the same session, fenced
    assert s.step_count == 4
    s.delete()


@pytest.mark.parametrize("optimizer,params,kw,words", [
    ("adam", {"W": np.zeros((2, 3)), "b": np.zeros(3)}, {}, "its optimizer is 'sgd', not 'adam'"),
    ("sgd", {"W": np.zeros((2, 3))}, {}, "parameter 'b' missing"),
    ("sgd", {"W": np.zeros((2, 3)), "b": np.zeros(3), "c": np.zeros(1)}, {}, "no parameter 'c'"),
    ("sgd", {"W": np.zeros((3, 2)), "b": np.zeros(3)}, {}, "'W' has shape (2, 3) there, (3, 2) here"),
    ("sgd", {"W": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32)}, {}, "float64, not float32"),
    ("sgd", {"W": np.zeros((2, 3)), "b": np.zeros(3)}, {"master_dtype": "float32"}, "float64, not float32"),
])
def test_resume_refuses_a_session_that_does_not_match(client, optimizer, params, kw, words):
    sid = f"mismatch-{optimizer}-{len(params)}-{'-'.join(map(str, params['W'].shape))}-{params['W'].dtype}-{len(kw)}"
    client.create_session("sgd", {"W": np.ones((2, 3)), "b": np.ones(3)}, session_id=sid)
    before = {k: v.copy() for k, v in params.items()}
    with pytest.raises(UsageError, match=f"cannot resume session '{sid}'.*{words}".replace("(", r"\(").replace(
            ")", r"\)")):
        client.create_session(optimizer, params, session_id=sid, resume=True, **kw)
    for k in params:
        np.testing.assert_array_equal(params[k], before[k])  # untouched
    assert client.get_session(sid).step == 0
    client.delete_session(sid)


def test_keep_says_what_leaving_the_block_does(client):
    with client.create_session("sgd", {"w": np.zeros(2)}, session_id="kept") as s:  # default keep=True
        s.step({"w": np.ones(2)})
    assert client.get_session("kept").step == 1
    with client.session("kept", keep=False) as s:
        assert s.arrays["w"].tolist() == [-0.01, -0.01]
    with pytest.raises(NotFound):
        client.get_session("kept")
    for raised, exists in ((True, True), (False, False)):
        try:
            with client.create_session("sgd", {"w": np.zeros(2)}, session_id=f"on-error-{raised}", keep="on-error"):
                if raised:
                    raise KeyError("interrupted")
        except KeyError:
            pass
        assert any(i.session_id == f"on-error-{raised}" for i in client.list_sessions()) is exists
    with pytest.raises(UsageError, match="keep="):
        client.session("x", keep="sometimes")


def test_results_are_small_typed_objects(client):
    p = {"W": np.zeros((4, 5), np.float32)}
    s = client.create_session("adam", p, step_reply="delta", durability="none", session_id="typed")
    r = s.step({"W": np.ones((4, 5), np.float32)}, hyperparameters={"lr": 0.01}, metrics={"loss": 0.5})
    assert isinstance(r, StepResult) and (r.step, r.replayed) == (1, False) and r.arrays["W"] is p["W"]
    info = client.get_session("typed")
    assert isinstance(info, SessionInfo) and info == client.list_sessions()[[i.session_id for i in
                                                                              client.list_sessions()].index("typed")]
    assert (info.optimizer, info.step, info.master_dtype, info.step_reply, info.durability) == \
        ("adam", 1, "float32", "delta", "none")
    assert info.parameters == {"W": (4, 5)} and info.slots == ("m", "v") and info.size_bytes == 3 * 20 * 4
    assert info.created_at.tzinfo == datetime.timezone.utc and info.last_used_at >= info.created_at
    with pytest.raises(AttributeError):
        info.step = 2  # frozen
    state = s.read_state()
    assert isinstance(state, SessionState) and state.info.step == 1 and set(state.state) == {"m", "v"}
    restored = client.create_session("adam", state.parameters, state=state.state, initial_step=state.info.step,
                                     **state.info.hyperparameters)
    assert restored.info.step == 1 and restored.info.hyperparameters == info.hyperparameters
    names = {o.name: o for o in client.optimizers()}
    lr = {h.name: h for h in names["adam"].hyperparameters}["lr"]
    assert (lr.type, lr.default, lr.minimum) == ("float", 0.001, 0.0) and names["adam"].slots[0].name == "m"
    # each slot's layout (contract v2), so a client in any language can size and read ReadState's arrays
    layout = {o: {sl.name: (sl.shape, sl.dtype, sl.domain) for sl in names[o].slots}
              for o in ("adam", "torch.adafactor", "adamw-bf16", "schedulefree.adamw")}
    assert layout["adam"] == {"m": ("same", "", "real"), "v": ("same", "", "nonnegative")}
    assert layout["torch.adafactor"]["row_var"][0] == "rows" and layout["torch.adafactor"]["col_var"][0] == "columns"
    assert layout["adamw-bf16"]["m"] == ("same", "bfloat16", "real")
    assert layout["schedulefree.adamw"]["weight_sum"] == ("scalar", "float64", "nonnegative")
    assert client.plugin_failures() == []
    s.delete()
    restored.delete()


def test_a_server_that_stops_mid_run_gives_unavailable_after_the_retry_window(start_server):
    srv = start_server("--memory-only")
    with Client(srv.address, timeout=60, retry=RetryPolicy(total_seconds=1.0)) as c:
        p = {"w": np.zeros(3)}
        s = c.create_session("sgd", p, lr=1.0)
        s.step({"w": np.ones(3)})
        srv.kill()
        t0 = time.monotonic()
        with pytest.raises(Unavailable, match="attempts in") as e:
            s.step({"w": np.ones(3)})
        elapsed = time.monotonic() - t0
        # Unavailable, not DeadlineExceeded: it did not wait out the 60 s timeout (as steps once did).
        print(f"Unavailable after {elapsed:.2f} s (retry window 1.0 s): {e.value}")
        assert s.step_count == 1 and p["w"].tolist() == [-1.0, -1.0, -1.0]


def test_a_step_continues_the_same_session_across_a_server_restart(start_server, tmp_path):
    data = tmp_path / "data"
    srv = start_server("--data-dir", str(data))
    port = srv.address.rsplit(":", 1)[1]
    reference = {"w": np.zeros(4)}
    velocity = np.zeros(4)

    def momentum(g):  # the book's Momentum, lr 0.1, momentum 0.9
        nonlocal velocity
        velocity = 0.9 * velocity - 0.1 * g
        reference["w"] += velocity

    grads = [np.arange(4.0) + i for i in range(6)]
    with Client(srv.address, retry=RetryPolicy(total_seconds=60)) as c:
        p = {"w": np.zeros(4)}
        s = c.create_session("momentum", p, lr=0.1, session_id="across", durability="every-step")
        for g in grads[:3]:
            s.step({"w": g})
            momentum(g)
        assert srv.stop() == 0
        restarted = []
        threading.Timer(0.5, lambda: restarted.append(start_server("--data-dir", str(data), "--port", port))).start()
        s.step({"w": grads[3]})  # retried with the same step number until the restarted server answers
        momentum(grads[3])
        assert restarted and s.step_count == 4
        np.testing.assert_allclose(p["w"], reference["w"], rtol=1e-12)
    # A new program resumes it by id and goes on where it stopped.
    with Client(restarted[0].address) as c:
        q = {"w": np.zeros(4)}
        s = c.create_session("momentum", q, lr=0.1, session_id="across", resume=True)
        assert s.resumed and s.step_count == 4
        for g in grads[4:]:
            s.step({"w": g})
            momentum(g)
        np.testing.assert_allclose(q["w"], reference["w"], rtol=1e-12)
        s.delete()


def test_wait_for_ready_waits_for_a_server_that_is_not_up_yet(start_server):
    import socket
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    started = []
    with Client(f"127.0.0.1:{port}", wait_for_ready=True, timeout=60, retry=RetryPolicy(total_seconds=0)) as c:
        threading.Timer(0.5, lambda: started.append(start_server("--memory-only", "--port", str(port)))).start()
        assert c.list_sessions() == []  # waited for the server instead of failing at once
        assert started


@pytest.mark.parametrize("path", ["unary", "stream", "shared memory"])
def test_a_steps_hyperparameters_apply_from_that_step_on_every_path(client, path):
    n = 700_000 if path == "stream" else 10  # 2.8 MB goes over StepStream
    p = {"w": np.zeros(n, np.float32)}
    s = client.create_session("sgd", p, lr=0.1)
    if path == "shared memory":
        p = s.enable_shared_memory()
    s.step({"w": np.ones(n, np.float32)})
    s.step({"w": np.ones(n, np.float32)}, hyperparameters={"lr": 0.5}, metrics={"loss": 1.0})
    s.step({"w": np.ones(n, np.float32)})
    np.testing.assert_allclose(s.arrays["w"][[0, -1]], np.float32(-0.1) - 0.5 - 0.5, rtol=1e-6)
    assert s.refresh().hyperparameters["lr"] == 0.5
    s.delete()
