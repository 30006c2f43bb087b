"""Contract v2 built-ins through RemoteOptimizer against local torch.optim on CPU: torch.optim.Adafactor
(factored state: row and column vectors per matrix) and torch.optim.Muon (whole-matrix Newton-Schulz in
bfloat16), each over 500 steps of a small MLP, through a kill -9 of a durable server, and restored from
state_dict in torch's own layout. Both sides get the same gradients each step (computed on the remote
model) unless a loss curve is the point."""
from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import ServerProcess  # noqa: E402
from optreg.client import Client, FailedPrecondition, InvalidArgument  # noqa: E402
from optreg.client.torch import RemoteOptimizer  # noqa: E402

STEPS = 500
ADAFACTOR = dict(lr=0.01, weight_decay=0.01)
MUON = dict(lr=0.02, momentum=0.95, weight_decay=0.01)
# For the loss curves: at lr 0.02 this MLP ends oscillating on a plateau where torch's own curve moves by
# 37% when the weights start 1e-7 apart (chaos, not a difference of formula); at 0.005 by 0.2%.
MUON_CURVE = dict(MUON, lr=0.005)


@pytest.fixture(scope="module")
def address():
    s = ServerProcess("--memory-only")
    yield s.address
    s.stop()


def mlp(bias: bool, seed: int = 0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16, bias=bias), torch.nn.Tanh(), torch.nn.Linear(16, 4, bias=bias))


def data(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 8, generator=g)
    return x, torch.sin(x[:, :4] * 2) + 0.1 * torch.randn(64, 4, generator=g)


def loss_of(model, x, y):
    return torch.nn.functional.mse_loss(model(x), y)


def shared_steps(remote_model, remote, local_model, local, steps, x, y, each=None):
    """`steps` steps, both optimizers fed the remote model's gradients; each(before, after) per step."""
    for _ in range(steps):
        remote.zero_grad()
        loss_of(remote_model, x, y).backward()
        for pr, pl in zip(remote_model.parameters(), local_model.parameters()):
            pl.grad = pr.grad.clone()
        before = [p.detach().clone() for p in remote_model.parameters()]
        local_before = [p.detach().clone() for p in local_model.parameters()]
        remote.step()
        local.step()
        if each is not None:
            each(before, local_before, remote_model, local_model)


def max_diff(a, b) -> float:
    return max(float((p - q).detach().abs().max()) for p, q in zip(a.parameters(), b.parameters()))


def test_adafactor_matches_torch_over_500_steps(address):
    x, y = data()
    remote_model = mlp(bias=True)  # biases: the unfactored `variance` slot; weights: row_var and col_var
    local_model = copy.deepcopy(remote_model)
    local = torch.optim.Adafactor(local_model.parameters(), **ADAFACTOR)
    with RemoteOptimizer(remote_model.parameters(), torch.optim.Adafactor, address=address, **ADAFACTOR) as remote:
        shared_steps(remote_model, remote, local_model, local, STEPS, x, y)
        assert max_diff(remote_model, local_model) < 1e-5
        # torch's own layout: a matrix keeps row_var [R, 1] and col_var [1, C], a vector variance
        sd = remote.state_dict()
        want = local.state_dict()
        for i, st in want["state"].items():
            assert set(sd["state"][i]) == set(st)
            for k, v in st.items():
                assert sd["state"][i][k].shape == v.shape
                torch.testing.assert_close(sd["state"][i][k], v, rtol=1e-4, atol=1e-9)


def test_muon_matches_torch_update_every_step_to_bfloat16_rounding(address):
    x, y = data()
    remote_model = mlp(bias=False)  # Muon takes 2-D weights only, as torch.optim.Muon
    local_model = copy.deepcopy(remote_model)
    local = torch.optim.Muon(local_model.parameters(), **MUON)
    worst = []

    def each(before, local_before, rm, lm):
        for b, lb, pr, pl in zip(before, local_before, rm.parameters(), lm.parameters()):
            rows, cols = pr.shape
            scale = MUON["lr"] * max(1, rows / cols) ** 0.5
            # the orthogonalised update, O = -(p_new - p * (1 - lr*wd)) / (lr*ratio), on each side
            decay = 1 - MUON["lr"] * MUON["weight_decay"]
            o_remote = (b * decay - pr.detach()) / scale
            o_local = (lb * decay - pl.detach()) / scale
            # bfloat16 keeps 8 bits: |O| <= ~1.5, so one rounding is at most 2**-8 of it
            worst.append(float((o_remote - o_local).abs().max() / o_local.abs().max().clamp(min=1e-6)))

    with RemoteOptimizer(remote_model.parameters(), torch.optim.Muon, address=address, **MUON) as remote:
        shared_steps(remote_model, remote, local_model, local, STEPS, x, y, each)
    assert len(worst) == 2 * STEPS and max(worst) <= 2 ** -7, max(worst)


def test_muon_loss_curve_within_one_percent_of_torch(address):
    x, y = data()
    remote_model = mlp(bias=False)
    local_model = copy.deepcopy(remote_model)
    local = torch.optim.Muon(local_model.parameters(), **MUON_CURVE)
    curves = ([], [])
    with RemoteOptimizer(remote_model.parameters(), torch.optim.Muon, address=address, **MUON_CURVE) as remote:
        for _ in range(STEPS):  # each side from its own gradients
            for model, opt, curve in ((remote_model, remote, curves[0]), (local_model, local, curves[1])):
                opt.zero_grad()
                loss = loss_of(model, x, y)
                loss.backward()
                opt.step()
                curve.append(loss.item())
    remote_curve, local_curve = np.array(curves[0]), np.array(curves[1])
    assert local_curve[-1] < 0.2 * local_curve[0]  # it trains
    np.testing.assert_allclose(remote_curve, local_curve, rtol=0.01)


