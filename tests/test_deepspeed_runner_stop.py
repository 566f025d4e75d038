"""SIGTERM to DeepSpeed's runner (`deepspeed --hostfile`, as a scheduler or Ctrl-C sends it) used to end the runner
alone while launch.py and both ranks trained on to the end as orphans (issue 18 item 10). With the real runner on
localhost: the ranks notice, write a checkpoint and exit (the stop protocol's path: STOPPED with exit code 75), and
no process of the job is left."""
import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

import _helpers_train as H


@pytest.mark.slow
def test_sigterm_to_the_deepspeed_runner_reaches_the_ranks(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    out = tmp_path / "ds"
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile), "--no_ssh_check",
           "--master_addr", "127.0.0.1", "--master_port", str(H.free_port()), "launchers/pretrain.py", "--config",
           "configs/debug/synthetic_pretrain.yaml", f"output_dir={out}", "engine.name=deepspeed",
           "engine.zero_stage=2", "engine.precision=fp32", "optim.fused=false", "schedule.max_steps=100000",
           "schedule.epochs=100000", "log_every=1"]
    runner = subprocess.Popen(cmd, cwd=H.REPO, env=H.child_env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    job = []
    try:
        deadline = time.monotonic() + 300
        while not (out / "metrics.jsonl").exists() or '"kind": "train"' not in (out / "metrics.jsonl").read_text():
            assert runner.poll() is None and time.monotonic() < deadline, "the job did not start training"
            time.sleep(0.5)
        job = psutil.Process(runner.pid).children(recursive=True)   # launch.py and the two ranks
        assert len(job) >= 3, job
        runner.send_signal(signal.SIGTERM)
        runner.wait(timeout=30)
        gone, alive = psutil.wait_procs(job, timeout=180)
        assert not alive, f"still running after SIGTERM to the runner: {[p.cmdline()[-6:] for p in alive]}"
        stopped = json.loads((out / "STOPPED").read_text())
        assert stopped["exit_code"] == 75 and os.path.isfile(os.path.join(stopped["checkpoint"], "meta.json"))
    finally:
        for p in job:
            if p.is_running():
                p.kill()
        if runner.poll() is None:
            runner.kill()
