"""DiLoCo for numpy clients (Douillard et al., 2023; docs/slow-links.md): H local steps, then one outer step.

    outer = client.create_session(**diloco_outer(params, workers=4))     # Nesterov, lr 0.7, momentum 0.9
    with client.join(outer.id, worker="w0") as w:                        # (or the Session itself, alone)
        loco = DiLoCo(w, AdamW(lr=1e-3), every=50, compress=Int8Blocks(256))
        for batch in data:
            loco.step(grads_of(loco.params, batch))

Each worker trains `params` (its own copy) with its local inner optimizer, whose state never leaves
it. Every `every` steps it sends its pseudo-gradient, the weights the round started from minus its
current ones, to the outer session as one contribution; the outer optimizer (any registered one;
Nesterov by default) applies the round's mean, and every worker starts the next round from the
answer. Only those syncs cross the network: `every` times fewer than a step per batch, and fewer
bytes again with `compress` (optreg.client.compression, the residual kept here).
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from optreg.client.errors import UsageError

OUTER = {"optimizer": "nesterov", "lr": 0.7, "momentum": 0.9}


def diloco_outer(params: Mapping[str, np.ndarray], workers: int | None = None, **options) -> dict:
    """create_session's arguments for an outer session: Nesterov, lr 0.7, momentum 0.9 (the paper's), answered
    with bf16 deltas (step_reply "bf16_delta"), unless `options` say otherwise (another optimizer: its own
    defaults); `workers`: a sync session of that many workers (None: one client, unshared)."""
    base = OUTER if options.get("optimizer", OUTER["optimizer"]) == OUTER["optimizer"] else {}
    # bf16 deltas from the copy the server keeps of the workers' weights: 2 bytes a parameter down, not 4,
    # and what one answer rounds off the next carries (no drift).
    out = {**base, "params": params, "step_reply": "bf16_delta", **options}
    if workers is not None:
        out.setdefault("mode", "sync")
        out["workers"] = workers
    return out


class AdamW:
    """A local inner optimizer: AdamW over numpy arrays, in place (float32 or float64 as the arrays). Weight
    decay 0.1 by default, the paper's inner AdamW's: without it the outer Nesterov step (0.7 x the mean
    pseudo-gradient, momentum 0.9) drives a small training set's loss to ~0 and the test loss up (the demo
    network on digits: 3.3x synchronous data parallel's at 0.01, 1.00x at 0.1; docs/slow-links.md)."""

    def __init__(self, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1):
        self.lr, self.b1, self.b2, self.eps, self.wd = lr, beta1, beta2, eps, weight_decay
        self.t, self.m, self.v = 0, {}, {}

    def step(self, params: dict, grads: Mapping[str, np.ndarray]) -> None:
        self.t += 1
        c1, c2 = 1 - self.b1 ** self.t, 1 - self.b2 ** self.t
        for n, g in grads.items():
            p = params[n]
            m = self.m.setdefault(n, np.zeros_like(p))
            v = self.v.setdefault(n, np.zeros_like(p))
            m += (1 - self.b1) * (g - m)
            v += (1 - self.b2) * (g * g - v)
            p -= self.lr * (m / c1 / (np.sqrt(v / c2) + self.eps) + self.wd * p)


class DiLoCo:
    """H (`every`) inner steps on local `params`, then the pseudo-gradient to `outer` (a Session, or a
    Worker of a sync session). `inner`: anything with `step(params, grads)` updating params in place.
    `params`: the arrays to train, written in place at each round's start (None: copies of the outer's;
    optreg.client.torch.DiLoCo hands it views of a model's tensors)."""

    def __init__(self, outer, inner, every: int = 50, compress=None, params: dict | None = None):
        if not isinstance(every, int) or every < 1:
            raise UsageError(f"every={every!r}: give the inner steps between syncs, an int >= 1")
        if not outer.arrays:
            raise UsageError("the outer session or worker has no arrays: join with params, or refresh() first")
        self.outer, self.inner, self.every = outer, inner, every
        self.steps = 0  # inner steps taken
        self.syncs = 0
        outer.compress(compress)
        self.params = params if params is not None else {n: np.array(a) for n, a in outer.arrays.items()}
        if set(self.params) != set(outer.arrays):
            raise UsageError(f"params {sorted(self.params)} are not the outer session's {sorted(outer.arrays)}")
        self._start_round()

    def _start_round(self) -> None:
        self.start = {n: np.array(a) for n, a in self.outer.arrays.items()}
        for n, a in self.start.items():
            np.copyto(self.params[n], a, casting="unsafe")

    def step(self, grads: Mapping[str, np.ndarray]):
        """One inner step; on every `every`-th, the sync too. Returns the outer step's result when it synced."""
        self.inner.step(self.params, grads)
        self.steps += 1
        return self.sync() if self.steps % self.every == 0 else None

    def sync(self):
        """Send start - current weights; the next round starts from the outer optimizer's answer."""
        result = self.outer.step({n: self.start[n] - self.params[n] for n in self.start})
        self.syncs += 1
        self._start_round()
        return result
