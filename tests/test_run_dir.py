"""The run folder at start-up (issue 18 item 11 and the weak messages): a second job on a live run folder is refused
naming the holder (real processes; the lock dies with its holder, even under SIGKILL); a folder that takes no file
is refused before training; a refused run leaves config.yaml as it was; the litter of killed writers is removed."""
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

import _helpers_train as H
from usp_scale.config import ConfigError

REPO = H.REPO
RECIPE = os.path.join(REPO, "configs", "debug", "synthetic_pretrain.yaml")


def _launch(out, *extra, **kw):
    cmd = [sys.executable, os.path.join(REPO, "launchers", "pretrain.py"), "--config", RECIPE, f"output_dir={out}",
           "engine.precision=fp32", "optim.fused=false", *extra]
    return subprocess.Popen(cmd, cwd=REPO, env=H.child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kw)


def test_second_job_on_a_live_run_folder_is_refused_naming_the_holder(tmp_path):
    out = str(tmp_path / "run")
    first = _launch(out, "schedule.max_steps=100000", "schedule.epochs=100000")
    try:
        lock = os.path.join(out, ".lock")
        deadline = time.monotonic() + 180
        while not (os.path.exists(lock) and open(lock).read().strip()):
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()[1][-2000:]
            time.sleep(0.2)
        second = _launch(out, "schedule.max_steps=2")
        _, err = second.communicate(timeout=180)
        assert second.returncode == 3, err[-2000:]
        assert f"host {socket.gethostname()}, pid {first.pid}" in err and "in use by another job" in err, err[-2000:]
        assert "Traceback" not in err
    finally:
        first.send_signal(signal.SIGKILL)  # no clean-up code runs: the OS releases the lock
        first.communicate()
    third = _launch(out, "schedule.max_steps=2")
    _, err = third.communicate(timeout=240)
    assert third.returncode == 0, err[-2000:]


def test_unwritable_checkpoint_folder_is_refused_at_start_up(tmp_path):
    from usp_scale.training import run

    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoints").write_text("not a folder")  # (the tests run as root: permissions would not stop a write)
    with pytest.raises(ConfigError, match=r"run/checkpoints is not writable"):
        run(H.trainer_cfg("local", str(out), **{"schedule.max_steps": 4}))
    assert not (out / "config.yaml").exists()


def test_refused_resume_leaves_config_yaml_and_litter_is_removed(tmp_path):
    from usp_scale.training import run

    out = tmp_path / "run"
    run(H.trainer_cfg("local", str(out), **{"schedule.max_steps": 4, "checkpoint.every_steps": 1,
                                            "checkpoint.keep_last": 0}))
    before = (out / "config.yaml").read_text()
    with pytest.raises(Exception, match=r"vit_small_patch_vae|signature|does not fit|differ"):
        run(H.trainer_cfg("local", str(out), **{"schedule.max_steps": 6, "model.name": "vit_small_patch_vae"}))
    assert (out / "config.yaml").read_text() == before
    # litter: a temp file of a writer killed mid-write (its pid is gone), a step folder emptied by a killed pruning,
    # the temporary folder of a killed save
    dead = subprocess.Popen(["true"])
    dead.wait()
    tmp_file = out / f"mae_export.safetensors.tmp{dead.pid}"
    tmp_file.write_bytes(b"partial")
    ck = out / "checkpoints"
    for name in os.listdir(ck):
        if name == "step_00000002":
            for f in os.listdir(ck / name):
                p = ck / name / f
                if p.is_file():
                    p.unlink()
    assert not (ck / "step_00000002" / "meta.json").exists()
    (ck / ".tmp-step_00000009").mkdir()
    res = run(H.trainer_cfg("local", str(out), **{"schedule.max_steps": 5, "checkpoint.every_steps": 1,
                                                  "checkpoint.keep_last": 0}))
    assert res["step"] == 5
    assert not tmp_file.exists() and not (ck / "step_00000002").exists() and not (ck / ".tmp-step_00000009").exists()
    assert (ck / "step_00000004" / "meta.json").exists()


@pytest.mark.parametrize("override,message", [
    ("data.root=/nonexistent", "dataset folder not found: /nonexistent/train"),
    ("engine.backend=nccl", "engine.backend=nccl needs a CUDA GPU"),
])
def test_errors_after_config_load_are_one_line_with_the_documented_exit_code(tmp_path, override, message):
    """Issue 18 weak messages: a missing dataset or nccl without a GPU ended in a 25-line traceback with exit 1 (the
    crash code, which requeue logic reads as a crash); now one line and exit 3 (docs/training.md, Exit codes)."""
    recipe = os.path.join(REPO, "configs", "debug", "tiny.yaml")
    cmd = [sys.executable, os.path.join(REPO, "launchers", "pretrain.py"), "--config", recipe,
           f"output_dir={tmp_path / 'run'}", "engine.name=ddp", override]
    r = subprocess.run(cmd, cwd=REPO, env=H.child_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 3 and message in r.stderr and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert not os.path.exists(tmp_path / "run" / "config.yaml")
