"""`optreg serve` refuses a port or a data directory another server holds, and ports that do not exist.

gRPC sets SO_REUSEPORT by default, so a second server on a port in use used to
start and take about half of the new connections (each with its own sessions).
"""
from __future__ import annotations

import numpy as np
import pytest

from cli_helpers import assert_one_line_error, optreg

from optreg.client import Client


def test_second_server_on_a_port_in_use_exits_and_the_first_keeps_every_client(start_server):
    first = start_server("--memory-only")
    port = first.address.rsplit(":", 1)[1]
    with Client(first.address, timeout=30) as c:
        c.create_session("sgd", {"w": np.zeros(3)}, session_id="first-server", lr=0.1)
    second = optreg("serve", "--host", "127.0.0.1", "--port", port, "--memory-only", timeout=60)
    line = assert_one_line_error(second, f"port {port}", "in use", "another server")
    assert second.stdout == "", "the second server must not print a serving line"
    assert "--port 0" in line  # the way out
    # Every new connection lands on the first server (the one with the session).
    for _ in range(12):
        with Client(first.address, timeout=30) as c:
            assert [s.session_id for s in c.list_sessions()] == ["first-server"]


@pytest.mark.parametrize("port, words", [("99999", ["99999", "0-65535"]), ("-5", ["-5", "0-65535"]),
                                         ("http", ["'http'", "port"])])
def test_ports_outside_the_range_are_refused_by_the_parser(port, words):
    done = optreg("serve", "--memory-only", "--port", port, timeout=60)
    assert done.returncode == 2
    assert_one_line_error(done, "--port", *words)


def test_metrics_port_outside_the_range_is_refused():
    assert_one_line_error(optreg("serve", "--memory-only", "--port", "0", "--metrics-port", "70000", timeout=60),
                          "--metrics-port", "70000")


def test_second_server_on_a_data_dir_in_use_exits(start_server, tmp_path):
    first = start_server("--data-dir", str(tmp_path))
    second = optreg("serve", "--port", "0", "--data-dir", str(tmp_path), timeout=60)
    assert_one_line_error(second, str(tmp_path), "in use by another optreg server",
                          f"pid {first.proc.pid}")
    first.stop()
    # The lock goes with the process: a restart on the same directory works.
    again = start_server("--data-dir", str(tmp_path))
    with Client(again.address, timeout=30) as c:
        assert c.list_sessions() == []
