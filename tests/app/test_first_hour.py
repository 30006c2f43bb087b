"""A newcomer's first hour (issue 27, items 5-10): what they met, each as a user meets it, against a real server."""
from __future__ import annotations

import socket

import pytest

from cli_helpers import assert_one_line_error, free_port, optreg


# -- item 9: `optreg serve` ------------------------------------------------------------------------

def test_serve_help_is_grouped_and_names_threads_not_workers():
    done = optreg("serve", "--help")
    assert done.returncode == 0, done.stderr
    for group in ("network:", "storage and durability:", "threads and limits:", "security:", "logging:"):
        assert f"\n{group}\n" in done.stdout, group
    assert "--threads" in done.stdout and "--workers" not in done.stdout


def test_serve_workers_is_a_deprecated_alias_of_threads(start_server):
    s = start_server("--workers", "4", "--memory-only")
    assert optreg("sessions", "list", "--address", s.address).returncode == 0
    s.stop()
    notes = [line for line in s.proc.stderr.read().splitlines() if "--workers" in line]
    assert notes == ["optreg serve: --workers is deprecated: use --threads (same meaning)"]


def test_serve_prints_where_its_sessions_live(start_server, tmp_path):
    s = start_server("--data-dir", str(tmp_path))
    m = start_server("--memory-only")
    s.stop(), m.stop()  # then read what they printed (reading a running server's next line could wait forever)
    assert f"optreg sessions in {tmp_path.resolve()}\n" in s.proc.stdout.read()
    assert "optreg sessions in memory only" in m.proc.stdout.read()


def test_serve_refuses_memory_only_with_a_data_dir(tmp_path):
    done = optreg("serve", "--port", "0", "--memory-only", "--data-dir", str(tmp_path), timeout=60)
    assert done.returncode == 2
    assert_one_line_error(done, "--memory-only", "--data-dir", str(tmp_path))
    assert not any(tmp_path.iterdir())


# -- item 6: an unreachable server ------------------------------------------------------------------

def test_a_stopped_server_is_one_line_with_the_address_and_a_hint():
    address = f"127.0.0.1:{free_port()}"
    line = assert_one_line_error(optreg("sessions", "list", "--address", address), address, "optreg serve")
    assert "connection refused" in line and "failed to connect to all addresses" not in line


@pytest.mark.parametrize("address, words", [
    ("nosuchhost.invalid:50051", ("nosuchhost.invalid:50051", "cannot resolve", "check the address")),
    ("http://127.0.0.1:50051", ("http://127.0.0.1:50051", "without a scheme", "127.0.0.1:50051")),
    ("127.0.0.1:5oo51", ("127.0.0.1:5oo51", "port")),
])
def test_a_bad_address_fails_at_once_in_one_line(address, words):
    line = assert_one_line_error(optreg("sessions", "list", "--address", address), *words)
    assert "attempts" not in line  # not retried for the client's retry window: retrying cannot help


def test_an_address_without_a_port_means_50051(start_server):
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", 50051))
        except OSError:
            pytest.skip("port 50051 is in use on this machine")
    s = start_server("--port", "50051", "--memory-only")
    assert s.address.endswith(":50051")
    done = optreg("sessions", "list", "--address", "127.0.0.1")
    assert done.returncode == 0, done.stderr
    from optreg.client import Client
    with Client("127.0.0.1") as client:
        assert client.address == "127.0.0.1:50051"
        assert client.list_sessions() == []


# -- item 5: the book's drop-ins, used exactly as in the book (no with-block, no close()) ------------

BOOK_SCRIPT = """
import sys
import numpy as np
from optreg.client import {cls}

params = {{"W": np.ones((3, 2)), "b": np.zeros(2)}}
optimizer = {cls}({kwargs})
start = optimizer.resume(params) if {named} else 0
print(start, flush=True)
for i in range(start, {until}):
    grads = {{"W": np.full((3, 2), 0.5), "b": np.ones(2)}}
    optimizer.update(params, grads)
    if i + 1 == {interrupt_at}:
        raise KeyboardInterrupt  # Ctrl-C
"""


def _book(address, cls="SGD", kwargs="lr=0.1", named=False, until=3, interrupt_at=-1):
    import subprocess
    import sys
    from cli_helpers import optreg_env
    code = BOOK_SCRIPT.format(cls=cls, kwargs=kwargs, named=named, until=until, interrupt_at=interrupt_at)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=optreg_env(OPTREG_ADDRESS=address))


