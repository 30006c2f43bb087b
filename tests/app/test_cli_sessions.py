"""`optreg sessions list|show|delete|export|import`, against a server with tokens (and TLS), and
offline against a data directory."""
from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from cli_helpers import assert_one_line_error, optreg, optreg_env

from optreg.client import Client


@pytest.fixture
def tokens(tmp_path):
    (tmp_path / "tokens").write_text("alice-token\nbob-token\n")
    (tmp_path / "alice").write_text("alice-token\n")
    (tmp_path / "bob").write_text("bob-token\n")
    return tmp_path


def _table(stdout: str) -> dict[str, list[str]]:
    lines = stdout.splitlines()
    assert lines[0].split() == ["ID", "OPTIMIZER", "STEP", "DURABILITY", "SIZE", "LAST", "USED", "STATE"], lines[0]
    return {line.split()[0]: line.split()[1:] for line in lines[1:]}


def _make_sessions(address: str, token: str | None = None):
    rng = np.random.default_rng(5)
    with Client(address, token=token, timeout=60) as c:
        a = c.create_session("adam", {"W": rng.standard_normal((3, 4)), "b": np.zeros(4)}, session_id="run-a",
                             durability="every-step", lr=0.01)
        for _ in range(3):
            a.step({"W": rng.standard_normal((3, 4)), "b": rng.standard_normal(4)})
        c.create_session("sgd", {"w": np.ones(10, dtype=np.float32)}, session_id="run-b", durability="none", lr=0.1)
        return c.session("run-a").read_state()


def _assert_same_state(a, b):
    assert (a.info.optimizer, a.info.step, dict(a.info.hyperparameters)) == \
        (b.info.optimizer, b.info.step, dict(b.info.hyperparameters))
    assert a.parameters.keys() == b.parameters.keys() and a.state.keys() == b.state.keys()
    for name in a.parameters:
        np.testing.assert_array_equal(a.parameters[name], b.parameters[name])
        for slot in a.state:
            np.testing.assert_array_equal(a.state[slot][name], b.state[slot][name])


def test_sessions_against_a_server_with_tokens(start_server, tokens, tmp_path):
    s = start_server("--data-dir", str(tmp_path / "data"), "--token-file", str(tokens / "tokens"))
    before = _make_sessions(s.address, "alice-token")
    alice = ("--address", s.address, "--token-file", str(tokens / "alice"))

    listed = optreg("sessions", "list", *alice)
    assert listed.returncode == 0, listed.stderr
    rows = _table(listed.stdout)
    assert set(rows) == {"run-a", "run-b"}
    # adam, float64: (12 + 4) elements x 8 bytes x (parameters + m + v)
    assert rows["run-a"][:5] == ["adam", "3", "every-step", "384", "B"]
    assert rows["run-b"][:5] == ["sgd", "0", "none", "40", "B"]
    # The token from the environment, the address too.
    env = optreg_env(OPTREG_ADDRESS=s.address, OPTREG_TOKEN="alice-token")
    assert _table(optreg("sessions", "list", env=env).stdout) == rows
    # Bob sees none of alice's; no token is refused in one line.
    assert optreg("sessions", "list", "--address", s.address, "--token-file", str(tokens / "bob")).stdout \
        == "no sessions\n"
    assert_one_line_error(optreg("sessions", "list", "--address", s.address), "UNAUTHENTICATED")
    assert_one_line_error(optreg("sessions", "show", "run-a", "--address", s.address, "--token-file",
                                 str(tokens / "bob")), "PERMISSION_DENIED")

    listing = optreg("optimizers", "--json", *alice)  # every client command takes the token
    assert listing.returncode == 0, listing.stderr
    assert "adam" in {o["name"] for o in json.loads(listing.stdout)["optimizers"]}
    assert_one_line_error(optreg("optimizers", "--address", s.address), "UNAUTHENTICATED")

    shown = optreg("sessions", "show", "run-a", *alice)
    assert shown.returncode == 0, shown.stderr
    for expected in ("optimizer:       adam", "step:            3", "durability:      every-step", "W  [3, 4]",
                     "b  [4]", "slots:           m, v", "lr=0.01"):
        assert expected in shown.stdout, (expected, shown.stdout)
    as_json = json.loads(optreg("sessions", "show", "run-a", "--json", *alice).stdout)
    assert as_json["step"] == 3 and as_json["parameters"] == {"W": [3, 4], "b": [4]}
    assert as_json["size_bytes"] == 384

    exported = tmp_path / "run-a.safetensors"
    done = optreg("sessions", "export", "run-a", str(exported), *alice)
    assert done.returncode == 0, done.stderr
    assert "step 3" in done.stdout
    assert set(load_file(str(exported))) == {"params/W", "params/b", "state/m/W", "state/m/b", "state/v/W",
                                             "state/v/b", "telemetry/ring"}  # its 3 steps' telemetry too

    done = optreg("sessions", "delete", "run-a", *alice)
    assert done.returncode == 0 and done.stdout == "deleted session run-a\n", done.stderr
    assert set(_table(optreg("sessions", "list", *alice).stdout)) == {"run-b"}
    assert_one_line_error(optreg("sessions", "export", "run-a", str(tmp_path / "gone"), *alice), "run-a")

    done = optreg("sessions", "import", str(exported), *alice)
    assert done.returncode == 0, done.stderr
    assert "as session run-a at step 3" in done.stdout
    with Client(s.address, token="alice-token") as c:
        after = c.session("run-a").read_state()
    _assert_same_state(before, after)
    assert after.info.durability == "every-step"
    assert_one_line_error(optreg("sessions", "import", str(exported), *alice), "ALREADY_EXISTS")
    done = optreg("sessions", "import", str(exported), "--session-id", "copy", "--durability", "none", *alice)
    assert done.returncode == 0, done.stderr
    assert _table(optreg("sessions", "list", *alice).stdout)["copy"][:3] == ["adam", "3", "none"]


