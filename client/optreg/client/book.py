"""Drop-in replacements for the book's optimizer classes, their state living in optreg.

    with Adam(lr=0.001, session_id="mnist-adam") as optimizer:
        for i in range(optimizer.resume(network.params), iters):
            grads = network.gradient(x_batch, t_batch)
            optimizer.update(network.params, grads)   # as in the book

The first `update` opens a session from the arrays it is given (their dtype becomes the master
dtype: the book works in float64); each `update` writes the new values into those same arrays.

`session_id`: a name for the session. If one of that name exists (a run that was interrupted),
`resume(params)` (or else the first `update`) attaches to it: the optimizer, names and shapes
must match, the arrays receive its parameters, and `resume` returns its step to continue from.
None: a fresh session, never resumed.

`keep`: what `close()` and leaving the with-block do with the session; without either (the book's
loop has no with-block), what the program's exit does (an uncaught exception, Ctrl-C included, being
the error), so a script used exactly as in the book leaves no session behind.
  - None (the default): with a session_id, "on-error"; without one, False.
  - "on-error": delete it when the block ends normally (the run is done); keep it when an
    exception ends the block (Ctrl-C, a crash), so running again resumes it. close() deletes.
  - False: always delete it. True: always keep it (delete it yourself, or with
    `optreg sessions delete ID`).

Several book-style processes can train one session (docs/workers.md): give each the same
`session_id`, a `worker` name of its own, and the shared session's shape (`workers=4`, and
optionally `mode`, `min_workers`, `round_deadline`). The first to start creates the session
from its arrays; the others attach to it and receive its parameters (call `resume(params)`
before the loop). Each `update` is the worker's contribution; in sync mode it returns with the
round's parameters in the arrays. Closing leaves the session (the others go on); the session is
kept unless keep=False.

    with Adam(lr=0.001, session_id="mnist-4", worker=f"w{rank}", workers=4) as optimizer:
        for i in range(optimizer.resume(network.params), iters):
            optimizer.update(network.params, network.gradient(x_batch, t_batch))
"""
from __future__ import annotations

import warnings

import numpy as np

from optreg.client.client import Client
from optreg.client.errors import UsageError
from optreg.client.session import KEEP_CHOICES, Session


class _ServiceOptimizer:
    optimizer = ""

    def __init__(self, address: str | None = None, client: Client | None = None, *, session_id: str | None = None,
                 keep=None, worker: str | None = None, workers: int | None = None, mode: str = "sync",
                 min_workers: int = 0, round_deadline: float | None = None, **hyperparameters):
        if keep is not None and keep not in KEEP_CHOICES:
            raise UsageError(f"keep={keep!r}: use None, True, False or 'on-error'")
        if worker is not None and (not session_id or not workers):
            raise UsageError("worker= needs session_id= (the shared session's name) and workers= (its most members)")
        self.worker_name = worker
        self.shared = dict(workers=workers, mode=mode, min_workers=min_workers,
                           round_deadline=round_deadline) if worker is not None else {}
        self.worker = None  # the optreg.client.workers.Worker handle, once open
        if worker is not None and keep is None:
            keep = True  # the session outlives any one worker
        self._own_client = client is None
        self.client = client or Client(address)
        self.hyperparameters = hyperparameters
        self.session_id = session_id
        self.keep = keep if keep is not None else ("on-error" if session_id else False)
        self.session: Session | None = None

    def __repr__(self):
        where = self.session.id if self.session is not None else self.session_id or "no session yet"
        return f"<{type(self).__name__} {where} {self.hyperparameters}>"

    def resume(self, params) -> int:
        """Open the session now: a new one from `params`, or, when one named `session_id` exists,
        that one, its parameters copied into `params`. Returns the step to continue from
        (0 for a new session). Call it before the loop, so the first gradients are computed from
        the resumed parameters: `for i in range(optimizer.resume(network.params), iters)`."""
        if self.session is None:
            self._open(params)
        return self.step

    def _open(self, params) -> bool:
        """Open or resume the session; True if resuming changed the values in `params`."""
        dtype = next(iter(params.values())).dtype.name
        before = {k: v.copy() for k, v in params.items()} if self.session_id is not None else None
        self.session = self.client.create_session(
            self.optimizer, params, session_id=self.session_id, resume=self.session_id is not None,
            master_dtype=dtype if dtype in ("float32", "float64") else None, keep=self.keep, **self.shared,
            **self.hyperparameters)
        if self.worker_name is not None:
            self.worker = self.client.join(self.session_id, self.worker_name, params)
        return self.session.resumed and any(not np.array_equal(before[k], params[k]) for k in params)

    def update(self, params, grads) -> None:
        if self.session is None and self._open(params):
            # Resumed without resume(): these gradients were computed from the parameters the
            # arrays held before, not from the session's; applying them would be wrong.
            warnings.warn(f"{type(self).__name__}: resumed session {self.session.id!r} at step {self.step}; its "
                          "parameters are now in the arrays and this update's gradients (computed from the old "
                          "values) were not applied. Call optimizer.resume(params) before the loop.",
                          RuntimeWarning, stacklevel=2)
            return
        if self.worker is not None:
            self.worker.arrays = params
            self.worker.step({k: grads[k] for k in params})
            return
        self.session.arrays = params
        self.session.step({k: grads[k] for k in params})

    @property
    def step(self) -> int:
        """Steps applied so far (0 before the first update); for a worker, the round it contributes to next."""
        if self.worker is not None:
            return self.worker.round
        return self.session.step_count if self.session is not None else 0

    def close(self, *, delete: bool | None = None) -> None:
        """End this optimizer: delete its session unless keep=True (or `delete` says otherwise),
        and close the connection this object opened."""
        if delete is None:
            delete = self.keep is not True
        self._end(delete)

    def _end(self, delete: bool) -> None:
        try:
            if self.worker is not None:
                try:
                    self.worker.leave()
                finally:
                    self.worker = None
            if self.session is not None:
                self.session.end(delete)
                self.session = None
        finally:
            if self._own_client:
                self.client.close()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self._end(self.keep is False or (self.keep == "on-error" and exc_type is None))


class SGD(_ServiceOptimizer):
    optimizer = "sgd"

    def __init__(self, lr=0.01, **kw):
        super().__init__(lr=lr, **kw)


class Momentum(_ServiceOptimizer):
    optimizer = "momentum"

    def __init__(self, lr=0.01, momentum=0.9, **kw):
        super().__init__(lr=lr, momentum=momentum, **kw)


class Nesterov(_ServiceOptimizer):
    optimizer = "nesterov"

    def __init__(self, lr=0.01, momentum=0.9, **kw):
        super().__init__(lr=lr, momentum=momentum, **kw)


class AdaGrad(_ServiceOptimizer):
    optimizer = "adagrad"

    def __init__(self, lr=0.01, **kw):
        super().__init__(lr=lr, **kw)


class RMSprop(_ServiceOptimizer):
    optimizer = "rmsprop"

    def __init__(self, lr=0.01, decay_rate=0.99, **kw):
        super().__init__(lr=lr, decay_rate=decay_rate, **kw)


class Adam(_ServiceOptimizer):
    optimizer = "adam"

    def __init__(self, lr=0.001, beta1=0.9, beta2=0.999, **kw):
        super().__init__(lr=lr, beta1=beta1, beta2=beta2, **kw)
