"""The example third-party package (examples/optreg-lion), installed by the test command, through a real server."""
import numpy as np
import pytest

from optreg.client import Client


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
