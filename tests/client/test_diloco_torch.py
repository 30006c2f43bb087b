"""DiLoCo for torch (issue 26): a model trained in place by a local torch optimizer, its pseudo-gradient sent
to an outer optreg session every H steps, and the next round started from the outer answer."""
from __future__ import annotations

import numpy as np
import torch

from optreg.client.diloco import diloco_outer
from optreg.client.torch.diloco import DiLoCo, arrays


def _data():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(64, 6, generator=g)
    return X, X @ torch.randn(6, 1, generator=g) + 0.5


def _loss(model, X, y) -> float:
    with torch.no_grad():
        return float(torch.nn.functional.mse_loss(model(X), y))


def test_torch_model_syncs_every_h_steps(client):
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 1)
    X, y = _data()
    outer = client.create_session(**diloco_outer(arrays(model), optimizer="sgd", lr=1.0))
    inner = torch.optim.AdamW(model.parameters(), lr=0.05)
    loco = DiLoCo(model, inner, outer, every=4)
    first = _loss(model, X, y)
    for i in range(40):
        inner.zero_grad()
        torch.nn.functional.mse_loss(model(X), y).backward()
        synced = loco.step()
        assert (synced is not None) == ((i + 1) % 4 == 0)
        if synced is not None:
            for n, p in model.named_parameters():  # the round starts from the answer (bf16 deltas, added)
                np.testing.assert_array_equal(p.detach().numpy(), outer.arrays[n])
            assert outer.info.step_reply == "bf16_delta"
    assert loco.syncs == 10 and outer.refresh().step == 10
    assert _loss(model, X, y) < 0.2 * first


def test_nesterov_outer_default(client):
    torch.manual_seed(1)
    model = torch.nn.Linear(6, 1)
    X, y = _data()
    outer = client.create_session(**diloco_outer(arrays(model)))
    assert outer.info.optimizer == "nesterov"
    inner = torch.optim.SGD(model.parameters(), lr=0.05)
    loco = DiLoCo(model, inner, outer, every=5)
    first = _loss(model, X, y)
    for _ in range(100):
        inner.zero_grad()
        torch.nn.functional.mse_loss(model(X), y).backward()
        loco.step()
    assert outer.refresh().step == 20
    assert _loss(model, X, y) < 0.1 * first
