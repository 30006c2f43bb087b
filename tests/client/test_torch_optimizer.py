"""RemoteOptimizer against local torch.optim on CPU: the same model, data and scheduler on both sides.

Golden runs (500 steps) for each torch-parity optimizer under StepLR, CosineAnnealingLR, OneCycleLR
(which cycles betas or momentum) and ReduceLROnPlateau: both optimizers get the same gradients each
step, the remote side must warn about nothing (no scheduler ordering warning) and end within 1e-6 of
torch's parameters. (Left to compute their own gradients, the two runs drift apart by a few 1e-6
over 500 steps: torch's CPU kernels fuse multiply-adds the server's numpy rounds twice, and training
amplifies that; the digits MLP test covers that setting with loss curves.)
"""
from __future__ import annotations

import warnings

import pytest

torch = pytest.importorskip("torch")

from conftest import ServerProcess  # noqa: E402
from optreg.client import Client, UsageError  # noqa: E402
from optreg.client.torch import RemoteOptimizer  # noqa: E402

STEPS = 500
TOL = 1e-6  # float32 parameters of size ~1: torch's fused CPU kernels round a few places differently

OPTIMIZERS = {
    "sgd": ("torch.sgd", torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)),
    "adam": ("torch.adam", torch.optim.Adam, dict(lr=0.01, weight_decay=1e-2)),
    "adamw": ("adamw", torch.optim.AdamW, dict(lr=0.01, weight_decay=0.05)),
    "rmsprop": ("torch.rmsprop", torch.optim.RMSprop, dict(lr=0.005, momentum=0.5, centered=True)),
    "adagrad": ("torch.adagrad", torch.optim.Adagrad, dict(lr=0.1, lr_decay=1e-3, initial_accumulator_value=0.1)),
}


def make_scheduler(kind, opt, name):
    sched = torch.optim.lr_scheduler
    if kind == "step":
        return sched.StepLR(opt, step_size=100, gamma=0.5)
    if kind == "cosine":
        return sched.CosineAnnealingLR(opt, T_max=STEPS)
    if kind == "onecycle":  # cycles betas (Adam, AdamW) or momentum (SGD, RMSprop) as well as lr
        return sched.OneCycleLR(opt, max_lr=opt.defaults["lr"] * 2, total_steps=STEPS,
                                cycle_momentum=name != "adagrad")
    if kind == "plateau":  # a coarse threshold so it does cut the lr within the run
        return sched.ReduceLROnPlateau(opt, factor=0.5, patience=3, threshold=0.2)
    raise AssertionError(kind)


@pytest.fixture(scope="module")
def address():
    s = ServerProcess("--memory-only")
    yield s.address
    s.stop()


@pytest.fixture(scope="module")
def client(address):
    with Client(address, timeout=120) as c:
        yield c


def tiny_model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2)).to(dtype)


def twin(model):
    other = tiny_model()
    other.load_state_dict(model.state_dict())
    return other


DATA = torch.Generator().manual_seed(1)
X = torch.randn(32, 4, generator=DATA)
Y = torch.randn(32, 2, generator=DATA)


def loss_of(model, i=0):
    rows = slice((i * 8) % 32, (i * 8) % 32 + 8)  # four batches in turn: a noisy loss
    return torch.nn.functional.mse_loss(model(X[rows]), Y[rows])


def train(model, opt, sched, steps=STEPS):
    losses, used = [], []
    for i in range(steps):
        opt.zero_grad()
        loss = loss_of(model, i)
        loss.backward()
        opt.step()
        used.append(dict(opt.param_groups[0]))  # the options this step ran with
        if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
            sched.step(loss.item())
        else:
            sched.step()
        losses.append(loss.item())
    train.last_options = used[-1]
    return losses


def assert_close(a_model, b_model, tol=TOL):
    for (name, a), b in zip(a_model.named_parameters(), b_model.parameters()):
        diff = (a.detach() - b.detach()).abs().max().item()
        assert diff <= tol, f"{name}: max difference {diff:.3g} > {tol}"


