"""Under CI=true a skip is a failure (tests/conftest.py), so a green CI means every test ran."""
import os
import shutil
import subprocess
import sys

_SKIPPING = '''
import pytest

def test_runs():
  pass

def test_needs_a_package():
  pytest.importorskip("no_such_package_for_retrieval_jax")

@pytest.mark.skipif(True, reason="../shared/data is absent")
def test_needs_data():
  pass

@pytest.mark.xfail(reason="an expected failure stays one")
def test_expected_failure():
  assert False
'''


def _pytest(folder, ci):
  env = {k: v for k, v in os.environ.items() if k != "CI"}
  if ci:
    env["CI"] = "true"
  return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                         "-p", "no:xdist", "-rA", str(folder)],
                        cwd=str(folder), env=env, capture_output=True, text=True, timeout=300)


def test_skips_fail_under_ci_and_stay_skips_elsewhere(tmp_path):
  shutil.copy(os.path.join(os.path.dirname(__file__), "conftest.py"), tmp_path / "conftest.py")
  (tmp_path / "test_skipping.py").write_text(_SKIPPING)
  local = _pytest(tmp_path, ci=False)
  assert local.returncode == 0, local.stdout
  assert "1 passed, 2 skipped, 1 xfailed" in local.stdout
  ci = _pytest(tmp_path, ci=True)
  assert ci.returncode == 1, ci.stdout
  assert "1 failed, 1 passed, 1 xfailed, 1 error" in ci.stdout  # skipif fails at setup
  assert "skipped in CI (CI=true), where every test must run" in ci.stdout
  assert "no_such_package_for_retrieval_jax" in ci.stdout and "shared/data is absent" in ci.stdout


def test_a_module_level_importorskip_fails_under_ci(tmp_path):
  shutil.copy(os.path.join(os.path.dirname(__file__), "conftest.py"), tmp_path / "conftest.py")
  (tmp_path / "test_module_skip.py").write_text(
      'import pytest\npytest.importorskip("no_such_package_for_retrieval_jax")\n'
      'def test_x():\n  pass\n')
  local = _pytest(tmp_path, ci=False)
  assert "1 skipped" in local.stdout and local.returncode == 5, local.stdout  # 5: none ran
  ci = _pytest(tmp_path, ci=True)
  assert ci.returncode == 2 and "skipped in CI" in ci.stdout, ci.stdout  # 2: collection error
