"""The example third-party packages (examples/optreg-lion, examples/optreg-8bit), installed by the test command,
through a real server."""
import importlib.metadata
import os

import numpy as np
import pytest

from conftest import ROOT
from optreg.client import Client, InvalidArgument
from test_slot_layouts import same_bits


def test_lion_listed_and_stepping(server):
    pytest.importorskip("optreg_lion", reason="pip install -e examples/optreg-lion (the README's test command does)")
    with Client(server.address) as c:
        found = {o.name: o for o in c.optimizers()}
        assert found["lion"].distribution == "optreg-lion" and found["lion"].plugin == "lion"
        rng = np.random.default_rng(0)
        p = {"w": rng.standard_normal((5, 7))}
        ref_p, m = p["w"].copy(), np.zeros((5, 7))
        lr, b1, b2, wd = 1e-3, 0.9, 0.99, 0.1
        s = c.create_session("lion", p, lr=lr, beta1=b1, beta2=b2, weight_decay=wd)
        for _ in range(20):
            g = rng.standard_normal((5, 7))
            # Chen et al. 2023, Algorithm 2, written plainly
            update = np.sign(b1 * m + (1 - b1) * g)
            ref_p = ref_p - lr * (update + wd * ref_p)
            m = b2 * m + (1 - b2) * g
            s.step({"w": g})
        np.testing.assert_allclose(p["w"], ref_p, rtol=1e-12, atol=1e-15)


# ---- examples/optreg-8bit: 8-bit AdamW (uint8 codes, a float32 scale per block of 256) --------------------

EXAMPLES = {"optreg-8bit": ("optreg_8bit", "adamw8bit"), "optreg-shampoo": ("optreg_shampoo", "shampoo")}


@pytest.fixture(scope="module")
def eight_bit_env(tmp_path_factory):
    """The server's environment with the contract v2 examples installed: what `pip install -e
    examples/optreg-8bit -e examples/optreg-shampoo` (the README's test command) leaves, a dist-info naming
    the entry point and the package's folder on the path, written into a scratch folder instead of the
    shared environment for those not installed there."""
    site, paths = tmp_path_factory.mktemp("site"), []
    for dist, (module, plugin) in EXAMPLES.items():
        try:
            importlib.metadata.distribution(dist)
            continue
        except importlib.metadata.PackageNotFoundError:
            pass
        info = site / f"{dist.replace('-', '_')}-0.1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1.0\n")
        (info / "entry_points.txt").write_text(f"[optreg]\n{plugin} = {module}\n")
        paths.append(str(ROOT / "examples" / dist))
    return {"PYTHONPATH": os.pathsep.join([str(site), *paths, os.environ.get("PYTHONPATH", "")])}


def eight_bit_params():
    rng = np.random.default_rng(0)
    return {"W": rng.standard_normal((300, 10)).astype(np.float32), "b": rng.standard_normal(5).astype(np.float32)}


def eight_bit_grads(i):
    rng = np.random.default_rng(50 + i)
    return {"W": (rng.standard_normal((300, 10)) * rng.uniform(0.01, 3, (300, 1))).astype(np.float32),
            "b": rng.standard_normal(5).astype(np.float32)}


def test_8bit_adamw_steps_its_codes_over_a_server(start_server, eight_bit_env):
    from optreg.plugins.testing import new_state
    from optreg_8bit import ADAMW_8BIT

    srv = start_server("--memory-only", env=eight_bit_env)
    with Client(srv.address) as c:
        found = {o.name: o for o in c.optimizers()}
        assert found["adamw-8bit"].distribution == "optreg-8bit" and found["adamw-8bit"].plugin == "adamw8bit"
        assert {(sl.name, sl.shape, sl.dtype) for sl in found["adamw-8bit"].slots} == {
            ("m", "same", "uint8"), ("v", "same", "uint8"), ("m_absmax", "blocks(256)", ""),
            ("v_absmax", "blocks(256)", "")}  # the layout ListOptimizers publishes
        s = c.create_session("adamw-8bit", eight_bit_params(), lr=1e-2)
        # what the session holds: parameters, a uint8 code per element for m and v, a float32 scale per block
        assert s.info.size_bytes == 3005 * 4 + 2 * 3005 + 2 * (12 + 1) * 4
        local = eight_bit_params()
        state = {n: new_state(ADAMW_8BIT, p) for n, p in local.items()}
        hp = ADAMW_8BIT.resolve({"lr": 1e-2})
        for i in range(4):
            s.step(eight_bit_grads(i))
            for n, p in local.items():  # the plugin's update in this process: the same bits
                ADAMW_8BIT.update(p, eight_bit_grads(i)[n], state[n], i + 1, hp, [])
        st = s.read_state()
        assert {k: {n: (a.shape, a.dtype.name) for n, a in v.items()} for k, v in st.state.items()} == {
            "m": {"W": ((300, 10), "uint8"), "b": ((5,), "uint8")}, "v": {"W": ((300, 10), "uint8"), "b": ((5,), "uint8")},
            "m_absmax": {"W": ((12,), "float32"), "b": ((1,), "float32")},
            "v_absmax": {"W": ((12,), "float32"), "b": ((1,), "float32")}}
        same_bits(st.parameters, local)
        same_bits(st.state, {slot: {n: state[n][slot] for n in local} for slot in st.state})
        # restored from ReadState, it continues bit for bit
        restored = c.create_session("adamw-8bit", st.parameters, state=st.state, initial_step=4, lr=1e-2)
        s.step(eight_bit_grads(4))
        restored.step(eight_bit_grads(4))
        same_bits(s.read_state().state, restored.read_state().state)
        # codes are not numbers to cast: a slot of codes given as floats is refused, naming it and the dtype
        floats = {k: {n: a.astype(np.float32) if k == "m" else a for n, a in v.items()} for k, v in st.state.items()}
        with pytest.raises(InvalidArgument, match=r"state m/'(W|b)': dtype float32, expected uint8"):
            c.create_session("adamw-8bit", st.parameters, state=floats, initial_step=4)
        assert len(c.list_sessions()) == 2
        # codes are state only: a parameter of 8-bit integers is refused, naming it
        with pytest.raises(InvalidArgument, match="'q'"):
            c.create_session("adamw-8bit", {"q": np.zeros(4, np.uint8)})


