"""`RemoteOptimizer`: a torch.optim.Optimizer whose master parameters and state live in optreg sessions.

    opt = RemoteOptimizer(model.parameters(), "torch.adam", address="127.0.0.1:50051", lr=1e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=1000)
    loss.backward(); opt.step(); sched.step(); opt.zero_grad()

One session per param group (each group's hyperparameters are its own; `session_id="run1"` names
them `run1.g0`, `run1.g1`, ...). `step()` sends each group's gradients in their local dtype, the
server applies the torch-parity optimizer on a float32 master (float64 when the group is all
float64), and the reply is written into the model's own tensors in place. Whatever changed in a
group's options since the last step (a scheduler's lr, OneCycleLR's betas or momentum, a hand edit)
travels with that group's step, so every scheduler works unchanged.

Parameters without a gradient: torch skips them and keeps a step count per parameter; a session
keeps one per group. A group none of whose parameters has a gradient is skipped (no call, its
step does not advance: exactly torch). A group where only some have one is refused with a
ValueError before anything is sent: put parameters that are stepped separately (or frozen) in their
own group, or leave them out of the optimizer.

The server's master weights are authoritative: a step answers with them, so a change made to the
model's weights between steps (model.load_state_dict, p.data = ...) is overwritten by the next
step unless `load_state_dict()` follows it, which re-creates the sessions from the current weights.

GradScaler calls `step()` only when the unscaled gradients are finite (this class does not set
`_step_supports_amp_scaling`), so a skipped step makes no call and the sessions do not advance.

`optimizer.state` stays empty: the state is on the server; `state_dict()` reads it and returns
torch's layout (`step`, `exp_avg`, ...), which `torch.optim.Adam` etc. load, and `load_state_dict()`
accepts their state dicts (it replaces each group's session with one holding the given state).

Or let the server schedule the learning rate, the same for every worker and kept across restarts:

    opt = RemoteOptimizer(model.parameters(), "torch.adam", lr=1e-2, schedule="onecycle",
                          schedule_parameters={"total_steps": 1000})

The group's lr is then the base the schedule multiplies (torch's initial_lr); `server_lr()` gives the
lr each group's last step ran with. Do not also attach a local lr scheduler: a step that changes lr
on a scheduled session is refused.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable

import numpy as np
import torch

from optreg.client.client import Client
from optreg.client._step_transport import STREAM_ABOVE_BYTES
from optreg.client.workers import Worker
from optreg.client.torch.options import check_value, lookup, server_hyperparameters, to_session_state, \
    to_torch_state

# Where hyperparameter changes travel: with the fenced step (StepRequest.hyperparameters, applied
# under the step's lock and logged with it) or, for a server that ignores that field, in an
# UpdateHyperparameters call ahead of the steps.
HYPERPARAMETERS_WITH_STEP = True


def send_steps(work: list[tuple[Any, dict[str, np.ndarray], dict[str, float], Callable[[], None]]],
               metrics: dict[str, float] | None = None) -> None:
    """Step each (session, gradients, hyperparameter changes, done) in turn; `done` runs after each step.
    The changes were checked against the server's specs first (RemoteOptimizer.step)."""
    if not HYPERPARAMETERS_WITH_STEP:
        for session, _, changes, _ in work:
            if changes:
                session.set_hyperparameters(**changes)
    for session, grads, changes, done in work:
        if isinstance(session, Worker):  # a shared session's contribution cannot carry them: set them first
            if changes:
                session.set_hyperparameters(**changes)
            session.step(grads, metrics=metrics)
        else:
            session.step(grads, hyperparameters=changes if HYPERPARAMETERS_WITH_STEP and changes else None,
                         metrics=metrics)
        done()


def read_state(session) -> tuple[int, dict[str, dict[str, np.ndarray]]]:
    """(step, {slot: {name: array}}) from either client API (a tuple or a SessionState)."""
    got = session.read_state()
    if isinstance(got, tuple):
        info, _, slots = got
    else:
        info, slots = got.info, got.state
    return int(info.step), slots


def _numpy(t: torch.Tensor) -> np.ndarray:
    """A CPU numpy view (bfloat16 as ml_dtypes.bfloat16, which the wire knows)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if t.dtype == torch.bfloat16:
        import ml_dtypes
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _loss_metric(loss) -> dict[str, float] | None:
    """The closure's loss, recorded with the step (the server keeps client metrics with its steps)."""
    if isinstance(loss, torch.Tensor) and loss.numel() == 1:
        return {"loss": float(loss.detach())}
    if isinstance(loss, (int, float)):
        return {"loss": float(loss)}
    return None


