"""photd installs as the import name ``photd`` and lives beside PyPI's ``python-daemon``.

PyPI's ``python-daemon`` (and ``daemon``) install a top-level ``daemon``
package; a project that also installed ``daemon`` would overwrite its files.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def _pip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
                          capture_output=True, text=True, timeout=600)


def test_photd_imports_from_any_folder_and_runs_as_a_module(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "photd", "--help"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "photd" in out.stdout and "run" in out.stdout


def test_photd_installs_beside_python_daemon_without_touching_it(tmp_path: Path) -> None:
    target = tmp_path / "site"
    got = _pip("install", "--quiet", "--no-deps", "--target", str(target),
               "python-daemon", "lockfile")
    if got.returncode != 0:
        pytest.skip(f"python-daemon could not be installed from the package index: "
                    f"{got.stderr[-300:]}")
    before = {p.relative_to(target) for p in (target / "daemon").rglob("*")}
    got = _pip("install", "--quiet", "--no-deps", "--target",
               str(target), str(REPO_ROOT))
    assert got.returncode == 0, got.stderr[-2000:]
    # photd added nothing to python-daemon's package and replaced none of its files
    after = {p.relative_to(target) for p in (target / "daemon").rglob("*")
             if "__pycache__" not in p.parts}
    assert after == {p for p in before if "__pycache__" not in p.parts}
    assert (target / "photd" / "pipeline.py").is_file()
    code = ("import daemon, photd, photd.cli; "
            "assert hasattr(daemon, 'DaemonContext'), daemon.__file__; "
            "assert photd.__file__.startswith(sys.argv[1]), photd.__file__; "
            "print(photd.__version__)")
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-c", "import sys; " + code, str(target)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
