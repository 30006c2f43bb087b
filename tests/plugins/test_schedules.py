"""Learning-rate schedules on the server (issue 24, item 4): the optreg_schedules hook, its built-ins
checked against torch.optim.lr_scheduler, the lr in force in the reply and in telemetry, shared
sessions, restarts, export/import, refusals and a third-party schedule. Real servers throughout."""
from __future__ import annotations

import json
import math
import re
import textwrap
import threading

import grpc
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from cli_helpers import optreg  # noqa: E402
from optreg.client import Client, FailedPrecondition, Internal, InvalidArgument  # noqa: E402
from optreg.client.torch import RemoteOptimizer  # noqa: E402
from optreg.v1 import session_pb2, session_pb2_grpc, telemetry_pb2, telemetry_pb2_grpc, tensors  # noqa: E402
from test_plugins_entry_point import install_fake_distribution  # noqa: E402

L = torch.optim.lr_scheduler
LR, STEPS = 0.1, 300

# name -> (schedule_parameters, the torch scheduler that must give the same lr at every step)
CASES = {
    "constant": ({}, lambda o: L.LambdaLR(o, lambda k: 1.0)),
    "linear-warmup": ({"warmup_steps": 50, "start_factor": 0.1}, lambda o: L.LinearLR(o, 0.1, 1.0, 50)),
    "cosine": ({"warmup_steps": 30, "total_steps": STEPS, "start_factor": 0.05, "min_factor": 0.01},
               lambda o: L.SequentialLR(o, [L.LinearLR(o, 0.05, 1.0, 30),
                                            L.CosineAnnealingLR(o, STEPS - 30, eta_min=LR * 0.01)], [30])),
    "linear-decay": ({"warmup_steps": 20, "total_steps": STEPS, "start_factor": 0.2, "end_factor": 0.1},
                     lambda o: L.SequentialLR(o, [L.LinearLR(o, 0.2, 1.0, 20), L.LinearLR(o, 1.0, 0.1, STEPS - 20)],
                                              [20])),
    "onecycle": ({"total_steps": STEPS, "pct_start": 0.25, "div_factor": 10.0, "final_div_factor": 100.0},
                 lambda o: L.OneCycleLR(o, max_lr=LR, total_steps=STEPS, pct_start=0.25, div_factor=10.0,
                                        final_div_factor=100.0, cycle_momentum=False)),
    "inverse-sqrt": ({"warmup_steps": 40},
                     lambda o: L.LambdaLR(o, lambda k: (k + 1) / 40 if k + 1 < 40 else math.sqrt(40 / (k + 1)))),
}


def torch_run(make, steps, lr=LR, p0=(1.0, -2.0, 0.5)):
    """torch SGD (float64, gradient ones) under a scheduler stepped after each optimizer.step(): the lr of
    every step and the parameters after each."""
    p = torch.nn.Parameter(torch.tensor(p0, dtype=torch.float64))
    opt = torch.optim.SGD([p], lr=lr)
    sched = make(opt)
    lrs, params = [], []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        p.grad = torch.ones_like(p)
        opt.step()
        sched.step()
        params.append(p.detach().numpy().copy())
    return lrs, params


def _telemetry_lrs(address, session_id) -> dict[int, float]:
    with grpc.insecure_channel(address) as ch:
        got = telemetry_pb2_grpc.TelemetryServiceStub(ch).GetTelemetry(
            telemetry_pb2.GetTelemetryRequest(session_id=session_id), timeout=30)
    return {s.step: s.hyperparameters["lr"] for s in got.steps if s.steps == 1}