_bump_version = getattr(torch.autograd.graph, "increment_version", None)


class _GroupSession:
    """One param group's session and the arrays its steps write into."""

    def __init__(self, session, group: dict, names: list[str], master: np.dtype, sent: dict[str, float],
                 worker: Worker | None = None):
        self.session, self.names, self.master = session, names, master
        self.worker = worker  # several workers on one session: this process's membership (steps go through it)
        self.server_optimizer = session.info.optimizer
        self.sent = dict(sent)  # the hyperparameters the server holds
        self.params = list(group["params"])
        # A float32 CPU contiguous parameter whose dtype is the master's is the session's array itself
        # (the reply lands in the model's tensor with no copy); any other gets its own master buffer.
        self.shared = [self._can_share(p) for p in self.params]
        self.shm = False

    @property
    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays a step's reply is written into (the worker's, for a shared session)."""
        return self.worker.arrays if self.worker is not None else self.session.arrays

    @property
    def stepper(self):
        return self.worker if self.worker is not None else self.session

    def use_shared_memory(self) -> None:
        """Parameters and gradients in a segment the server maps too: a step sends names and offsets only.
        The model's tensors keep their storage: gradients are copied in, results copied out."""
        self.session.enable_shared_memory()
        self.shm = True
        self.shared = [False] * len(self.params)

    def gradients(self, negate: bool) -> dict[str, np.ndarray]:
        if self.shm:
            out = self.session.gradients  # the segment's buffers: the client sends only their offsets
            for name, p in zip(self.names, self.params):
                # numpy, not torch: torch's copy threads would spin on the cores a local server needs
                if negate:
                    np.negative(_numpy(p.grad), out=out[name], casting="unsafe")
                else:
                    np.copyto(out[name], _numpy(p.grad), casting="unsafe")
            return {name: out[name] for name in self.names}
        return {n: _numpy(-p.grad if negate else p.grad) for n, p in zip(self.names, self.params)}

    def _can_share(self, p: torch.Tensor) -> bool:
        return p.device.type == "cpu" and p.is_contiguous() and p.dtype == _torch_dtype(self.master)

    def relink(self) -> None:
        """Point shared arrays at the parameters' current storage (`p.data = ...` replaces it)."""
        if self.shm:
            return
        for i, (name, p) in enumerate(zip(self.names, self.params)):
            if not self.shared[i]:
                continue
            arr = self.arrays.get(name)
            if (arr is None or not self._can_share(p)
                    or arr.__array_interface__["data"][0] != p.data_ptr() or arr.shape != tuple(p.shape)):
                if self._can_share(p):
                    self.arrays[name] = p.detach().numpy()
                else:
                    self.shared[i] = False
                    self.arrays[name] = _numpy(p).astype(self.master)

    def write_back(self) -> None:
        for name, p, shared in zip(self.names, self.params, self.shared):
            if not shared:
                value = self.arrays[name]
                if p.device.type == "cpu" and p.is_contiguous():
                    # numpy rounds to bf16/fp16 to nearest-even as torch does, without torch's copy threads
                    np.copyto(_numpy(p), value, casting="unsafe")
                else:
                    p.copy_(torch.from_numpy(value))
                    continue
            if _bump_version is not None:
                _bump_version(p)  # autograd sees the in-place change, as after torch's own step


def _torch_dtype(master: np.dtype) -> torch.dtype:
    return torch.float64 if master == np.float64 else torch.float32


