"""Fast checks of the multi-node launch pieces, without a cluster (each is also exercised for real by
tests/cluster/test_cluster.py): ranks from SLURM variables, the batch-job wrapper's requeue logic (stand-in
scontrol), .deepspeed_env lines, stop files and exit codes of the launcher, and the two process-group timeouts on
real gloo ranks."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import _helpers_train as H  # noqa: E402

from usp_scale.runtime import env as D  # noqa: E402
from usp_scale.cluster import slurm as S  # noqa: E402
from usp_scale.training import cli, stop  # noqa: E402


def test_tasks_per_node_and_slurm_ranks_exported(monkeypatch):
    assert [D.tasks_on_node("2(x3),1", i) for i in range(4)] == [2, 2, 2, 1]
    assert D.tasks_on_node("8", 0) == 8
    env = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
           "SLURM_NTASKS_PER_NODE": "1", "SLURM_STEP_TASKS_PER_NODE": "2(x2)", "SLURM_JOB_NODELIST": "n[1-2]",
           "SLURM_JOB_ID": "7", "MASTER_PORT": "1234"}
    info = D.detect(env)
    assert (info.rank, info.world_size, info.local_rank, info.local_world_size, info.master_addr,
            info.master_port, info.launcher) == (3, 4, 1, 2, "n1", 1234, "slurm")
    names = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    monkeypatch.setattr(os, "environ", {**{k: v for k, v in os.environ.items() if k not in names},
                                        "MASTER_ADDR": "10.0.0.9"})   # a launcher's value wins
    D.export_env(info)
    assert [os.environ[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                                    "MASTER_PORT")] == ["3", "1", "4", "2", "10.0.0.9", "1234"]
    assert D.shared_rendezvous_store_with_restarts({"TORCHELASTIC_MAX_RESTARTS": "2",
                                                    "TORCHELASTIC_USE_AGENT_STORE": "True"})
    assert not D.shared_rendezvous_store_with_restarts({"TORCHELASTIC_MAX_RESTARTS": "2",
                                                        "TORCHELASTIC_USE_AGENT_STORE": "False"})


def test_stop_protocol_constants_agree():
    """One home for the protocol's names (usp_scale.cluster.slurm); the trainer's side (training/stop.py) uses them."""
    assert stop.STOP_FILE == S.STOP_FILE == "STOP_AND_CHECKPOINT" and stop.STOPPED_FILE == S.STOPPED_FILE == "STOPPED"
    assert stop.EXIT_STOPPED == S.EXIT_STOPPED == 75
    assert len({cli.EXIT_DONE, cli.EXIT_CONFIG, cli.EXIT_ERROR, S.EXIT_STOPPED}) == 4


def _fake_scontrol(tmp_path):
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "scontrol").write_text(f'#!/bin/bash\necho "$@" >> {tmp_path}/scontrol.calls\n')
    (bin_ / "scontrol").chmod(0o755)
    return {**os.environ, "PATH": f"{bin_}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": "42"}


def _calls(tmp_path):
    p = tmp_path / "scontrol.calls"
    return p.read_text().split() if p.exists() else []


def test_run_job_exit_codes_requeue_and_stale_files(tmp_path):
    env = _fake_scontrol(tmp_path)
    out = tmp_path / "run"
    out.mkdir()
    (out / "STOP_AND_CHECKPOINT").touch()
    (out / "STOPPED").write_text("{}")
    # a finished launcher: stale stop files gone before it starts, its exit code passed on, no requeue
    probe = f"test ! -e {out}/STOP_AND_CHECKPOINT -a ! -e {out}/STOPPED && test -n \"$USP_SCALE_STARTED_AT\""
    assert S.run_job(["bash", "-c", probe], str(out), env=env) == 0
    assert S.run_job(["bash", "-c", "exit 3"], str(out), env=env) == 3 and _calls(tmp_path) == []
    assert S.run_job(["bash", "-c", "kill -9 $$"], str(out), env=env) == 128 + 9
    # a stop on request: exit code 75 directly (python, deepspeed) or only the marker (torchrun says 1)
    assert S.run_job(["bash", "-c", "exit 75"], str(out), env=env) == 75
    assert _calls(tmp_path) == ["requeue", "42"]
    assert S.run_job(["bash", "-c", f"echo '{{\"step\": 9}}' > {out}/STOPPED; exit 1"], str(out), env=env) == 75
    assert _calls(tmp_path) == ["requeue", "42"] * 2
    # outside SLURM: the stop code, nothing to requeue
    env.pop("SLURM_JOB_ID")
    assert S.run_job(["bash", "-c", "exit 75"], str(out), env=env) == 75 and len(_calls(tmp_path)) == 4


def test_run_subcommand_turns_sigusr1_into_a_checkpoint_request_and_requeues(tmp_path):
    """What `#SBATCH --signal=B:USR1@300` does to the batch script (which execs this wrapper)."""
    env = _fake_scontrol(tmp_path)
    out = tmp_path / "run"
    trainer = (f"while [ ! -e {out}/STOP_AND_CHECKPOINT ]; do sleep 0.05; done; "
               f"echo '{{\"step\": 5}}' > {out}/STOPPED; exit 75")
    p = subprocess.Popen([sys.executable, "-m", "usp_scale.cluster.slurm", "run", "--output-dir", str(out), "--",
                          "bash", "-c", trainer], env={**env, "PYTHONPATH": H.REPO}, cwd=H.REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(1.5)
    p.send_signal(signal.SIGUSR1)
    text, _ = p.communicate(timeout=60)
    assert p.returncode == 75, text
    assert "SIGUSR1: asking the trainer to checkpoint" in text and "requeueing job 42" in text
    assert _calls(tmp_path) == ["requeue", "42"]


def test_deepspeed_env_lines():
    env = {"OMP_NUM_THREADS": "4", "HF_HOME": "/data/hf", "USP_SCALE_CACHE": "/c", "NCCL_SOCKET_IFNAME": "ib0",
           "GLOO_SOCKET_IFNAME": "eth1", "MY_VAR": "a b", "HOME": "/root", "DS_ENV_FILE": "/x", "RANK": "3",
           "PATH": "/venv/bin:/usr/bin"}
    lines = S.deepspeed_env_lines(["MY_VAR"], env)
    assert lines == ["GLOO_SOCKET_IFNAME=eth1", "HF_HOME=/data/hf", "NCCL_SOCKET_IFNAME=ib0", "OMP_NUM_THREADS=4",
                     "PATH=/venv/bin:/usr/bin", "USP_SCALE_CACHE=/c", "MY_VAR=a b"]
    assert all(dict([line.split("=", 1)]) for line in lines)    # DeepSpeed's runner splits each line at '='
    with pytest.raises(SystemExit, match="NOT_SET not set"):
        S.deepspeed_env_lines(["NOT_SET"], env)
    with pytest.raises(SystemExit, match="BAD"):
        S.deepspeed_env_lines(["BAD"], {"BAD": 'say "hi" $USER'})


def test_stale_stop_files_and_stop_exit_code(tmp_path, monkeypatch):
    out = tmp_path
    (out / "STOPPED").write_text("{}")
    (out / "STOP_AND_CHECKPOINT").touch()
    started = time.time()
    monkeypatch.setenv("USP_SCALE_STARTED_AT", str(started))
    os.utime(out / "STOP_AND_CHECKPOINT", (started + 1,) * 2)     # written after the run started: kept
    stop.clear_stale_stop_files(str(out))
    assert (out / "STOP_AND_CHECKPOINT").exists() and not (out / "STOPPED").exists()
    os.utime(out / "STOP_AND_CHECKPOINT", (started - 60,) * 2)    # left by an earlier job: removed
    stop.clear_stale_stop_files(str(out))
    assert not (out / "STOP_AND_CHECKPOINT").exists()
    monkeypatch.delenv("USP_SCALE_STARTED_AT")
    assert abs(stop.run_started_at() - time.time()) < 3600          # this process's start, from /proc
    for max_r, count, code in (("0", "0", 75), ("3", "1", 0), ("3", "3", 75)):
        monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", max_r)
        monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", count)
        assert stop.stop_exit_code() == code


def _pretrain(tmp_path, *more, env=None):
    args = ["launchers/pretrain.py", "--config", "configs/debug/synthetic_pretrain.yaml",
            f"output_dir={tmp_path / 'run'}", "schedule.max_steps=6", "checkpoint.every_steps=0"] + list(more)
    return subprocess.run([sys.executable] + args, cwd=H.REPO, env={**H.child_env(), **(env or {})},
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_launcher_stale_stop_file_is_removed_and_a_fresh_one_stops_with_code_75(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "STOP_AND_CHECKPOINT").touch()
    os.utime(run / "STOP_AND_CHECKPOINT", (time.time() - 600,) * 2)
    p = _pretrain(tmp_path)                                        # the stale file does not stop this run
    assert p.returncode == 0 and "[usp_scale] done: step 6" in p.stdout, p.stdout + p.stderr[-3000:]
    assert "removed" in p.stdout and not (run / "STOP_AND_CHECKPOINT").exists()
    (run / "STOP_AND_CHECKPOINT").touch()                          # written "during" the next run
    p = _pretrain(tmp_path, "schedule.max_steps=12", env={"USP_SCALE_STARTED_AT": str(time.time() - 5)})
    assert p.returncode == 75, p.stdout + p.stderr[-3000:]
    assert "stopped on request at step 7" in p.stdout and "done" not in p.stdout
    assert json.loads((run / "STOPPED").read_text())["step"] == 7
    p = _pretrain(tmp_path, "engine.train_timeout_s=-1")
    assert p.returncode == 2 and "engine.train_timeout_s" in p.stderr


@pytest.mark.slow
def test_train_timeout_replaces_the_long_one_after_the_switch_and_long_timeout_restores_it():
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                        "127.0.0.1", "--master_port", str(H.free_port()), "tests/cluster/_timeout_worker.py", "2"],
                       cwd=H.REPO, env=H.child_env(), capture_output=True, text=True, timeout=180)
    checks = dict(line.split(" ", 2)[1:] for line in p.stdout.splitlines() if line.startswith("CHECK "))
    assert set(checks) == {"before", "long_block", "after_block", "train"}, p.stdout + p.stderr[-3000:]
    assert checks["before"].startswith("ok") and checks["long_block"].startswith("ok"), checks
    assert checks["after_block"].startswith("ok"), checks
    verdict, waited = checks["train"].split()[:2]
    assert verdict == "error" and 1.5 < float(waited) < 5.0, checks   # 2 s, not the 1 min init timeout


def test_cluster_helpers_start_without_torch_and_the_old_path_names_the_new_one():
    env = {**os.environ, "PYTHONPATH": H.REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-c", "import sys, usp_scale.cluster.slurm; print('torch' in sys.modules)"],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr
    r = subprocess.run([sys.executable, "-m", "usp_scale.engine.slurm", "head"], capture_output=True, text=True,
                       env={**env, "SLURM_JOB_NODELIST": "n[1-2]"}, timeout=60)
    assert r.returncode == 1 and "moved to usp_scale.cluster.slurm" in r.stderr, r.stderr
    with pytest.raises(ImportError, match="python -m usp_scale.cluster.slurm"):
        import usp_scale.engine.slurm  # noqa: F401