def lockstep(local_model, local, local_sched, remote_model, remote, remote_sched, steps=STEPS):
    """Both optimizers get the gradients of the local model each step (and the schedulers its loss), so
    what is compared is the optimizers, not how a loss landscape amplifies a rounding difference."""
    for i in range(steps):
        local.zero_grad()
        remote.zero_grad()
        loss = loss_of(local_model, i)
        loss.backward()
        for a, b in zip(local_model.parameters(), remote_model.parameters()):
            b.grad = a.grad.clone()
        local.step()
        remote.step()
        train.last_options = dict(remote.param_groups[0])
        train.last_groups = [dict(g) for g in remote.param_groups]
        for sched in (local_sched, remote_sched):
            if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
                sched.step(loss.item())
            else:
                sched.step()


@pytest.mark.parametrize("sched_kind", ["step", "cosine", "onecycle", "plateau"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_golden_run_matches_torch(client, name, sched_kind):
    optreg_name, cls, kw = OPTIMIZERS[name]
    remote_model = tiny_model()
    local_model = twin(remote_model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # an earlier test's socket collected now is not this run's warning
        warnings.simplefilter("ignore", ResourceWarning)
        local = cls(local_model.parameters(), **kw)
        remote = RemoteOptimizer(remote_model.parameters(), optreg_name, client=client, **kw)
        lockstep(local_model, local, make_scheduler(sched_kind, local, name),
                 remote_model, remote, make_scheduler(sched_kind, remote, name))
    try:
        assert [str(w.message) for w in caught] == []  # no scheduler ordering warning, nor any other
        assert remote.param_groups[0]["lr"] == local.param_groups[0]["lr"]
        if sched_kind == "plateau":
            assert remote.param_groups[0]["lr"] < kw["lr"] / 2, "the plateau scheduler never cut the lr"
        assert remote.sessions[0].refresh().step == STEPS
        # the server holds the options the last step ran with
        info, last = remote.sessions[0].info, train.last_options
        assert info.hyperparameters["lr"] == last["lr"]
        if "betas" in last:
            assert info.hyperparameters["beta1"] == last["betas"][0]
        if "momentum" in last:
            assert info.hyperparameters["momentum"] == last["momentum"]
        assert_close(remote_model, local_model)
    finally:
        remote.close()


def test_param_groups_keep_their_own_options(client):
    """No weight decay on biases and a smaller lr for the output layer, under OneCycleLR (one lr per group)."""
    def groups(m):
        return [{"params": [m[0].weight], "weight_decay": 0.1},
                {"params": [m[0].bias, m[2].bias], "weight_decay": 0.0},
                {"params": [m[2].weight], "lr": 0.002}]

    remote_model = tiny_model()
    local_model = twin(remote_model)
    local = torch.optim.AdamW(groups(local_model), lr=0.01)
    with RemoteOptimizer(groups(remote_model), "adamw", client=client, lr=0.01, session_id="groups-run") as remote:
        ids = [s.id for s in remote.sessions]
        assert ids == ["groups-run.g0", "groups-run.g1", "groups-run.g2"]
        lockstep(local_model, local, torch.optim.lr_scheduler.OneCycleLR(local, max_lr=[0.02, 0.02, 0.004],
                                                                          total_steps=200),
                 remote_model, remote, torch.optim.lr_scheduler.OneCycleLR(remote, max_lr=[0.02, 0.02, 0.004],
                                                                            total_steps=200), steps=200)
        hp = [s.refresh().hyperparameters for s in remote.sessions]
        assert [h["weight_decay"] for h in hp] == pytest.approx([0.1, 0.0, 0.01])
        assert [h["lr"] for h in hp] == [g["lr"] for g in train.last_groups]
        assert [h["beta1"] for h in hp] == [g["betas"][0] for g in train.last_groups]
        assert_close(remote_model, local_model)


def test_gradscaler_skips_the_same_steps_and_makes_no_call(client):
    """An inf every 7th step: GradScaler skips optimizer.step (the session's step stays), halves its scale;
    unscale_ and clip_grad_norm_ act on the local grads."""
    def run(model, opt):
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=5)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=20, gamma=0.7)
        calls, scales = [], []
        opt.register_step_pre_hook(lambda o, a, k: calls.append(1))
        for i in range(1, 141):
            opt.zero_grad()
            loss = loss_of(model, i)
            scaler.scale(loss).backward()
            if i % 7 == 0:
                model[0].weight.grad[0, 0] = float("inf")
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            scaler.step(opt)
            scaler.update()
            sched.step()
            scales.append(scaler.get_scale())
        return len(calls), scales

    remote_model = tiny_model()
    local_model = twin(remote_model)
    local = torch.optim.Adam(local_model.parameters(), lr=0.01)
    local_calls, local_scales = run(local_model, local)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with RemoteOptimizer(remote_model.parameters(), "torch.adam", client=client, lr=0.01) as remote:
            remote_calls, remote_scales = run(remote_model, remote)
            assert remote.sessions[0].refresh().step == remote_calls == 140 - 140 // 7
    assert [str(w.message) for w in caught] == []
    assert remote_calls == local_calls and remote_scales == local_scales
    assert local.state_dict()["state"][0]["step"].item() == remote_calls
    assert_close(remote_model, local_model)


def test_state_dict_round_trip_remote_local_remote_bit_for_bit(client):
    for optreg_name, cls, kw in OPTIMIZERS.values():
        kw = dict(kw, **({"amsgrad": True} if cls in (torch.optim.Adam, torch.optim.AdamW) else {}))
        model = tiny_model()
        remote = RemoteOptimizer(model.parameters(), optreg_name, client=client, **kw)
        sched = torch.optim.lr_scheduler.StepLR(remote, step_size=5, gamma=0.5)
        train(model, remote, sched, steps=12)
        saved = remote.state_dict()
        assert saved["param_groups"][0]["initial_lr"] == kw["lr"]

        local_model = twin(model)
        local = cls(local_model.parameters(), **kw)
        local.load_state_dict(saved)
        through_torch = local.state_dict()

        model2 = twin(model)
        remote2 = RemoteOptimizer(model2.parameters(), optreg_name, client=client, session_id=f"rt-{optreg_name}",
                                  **kw)
        remote2.load_state_dict(through_torch)  # the named session is replaced under the same name
        assert remote2.sessions[0].id == f"rt-{optreg_name}.g0"
        back = remote2.state_dict()
        assert back["param_groups"] == saved["param_groups"]
        assert back["state"].keys() == saved["state"].keys()
        for i, st in saved["state"].items():
            assert back["state"][i].keys() == st.keys()
            for k, v in st.items():
                assert torch.equal(back["state"][i][k], v), (optreg_name, i, k)
        # initial_lr survived: a scheduler resumes at epoch 12 on the loaded optimizer (pytorch#140900)
        torch.optim.lr_scheduler.StepLR(remote2, step_size=5, gamma=0.5, last_epoch=11)
        # and both continue identically, also against torch from the same state
        remote.zero_grad()
        loss_of(model, 3).backward()
        loss_of(model2, 3).backward()
        loss_of(local_model, 3).backward()
        remote.step()
        remote2.step()
        local.step()
        for a, b, c in zip(model.parameters(), model2.parameters(), local_model.parameters()):
            assert torch.equal(a, b), optreg_name
            assert (a - c).abs().max().item() <= TOL
        remote.close()
        remote2.close()


def test_local_checkpoint_starts_a_remote_session(client):
    """torch.optim.RMSprop trained locally, then its state dict continues remotely: same as staying local."""
    model = tiny_model()
    local = torch.optim.RMSprop(model.parameters(), lr=0.01, momentum=0.9)
    train(model, local, torch.optim.lr_scheduler.CosineAnnealingLR(local, T_max=60), steps=30)
    remote_model = twin(model)
    with RemoteOptimizer(remote_model.parameters(), "torch.rmsprop", client=client, lr=0.01,
                         momentum=0.9) as remote:
        remote.load_state_dict(local.state_dict())
        assert remote.sessions[0].refresh().step == 30
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(remote, T_max=60, last_epoch=29)
        local_sched = torch.optim.lr_scheduler.CosineAnnealingLR(local, T_max=60, last_epoch=29)
        train(model, local, local_sched, steps=30)
        train(remote_model, remote, sched, steps=30)
        assert_close(remote_model, model)


def test_hooks_closure_zero_grad_and_in_place(client):
    model = tiny_model()
    weights = [p for p in model.parameters()]
    storage = [p.data_ptr() for p in weights]
    with RemoteOptimizer(model.parameters(), client=client, lr=0.01) as opt:
        assert isinstance(opt, torch.optim.Optimizer)
        seen = []
        opt.register_step_pre_hook(lambda o, a, k: seen.append("pre"))
        opt.register_step_post_hook(lambda o, a, k: seen.append("post"))
        before = [p.detach().clone() for p in weights]

        def closure():
            opt.zero_grad()
            loss = loss_of(model)
            loss.backward()
            return loss

        versions = [p._version for p in weights]
        loss = opt.step(closure)
        assert all(p._version > v for p, v in zip(weights, versions))  # autograd sees the in-place update
        assert isinstance(loss, torch.Tensor) and seen == ["pre", "post"]
        assert [p.data_ptr() for p in model.parameters()] == storage  # written in place
        assert all(not torch.equal(a, b) for a, b in zip(before, weights))
        opt.zero_grad()
        assert all(p.grad is None for p in weights)  # set_to_none by default
        assert opt.state == {} or len(opt.state) == 0


def test_param_without_grad(client):
    """A group none of whose params has a grad is skipped (no call); a partial group is refused unchanged."""
    model = tiny_model()
    frozen_out = [{"params": list(model[0].parameters())}, {"params": list(model[2].parameters())}]
    with RemoteOptimizer(frozen_out, client=client, lr=0.01) as opt:
        model[2].weight.requires_grad_(False)
        model[2].bias.requires_grad_(False)
        out_before = model[2].weight.detach().clone()
        loss_of(model).backward()
        opt.step()
        assert [s.refresh().step for s in opt.sessions] == [1, 0]
        assert torch.equal(model[2].weight, out_before)

        opt.zero_grad()
        model[2].weight.requires_grad_(True)
        loss_of(model).backward()  # the output weight has a grad, its bias none
        first_before = model[0].weight.detach().clone()
        with pytest.raises(ValueError, match=r"param group 1: no gradient for p3 .* own param group"):
            opt.step()
        assert [s.refresh().step for s in opt.sessions] == [1, 0]  # nothing was sent, not even group 0
        assert torch.equal(model[0].weight, first_before)


@pytest.mark.parametrize("shared_memory", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_params_keep_a_float32_master(client, dtype, shared_memory):
    """bf16/fp16 local weights: gradients travel as they are, the server keeps float32 masters (as a local
    float32 Adam fed the same gradients), and the local weights are the masters rounded."""
    gen = torch.Generator().manual_seed(3)
    shapes = [(5, 4), (5,)]
    params = [torch.randn(s, generator=gen).to(dtype).requires_grad_() for s in shapes]
    masters = [p.detach().float().clone().requires_grad_() for p in params]
    local = torch.optim.Adam(masters, lr=1e-3)
    with RemoteOptimizer(params, client=client, lr=1e-3, shared_memory=shared_memory) as opt:
        assert opt.sessions[0].info.master_dtype == "float32"
        for _ in range(40):
            grads = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
            for p, m, g in zip(params, masters, grads):
                p.grad, m.grad = g, g.float()
            opt.step()
            local.step()
        server = opt.sessions[0].read_parameters()
        for i, (p, m) in enumerate(zip(params, masters)):
            master = torch.from_numpy(server[f"p{i}"])
            assert master.dtype == torch.float32
            assert (master - m.detach()).abs().max().item() <= TOL
            assert p.dtype == dtype and torch.equal(p.detach(), master.to(dtype))


@pytest.mark.parametrize("shared_memory", [False, True])
def test_maximize_and_bad_arguments(client, shared_memory):
    remote_model = tiny_model()
    local_model = twin(remote_model)
    local = torch.optim.SGD(local_model.parameters(), lr=0.01, momentum=0.5, maximize=True)
    with RemoteOptimizer(remote_model.parameters(), torch.optim.SGD, client=client, lr=0.01, momentum=0.5,
                         maximize=True, shared_memory=shared_memory) as remote:
        for model, opt in ((local_model, local), (remote_model, remote)):
            train(model, opt, torch.optim.lr_scheduler.StepLR(opt, 10), steps=20)
        assert_close(remote_model, local_model)
    with pytest.raises(ValueError, match="book optimizer"):
        RemoteOptimizer(tiny_model().parameters(), "adam", client=client)
    with pytest.raises(ValueError, match="Invalid learning rate"):  # torch's own check of its options
        RemoteOptimizer(tiny_model().parameters(), "torch.sgd", client=client, lr=-1.0)
    with pytest.raises(ValueError, match="capturable=True cannot apply"):
        RemoteOptimizer(tiny_model().parameters(), client=client, capturable=True)
    with pytest.raises(ValueError, match="worker="):
        RemoteOptimizer(tiny_model().parameters(), client=client, worker="w0")
    # a value the server refuses stops the step before any group has moved
    model = tiny_model()
    with RemoteOptimizer([{"params": model[0].parameters()}, {"params": model[2].parameters()}], "torch.adam",
                         client=client) as opt:
        opt.param_groups[1]["betas"] = (1.5, 0.999)
        loss_of(model).backward()
        before = [p.detach().clone() for p in model.parameters()]
        with pytest.raises(UsageError, match=r"param group 1: beta1=1.5 must be < 1 \(the group's betas\[0\]\); "
                                             "nothing was sent"):
            opt.step()
        assert [s.refresh().step for s in opt.sessions] == [0, 0]
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_mlp_on_digits_trains_like_local(client):
    """A real model on the demo's fallback data: each side computes its own gradients, and the two loss
    curves stay together (rounding differences are amplified by training, so not bit for bit)."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target)

    def mlp():
        torch.manual_seed(5)
        return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))

    def run(model, opt):
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=150)
        order = torch.Generator().manual_seed(0)
        losses = []
        for _ in range(150):
            idx = torch.randint(0, len(x), (64,), generator=order)
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        return losses

    local_model, remote_model = mlp(), mlp()
    local = run(local_model, torch.optim.Adam(local_model.parameters(), lr=3e-3))
    with RemoteOptimizer(remote_model.parameters(), "torch.adam", client=client, lr=3e-3) as opt:
        remote = run(remote_model, opt)
    assert local[-1] < 0.5 * local[0]  # it did learn
    worst = max(abs(a - b) / a for a, b in zip(local, remote))
    assert worst < 1e-4, f"loss curves differ by {worst:.2e} relative"


def test_example_trains_and_checkpoints(address, tmp_path):
    """examples/torch_train.py against the module's server; its checkpoint loads into torch.optim.AdamW."""
    import os
    import pathlib
    import subprocess
    import sys

    from conftest import ROOT, SOURCE_ROOTS
    ckpt = tmp_path / "run.pt"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(SOURCE_ROOTS))
    out = subprocess.run([sys.executable, str(pathlib.Path(ROOT) / "examples" / "torch_train.py"), "--address",
                          address, "--steps", "120", "--checkpoint", str(ckpt)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "server step 120" in out.stdout
    accuracy = float(out.stdout.split("test accuracy ")[1].split()[0])
    assert accuracy > 0.8, out.stdout
    saved = torch.load(ckpt)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    model.load_state_dict(saved["model"])
    local = torch.optim.AdamW([{"params": [model[0].weight, model[2].weight]},
                               {"params": [model[0].bias, model[2].bias]}])
    local.load_state_dict(saved["optimizer"])
    assert local.state_dict()["state"][0]["step"].item() == 120
    assert local.param_groups[0]["weight_decay"] == 1e-2 and local.param_groups[1]["weight_decay"] == 0.0


def test_resume_attaches_to_the_named_sessions(client):
    """A restarted process passes the same session_id and resume=True: the server's master weights are
    copied into the new model and training continues where it was, also under a new lr."""
    model = tiny_model()
    first = RemoteOptimizer(model.parameters(), "torch.adam", client=client, lr=0.01, session_id="resume-run",
                            shared_memory=True)  # released by close(delete=False), the session kept
    train(model, first, torch.optim.lr_scheduler.StepLR(first, 100), steps=10)
    first.close(delete=False)

    fresh = tiny_model(seed=7)
    assert not torch.equal(fresh[0].weight, model[0].weight)
    with RemoteOptimizer(fresh.parameters(), "torch.adam", client=client, lr=0.005, session_id="resume-run",
                         resume=True) as again:
        for a, b in zip(fresh.parameters(), model.parameters()):
            assert torch.equal(a, b)
        assert again.sessions[0].info.step == 10
        again.zero_grad()
        loss_of(fresh).backward()
        again.step()
        assert again.sessions[0].refresh().hyperparameters["lr"] == 0.005
        assert again.state_dict()["state"][0]["step"].item() == 11
    with pytest.raises(Exception, match="resume-run.g0"):
        client.get_session("resume-run.g0")  # closing deleted them


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_cyclic_lr_cycles_momentum_and_betas(client, name):
    """CyclicLR cycles lr and momentum (SGD) or beta1 (Adam) every step; the server follows."""
    optreg_name, cls, kw = OPTIMIZERS[name]
    remote_model = tiny_model()
    local_model = twin(remote_model)

    def cyclic(opt):
        return torch.optim.lr_scheduler.CyclicLR(opt, base_lr=kw["lr"] / 10, max_lr=kw["lr"], step_size_up=15,
                                                 mode="triangular2")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # an earlier test's socket collected now is not this run's warning
        warnings.simplefilter("ignore", ResourceWarning)
        local = cls(local_model.parameters(), **kw)
        with RemoteOptimizer(remote_model.parameters(), optreg_name, client=client, **kw) as remote:
            lockstep(local_model, local, cyclic(local), remote_model, remote, cyclic(remote), steps=120)
            info, last = remote.sessions[0].refresh(), train.last_options
            momentum = last["betas"][0] if "betas" in last else last["momentum"]
            assert info.hyperparameters["beta1" if "betas" in last else "momentum"] == momentum
            assert momentum != kw.get("momentum", 0.9)  # it was cycled
    assert [str(w.message) for w in caught] == []
    assert_close(remote_model, local_model)


@pytest.mark.parametrize("shared_memory", [None, False])
def test_large_group_and_groups_added_later(client, shared_memory):
    """A 700k-element tensor (over the client's 2 MiB unary size) steps like torch, through a segment
    shared with this loopback server by default, or streamed (shared_memory=False); a small group
    added later (add_param_group: one more session) steps over unary calls."""
    gen = torch.Generator().manual_seed(4)
    big = torch.randn(700, 1000, generator=gen).requires_grad_()
    storage = big.data_ptr()
    local_big = big.detach().clone().requires_grad_()
    local = torch.optim.Adam([local_big], lr=1e-3)
    with RemoteOptimizer([big], client=client, lr=1e-3, shared_memory=shared_memory) as opt:
        if shared_memory is None:
            assert set(opt.sessions[0].gradients) == {"p0"}  # the segment's buffers exist
        else:
            with pytest.raises(UsageError, match="enable_shared_memory"):
                opt.sessions[0].gradients
        for _ in range(3):
            g = torch.randn(700, 1000, generator=gen)
            big.grad, local_big.grad = g, g.clone()
            opt.step()
            local.step()
        assert (big - local_big).abs().max().item() <= TOL
        assert big.data_ptr() == storage
        small = torch.zeros(3, requires_grad=True)
        opt.add_param_group({"params": [small], "lr": 0.1})
        assert len(opt.sessions) == 2 and opt.sessions[1].info.hyperparameters["lr"] == 0.1
        big.grad = None
        small.grad = torch.ones(3)
        opt.step()
        assert [s.refresh().step for s in opt.sessions] == [3, 1]
        assert torch.allclose(small, torch.full((3,), -0.1))


def test_a_refused_group_leaves_no_sessions(client):
    model = tiny_model()
    before = {s.session_id for s in client.list_sessions()}
    with pytest.raises(ValueError, match="param group 1: differentiable=True"):
        RemoteOptimizer([{"params": model[0].parameters()},
                         {"params": model[2].parameters(), "differentiable": True}], client=client)
    assert {s.session_id for s in client.list_sessions()} == before


def test_named_parameters_name_the_session_tensors(client):
    model = tiny_model()
    with RemoteOptimizer(model.named_parameters(), client=client, lr=0.01) as opt:
        assert list(opt.sessions[0].info.parameters) == ["0.weight", "0.bias", "2.weight", "2.bias"]
        loss_of(model).backward()
        model[2].bias.grad = None
        with pytest.raises(ValueError, match="no gradient for 2.bias"):
            opt.step()
        loss_of(model).backward()
        opt.step()
        saved = opt.state_dict()
        assert saved["param_groups"][0]["param_names"] == ["0.weight", "0.bias", "2.weight", "2.bias"]
        local = torch.optim.Adam(twin(model).named_parameters(), lr=0.01)
        local.load_state_dict(saved)
        assert local.state_dict()["state"][3]["step"].item() == 1


def test_a_state_dict_from_another_optimizer_is_refused(client):
    model = tiny_model()
    adam = torch.optim.Adam(model.parameters(), lr=0.01)
    loss_of(model).backward()
    adam.step()
    with RemoteOptimizer(twin(model).parameters(), "torch.sgd", client=client, lr=0.01, momentum=0.9) as opt:
        with pytest.raises(ValueError, match="param group 0: the state dict has no option 'momentum', which SGD"):
            opt.load_state_dict(adam.state_dict())
        assert "betas" not in opt.param_groups[0]  # nothing changed
    saved = adam.state_dict()
    saved["param_groups"][0]["amsgrad"] = True  # options that need a state it does not have
    with RemoteOptimizer(twin(model).parameters(), "torch.adam", client=client, lr=0.01) as opt:
        with pytest.raises(ValueError, match=r"the state of p0 has \['exp_avg', 'exp_avg_sq', 'step'\]; Adam with "
                                             r"these options keeps \['exp_avg', 'exp_avg_sq', 'max_exp_avg_sq', "):
            opt.load_state_dict(saved)
        assert opt.param_groups[0]["amsgrad"] is False


@pytest.mark.parametrize("with_step", [True, False])
def test_hyperparameter_changes_reach_the_server(client, monkeypatch, with_step):
    """Changes travel with the fenced step (no UpdateHyperparameters call) or, for a server that ignores
    StepRequest.hyperparameters, in an UpdateHyperparameters call ahead: the same numbers as torch either
    way, under a scheduler that changes lr and beta1 every step."""
    import numpy as np

    import optreg.client.torch.optimizer as adapter
    if with_step:
        probe = client.create_session("torch.sgd", {"w": np.zeros(2, np.float32)}, lr=0.1)
        try:
            probe.step({"w": np.ones(2, np.float32)}, hyperparameters={"lr": 0.25})
            honoured = probe.refresh().hyperparameters["lr"] == 0.25
        finally:
            probe.delete()
        if not honoured:
            pytest.skip("this server does not apply hyperparameters sent with a step (StepRequest.hyperparameters)")
    monkeypatch.setattr(adapter, "HYPERPARAMETERS_WITH_STEP", with_step)
    calls = []
    remote_model = tiny_model()
    local_model = twin(remote_model)
    local = torch.optim.Adam(local_model.parameters(), lr=0.01)
    with RemoteOptimizer(remote_model.parameters(), client=client, lr=0.01) as remote:
        session = remote.sessions[0]
        real = session.set_hyperparameters
        monkeypatch.setattr(session, "set_hyperparameters", lambda **kw: (calls.append(kw), real(**kw))[1])
        lockstep(local_model, local, torch.optim.lr_scheduler.OneCycleLR(local, max_lr=0.02, total_steps=100),
                 remote_model, remote, torch.optim.lr_scheduler.OneCycleLR(remote, max_lr=0.02, total_steps=100),
                 steps=100)
        assert len(calls) == (0 if with_step else 100)
        assert session.refresh().hyperparameters["beta1"] == train.last_options["betas"][0]
    assert_close(remote_model, local_model)


def test_workers_train_one_shared_session(address):
    """Three RemoteOptimizer workers (threads, a connection each) of one sync session with two param groups
    and a StepLR schedule: every step is one round applying the mean of the three gradients, so each
    worker's model equals local torch.optim.Adam fed that mean; `close()` leaves and keeps the sessions."""
    import threading
    n, steps = 3, 12
    grads = {(w, k): [torch.randn(p.shape, generator=torch.Generator().manual_seed(100 * w + k))
                      for p in tiny_model().parameters()] for w in range(n) for k in range(steps)}
    models, errors = {}, []
    ready = threading.Barrier(n)

    def worker(w):
        try:
            model = tiny_model(seed=w)  # different initial weights: joining sets them to the session's
            groups = [{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 0.02}]
            with Client(address, timeout=60) as c:
                opt = RemoteOptimizer(groups, "torch.adam", client=c, lr=0.01, session_id="torch-shared",
                                      worker=f"w{w}", workers=n)
                sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
                models[w, "start"] = [p.detach().clone() for p in model.parameters()]
                ready.wait()  # every worker a member before the first round
                for k in range(steps):
                    for p, g in zip(model.parameters(), grads[w, k]):
                        p.grad = g.clone()
                    opt.step()
                    sched.step()
                models[w] = model
                opt.close()
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)
            ready.abort()

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors[0]
    assert all(not t.is_alive() for t in threads), "a worker hung"
    starts = [models[w, "start"] for w in range(n)]
    assert all(torch.equal(a, b) for s in starts[1:] for a, b in zip(starts[0], s))  # the session's weights
    local_model = tiny_model()
    with torch.no_grad():
        for p, s in zip(local_model.parameters(), starts[0]):
            p.copy_(s)
    local = torch.optim.Adam([{"params": local_model[0].parameters()},
                              {"params": local_model[2].parameters(), "lr": 0.02}], lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(local, step_size=4, gamma=0.5)
    for k in range(steps):
        for i, p in enumerate(local_model.parameters()):
            acc = grads[0, k][i].clone()
            for w in range(1, n):
                acc += grads[w, k][i]
            p.grad = acc / n  # the round's mean, summed in worker-name order as the server does
        local.step()
        sched.step()
    for w in range(n):
        assert_close(models[w], local_model)
    with Client(address) as c:
        for g in ("g0", "g1"):
            info = c.get_session(f"torch-shared.{g}")
            assert info.step == steps and info.members == ()  # every worker left; the sessions are kept
        # the schedule reached the server with each contribution (the last cut, after the last step, is unsent)
        assert c.get_session("torch-shared.g1").hyperparameters["lr"] == pytest.approx(0.02 * 0.5 ** 2)
        for g in ("g0", "g1"):
            c.delete_session(f"torch-shared.{g}")
    with pytest.raises(ValueError, match="needs session_id="):
        RemoteOptimizer(tiny_model().parameters(), address=address, worker="w0", workers=2)
