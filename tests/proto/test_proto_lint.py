"""The contract follows buf's STANDARD lint rules (proto/buf.yaml)."""
import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_buf_lint_standard():
    buf = shutil.which("buf") or ROOT / ".tools" / "node_modules" / ".bin" / "buf"
    if not pathlib.Path(buf).exists():
        pytest.skip("buf not installed (.ci/run installs it: npm install --prefix .tools @bufbuild/buf)")
    result = subprocess.run([str(buf), "lint"], cwd=ROOT / "proto", capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
