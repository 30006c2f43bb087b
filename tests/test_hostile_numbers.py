"""Issue 22, finding 12: a state the server itself produced can be restored.

A float32 Adam or AdaGrad session stepped with a finite gradient of 1e20 (1e30 for torch.adam) holds v = +inf (g**2
overflows float32); SGD with a large lr overflows a parameter. ReadState gives such a state back
and every restore path takes it: CreateSession with state=, `optreg sessions export`/`import`, and
the torch adapter's state_dict/load_state_dict. NaN stays refused, on the same paths, by the same
check (optreg.server.factory.check_values; the snapshot load path is in test_hostile_files.py).
"""
from __future__ import annotations

import numpy as np
import pytest

from cli_helpers import assert_one_line_error, optreg
from optreg.client import Client
from optreg.client.errors import OptregError

HUGE = np.array([1e30, 1.0, 0.0, -1e30], np.float32)  # finite; its square is not (nor 1e-3 * its square)


@pytest.fixture(scope="module")
def address():
    from conftest import ServerProcess
    s = ServerProcess("--memory-only")
    yield s.address
    s.stop()


def _same(a, b):
    assert a.parameters.keys() == b.parameters.keys() and a.state.keys() == b.state.keys()
    for name, p in a.parameters.items():
        assert p.dtype == b.parameters[name].dtype and p.tobytes() == b.parameters[name].tobytes(), name
        for slot in a.state:
            assert a.state[slot][name].tobytes() == b.state[slot][name].tobytes(), (slot, name)


@pytest.mark.parametrize("optimizer,slot,hp", [("adam", "v", {}), ("adagrad", "h", {}),
                                                ("sgd", None, {"lr": 1e30})])
def test_an_overflowed_state_reads_back_and_is_created_again(address, optimizer, slot, hp):
    with Client(address, timeout=60) as c:
        s = c.create_session(optimizer, {"w": np.zeros(4, np.float32)}, session_id=f"of-{optimizer}", **hp)
        s.step({"w": HUGE})
        saved = s.read_state()
        if slot:
            assert np.isposinf(saved.state[slot]["w"][[0, 3]]).all()
        else:
            assert np.isinf(saved.parameters["w"][[0, 3]]).all()
        again = c.create_session(optimizer, saved.parameters, session_id=f"of-{optimizer}-2", state=saved.state,
                                 initial_step=saved.info.step, **hp)
        _same(saved, again.read_state())
        again.step({"w": np.ones(4, np.float32)})
        s.step({"w": np.ones(4, np.float32)})
        _same(s.read_state(), again.read_state())  # and it goes on exactly as the original (NaN and all: the
        # book's Adam kernel computes v + (g*g - v)*(1 - beta2), which is inf - inf once v is +inf)


def test_nan_stays_refused(address):
    with Client(address, timeout=60) as c:
        v = np.ones(3, np.float32)
        v[1] = np.nan
        with pytest.raises(OptregError, match=r"state v/'w' has 1 NaN") as e:
            c.create_session("adam", {"w": np.ones(3, np.float32)}, state={"m": {"w": np.zeros(3, np.float32)},
                                                                         "v": {"w": v}}, initial_step=3)
        assert e.value.code.name == "INVALID_ARGUMENT"
        with pytest.raises(OptregError, match=r"parameter 'w' has 1 NaN"):
            c.create_session("sgd", {"w": v})
        assert not [i for i in c.list_sessions() if i.optimizer == "adam" and i.step == 3]


def test_export_and_import_of_an_overflowed_session(address, tmp_path):
    with Client(address, timeout=60) as c:
        s = c.create_session("adam", {"w": np.zeros(4, np.float32)}, session_id="of-export")
        s.step({"w": HUGE})
        exported = tmp_path / "of.safetensors"
        done = optreg("sessions", "export", "of-export", str(exported), "--address", address)
        assert done.returncode == 0, done.stderr
        done = optreg("sessions", "import", str(exported), "--session-id", "of-import", "--address", address)
        assert done.returncode == 0, done.stderr
        _same(s.read_state(), c.session("of-import").read_state())
        # a NaN put into the file (its checksums recomputed) is refused by the server, in one line
        from optreg.server import snapshot
        meta, arrays = snapshot.read(exported)
        arrays["state/v/w"][2] = np.nan
        snapshot.write(exported, meta, arrays)
        assert_one_line_error(optreg("sessions", "import", str(exported), "--session-id", "of-nan", "--address",
                                     address), "INVALID_ARGUMENT", "NaN")


def test_torch_state_dict_of_an_overflowed_session_loads(address):
    torch = pytest.importorskip("torch")
    from optreg.client.torch import RemoteOptimizer
    with Client(address, timeout=60) as c:
        w = torch.nn.Parameter(torch.zeros(4))
        with RemoteOptimizer([w], "torch.adam", client=c, lr=0.01) as remote:
            w.grad = torch.from_numpy(HUGE.copy())
            remote.step()
            saved = remote.state_dict()
        assert torch.isinf(saved["state"][0]["exp_avg_sq"]).any()
        w2 = torch.nn.Parameter(w.detach().clone())
        with RemoteOptimizer([w2], "torch.adam", client=c, lr=0.01) as other:
            other.load_state_dict(saved)
            back = other.state_dict()
        for k, v in saved["state"][0].items():
            assert torch.equal(back["state"][0][k], v), k
