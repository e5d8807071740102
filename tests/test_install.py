"""A plain (non-editable) install carries the compiled parts and works."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.timeout(300)
def test_non_editable_install_imports_and_migrates(tmp_path):
    target = tmp_path / "site"
    build = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                            "--target", str(target), ROOT], capture_output=True, text=True, timeout=280)
    assert build.returncode == 0, build.stderr[-2000:]
    env = dict(os.environ, PYTHONPATH=str(target))
    probe = subprocess.run([sys.executable, "-c", (
        "import migrate, migrate._native, os\n"
        "from migrate.qemu.shim import shim_path\n"
        "assert os.path.exists(shim_path()), shim_path()\n"
        "print(migrate.__file__)\n")], capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=60)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == str(target / "migrate" / "__init__.py")
    demo = subprocess.run([sys.executable, "-m", "migrate", "demo", "--size", "32M", "--json"], capture_output=True,
                          text=True, env=env, cwd=str(tmp_path), timeout=120)
    assert demo.returncode == 0, demo.stderr[-2000:]
    assert '"verified": true' in demo.stdout.strip().splitlines()[-1]