def test_each_builtin_matches_torch_lr_scheduler_in_the_reply_and_telemetry(start_server):
    srv = start_server()
    with Client(srv.address, timeout=60) as c:
        listed = {s.name: s for s in c.schedules()}
        assert set(CASES) <= set(listed)
        assert listed["cosine"].required == ("total_steps",) and listed["cosine"].distribution == "optreg"
        for name, (params, make) in CASES.items():
            want_lr, want_p = torch_run(make, STEPS)
            p = {"w": np.array([1.0, -2.0, 0.5])}
            s = c.create_session("torch.sgd", p, lr=LR, schedule=name, schedule_parameters=params,
                                 session_id=f"s-{name}", durability="none")
            assert s.info.schedule == name and s.info.schedule_parameters.keys() >= params.keys()
            got = []
            for t in range(STEPS):
                s.step({"w": np.ones(3)})
                got.append(s.lr)
                np.testing.assert_allclose(p["w"], want_p[t], rtol=0, atol=1e-12, err_msg=f"{name} step {t + 1}")
            np.testing.assert_allclose(got, want_lr, rtol=0, atol=1e-12, err_msg=name)
            telemetry = _telemetry_lrs(srv.address, s.id)
            assert len(telemetry) >= 50, name
            for step, lr in telemetry.items():
                assert lr == got[step - 1], (name, step)
        # A session without a schedule: the client's own lr, per step, as before; the reply says it.
        plain = c.create_session("torch.sgd", {"w": np.zeros(2)}, lr=0.5, durability="none")
        plain.step({"w": np.ones(2)}, hyperparameters={"lr": 0.25})
        assert plain.lr == 0.25 and plain.arrays["w"].tolist() == [-0.25, -0.25]


def _warmup_cosine(start, warmup, total, eta_min=0.0):
    return lambda o: L.SequentialLR(o, [L.LinearLR(o, start, 1.0, warmup),
                                        L.CosineAnnealingLR(o, total - warmup, eta_min=eta_min)], [warmup])


def test_stream_resident_and_shared_memory_steps_carry_the_scheduled_lr(start_server):
    srv = start_server()
    n = 700_000  # above the client's streaming size: StepStream
    params = {"total_steps": 10, "warmup_steps": 4, "start_factor": 0.5}
    want, _ = torch_run(_warmup_cosine(0.5, 4, 10), 6)
    with Client(srv.address, timeout=60) as c:
        made = [c.create_session("torch.sgd", {"w": np.zeros(n, np.float32)}, lr=LR, schedule="cosine",
                                 schedule_parameters=params, durability="none") for _ in range(3)]
        streamed, shm, resident = made
        shm.enable_shared_memory()
        resident.enable_shared_memory(resident=True)
        for t in range(6):
            for s in made:
                s.step({"w": np.ones(n, np.float32)})
                assert s.lr == pytest.approx(want[t], abs=1e-12), t
        w = np.float32(0)
        for lr in want:
            w = np.float32(w - np.float32(lr))  # SGD on a float32 master: each step's lr, rounded as it ran
        for s in made:
            assert s.arrays["w"][0] == w and s.arrays["w"][-1] == w


def test_workers_of_a_shared_session_step_under_the_same_schedule(start_server):
    srv = start_server()
    want, _ = torch_run(CASES["linear-warmup"][1], 60)
    with Client(srv.address, timeout=60) as c:
        for mode in ("sync", "async"):
            s = c.create_session("sgd", {"w": np.zeros(4)}, lr=LR, workers=2, mode=mode, schedule="linear-warmup",
                                 schedule_parameters=CASES["linear-warmup"][0], durability="none")
            clients = [Client(srv.address, timeout=60) for _ in range(2)]
            ws = [cl.join(s.id, f"w{i}") for i, cl in enumerate(clients)]
            if mode == "sync":  # both contribute to each round: one step, the same lr in both replies
                for rnd in range(6):
                    out = [None, None]
                    ts = [threading.Thread(target=lambda i=i: out.__setitem__(i, ws[i].step({"w": np.ones(4)})))
                          for i in range(2)]
                    for t in ts:
                        t.start()
                    for t in ts:
                        t.join(60)
                    assert out[0].step == out[1].step == rnd + 1
                    assert out[0].lr == out[1].lr == pytest.approx(want[rnd], abs=1e-12), rnd
            else:  # each contribution is a step of its own: its lr is the schedule's at that step
                for k in range(12):
                    r = ws[k % 2].step({"w": np.ones(4)})
                    assert r.step == k + 1 and r.lr == pytest.approx(want[k], abs=1e-12), k
            for cl in clients:
                cl.close()


