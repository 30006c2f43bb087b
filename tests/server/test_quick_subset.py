"""`pytest --quick` (README): a real subset of the suite, from files that exist, and nothing else."""
import pathlib
import subprocess
import sys

from conftest import QUICK, ROOT


def test_every_quick_file_exists_and_quick_selects_exactly_them():
    files = {p.name for p in ROOT.glob("tests/**/test_*.py")} | {p.name for p in ROOT.glob("examples/*/tests/test_*.py")}
    assert QUICK <= files, QUICK - files
    done = subprocess.run([sys.executable, "-m", "pytest", "--quick", "--collect-only", "-q", "-p", "no:cacheprovider"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    ids = [line for line in done.stdout.splitlines() if "::" in line]
    selected = {pathlib.Path(i.split("::")[0]).name for i in ids}
    assert selected == QUICK and len(ids) > 300
