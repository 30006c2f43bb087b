"""The Node.js client in examples/node against a real server: language-agnostic access, checked numerically.

The client loads the contract from proto/ at run time, steps sgd and adam
sessions, and compares every returned number with the book's formulas
computed in JavaScript; it exits non-zero on any mismatch.
"""
from __future__ import annotations

import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
NODE_DIR = ROOT / "examples" / "node"

NODE = shutil.which("node")
pytestmark = pytest.mark.skipif(NODE is None, reason="node is not installed")


def _ensure_node_modules() -> None:
    if (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir() and \
            (NODE_DIR / "node_modules" / "@grpc" / "proto-loader").is_dir():
        return
    npm = shutil.which("npm")
    assert npm, "node is installed but npm is not: cannot install examples/node's packages"
    cmd = [npm, "ci"] if (NODE_DIR / "package-lock.json").is_file() else [npm, "install"]
    done = subprocess.run(cmd + ["--no-audit", "--no-fund"], cwd=NODE_DIR, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}"


def _run_client(address: str) -> subprocess.CompletedProcess:
    _ensure_node_modules()
    return subprocess.run([NODE, str(NODE_DIR / "client.js"), address], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_node_client_matches_the_book(start_server):
    server = start_server()
    done = _run_client(server.address)
    assert done.returncode == 0, f"node client failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    assert "all checks passed" in done.stdout
    assert "sgd" in done.stdout and "adam" in done.stdout


def test_node_client_fails_without_a_server(start_server):
    # The client's exit status means something: stop the server, and it must fail.
    server = start_server()
    address = server.address
    server.stop()
    done = _run_client(address)
    assert done.returncode != 0, done.stdout