def test_schedule_survives_kill9_restart_and_replays_bit_for_bit(start_server, tmp_path):
    """A logged session killed (-9) after 20 steps: its log replays them, each step's lr computed again
    from the step, to the state it had; step 21 runs at the schedule's lr and gives what a run never
    interrupted gives, bit for bit."""
    data = str(tmp_path / "data")
    params = {"total_steps": 40, "warmup_steps": 5, "start_factor": 0.1}
    rng = np.random.default_rng(3)
    grads = [rng.standard_normal(6) for _ in range(21)]
    w0 = np.linspace(-1, 1, 6)

    def create(c, sid):
        return c.create_session("torch.adam", {"w": w0.copy()}, session_id=sid, lr=0.05, schedule="cosine",
                                schedule_parameters=params, durability="log")

    srv = start_server("--data-dir", data)
    with Client(srv.address, timeout=60) as c:
        s = create(c, "killed")
        for g in grads[:20]:
            s.step({"w": g})
        before = s.read_state()
    srv.kill()
    srv = start_server("--data-dir", data)
    want, _ = torch_run(_warmup_cosine(0.1, 5, 40), 21, lr=0.05)
    with Client(srv.address, timeout=60) as c:
        s = c.session("killed")
        assert (s.info.step, s.info.schedule, s.info.hyperparameters["lr"]) == (20, "cosine", 0.05)
        assert s.info.schedule_parameters == {"min_factor": 0.0, "start_factor": 0.1, "total_steps": 40.0,
                                              "warmup_steps": 5.0}
        after = s.read_state()
        assert np.array_equal(after.parameters["w"], before.parameters["w"])
        for slot in before.state:
            assert np.array_equal(after.state[slot]["w"], before.state[slot]["w"]), slot
        s.step({"w": grads[20]})
        assert s.lr == pytest.approx(want[20], abs=1e-12)
        twin = create(c, "twin")
        for g in grads:
            twin.step({"w": g})
        assert twin.lr == s.lr
        assert np.array_equal(twin.arrays["w"], s.arrays["w"])


def test_export_import_keeps_the_schedule(start_server, tmp_path):
    srv = start_server()
    want, _ = torch_run(CASES["onecycle"][1], 8)
    with Client(srv.address, timeout=60) as c:
        s = c.create_session("torch.sgd", {"w": np.zeros(3)}, session_id="run", lr=LR, schedule="onecycle",
                             schedule_parameters=CASES["onecycle"][0], durability="none")
        for _ in range(5):
            s.step({"w": np.ones(3)})
    path = tmp_path / "run.safetensors"
    for args in (("export", "run", str(path)), ("import", str(path), "--session-id", "copy")):
        done = optreg("sessions", *args, "--address", srv.address)
        assert done.returncode == 0, done.stderr
    with Client(srv.address, timeout=60) as c:
        copy = c.session("copy")
        assert copy.info.schedule == "onecycle" and copy.info.step == 5
        for t in range(5, 8):
            copy.step({"w": np.ones(3)})
            assert copy.lr == pytest.approx(want[t], abs=1e-12), t


