"""A Node.js client steps compressed sessions (issue 26): examples/node/compressed.js sends top-k and int8
gradients with its own error feedback and takes bf16-delta replies, checking every number against SGD on what
the contract says the server decodes, and a bad index is refused naming the field."""
from __future__ import annotations

import subprocess

import pytest

from conftest import ROOT
from test_node_client import NODE, NODE_DIR, _ensure_node_modules

pytestmark = pytest.mark.skipif(NODE is None, reason="node is not installed")


def test_node_client_steps_compressed_sessions(start_server):
    server = start_server("--memory-only")
    _ensure_node_modules()
    done = subprocess.run([NODE, str(NODE_DIR / "compressed.js"), server.address], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, f"node client failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    assert "all checks passed" in done.stdout and "bf16 replies" in done.stdout
