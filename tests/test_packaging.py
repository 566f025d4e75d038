"""The kernels live in usp_scale/kernels (never a top-level module named `kernels`), and every launcher runs the
code of the checkout it sits in, even from a plain checkout or with another copy of usp_scale installed."""
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHERS = sorted(f for f in os.listdir(os.path.join(ROOT, "launchers")) if f.endswith(".py"))


def test_kernels_are_usp_scale_kernels_only(tmp_path):
    code = ("import importlib.util, usp_scale.kernels as k, diffusers;"
            "print(k.__file__);"
            "print(importlib.util.find_spec('kernels'))")
    env = {**os.environ, "PYTHONPATH": ROOT}
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                       env=env)
    assert r.returncode == 0, r.stderr
    path, spec = r.stdout.strip().splitlines()[-2:]
    assert os.path.realpath(path) == os.path.realpath(os.path.join(ROOT, "usp_scale", "kernels", "__init__.py"))
    # Nothing named `kernels` is importable unless the unrelated PyPI package is installed.
    if spec != "None":
        assert "site-packages" in spec and ROOT not in spec, spec


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_launcher_runs_its_own_checkout(tmp_path, launcher):
    """A copy of the repository (not installed): loading one of its launchers makes ``usp_scale`` and
    ``usp_scale.kernels`` resolve inside that copy, not to the installed one."""
    copy = tmp_path / "checkout"
    for d in ("usp_scale", "launchers"):
        shutil.copytree(os.path.join(ROOT, d), copy / d, ignore=shutil.ignore_patterns("__pycache__"))
    path = str(copy / "launchers" / launcher)
    code = ("import runpy, sys; sys.argv = [%r]; runpy.run_path(%r, run_name='probe');"
            "import usp_scale, usp_scale.kernels as k; print(usp_scale.__file__); print(k.__file__)") % (path, path)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env=env)
    assert r.returncode == 0, r.stderr
    pkg, kern = r.stdout.strip().splitlines()[-2:]
    assert pkg.startswith(str(copy)) and kern.startswith(str(copy)), (launcher, pkg, kern)