class RemoteOptimizer(torch.optim.Optimizer):
    """A torch optimizer whose parameters' master copies and state live in an optreg server.

    `optimizer`: "torch.adam", "adamw", "torch.sgd", "torch.rmsprop", "torch.adagrad", "torch.adafactor",
    "torch.muon" or the torch.optim class. torch.optim.Muon takes 2-D parameters only, as torch's does
    (the session refuses others, naming them): step biases and norms with a second RemoteOptimizer of
    torch.optim.AdamW, as with torch. `**hyperparameters` are that torch class's own arguments (`betas=(0.9, 0.99)`,
    `momentum=0.9`, `nesterov=True`, `maximize=True`, ...), validated by it; param groups may
    override them as in torch. Connect with `address=` (and `token=`) or pass a `client=`.
    `session_id=`: the sessions are named `<session_id>.g<group index>`; with `resume=True` they
    are attached to (and the server's parameters copied into the model) instead of created.
    `worker=`: this process is one of several workers training the same sessions (docs/workers.md).
    Needs `session_id=` and `workers=` (the most members; with `mode`, `min_workers`,
    `round_deadline`, `staleness`, `lease` as `Client.create_session` takes them: a framework that
    restarts a failed worker under its name, as Ray Train does, wants a lease longer than the restart):
    the first worker to start creates the sessions, the others attach, each joins as `worker` and its
    parameters are set to the server's. Each `step()` is the worker's contribution (in sync mode it returns when the round
    closes, with the round's parameters); option changes (a scheduler's) are set with
    UpdateHyperparameters before the contribution, so every worker should run the same schedule.
    `close()` leaves the sessions and keeps them (`close(delete=True)` deletes them);
    `load_state_dict()` is refused (it would replace the session under the other workers).
    `shared_memory`: None (default) puts a group's tensors in a segment shared with the server when
    the server is on this host and the group is over the client's streaming size (2 MiB); True for
    every group (a server elsewhere is refused), False never. Smaller groups and remote servers use
    unary or streamed steps, as the client chooses by size.
    """

    def __init__(self, params, optimizer: Any = "torch.adam", address: str | None = None, *,
                 client: Client | None = None, token: str | None = None, session_id: str | None = None,
                 worker: str | None = None, resume: bool = False, durability: str | None = None,
                 shared_memory: bool | None = None, workers: int | None = None, mode: str = "sync",
                 min_workers: int = 0, round_deadline: float | None = None, staleness: int = 0,
                 lease: float | None = None, schedule: str | None = None, schedule_parameters: dict | None = None,
                 **hyperparameters):
        if worker is not None and (not session_id or not workers):
            raise ValueError(f"worker={worker!r} needs session_id= (the shared sessions' name) and workers= (the most "
                             "workers at once)")
        if workers is not None and worker is None:
            raise ValueError("workers= needs worker= (this process's name among the workers)")
        if worker is not None and shared_memory:
            raise ValueError("shared_memory=True: a worker's contributions are sent over gRPC; leave it unset")
        self.worker = worker
        self._shared = dict(workers=workers, mode=mode, min_workers=min_workers, round_deadline=round_deadline,
                            staleness=staleness, lease=lease) if worker is not None else {}
        if resume and not session_id:
            raise ValueError("resume=True needs session_id=: the sessions to attach to are named after it")
        self.optreg_name, self._mapping = lookup(optimizer)
        # The torch class checks the options and supplies its defaults, so param_groups hold exactly
        # the keys (and values) torch's own optimizer would: schedulers and state dicts see no difference.
        probe = self._mapping.torch_class([torch.zeros(1, 1, requires_grad=True)], **hyperparameters)  # 2-D: Muon
        defaults = dict(probe.defaults)
        self._owns_client = client is None
        if client is None:
            kw = {"token": token} if token is not None else {}
            client = Client(address, **kw) if address is not None else Client(**kw)
        self.client = client
        self.session_id, self.resume, self.durability = session_id, resume, durability
        self._schedule = dict(schedule=schedule, schedule_parameters=schedule_parameters) if schedule else {}
        self.shared_memory = shared_memory
        self._groups: list[_GroupSession] = []
        self._specs: dict[str, dict] = {}  # optimizer -> {hyperparameter: spec}, as the server publishes them
        try:
            super().__init__(params, defaults)
        except BaseException:
            self.close()  # sessions of the groups opened before the one that failed, and our connection
            raise

    # -- groups and their sessions ------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        self._groups.append(self._open(len(self.param_groups) - 1))

    def _where(self, index: int) -> str:
        return f"param group {index}"

    def _check_group(self, index: int, group: dict) -> None:
        for key in ("differentiable", "capturable"):
            if group.get(key):
                raise ValueError(f"{self._where(index)}: {key}=True cannot apply to an optimizer that runs on a "
                                 f"server; leave {key} False")
        for p in group["params"]:
            if not p.is_floating_point():
                raise ValueError(f"{self._where(index)}: a parameter of dtype {p.dtype}; optreg optimizes floating "
                                 "point parameters")

    def _master(self, group: dict) -> np.dtype:
        return np.dtype(np.float64) if all(p.dtype == torch.float64 for p in group["params"]) \
            else np.dtype(np.float32)

    def _names(self, index: int) -> list[str]:
        """The session's tensor names: the model's (given model.named_parameters()), else p<state dict index>."""
        group = self.param_groups[index]
        if "param_names" in group:
            return list(group["param_names"])
        start = sum(len(g["params"]) for g in self.param_groups[:index])
        return [f"p{start + j}" for j in range(len(group["params"]))]

    def _arrays(self, group: dict, master: np.dtype, names: list[str]) -> dict[str, np.ndarray]:
        out = {}
        for name, p in zip(names, group["params"]):
            shareable = p.device.type == "cpu" and p.is_contiguous() and p.dtype == _torch_dtype(master)
            out[name] = p.detach().numpy() if shareable else _numpy(p).astype(master)
        return out

    def _sid(self, index: int) -> str:
        return f"{self.session_id}.g{index}" if self.session_id else ""

    def _open(self, index: int, state: dict | None = None, initial_step: int = 0) -> _GroupSession:
        group = self.param_groups[index]
        self._check_group(index, group)
        master, names = self._master(group), self._names(index)
        arrays = self._arrays(group, master, names)
        kw = {"durability": self.durability} if self.durability else {}
        kw.update(self._schedule)
        if state:
            kw.update(state=state, initial_step=initial_step)
        # resume=True attaches to an existing session of that id and copies its parameters into `arrays`
        # (a worker always does: whichever worker starts first creates the shared session)
        session = self.client.create_session(
            self._mapping.server_optimizer(group), arrays, master_dtype=str(master),
            session_id=self._sid(index) or None, resume=(self.resume or bool(self.worker)) and not state, **kw,
            **self._shared, **server_hyperparameters(self._mapping, group))
        # a worker joins; the reply's parameters land in `arrays` (the model's tensors where they are shared)
        worker = self.client.join(session.id, self.worker, arrays) if self.worker else None
        # What the server holds: a resumed session's own values, so the first step sends the group's.
        gs = _GroupSession(session, group, names, master, dict(session.info.hyperparameters), worker)
        if worker is None and (self.shared_memory or (self.shared_memory is None and self.client.transport.is_local()
                                                      and session.info.parameter_bytes > STREAM_ABOVE_BYTES)):
            try:
                gs.use_shared_memory()
            except BaseException:
                session.delete()
                raise
        with torch.no_grad():
            gs.write_back()
        return gs

    # -- the step -----------------------------------------------------------------------------------
    @torch.no_grad()
    def server_lr(self) -> list[float]:
        """Per param group, the lr its session's last step ran with (a server schedule's value; 0 before
        the first step)."""
        return [gs.session.lr for gs in self._groups]

    def step(self, closure: Callable[[], Any] | None = None):
        """Send every group's gradients (and its changed options); write the results into the parameters.
        A closure's loss travels with the step as the metric "loss"."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = []  # checked for every group before anything is sent, so a refused step changes nothing
        for index, (group, gs) in enumerate(zip(self.param_groups, self._groups)):
            have = [p.grad is not None for p in group["params"]]
            if not any(have):
                continue
            if not all(have):
                missing = [n for n, h in zip(gs.names, have) if not h]
                raise ValueError(
                    f"{self._where(index)}: no gradient for {', '.join(missing)} while the group's other parameters "
                    "have one. torch would skip them and count steps per parameter; an optreg session counts one "
                    "per group, so this step is refused: put such parameters in their own param group (or leave "
                    "frozen ones out of the optimizer)")
            if self._mapping.server_optimizer(group) != gs.server_optimizer:
                raise ValueError(f"{self._where(index)}: decoupled_weight_decay changed after the session was "
                                 f"created as {gs.server_optimizer!r}; it cannot change mid-run")
            if any(p.grad.is_sparse for p in group["params"]):
                raise ValueError(f"{self._where(index)}: sparse gradients are not supported; use dense ones")
            hp = server_hyperparameters(self._mapping, group)
            changes = {k: v for k, v in hp.items() if gs.sent.get(k) != v}
            if changes:
                specs = self._hyperparameter_specs(gs.server_optimizer)
                for k, v in changes.items():
                    if k in specs:
                        check_value(specs[k], v, self._where(index))
            work.append((group, gs, changes))
        calls = []
        for group, gs, changes in work:
            gs.relink()
            grads = gs.gradients(negate=group.get("maximize", False))  # torch's maximize steps on -grad

            def done(gs=gs, changes=changes):
                gs.sent.update(changes)
                gs.write_back()
            calls.append((gs.stepper, grads, changes, done))
        send_steps(calls, _loss_metric(loss))
        return loss

    def _hyperparameter_specs(self, optimizer: str) -> dict:
        if optimizer not in self._specs:
            for info in self.client.optimizers():  # one call, the first time an option changes
                self._specs[info.name] = {h.name: h for h in info.hyperparameters}
        return self._specs.get(optimizer, {})

    # -- state dicts --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """torch's layout, read from the server: what `torch.optim.<Class>.load_state_dict` expects."""
        for group, gs in zip(self.param_groups, self._groups):
            step, slots = read_state(gs.session)
            for name, p in zip(gs.names, group["params"]):
                st = to_torch_state(self._mapping, group, step, {s: a[name] for s, a in slots.items()}, p)
                if st:
                    self.state[p] = st
        try:
            return super().state_dict()
        finally:
            self.state = defaultdict(dict)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of this class or of the matching torch.optim class: each group's session is
        replaced by one holding the given state, the current parameter values and the group's options.
        Everything is checked before anything changes."""
        if self.worker is not None:
            raise ValueError(f"load_state_dict: worker {self.worker!r} shares its sessions with other workers; "
                             "replacing them would pull the state from under the others: load the state into a "
                             "single-writer RemoteOptimizer (or create the shared sessions from it) instead")
        saved_groups, saved_state = state_dict["param_groups"], state_dict["state"]
        if len(saved_groups) != len(self.param_groups) or any(
                len(g["params"]) != len(s["params"]) for g, s in zip(self.param_groups, saved_groups)):
            raise ValueError("the state dict's param groups do not match this optimizer's (their number or sizes "
                             "differ)")
        cls = self._mapping.torch_class.__name__
        new = []
        for index, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            options = {**saved, "params": group["params"]}
            try:
                self._mapping.hyperparameters(options)
            except KeyError as e:
                raise ValueError(f"{self._where(index)}: the state dict has no option {e.args[0]!r}, which {cls} "
                                 "keeps: is it from another optimizer?") from None
            self._check_group(index, options)
            # The raw saved tensors: torch would cast them to the parameters' dtype; the master keeps float32.
            states = [saved_state.get(i, {}) for i in saved["params"]]
            slots, step = to_session_state(self._mapping, options, self._names(index), states,
                                           [tuple(p.shape) for p in group["params"]], self._master(group),
                                           self._where(index))
            new.append((index, slots, step))
        super().load_state_dict(state_dict)  # the groups' options (initial_lr too), through torch's hooks
        self.state = defaultdict(dict)
        resume, self.resume = self.resume, False
        try:
            for index, slots, step in new:
                old = self._groups[index]
                if self._sid(index):  # the new session takes the old one's name: delete first
                    old.session.delete()
                self._groups[index] = self._open(index, state=slots, initial_step=step)
                if not self._sid(index):
                    old.session.delete()
        finally:
            self.resume = resume

    # -- lifetime -----------------------------------------------------------------------------------
    @property
    def sessions(self) -> list:
        """The client Session of each param group."""
        return [g.session for g in self._groups]

    def close(self, delete: bool | None = None) -> None:
        """Delete the sessions (delete=False: keep them, releasing only their shared-memory segments) and
        close the connection if this optimizer opened it. A worker leaves the sessions and keeps them
        (delete=True deletes them, for every worker)."""
        if delete is None:
            delete = self.worker is None
        try:
            for g in self._groups:
                if g.worker is not None:
                    try:
                        g.worker.leave()
                    except Exception:  # the session may be gone (another worker deleted it)
                        if not delete:
                            raise
                if delete:
                    g.session.delete()
                else:
                    g.session.disable_shared_memory()
        finally:
            if self._owns_client:
                self.client.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __getstate__(self):
        raise TypeError("a RemoteOptimizer holds a connection and cannot be pickled; save state_dict() instead")