def test_bad_schedules_are_invalid_argument_naming_the_field_and_change_nothing(start_server):
    srv = start_server()
    bad = [
        (dict(schedule="no-such"), ["config.schedule", "'no-such'", "cosine"]),
        (dict(schedule="cosine"), ["config.schedule_parameters", "needs parameter total_steps"]),
        (dict(schedule="cosine", schedule_parameters={"total_steps": 10, "warmup": 2}),
         ["config.schedule_parameters", "unknown parameter warmup", "warmup_steps"]),
        (dict(schedule="cosine", schedule_parameters={"total_steps": 5, "warmup_steps": 5}),
         ["config.schedule_parameters", "total_steps=5", "warmup_steps=5"]),
        (dict(schedule="onecycle", schedule_parameters={"total_steps": 10, "pct_start": 1.5}),
         ["config.schedule_parameters", "pct_start=1.5", "< 1"]),
        (dict(schedule="linear-warmup", schedule_parameters={"warmup_steps": 2.5}),
         ["config.schedule_parameters", "warmup_steps=2.5", "integer"]),
    ]
    with Client(srv.address, timeout=60) as c:
        for kw, words in bad:
            with pytest.raises(InvalidArgument) as e:
                c.create_session("torch.sgd", {"w": np.zeros(2)}, **kw)
            for w in words:
                assert w in str(e.value), (w, str(e.value))
        with grpc.insecure_channel(srv.address) as ch:  # parameters without a schedule, over the wire itself
            with pytest.raises(grpc.RpcError) as e:
                session_pb2_grpc.SessionServiceStub(ch).CreateSession(session_pb2.CreateSessionRequest(
                    config=session_pb2.SessionConfig(optimizer="sgd", schedule_parameters={"total_steps": 3}),
                    parameters=[tensors.from_numpy("w", np.zeros(2))]), timeout=30)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "config.schedule_parameters" in e.value.details()
        assert c.list_sessions() == []
        # A step that sets lr on a scheduled session: refused, naming lr; nothing applied, the server serves on.
        s = c.create_session("torch.sgd", {"w": np.zeros(2)}, lr=LR, schedule="constant", durability="none")
        with pytest.raises(InvalidArgument) as e:
            s.step({"w": np.ones(2)}, hyperparameters={"lr": 0.5})
        assert "lr=0.5" in str(e.value) and "schedule constant" in str(e.value)
        assert s.refresh().step == 0 and s.info.hyperparameters["lr"] == LR
        with pytest.raises(FailedPrecondition, match="schedule constant"):  # sparse rows would catch up under one lr
            c.create_session("sgd", {"w": np.zeros((4, 2))}, lr=LR, schedule="constant",
                             durability="none").step_sparse("w", [1], np.ones((1, 2)))
        s.step({"w": np.ones(2)})
        assert s.lr == LR and s.arrays["w"].tolist() == [-LR, -LR]
        s.set_hyperparameters(lr=0.2)  # the base the schedule multiplies
        s.step({"w": np.ones(2)})
        assert s.lr == 0.2


STEP_DECAY = textwrap.dedent('''
    from optreg.plugins import Hyperparameter, Schedule, hookimpl

    def factor(k, p):
        return p["gamma"] ** (k // p["step_size"])

    @hookimpl
    def optreg_schedules():
        return [Schedule(name="step-decay", summary="lr * gamma every step_size steps (torch StepLR).",
                         factor=factor, parameters=(
                             Hyperparameter("step_size", 1, "steps between decays", type=int, minimum=1),
                             Hyperparameter("gamma", 0.1, "the decay", minimum=0.0, maximum=1.0)),
                         required=("step_size",))]
''')


def test_third_party_schedule_from_an_entry_point(tmp_path, start_server):
    install_fake_distribution(tmp_path, name="optreg-stepdecay", version="0.2.0", body=STEP_DECAY)
    srv = start_server(env={"PYTHONPATH": str(tmp_path)})
    want, _ = torch_run(lambda o: L.StepLR(o, step_size=7, gamma=0.5), 30)
    with Client(srv.address, timeout=60) as c:
        assert not c.plugin_failures()
        found = {s.name: s for s in c.schedules()}["step-decay"]
        assert (found.plugin, found.distribution, found.version) == ("signsgd", "optreg-stepdecay", "0.2.0")
        s = c.create_session("torch.sgd", {"w": np.zeros(2)}, lr=LR, schedule="step-decay",
                             schedule_parameters={"step_size": 7, "gamma": 0.5}, durability="none")
        got = []
        for _ in range(30):
            s.step({"w": np.ones(2)})
            got.append(s.lr)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
        listing = optreg("optimizers", "--json", "--address", srv.address)  # the CLI lists them all
        assert listing.returncode == 0, listing.stderr
        assert set(CASES) | {"step-decay"} <= {s["name"] for s in json.loads(listing.stdout)["schedules"]}
        table = optreg("optimizers", "--address", srv.address).stdout
        row = next(line for line in table.splitlines() if line.startswith("step-decay "))
        assert re.split(r"\s{2,}", row) == ["step-decay", "step_size*, gamma=0.1", "optreg-stepdecay 0.2.0"], table


