"""A third-party optimizer from a real entry point of a distribution that is not optreg."""
import textwrap

import numpy as np
import pytest

from optreg.client import Client, Internal


def install_fake_distribution(root, name="optreg-signsgd", version="1.2.3", body=None):
    """Lay out a distribution as pip installs one: a module plus a .dist-info with entry_points.txt."""
    module = name.replace("-", "_")
    (root / f"{module}.py").write_text(body or textwrap.dedent('''
        import numpy as np
        from optreg.plugins import Hyperparameter, Optimizer, hookimpl

        def update(param, grad, state, step, hp, scratch):
            param -= hp["lr"] * np.sign(grad)

        @hookimpl
        def optreg_optimizers():
            return [Optimizer(name="signsgd", summary="SGD on the gradient's sign.", update=update,
                              hyperparameters=(Hyperparameter("lr", 0.1, "step size", minimum=0.0),))]
    '''))
    info = root / f"{module}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[optreg]\nsignsgd = {module}\n")
    return root


def test_entry_point_plugin_listed_and_stepping(tmp_path, start_server):
    install_fake_distribution(tmp_path)
    srv = start_server(env={"PYTHONPATH": str(tmp_path)})
    with Client(srv.address) as c:
        found = {o.name: o for o in c.optimizers()}
        assert found["signsgd"].distribution == "optreg-signsgd"
        assert found["signsgd"].version == "1.2.3"
        assert found["signsgd"].plugin == "signsgd"
        assert "adam" in found and not c.plugin_failures()
        p = {"w": np.array([1.0, -1.0, 0.5])}
        s = c.create_session("signsgd", p, lr=0.25)
        s.step({"w": np.array([3.0, -2.0, 0.0])})
        np.testing.assert_array_equal(p["w"], [0.75, -0.75, 0.5])


def test_autoload_switch_and_block_list(tmp_path, start_server):
    install_fake_distribution(tmp_path)
    off = start_server(env={"PYTHONPATH": str(tmp_path), "OPTREG_DISABLE_PLUGIN_AUTOLOAD": "1"})
    blocked = start_server(env={"PYTHONPATH": str(tmp_path), "OPTREG_BLOCK_PLUGINS": "signsgd,optreg.plugins.builtins.sgd"})
    with Client(off.address) as c:
        assert "signsgd" not in {o.name for o in c.optimizers()}
    with Client(blocked.address) as c:
        names = {o.name for o in c.optimizers()}
        assert "signsgd" not in names and "sgd" not in names and "adam" in names


@pytest.mark.parametrize("body,reason", [
    ("raise ImportError('no such thing')\n", "failed to load"),
    ("from optreg.plugins import hookimpl, Optimizer\n@hookimpl\ndef optreg_optimizers():\n"
     "    return [Optimizer(name='Bad Name', summary='x', update=print)]\n", "invalid optimizer definition"),
    ("from optreg.plugins import hookimpl, Optimizer\n@hookimpl\ndef optreg_optimizers():\n"
     "    return [Optimizer(name='adam', summary='x', update=print)]\n", "already provided"),
    ("from optreg.plugins import hookimpl\n@hookimpl\ndef optreg_optimizerz():\n    return []\n", "unknown hook"),
])
def test_broken_plugin_is_reported_and_server_serves(tmp_path, start_server, body, reason):
    install_fake_distribution(tmp_path, body=body)
    srv = start_server(env={"PYTHONPATH": str(tmp_path)})
    with Client(srv.address) as c:
        failures = c.plugin_failures()
        assert [f.plugin for f in failures] == ["signsgd"]
        assert reason in failures[0].reason
        assert len(c.optimizers()) >= 6
        s = c.create_session("adam", {"w": np.ones(2)})
        s.step({"w": np.ones(2)})


def test_update_that_raises_is_internal_and_session_unchanged(tmp_path, start_server):
    install_fake_distribution(tmp_path, body=textwrap.dedent('''
        from optreg.plugins import Hyperparameter, Optimizer, Slot, hookimpl

        def update(param, grad, state, step, hp, scratch):
            state["n"] += 1
            param -= grad
            if step == 2 and param.size > 2:
                raise RuntimeError("boom at step 2")

        @hookimpl
        def optreg_optimizers():
            return [Optimizer(name="flaky", summary="Raises on its second step.", update=update,
                              slots=(Slot("n"),))]
    '''))
    srv = start_server(env={"PYTHONPATH": str(tmp_path)})
    with Client(srv.address) as c:
        p = {"a": np.zeros(2), "b": np.zeros(3)}  # "a" updates fine, then "b" raises
        s = c.create_session("flaky", p)
        s.step({"a": np.ones(2), "b": np.ones(3)})
        before = s.read_state()
        with pytest.raises(Internal) as e:
            s.step({"a": np.ones(2), "b": np.ones(3)})
        assert "flaky" in str(e.value) and "signsgd" in str(e.value) and "boom" in str(e.value)
        after = s.read_state()
        assert after[0].step == before[0].step == 1
        for k in p:
            np.testing.assert_array_equal(after[1][k], before[1][k])
            np.testing.assert_array_equal(after[2]["n"][k], before[2]["n"][k])
