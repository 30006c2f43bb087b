"""A session whose optimizer's plugin is not installed at restart (issue 27, item 3): listed with that
state, its calls refused naming the optimizer, its files kept; served again when the plugin is back."""
import numpy as np
import pytest

from cli_helpers import optreg, optreg_env
from optreg.client import Client, FailedPrecondition
from test_plugins_entry_point import install_fake_distribution


def test_a_session_of_a_missing_plugin_is_listed_refused_by_name_and_served_again(tmp_path, start_server):
    plugin, data = tmp_path / "plugin", tmp_path / "data"
    plugin.mkdir()
    install_fake_distribution(plugin)
    with_plugin = {"PYTHONPATH": str(plugin)}
    srv = start_server("--data-dir", str(data), env=with_plugin)
    with Client(srv.address) as c:
        p = {"w": np.array([1.0, -1.0, 0.5])}
        c.create_session("signsgd", p, session_id="signs", lr=0.25).step({"w": np.array([3.0, -2.0, 0.0])})
        c.create_session("sgd", {"w": np.zeros(2)}, session_id="plain", lr=0.1)
    srv.stop()

    srv = start_server("--data-dir", str(data))  # the plugin uninstalled
    with Client(srv.address) as c:
        listed = {i.session_id: i for i in c.list_sessions()}
        assert set(listed) == {"signs", "plain"}
        assert listed["signs"].missing_optimizer == "signsgd" and listed["signs"].step == 1
        assert listed["signs"].state == "optimizer signsgd not installed" and listed["plain"].state != listed["signs"].state
        info = c.get_session("signs")  # GetSession answers; it no longer says DATA_LOSS
        assert info.optimizer == "signsgd" and info.parameters == {"w": (3,)}
        s = c.session("signs", {})
        with pytest.raises(FailedPrecondition, match=r"signsgd.*not installed.*`optreg optimizers` lists what is installed.*restart"):
            s.step({"w": np.ones(3)})
        with pytest.raises(FailedPrecondition, match="signsgd"):
            s.read_parameters()
    env = optreg_env()
    done = optreg("sessions", "list", "--address", srv.address, env=env)
    assert done.returncode == 0, done.stderr
    assert "optimizer signsgd not installed" in done.stdout and "plain" in done.stdout
    done = optreg("sessions", "show", "signs", "--address", srv.address, env=env)
    assert done.returncode == 0 and "optimizer signsgd not installed" in done.stdout, done.stdout + done.stderr
    srv.stop()

    srv = start_server("--data-dir", str(data), env=with_plugin)  # reinstalled: served as before
    with Client(srv.address) as c:
        assert c.get_session("signs").missing_optimizer == ""
        p = {"w": np.zeros(3)}
        s = c.session("signs", p)
        np.testing.assert_array_equal(p["w"], [0.75, -0.75, 0.5])
        s.step({"w": np.array([1.0, 1.0, 1.0])})
        np.testing.assert_array_equal(p["w"], [0.5, -1.0, 0.25])