def test_a_session_whose_schedule_is_uninstalled_is_listed_refused_and_served_again(tmp_path, start_server):
    (tmp_path / "site").mkdir()
    install_fake_distribution(tmp_path / "site", name="optreg-stepdecay", version="0.2.0", body=STEP_DECAY)
    data = str(tmp_path / "data")
    with_plugin = {"PYTHONPATH": str(tmp_path / "site")}
    srv = start_server("--data-dir", data, env=with_plugin)
    with Client(srv.address, timeout=60) as c:
        s = c.create_session("torch.sgd", {"w": np.zeros(2)}, session_id="decay", lr=LR, schedule="step-decay",
                             schedule_parameters={"step_size": 2, "gamma": 0.5}, durability="log")
        for _ in range(3):
            s.step({"w": np.ones(2)})
    srv.kill()
    srv = start_server("--data-dir", data)  # the plugin is gone
    with Client(srv.address, timeout=60) as c:
        info = c.get_session("decay")
        assert info.missing_optimizer == "schedule step-decay" and info.step == 3
        with pytest.raises(FailedPrecondition, match="needs schedule step-decay, which is not installed"):
            c.session("decay").step({"w": np.ones(2)})
    srv.stop()
    srv = start_server("--data-dir", data, env=with_plugin)
    with Client(srv.address, timeout=60) as c:
        s = c.session("decay")
        s.step({"w": np.ones(2)})  # step 4: 0.5 ** (3 // 2)
        assert s.lr == LR * 0.5 and s.info.schedule == "step-decay"


BROKEN = textwrap.dedent('''
    from optreg.plugins import Schedule, hookimpl

    @hookimpl
    def optreg_schedules():
        return [Schedule(name="nan-at-3", summary="breaks at step 3.",
                         factor=lambda k, p: float("nan") if k == 2 else 1.0),
                Schedule(name="Bad Name", summary="refused at load.", factor=lambda k, p: 1.0)]
''')


def test_a_schedule_that_fails_is_internal_naming_the_plugin_and_changes_nothing(tmp_path, start_server):
    install_fake_distribution(tmp_path, name="optreg-broken", body=BROKEN)
    srv = start_server(env={"PYTHONPATH": str(tmp_path)})
    with Client(srv.address, timeout=60) as c:
        (failure,) = c.plugin_failures()
        assert failure.plugin == "signsgd" and "invalid schedule definition" in failure.reason
        s = c.create_session("torch.sgd", {"w": np.zeros(2)}, lr=LR, schedule="nan-at-3", durability="none")
        s.step({"w": np.ones(2)})
        s.step({"w": np.ones(2)})
        with pytest.raises(Internal, match=r"schedule nan-at-3 \(plugin signsgd\) failed at step 3"):
            s.step({"w": np.ones(2)})
        assert s.refresh().step == 2
        assert s.read_parameters()["w"].tolist() == [-2 * LR, -2 * LR]


def test_remote_optimizer_with_a_server_schedule_matches_torch_with_onecycle(start_server):
    srv = start_server()
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2).double()
    ref = torch.nn.Linear(4, 2).double()
    ref.load_state_dict(model.state_dict())
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randn(16, 2, dtype=torch.float64)
    opt = RemoteOptimizer(model.parameters(), "torch.adam", address=srv.address, lr=0.01, schedule="onecycle",
                          schedule_parameters={"total_steps": 40})
    local = torch.optim.Adam(ref.parameters(), lr=0.01)
    sched = L.OneCycleLR(local, max_lr=0.01, total_steps=40, cycle_momentum=False)
    try:
        for _ in range(40):
            for m, o in ((model, opt), (ref, local)):
                o.zero_grad()
                torch.nn.functional.mse_loss(m(x), y).backward()
                o.step()
            assert opt.server_lr()[0] == pytest.approx(sched.get_last_lr()[0], abs=1e-12)
            sched.step()
        for a, b in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    finally:
        opt.close()