def test_sessions_over_tls(start_server, tokens, tmp_path):
    from test_auth_tls_metrics import _self_signed
    cert, key, _ = _self_signed(tmp_path)
    s = start_server("--memory-only", "--tls-cert", cert, "--tls-key", key, "--token-file", str(tokens / "tokens"))
    port = s.address.rsplit(":", 1)[1]
    with Client(s.address, token="alice-token", root_certificates=open(cert, "rb").read()) as c:
        c.create_session("sgd", {"w": np.ones(2)}, session_id="tls-run")
    listed = optreg("sessions", "list", "--address", f"localhost:{port}", "--tls-ca", cert, "--token-file",
                    str(tokens / "alice"))
    assert listed.returncode == 0, listed.stderr
    assert set(_table(listed.stdout)) == {"tls-run"}
    # The certificate names localhost and 127.0.0.1; --tls-server-name checks it against another name.
    assert_one_line_error(optreg("sessions", "list", "--address", s.address, "--tls-ca", cert, "--token-file",
                                 str(tokens / "alice"), "--tls-server-name", "elsewhere.example"), "UNAVAILABLE")
    assert_one_line_error(optreg("sessions", "list", "--address", s.address, "--token-file",
                                 str(tokens / "alice")), "UNAVAILABLE")


def test_sessions_offline_on_a_data_directory(start_server, tmp_path):
    data = tmp_path / "data"
    s = start_server("--data-dir", str(data))
    before = _make_sessions(s.address)
    # While a server uses the directory, offline access is refused (both would write its files).
    assert_one_line_error(optreg("sessions", "list", "--data-dir", str(data)), str(data),
                          "in use by another optreg server")
    s.stop()

    offline = ("--data-dir", str(data))
    rows = _table(optreg("sessions", "list", *offline).stdout)
    # run-b had durability none: never written, so it did not outlive its server.
    assert set(rows) == {"run-a"} and rows["run-a"][:3] == ["adam", "3", "every-step"]
    shown = optreg("sessions", "show", "run-a", *offline)
    assert "step:            3" in shown.stdout, shown.stderr
    exported = tmp_path / "run-a.safetensors"
    assert optreg("sessions", "export", "run-a", str(exported), *offline).returncode == 0
    assert optreg("sessions", "delete", "run-a", *offline).stdout == "deleted session run-a\n"
    assert optreg("sessions", "list", *offline).stdout == "no sessions\n"
    done = optreg("sessions", "import", str(exported), "--session-id", "restored", *offline)
    assert done.returncode == 0, done.stderr

    # What the offline commands did is what the next server finds.
    again = start_server("--data-dir", str(data))
    with Client(again.address) as c:
        assert [i.session_id for i in c.list_sessions()] == ["restored"]
        _assert_same_state(before, c.session("restored").read_state())


def test_export_and_import_keep_a_shared_session_shared(start_server, tmp_path):
    """A shared session (docs/workers.md) exported and imported is shared again, with the same worker
    setup, so its workers can join it and a sparse contribution is combined as before."""
    s = start_server("--memory-only")
    with Client(s.address) as c:
        shared = c.create_session("adam", {"E": np.ones((6, 2)), "b": np.zeros(2)}, session_id="run-w", workers=3,
                                  mode="ssp", min_workers=0, lease=7.0, staleness=2, scale_lr_by_staleness=True)
        with c.join("run-w", "w0") as w:
            w.step_sparse("E", [1, 4], np.ones((2, 2)))
        setup = c.get_session("run-w").workers
        exported = tmp_path / "run-w.safetensors"
        address = ("--address", s.address)
        done = optreg("sessions", "export", "run-w", str(exported), *address)
        assert done.returncode == 0, done.stderr
        done = optreg("sessions", "import", str(exported), "--session-id", "run-w2", *address)
        assert done.returncode == 0, done.stderr
        again = c.get_session("run-w2")
        assert again.workers == setup and again.step == 1
        _assert_same_state(shared.read_state(), c.session("run-w2").read_state())
        with c.join("run-w2", "w0") as w:
            assert w.step_sparse("E", [2], np.ones((1, 2))).step == 2
