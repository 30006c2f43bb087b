"""Any model size: create, step and read over the streaming RPCs (a 128 MB float32 model)."""
import numpy as np

from optreg.client import _step_transport as client_mod


def test_large_model_create_step_read(client):
    n = 32 * 1024 * 1024  # 32M float32 = 128 MiB, above gRPC's and our unary limits
    rng = np.random.default_rng(0)
    params = {"big": rng.standard_normal(n, dtype=np.float32), "small": np.ones((3, 3), np.float32)}
    assert params["big"].nbytes > 120e6 > client_mod.STREAM_ABOVE_BYTES
    expected = params["big"].copy()
    s = client.create_session("sgd", params, lr=0.5)
    info = s.refresh()
    assert list(info.parameters.items()) == [("big", (n,)), ("small", (3, 3))]
    g = {"big": rng.standard_normal(n, dtype=np.float32), "small": np.ones((3, 3), np.float32)}
    s.step(g)
    expected -= np.float32(0.5) * g["big"]
    np.testing.assert_array_equal(params["big"], expected)
    back = s.read_parameters()
    np.testing.assert_array_equal(back["big"], expected)
    np.testing.assert_array_equal(back["small"], np.full((3, 3), 0.5, np.float32))
    _, p, slots = s.read_state()
    np.testing.assert_array_equal(p["big"], expected)
    assert slots == {}
    s.delete()


def test_streamed_state_roundtrip_restores_session(client):
    """ReadState over the stream, then CreateSession with that state, continues identically."""
    n = 1_000_000
    rng = np.random.default_rng(1)
    a = {"w": rng.standard_normal(n)}
    s = client.create_session("adam", a, lr=0.01)
    for _ in range(3):
        s.step({"w": rng.standard_normal(n)})
    info, params, slots = s.read_state()
    assert set(slots) == {"m", "v"} and info.step == 3
    b = {"w": params["w"].copy()}
    t = client.create_session("adam", b, state=slots, initial_step=info.step, **dict(info.hyperparameters))
    g = {"w": rng.standard_normal(n)}
    s.step(g)
    t.step(g)
    np.testing.assert_array_equal(a["w"], b["w"])
    assert t.step_count == 4
