"""The suite's skip guard (tests/conftest.py): a skip outside ALLOWED_SKIPS fails the run."""

import os
import shutil
import subprocess
import sys

CONFTEST = os.path.join(os.path.dirname(os.path.abspath(__file__)), "conftest.py")


def _run(tmp_path, body: str) -> subprocess.CompletedProcess:
    shutil.copy(CONFTEST, tmp_path / "conftest.py")
    (tmp_path / "test_case.py").write_text("import pytest\n\n" + body)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                          capture_output=True, text=True, cwd=tmp_path)


def test_unlisted_skip_fails_the_run(tmp_path):
    out = _run(tmp_path, "def test_skipped():\n    pytest.skip('no reference library')\n\n"
                         "def test_passes():\n    assert True\n")
    assert out.returncode == 1, out.stdout
    assert "test_case.py::test_skipped: Skipped: no reference library" in out.stdout


def test_run_without_skips_passes(tmp_path):
    out = _run(tmp_path, "def test_passes():\n    assert True\n")
    assert out.returncode == 0, out.stdout