def test_book_dropins_without_with_or_close_leave_no_session(server, client):
    for cls, kwargs in (("SGD", "lr=0.1"), ("Adam", "lr=0.001"), ("Momentum", "keep=False")):
        done = _book(server.address, cls, kwargs)
        assert done.returncode == 0, done.stderr
    assert [s.session_id for s in client.list_sessions()] == []


def test_a_named_book_run_interrupted_is_kept_and_resumed_then_ended(server, client):
    kwargs = "lr=0.001, session_id='book-no-with'"
    interrupted = _book(server.address, "Adam", kwargs, named=True, until=6, interrupt_at=3)
    assert interrupted.returncode != 0 and "KeyboardInterrupt" in interrupted.stderr
    assert client.get_session("book-no-with").step == 3  # kept: Ctrl-C is the error "on-error" keeps it for
    resumed = _book(server.address, "Adam", kwargs, named=True, until=6)
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.split() == ["3"]
    assert [s.session_id for s in client.list_sessions()] == []  # the run finished: nothing left


def test_keep_false_outside_a_with_block_deletes_at_exit(server, client):
    import subprocess
    import sys
    from cli_helpers import optreg_env
    code = ("import numpy as np\nfrom optreg.client import Client\n"
            "c = Client()\nkept = c.create_session('sgd', {'w': np.zeros(2)}, session_id='kept-by-default')\n"
            "gone = c.create_session('sgd', {'w': np.zeros(2)}, session_id='keep-false', keep=False)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=optreg_env(OPTREG_ADDRESS=server.address))
    assert done.returncode == 0, done.stderr
    assert [s.session_id for s in client.list_sessions()] == ["kept-by-default"]
    client.delete_session("kept-by-default")


def test_sessions_that_end_on_their_own_are_ended_by_their_clients_with_block(server, client):
    # The session objects outlive the Client's with-block, which closes the connection: the block's end
    # decides them (an exception keeps "on-error" ones), not the exit, when the client can no longer call.
    import subprocess
    import sys
    from cli_helpers import optreg_env
    code = ("import numpy as np\nfrom optreg.client import Client\n"
            "with Client() as c:\n"
            "    a = c.create_session('sgd', {'w': np.zeros(2)}, session_id='outlives-ok', keep=False)\n"
            "try:\n"
            "    with Client() as c:\n"
            "        b = c.create_session('sgd', {'w': np.zeros(2)}, session_id='on-error-kept', keep='on-error')\n"
            "        c2 = c.create_session('sgd', {'w': np.zeros(2)}, session_id='false-gone', keep=False)\n"
            "        raise RuntimeError('training failed')\n"
            "except RuntimeError:\n"
            "    pass\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=optreg_env(OPTREG_ADDRESS=server.address))
    assert done.returncode == 0, done.stderr
    assert [s.session_id for s in client.list_sessions()] == ["on-error-kept"]
    client.delete_session("on-error-kept")


# -- item 10: the README's book snippet runs as written -----------------------------------------------

def test_the_readme_book_snippet_runs_as_written(server, client):
    import re
    import subprocess
    import sys
    from conftest import ROOT
    from cli_helpers import optreg_env
    readme = (ROOT / "README.md").read_text()
    snippet = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "import Adam" in b)
    done = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, timeout=300,
                          env=optreg_env(OPTREG_ADDRESS=server.address, MPLBACKEND="Agg"))
    assert done.returncode == 0, done.stderr
    assert re.fullmatch(r"loss \d+\.\d+, test accuracy \d+\.\d%\n", done.stdout), done.stdout
    assert client.list_sessions() == []  # the with-block ended the session


def _idx(path, array):
    """An IDX file of unsigned bytes (the format the book's loader saves)."""
    import numpy as np
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    path.write_bytes(header + np.asarray(array, np.uint8).tobytes())


