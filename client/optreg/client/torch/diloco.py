"""DiLoCo for torch (issue 26; docs/slow-links.md): a model trained by a local torch optimizer, synced
to an outer optreg session every H steps with its pseudo-gradient.

    from optreg.client.diloco import diloco_outer
    from optreg.client.torch.diloco import DiLoCo, arrays
    outer = client.create_session(**diloco_outer(arrays(model), workers=4))   # Nesterov 0.7 / 0.9
    with client.join(outer.id, worker="w0", params=arrays(model)) as w:
        loco = DiLoCo(model, torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1), w, every=50)
        for x, y in data:
            loss_fn(model(x), y).backward()
            loco.step()                  # the inner step; every 50th, the sync too
            loco.inner.zero_grad()

The inner optimizer and its state stay here; the model's parameters (CPU float32 tensors) are trained
in place, and each round starts them from the outer session's answer (optreg.client.diloco.DiLoCo,
handed numpy views of the tensors).
"""
from __future__ import annotations

import numpy as np
import torch

from optreg.client import diloco
from optreg.client.errors import UsageError


def _views(model) -> dict[str, np.ndarray]:
    out = {}
    for name, p in model.named_parameters():
        if p.device.type != "cpu" or p.dtype != torch.float32:
            raise UsageError(f"parameter {name}: {p.dtype} on {p.device}; DiLoCo here trains CPU float32 "
                             "parameters in place")
        out[name] = p.detach().numpy()  # shares the tensor's memory
    return out


def arrays(model) -> dict[str, np.ndarray]:
    """Copies of the model's parameters by name: an outer session's initial values."""
    return {n: a.copy() for n, a in _views(model).items()}


class _Inner:
    """A torch optimizer as the numpy helper's inner optimizer: the gradients are already in the tensors."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer

    def step(self, params, grads) -> None:
        self.optimizer.step()


class DiLoCo:
    """`every` steps of `inner` (a torch.optim.Optimizer over `model`'s parameters), then start - current
    weights to `outer` (a Session, or a Worker of a sync session); `compress`: as Session.compress."""

    def __init__(self, model, inner: torch.optim.Optimizer, outer, every: int = 50, compress=None):
        self.model, self.inner = model, inner
        self._loco = diloco.DiLoCo(outer, _Inner(inner), every, compress, params=_views(model))

    def step(self):
        """After backward(): the inner step; on every `every`-th, the sync (its result returned)."""
        with torch.no_grad():  # the round's start is written into the parameters in place
            return self._loco.step(None)

    @property
    def syncs(self) -> int:
        return self._loco.syncs