def test_8bit_adamw_comes_back_after_a_kill_9(start_server, eight_bit_env, tmp_path):
    srv = start_server("--data-dir", str(tmp_path), env=eight_bit_env)
    with Client(srv.address) as c:
        s = c.create_session("adamw-8bit", eight_bit_params(), session_id="q8", durability="every-step", lr=1e-2)
        for i in range(3):
            s.step(eight_bit_grads(i))
        want = s.read_state()
    srv.kill()  # the steps come back from the log, replayed through the plugin bit for bit
    srv = start_server("--data-dir", str(tmp_path), env=eight_bit_env)
    with Client(srv.address) as c:
        got = c.session("q8", {}).read_state()
        assert got.info.step == 3
        same_bits(got.state, want.state)
        same_bits(got.parameters, want.parameters)


# ---- examples/optreg-shampoo: preconditioners refreshed every k steps (Optimizer.every) -------------------

def test_shampoo_refreshes_every_k_steps_reported_and_replayed_after_a_kill_9(start_server, eight_bit_env, tmp_path):
    from optreg.plugins.testing import new_state
    from optreg_shampoo import SHAMPOO
    from test_auth_tls_metrics import _free_port, _scrape

    rng = np.random.default_rng(0)
    w0 = rng.standard_normal((6, 4))
    grads = [rng.standard_normal((6, 4)) for _ in range(9)]
    hp = SHAMPOO.resolve({"lr": 0.05, "precondition_frequency": 3})
    local, state = w0.copy(), new_state(SHAMPOO, w0)
    for t, g in enumerate(grads, 1):  # the plugin in this process, as the server runs it
        if SHAMPOO.refresh_due(t, hp):
            SHAMPOO.every[1](local, g, state, t, hp)
        SHAMPOO.update(local, g, state, t, hp, [])
        if t == 7:
            at_7 = local.copy()
    port = _free_port()
    srv = start_server("--data-dir", str(tmp_path), "--metrics-port", str(port), env=eight_bit_env)
    with Client(srv.address) as c:
        s = c.create_session("shampoo", {"W": w0.copy()}, session_id="sh", durability="log", lr=0.05,
                             precondition_frequency=3)
        for g in grads[:7]:
            s.step({"W": g})
        assert s.read_state().parameters["W"].tobytes() == at_7.tobytes()
    m = _scrape(port)
    assert m['optreg_refreshes_total{optimizer="shampoo"}'] == 2  # steps 3 and 6
    assert m['optreg_refresh_seconds_total{optimizer="shampoo"}'] > 0
    srv.kill()  # kill -9: the seven steps come back from the log, refreshes replayed with them
    port = _free_port()
    srv = start_server("--data-dir", str(tmp_path), "--metrics-port", str(port), env=eight_bit_env)
    with Client(srv.address) as c:
        s = c.session("sh", {})
        assert s.read_state().parameters["W"].tobytes() == at_7.tobytes()
        assert _scrape(port)['optreg_refreshes_total{optimizer="shampoo"}'] == 2  # the replay ran them
        s = c.session("sh")
        for g in grads[7:]:  # step 9 refreshes again
            s.step({"W": g})
        got = s.read_state()
    assert got.parameters["W"].tobytes() == local.tobytes()
    assert got.state["precond"]["W"].tobytes() == state["precond"].tobytes()
