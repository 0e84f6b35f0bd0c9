import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_finds_nothing():
    # rules in pyproject.toml ([tool.ruff.lint]): pyflakes, syntax errors and import order
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "dbl", "tests", "tools"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
