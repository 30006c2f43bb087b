"""The `optreg` command as a user meets it: --version, the optimizer table, command plugins, and
every expected failure (a stopped server, a bad argument) as one line on stderr with a non-zero
exit, never a traceback; a closed pipe ends a command quietly."""
from __future__ import annotations

import subprocess
import types

import pytest

from cli_helpers import assert_one_line_error, free_port, optreg, optreg_command, optreg_env


def test_version():
    done = optreg("--version")
    assert done.returncode == 0
    assert done.stdout.startswith("optreg ") and done.stdout.split()[1][0].isdigit()


def test_optimizer_table_fits_100_columns_and_wide_shows_everything():
    table = optreg("optimizers")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert max(len(line) for line in lines) <= 100, max(lines, key=len)
    assert lines[0].split()[0] == "NAME"
    text = table.stdout
    for expected in ("adam", "lr=0.001", "beta2=0.999", "torch.adagrad", "initial_accumulator_value=0"):
        assert expected in text
    wide = optreg("optimizers", "--wide")
    assert wide.returncode == 0
    assert "optreg.plugins.builtins.adam" in wide.stdout and "SUMMARY" in wide.stdout
    assert max(len(line) for line in wide.stdout.splitlines()) > 100


def _stopped_server_commands(tmp_path):
    from optreg.app import sessionfile
    from optreg.client.results import SessionInfo
    import numpy as np
    info = SessionInfo(session_id="s", optimizer="sgd", hyperparameters={"lr": 0.1}, step=3,
                       master_dtype="float64", step_reply="parameters", parameters={"w": (2,)}, slots=(),
                       durability="none", periodic_steps=0, periodic_seconds=0.0, persisted_step=-1, loaded=True)
    exported = tmp_path / "s.safetensors"
    sessionfile.write(exported, info, {"w": np.ones(2)}, {})
    return [("optimizers",), ("sessions", "list"), ("sessions", "show", "s"), ("sessions", "delete", "s"),
            ("sessions", "export", "s", str(tmp_path / "out.safetensors")), ("sessions", "import", str(exported)),
            ("demo", "--quick", "--no-progress", "--out", str(tmp_path / "demo"))]


def test_every_command_against_a_stopped_server_says_so_in_one_line(tmp_path):
    address = f"127.0.0.1:{free_port()}"
    env = optreg_env(MPLBACKEND="Agg")
    # All at once: each waits out the client's retry window (seconds) before giving up.
    running = [(args, subprocess.Popen(optreg_command(*args, "--address", address), stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True, env=env))
               for args in _stopped_server_commands(tmp_path)]
    for args, proc in running:
        out, err = proc.communicate(timeout=300)
        done = subprocess.CompletedProcess(args, proc.returncode, out, err)
        assert_one_line_error(done, "optreg " + " ".join(a for a in args[:2] if not a.startswith(("-", "/"))),
                              address, "UNAVAILABLE")
    assert not (tmp_path / "out.safetensors").exists()


def test_address_and_token_from_the_environment(tmp_path):
    address = f"127.0.0.1:{free_port()}"
    done = optreg("sessions", "list", env=optreg_env(OPTREG_ADDRESS=address, OPTREG_TOKEN="t"))
    assert_one_line_error(done, address)


BAD_ARGUMENTS = [
    ("serve", "--port", "99999"),
    ("serve", "--threads", "many"),
    ("serve", "--tls-cert", "/nonexistent/cert.pem", "--port", "0", "--memory-only"),
    ("bogus",),
    ("optimizers", "--nope"),
    ("sessions",),
    ("sessions", "show"),
    ("sessions", "list", "--timeout", "soon"),
    ("sessions", "list", "--token-file", "/nonexistent/token"),
    ("sessions", "list", "--tls-ca", "/nonexistent/ca.pem"),
    ("sessions", "list", "--data-dir", "/nonexistent/optreg-data"),
    ("sessions", "list", "--data-dir", "/tmp", "--address", "127.0.0.1:1"),
    ("sessions", "import", "/nonexistent/file.safetensors"),
    ("sessions", "import", "/etc/hostname"),
    ("sessions", "import", "x", "--durability", "sometimes"),
    ("sessions", "export", "s", "/nonexistent/dir/file.safetensors"),
    ("demo", "--iterations", "0"),
    ("demo", "--dataset", "imagenet"),
    ("demo", "--data", "/nonexistent/mnist"),
]


@pytest.mark.parametrize("args", BAD_ARGUMENTS, ids=" ".join)
def test_bad_arguments_are_one_line(args, tmp_path):
    done = optreg(*args, env=optreg_env(MPLBACKEND="Agg"), timeout=120)
    assert_one_line_error(done)
    assert done.stdout == ""


def test_demo_checks_its_data_before_any_work(tmp_path):
    out = tmp_path / "demo"
    done = optreg("demo", "--data", str(tmp_path), "--out", str(out), "--no-progress", timeout=120)
    assert_one_line_error(done, "train-images-idx3-ubyte")
    assert not out.exists(), "nothing written before the data was checked"


