"""The code's hygiene: snakefmt formatting, `snakemake --lint` without findings, ruff on the Python."""

import subprocess
import sys
import pytest
from pathlib import Path

from conftest import REPO

BIN = Path(sys.executable).parent


def test_snakefmt_check():
    files = ["Snakefile", *sorted(str(p.relative_to(REPO)) for p in (REPO / "workflow" / "rules").glob("*.smk"))]
    proc = subprocess.run([str(BIN / "snakefmt"), "--check", *files], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.slow
def test_snakemake_lint_has_no_findings(tmp_path):
    proc = subprocess.run(
        [str(BIN / "snakemake"), "--snakefile", str(REPO / "Snakefile"), "--directory", str(tmp_path),
         "--configfile", str(REPO / "config" / "config.yaml"), "--lint"],
        capture_output=True, text=True,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "Congratulations" in out, out


def test_python_lint_is_clean():
    """ruff's pyflakes rules (pyproject.toml [tool.ruff]): unused imports and variables, undefined names."""
    proc = subprocess.run([str(BIN / "ruff"), "check", "--no-cache", "."], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
