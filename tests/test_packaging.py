"""The kernels live in the top-level folder kernels/ and are the package usp_scale.kernels: in a fresh install
(setup.py's package_dir) and in a source checkout (usp_scale maps it), never a top-level module named `kernels`; and
every launcher runs the code of the checkout it sits in, even from a plain checkout or with another copy of usp_scale
installed."""
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHERS = sorted(f for f in os.listdir(os.path.join(ROOT, "launchers")) if f.endswith(".py"))
PROBE = ("import importlib.util, usp_scale, usp_scale.kernels as k, usp_scale.kernels.dispatch as d, diffusers;"
         "print(usp_scale.__file__); print(k.__file__); print(d.__file__);"
         "print(importlib.util.find_spec('kernels'))")


def _copy_tree(dst, parts=("usp_scale", "kernels", "launchers")):
    for d in parts:
        shutil.copytree(os.path.join(ROOT, d), dst / d, ignore=shutil.ignore_patterns("__pycache__"))


@pytest.mark.slow
def test_a_fresh_install_has_usp_scale_kernels_and_no_top_level_kernels(tmp_path):
    """pip installs a copy of the tree into a target folder (no dependencies, no build isolation: setuptools as
    installed); run from elsewhere with only that folder on the path, usp_scale.kernels is the installed one and
    nothing named `kernels` is importable (unless the unrelated PyPI package is installed in site-packages)."""
    src = tmp_path / "src"
    _copy_tree(src, ("usp_scale", "kernels"))
    shutil.copy(os.path.join(ROOT, "setup.py"), src / "setup.py")
    target = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                        "--no-compile", "--target", str(target), str(src)], capture_output=True, text=True,
                       timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (target / "usp_scale" / "kernels" / "dispatch.py").is_file() and not (target / "kernels").exists()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(target)
    run = tmp_path / "elsewhere"
    run.mkdir()
    r = subprocess.run([sys.executable, "-c", PROBE], cwd=run, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    pkg, kern, disp, spec = r.stdout.strip().splitlines()[-4:]
    for path in (pkg, kern, disp):
        assert path.startswith(str(target)), (path, r.stdout)
    assert kern.endswith(os.path.join("usp_scale", "kernels", "__init__.py"))
    if spec != "None":
        assert "site-packages" in spec and str(target) not in spec, spec


def test_source_checkout_maps_the_kernels_folder_and_refuses_the_bare_name(tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT}
    r = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                       env=env)
    assert r.returncode == 0, r.stderr
    _, kern, disp, _ = r.stdout.strip().splitlines()[-4:]
    assert os.path.realpath(kern) == os.path.realpath(os.path.join(ROOT, "kernels", "__init__.py"))
    assert os.path.realpath(disp) == os.path.realpath(os.path.join(ROOT, "kernels", "dispatch.py"))
    # With the repository root on the path the folder is found under its bare name, and refuses it.
    r = subprocess.run([sys.executable, "-c", "import kernels"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, env=env)
    assert r.returncode != 0 and "usp_scale.kernels" in r.stderr, r.stderr


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_launcher_runs_its_own_checkout(tmp_path, launcher):
    """A copy of the repository (not installed): loading one of its launchers makes ``usp_scale`` and
    ``usp_scale.kernels`` resolve inside that copy, not to the installed one."""
    copy = tmp_path / "checkout"
    _copy_tree(copy)
    path = str(copy / "launchers" / launcher)
    code = ("import runpy, sys; sys.argv = [%r]; runpy.run_path(%r, run_name='probe');"
            "import usp_scale, usp_scale.kernels as k; print(usp_scale.__file__); print(k.__file__)") % (path, path)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env=env)
    assert r.returncode == 0, r.stderr
    pkg, kern = r.stdout.strip().splitlines()[-2:]
    assert pkg.startswith(str(copy)) and kern.startswith(str(copy)), (launcher, pkg, kern)