@pytest.mark.parametrize("buffered", [True, False], ids=["buffered", "PYTHONUNBUFFERED"])
@pytest.mark.parametrize("args", [("optimizers",), ("optimizers", "--wide"), ("optimizers", "--json"), ("--help",),
                                  ("sessions", "--help"), ("--version",)], ids=" ".join)
def test_closed_pipe_ends_quietly(args, buffered):
    """`optreg ... | head` when head has read enough: no traceback, no "[Errno 32] Broken pipe",
    the exit status of a process ended by SIGPIPE."""
    env = optreg_env()
    env.pop("PYTHONUNBUFFERED", None)
    if not buffered:
        env["PYTHONUNBUFFERED"] = "1"
    proc = subprocess.Popen(optreg_command(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    proc.stdout.close()  # the reader is gone before the command writes (`optreg ... | head -0`)
    err = proc.stderr.read().decode()
    proc.wait(timeout=120)
    assert (proc.returncode, err) == (141, "")


# --- commands are plugins --------------------------------------------------------------

def test_builtin_commands_are_plugins_of_register_commands():
    from optreg.app import cli
    pm = cli.plugin_manager()
    names = {pm.get_name(p) for p in pm.get_plugins()}
    assert set(cli.BUILTIN_COMMANDS) <= names
    sub = cli.build_parser(pm)._subparsers._group_actions[0]
    assert {"serve", "optimizers", "sessions", "demo"} <= set(sub.choices)


def test_a_plugin_adds_a_command(capsys):
    from optreg.app import cli
    from optreg.app.hookspecs import hookimpl

    plugin = types.ModuleType("optreg_hello")

    @hookimpl
    def register_commands(subparsers):
        p = subparsers.add_parser("hello", help="greet")
        p.add_argument("name")
        p.set_defaults(run=lambda args: print(f"hello {args.name}") or 0)

    plugin.register_commands = register_commands
    pm = cli.plugin_manager()
    pm.register(plugin)
    args = cli.build_parser(pm).parse_args(["hello", "optreg"])
    assert args.run(args) == 0
    assert capsys.readouterr().out == "hello optreg\n"


def _install_command_plugin(site, name: str, module_source: str) -> None:
    """A distribution on `site` with an "optreg.app" entry point, as `pip install` would lay it out."""
    (site / f"{name}.py").write_text(module_source)
    info = site / f"{name}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[optreg.app]\n{name} = {name}\n")


def test_an_installed_command_plugin_runs_and_a_broken_one_is_one_line(tmp_path, start_server):
    site = tmp_path / "site"
    site.mkdir()
    # docs/plugins.md's example, as written there
    _install_command_plugin(site, "optreg_steps", '''
from optreg.app.connect import add_client_arguments, connect
from optreg.app.hookspecs import hookimpl


def run(args):
    with connect(args) as client:
        for info in client.list_sessions():
            print(info.session_id, info.step)
    return 0


@hookimpl
def register_commands(subparsers):
    p = subparsers.add_parser("steps", help="each session's step")
    add_client_arguments(p, offline=True)
    p.set_defaults(run=run)
''')
    _install_command_plugin(site, "optreg_broken", "raise ImportError('needs a library that is not here')\n")
    env = optreg_env()
    env["PYTHONPATH"] = f"{site}:{env['PYTHONPATH']}"
    data = tmp_path / "data"
    server = start_server("--data-dir", str(data))
    import numpy as np
    from optreg.client import Client
    with Client(server.address) as c:
        c.create_session("sgd", {"w": np.ones(2)}, session_id="run", lr=0.1).step({"w": np.ones(2)})
    server.stop()
    done = optreg("steps", "--data-dir", str(data), env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "run 1\n"
    line = done.stderr.strip()
    assert "optreg_broken" in line and "needs a library that is not here" in line and "\n" not in line


def test_the_server_never_imports_the_client_or_the_application_layer():
    """Layering: app -> client, server; client -> proto; server -> proto, plugins. Never back."""
    import pathlib
    import sys as _sys
    from conftest import ROOT
    src = ROOT / "server" / "optreg" / "server"
    server_modules = sorted(".".join(p.relative_to(src).with_suffix("").parts) for p in src.rglob("*.py")
                            if p.stem not in ("__main__", "__init__") and "cluster" not in p.parts)
    code = ("import sys\n" + "".join(f"import optreg.server.{m}\n" for m in server_modules) +
            "bad = sorted(m for m in sys.modules if m.startswith(('optreg.client', 'optreg.app')))\n"
            "print(bad)")
    done = subprocess.run([_sys.executable, "-c", code], capture_output=True, text=True, env=optreg_env(),
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", done.stdout
    import re
    importing = re.compile(r"^\s*(from|import)\s+optreg\.(client|app)\b", re.M)
    for source in (ROOT / "server").rglob("*.py"):  # imports inside functions too
        assert not importing.search(source.read_text()), source
