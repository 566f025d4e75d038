"""The README's first screen: exactly two commands for a fresh machine (install + main job, install + tests), the
CI entry point runs the README's test command, both install the pinned stack through launchers/install.sh; and the
trainer's TensorBoard writer says once when tensorboard is missing instead of writing nothing silently."""
import os
import re
import subprocess
import sys
import warnings

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_CMD = "bash launchers/run_tiny.sh --install"
TEST_CMD = "bash tests/run.sh --install"


def _commands(block: str):
    return [ln.strip() for ln in block.splitlines() if ln.strip() and not ln.strip().startswith("#")]


def test_readme_first_screen_has_exactly_the_two_commands():
    text = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    first = re.search(r"```bash\n(.*?)```", text, flags=re.S)
    assert first.start() < 1500, "the README's first code block must be on its first screen"
    assert _commands(first.group(1)) == [RUN_CMD, TEST_CMD]


def test_ci_runs_the_readme_test_command_and_the_pins_agree():
    ci = _commands(open(os.path.join(REPO, ".ci", "run")).read())
    assert ci[-1] == TEST_CMD, ".ci/run must end with the README's test command"
    install = open(os.path.join(REPO, "launchers", "install.sh")).read()
    assert "torch==2.14.1 torchvision==0.29.1" in install
    assert "torch 2.14.1, torchvision 0.29.1" in open(os.path.join(REPO, "setup.py")).read()


def _stub_python(tmp_path, fail_unless_pip: bool):
    """A PYTHON that logs its arguments (and, for run_tiny, stops the job after the install)."""
    log = tmp_path / "calls.log"
    stub = tmp_path / "py"
    stub.write_text("#!/usr/bin/env bash\n"
                    f"echo \"$*\" >> {log}\n"
                    + ('[ "$1 $2" = "-m pip" ] || exit 3\n' if fail_unless_pip else "") + "exit 0\n")
    stub.chmod(0o755)
    return str(stub), log


def test_test_command_installs_the_pinned_stack_then_runs_the_suite(tmp_path):
    stub, log = _stub_python(tmp_path, fail_unless_pip=False)
    env = dict(os.environ, PYTHON=stub)
    env.pop("EXTRAS", None)
    r = subprocess.run(["bash", "tests/run.sh", "--install", "-k", "nothing"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    calls = log.read_text().splitlines()
    assert calls == ["-m pip install -q torch==2.14.1 torchvision==0.29.1",
                     "-m pip install -q -e .[all]",
                     "-m pytest -q -n 2 --dist loadgroup tests -k nothing"]
    # without --install: the tests only
    log.unlink()
    r = subprocess.run(["bash", "tests/run.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and log.read_text().splitlines() == ["-m pytest -q -n 2 --dist loadgroup tests"]


def test_main_job_command_installs_first(tmp_path):
    stub, log = _stub_python(tmp_path, fail_unless_pip=True)
    env = dict(os.environ, PYTHON=stub, OUT=str(tmp_path / "out"))
    env.pop("EXTRAS", None)
    r = subprocess.run(["bash", "launchers/run_tiny.sh", "--install"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=60)
    calls = log.read_text().splitlines()
    assert calls[:2] == ["-m pip install -q torch==2.14.1 torchvision==0.29.1", "-m pip install -q -e .[all]"]
    assert len(calls) > 2 and r.returncode != 0  # the job went on to its first stage (which the stub refuses)
    r = subprocess.run(["bash", "launchers/run_tiny.sh", "--instal"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--install" in r.stderr


def test_setup_extras_install_tensorboard_with_all():
    out = subprocess.run([sys.executable, "-c", "import runpy, unittest.mock as m, setuptools\n"
                          "with m.patch.object(setuptools, 'setup', lambda **kw: print(sorted(kw['extras_require']['all']))):\n"
                          "    runpy.run_path('setup.py')"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "tensorboard>=2.14" in out.stdout


def test_missing_tensorboard_warns_once(tmp_path, monkeypatch):
    from usp_scale.training import metrics
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    monkeypatch.setattr(metrics, "_TB_MISSING_WARNED", False)
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        for run in ("a", "b"):
            log = metrics.MetricsLogger(str(tmp_path / run), enabled=True, tensorboard=True)
            log.log({"step": 1, "loss": 1.0})
            log.log({"step": 2, "loss": 0.5})
    tb = [w for w in got if "tensorboard" in str(w.message)]
    assert len(tb) == 1 and "tensorboard=false to silence" in str(tb[0].message)
    assert log.tb is None and len(log.read_all()) == 2
    # off in the config: no warning
    monkeypatch.setattr(metrics, "_TB_MISSING_WARNED", False)
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        metrics.MetricsLogger(str(tmp_path / "c"), enabled=True, tensorboard=False).log({"step": 1, "loss": 1.0})
    assert not [w for w in got if "tensorboard" in str(w.message)]