def test_muon_refuses_a_vector_and_sparse_rows_naming_the_optimizer_and_the_reason(address):
    with Client(address) as c:
        with pytest.raises(InvalidArgument) as e:
            c.create_session("torch.muon", {"w": np.zeros((4, 3), np.float32), "b": np.zeros(3, np.float32)})
        assert "parameter 'b' of shape [3]: optimizer torch.muon does not apply to it" in str(e.value)
        assert "2-D" in str(e.value) and "adamw" in str(e.value)
        # a whole-matrix method cannot step some rows: the definition says so (sparse_rows False)
        s = c.create_session("torch.muon", {"w": np.ones((4, 3), np.float32)})
        with pytest.raises(FailedPrecondition) as e:
            s.step_sparse("w", [1], np.ones((1, 3), np.float32))
        assert "torch.muon" in str(e.value) and "sparse_rows" in str(e.value)
        assert s.read_state().info.step == 0  # left untouched
        s.step({"w": np.ones((4, 3), np.float32)})  # and it still steps
        assert s.read_state().info.step == 1


@pytest.mark.parametrize("cls, options, bias", [(torch.optim.Adafactor, ADAFACTOR, True),
                                                (torch.optim.Muon, MUON, False)])
def test_kill_9_mid_run_then_restore_from_state_dict(start_server, tmp_path, cls, options, bias):
    """A durable run killed at step 250 (kill -9), resumed on a restarted server, ends where an
    uninterrupted local torch run does; then its state_dict loads into torch.optim and into a fresh
    RemoteOptimizer, and both continue alike."""
    x, y = data()
    remote_model = mlp(bias=bias)
    local_model = copy.deepcopy(remote_model)
    local = cls(local_model.parameters(), **options)
    srv = start_server("--data-dir", str(tmp_path))
    remote = RemoteOptimizer(remote_model.parameters(), cls, address=srv.address, session_id="run",
                             durability="every-step", **options)
    shared_steps(remote_model, remote, local_model, local, 250, x, y)
    srv.kill()
    remote.client.close()
    srv = start_server("--data-dir", str(tmp_path))
    with torch.no_grad():  # resume: the server's parameters, not these, are the run's
        for p in remote_model.parameters():
            p.zero_()
    remote = RemoteOptimizer(remote_model.parameters(), cls, address=srv.address, session_id="run", resume=True,
                             durability="every-step", **options)
    shared_steps(remote_model, remote, local_model, local, 250, x, y)
    tol = 1e-5 if cls is torch.optim.Adafactor else 1e-3
    assert max_diff(remote_model, local_model) < tol

    # state_dict in torch's layout: torch.optim loads it, and a fresh RemoteOptimizer does too
    sd = remote.state_dict()
    remote.close(delete=True)
    torch_model = copy.deepcopy(remote_model)
    from_remote = cls(torch_model.parameters(), **options)
    from_remote.load_state_dict(sd)
    restored_model = copy.deepcopy(remote_model)
    with RemoteOptimizer(restored_model.parameters(), cls, address=srv.address, **options) as restored:
        restored.load_state_dict(sd)
        shared_steps(restored_model, restored, torch_model, from_remote, 20, x, y)
        assert max_diff(restored_model, torch_model) < tol


def test_schedulefree_adamw_matches_the_reference_in_train_and_eval_views(address):
    """schedulefree.adamw through a real session against schedulefree.AdamWScheduleFree (PyPI 1.4), the
    same gradients for 300 steps with warm-up and weight decay: the training point y (the session's
    parameters) and z within 1e-5, and the evaluation view x = lerp(y, z, 1 - 1/beta1), computed from
    ReadState, equal to the reference's parameters after optimizer.eval()."""
    schedulefree = pytest.importorskip("schedulefree")
    options = dict(lr=0.01, weight_decay=0.01, warmup_steps=20, betas=(0.9, 0.999))
    rng = np.random.default_rng(0)
    init = {"W": rng.standard_normal((16, 8)).astype(np.float32), "b": rng.standard_normal(8).astype(np.float32)}
    ref = {n: torch.nn.Parameter(torch.from_numpy(a.copy())) for n, a in init.items()}
    opt = schedulefree.AdamWScheduleFree(list(ref.values()), **options)
    opt.train()
    hp = dict(lr=0.01, weight_decay=0.01, warmup_steps=20, beta1=0.9, beta2=0.999)
    with Client(address) as c:
        s = c.create_session("schedulefree.adamw", {n: a.copy() for n, a in init.items()}, **hp)
        for _ in range(300):
            g = {n: rng.standard_normal(a.shape).astype(np.float32) for n, a in init.items()}
            for n, p in ref.items():
                p.grad = torch.from_numpy(g[n].copy())
            opt.step()
            s.step(g)
        st = s.read_state()
    for n, p in ref.items():
        np.testing.assert_allclose(st.parameters[n], p.detach().numpy(), atol=1e-5, rtol=0)
        np.testing.assert_allclose(st.state["z"][n], opt.state[p]["z"].numpy(), atol=1e-5, rtol=0)
        assert st.state["weight_sum"][n].shape == () and st.state["weight_sum"][n].dtype == np.float64
    opt.eval()
    for n, p in ref.items():
        y, z = torch.from_numpy(st.parameters[n]), torch.from_numpy(st.state["z"][n])
        np.testing.assert_allclose(y.lerp(z, 1 - 1 / 0.9).numpy(), p.detach().numpy(), atol=1e-5, rtol=0)
