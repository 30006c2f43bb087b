import importlib.metadata

import numpy as np
import pytest

from optreg.plugins.testing import OptimizerConformance
from optreg_lion import LION


class TestLionConformance(OptimizerConformance):
    optimizer = LION


def lion_reference(p, grads, lr, beta1, beta2, weight_decay):
    """The paper's formula, one float64 element at a time."""
    p, m = [float(v) for v in p], [0.0] * len(p)
    for g in grads:
        for i, gi in enumerate(map(float, g)):
            c = beta1 * m[i] + (1 - beta1) * gi
            sign = (c > 0) - (c < 0)
            p[i] = p[i] - lr * (sign + weight_decay * p[i])
            m[i] = beta2 * m[i] + (1 - beta2) * gi
    return np.array(p)


@pytest.mark.parametrize("overrides", [{}, {"lr": 3e-3, "beta1": 0.5, "beta2": 0.9, "weight_decay": 0.1}])
def test_matches_the_paper(overrides):
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal(23)
    grads = [rng.standard_normal(23) for _ in range(30)]
    hp = LION.resolve(overrides)
    p, state = p0.copy(), {"m": np.zeros(23)}
    scratch = [np.empty(23) for _ in range(LION.scratch)]
    for step, g in enumerate(grads, 1):
        LION.update(p, g, state, step, hp, scratch)
    expected = lion_reference(p0, grads, hp["lr"], hp["beta1"], hp["beta2"], hp["weight_decay"])
    np.testing.assert_allclose(p, expected, rtol=1e-12, atol=1e-15)


def test_registered_through_its_entry_point():
    try:
        importlib.metadata.distribution("optreg-lion")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("optreg-lion is not installed (pip install -e examples/optreg-lion)")
    from optreg.plugins.registry import Registry
    registered = Registry().get("lion")
    assert registered.distribution == "optreg-lion" and registered.plugin == "lion"
    assert registered.definition.name == "lion"
