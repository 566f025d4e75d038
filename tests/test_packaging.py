"""kernels/ is installed as usp_scale.kernels and never as a top-level module named `kernels`."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_kernels_folder_is_usp_scale_kernels_only(tmp_path):
    code = ("import importlib.util, usp_scale.kernels as k, diffusers;"
            "print(k.__file__);"
            "print(importlib.util.find_spec('kernels'))")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    path, spec = r.stdout.strip().splitlines()[-2:]
    assert os.path.realpath(path) == os.path.realpath(os.path.join(ROOT, "kernels", "__init__.py"))
    # Outside the repository root nothing named `kernels` is importable unless the unrelated PyPI package is.
    if spec != "None":
        assert "site-packages" in spec and ROOT not in spec, spec
