"""The committed bindings, and the descriptor set that reflection serves, equal a fresh generation
from the .proto files."""
import importlib.util
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2] / "proto"


def test_generated_code_is_not_stale(tmp_path):
    pytest.importorskip("grpc_tools", reason="grpcio-tools comes with the test extra")
    spec = importlib.util.spec_from_file_location("generate", ROOT / "generate.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    gen.generate(tmp_path)
    fresh = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert fresh, "generation produced nothing"
    for rel, content in fresh.items():
        committed = ROOT / rel
        assert committed.exists(), f"{rel} is not committed: run python proto/generate.py"
        assert committed.read_bytes() == content, f"{rel} is stale: run python proto/generate.py"
    committed_generated = {p.relative_to(ROOT) for p in (ROOT / "optreg").rglob("*_pb2*.py*")
                           if "__pycache__" not in p.parts}
    assert committed_generated == {r for r in fresh if "_pb2" in r.name}, \
        "bindings for a removed .proto are still committed"