def test_fashion_mnist_given_with_data_is_titled_fashion_mnist(server, tmp_path):
    import json
    import numpy as np
    data = tmp_path / "some" / "long" / "path"
    data.mkdir(parents=True)
    rng = np.random.default_rng(0)
    labels = np.array([9, 0, 0, 3, 0, 2, 7, 2, 5, 5] * 10)  # Fashion-MNIST's first training labels
    _idx(data / "train-images-idx3-ubyte", rng.integers(0, 256, (100, 28, 28)))
    _idx(data / "train-labels-idx1-ubyte", labels)
    _idx(data / "t10k-images-idx3-ubyte", rng.integers(0, 256, (20, 28, 28)))
    _idx(data / "t10k-labels-idx1-ubyte", labels[:20])
    out = tmp_path / "demo"
    done = optreg("demo", "--data", str(data), "--quick", "--iterations", "2", "--no-progress", "--out", str(out),
                  "--address", server.address, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads((out / "summary.json").read_text())["dataset"] == "Fashion-MNIST"
    assert f"data set: Fashion-MNIST (IDX files in {data}):" in done.stdout


# -- items 7 and 10: the workers demo and examples/workers_train.py ---------------------------------------

def _noise_line_is_honest(line: str) -> None:
    assert "noise scale 0.00" not in line
    assert "worker batches (~" in line or "noise scale not measurable" in line, line


def test_workers_demo_says_what_its_noise_scale_and_wall_time_mean(server, tmp_path):
    import json
    done = optreg("demo", "--workers", "2", "--quick", "--iterations", "4", "--dataset", "digits", "--no-progress",
                  "--out", str(tmp_path), "--address", server.address, timeout=600)
    assert done.returncode == 0, done.stderr
    _noise_line_is_honest(next(line for line in done.stdout.splitlines() if "noise scale" in line))
    runs = json.loads((tmp_path / "workers.json").read_text())["runs"]
    if runs["many"]["seconds"] > runs["one"]["seconds"]:
        assert "2 workers took" in done.stdout and "every round waits for the slowest of 2 processes" in done.stdout


def test_workers_example_help_is_whole_and_it_names_the_file_it_wrote(server, tmp_path):
    import subprocess
    import sys
    from conftest import ROOT
    from cli_helpers import optreg_env
    example = [sys.executable, str(ROOT / "examples" / "workers_train.py")]
    helped = subprocess.run(example + ["--help"], capture_output=True, text=True, env=optreg_env(), timeout=120)
    assert helped.returncode == 0 and "or with\noptreg installed." in helped.stdout, helped.stdout
    done = subprocess.run(example + ["--address", server.address, "--workers", "2", "--rounds", "3",
                                     "--out", str(tmp_path / "wt")],
                          capture_output=True, text=True, env=optreg_env(MPLBACKEND="Agg"), timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == f"wrote {tmp_path / 'wt.png'}"
    assert (tmp_path / "wt.png").read_bytes()[:4] == b"\x89PNG"
    _noise_line_is_honest(done.stdout.splitlines()[0])


def test_serve_ray_at_an_address_where_no_cluster_answers_fails_in_one_line(tmp_path):
    pytest.importorskip("ray")
    address = f"127.0.0.1:{free_port()}"
    done = optreg("serve", "--ray", address, "--data-dir", str(tmp_path), "--port", "0", timeout=90)  # hang guard
    assert done.returncode == 2
    assert_one_line_error(done, "--ray", f"no Ray cluster answers at {address} (Connection refused)")


def test_the_readme_grpcurl_example_creates_steps_and_deletes_a_session(server, client):
    import re
    import subprocess
    from conftest import ROOT
    from test_reflection import _grpcurl
    grpcurl = _grpcurl()
    readme = (ROOT / "README.md").read_text()
    block = next(b for b in re.findall(r"```sh\n(.*?)```", readme, re.S) if "SessionService/Step" in b)
    script = block.replace("127.0.0.1:50051", server.address).replace("grpcurl ", f"{grpcurl} ")
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert '"data": "ZmZmZmZm7j8zMzMzMzP/Pw=="' in done.stdout and '"step": "1"' in done.stdout, done.stdout
    assert client.list_sessions() == []


# -- item 8: the plugin guide says what is true ---------------------------------------------------------

def test_the_plugin_guide_counts_the_kits_tests_and_shares_without_an_index():
    import re
    import subprocess
    import sys
    from conftest import ROOT
    from cli_helpers import optreg_env
    from optreg.plugins.testing import OptimizerConformance
    guide = (ROOT / "docs" / "plugins.md").read_text()
    words = ["ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen"]
    kit = len([n for n in dir(OptimizerConformance) if n.startswith("test_")])
    assert f"That is {words[kit - 10]} tests:" in guide
    assert f"# {kit} conformance tests" in guide
    # The count the guide promises for the example package, run from its folder as the guide says.
    promised = re.search(r'"(\d+ passed, \d+ skipped)"', guide).group(1)
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"], capture_output=True,
                          text=True, cwd=ROOT / "examples" / "optreg-lion", env=optreg_env(), timeout=300)
    assert done.returncode == 0, done.stdout
    assert promised in done.stdout.splitlines()[-1], done.stdout
    # optreg is on no index: the guide must not send a plugin that depends on it to one.
    assert "on a package index" in guide and "twine upload" not in guide
