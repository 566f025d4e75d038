"""launchers/slurm/torchrun.sbatch run for real on this machine as a fake two-node allocation.

A stand-in ``srun`` starts the script's torchrun command once per "node" (all on localhost), so the two
torchrun agents meet through the real c10d rendezvous (--nnodes=2, one gloo rank each) and train together.
A stand-in ``scontrol`` records the requeue. The test sends SIGUSR1 to the script as SLURM does before the time
limit: the trap asks the trainer to checkpoint, the job exits with the stop code 75 and requeues itself, and the
requeued run (the same command again) resumes from that checkpoint and finishes. The same paths on a real SLURM
cluster: tests/cluster/test_cluster.py.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _helpers_train as H  # noqa: E402

SRUN = """#!/bin/bash
# fake srun: start the command once per node of the allocation, on this machine
while [[ $# -gt 0 && $1 == --* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_JOB_NUM_NODES; i++)); do
  SLURM_NODEID=$i SLURM_PROCID=$i SLURM_LOCALID=0 "$@" > "$FAKE_SLURM_LOG/node$i.log" 2>&1 &
  pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
"""
SCONTROL = """#!/bin/bash
echo "$@" >> "$FAKE_SLURM_LOG/scontrol.calls"
"""
TORCHRUN = """#!/bin/bash
exec "{py}" -m torch.distributed.run "$@"
"""


def _fake_slurm(tmp_path):
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL), ("torchrun", TORCHRUN.format(py=sys.executable))):
        (bin_ / name).write_text(text)
        (bin_ / name).chmod(0o755)
    logs = tmp_path / "slurm"
    logs.mkdir()
    env = H.child_env()
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.update(PATH=f"{bin_}{os.pathsep}{env['PATH']}", PYTHON=sys.executable, FAKE_SLURM_LOG=str(logs),
               SLURM_JOB_NODELIST="localhost,localhost", SLURM_JOB_NUM_NODES="2", SLURM_JOB_ID="777",
               GPUS_PER_NODE="1", MASTER_PORT=str(H.free_port()))
    return env, logs


def _steps(out):
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in open(path) if '"kind": "train"' in line]


@pytest.mark.slow
def test_two_node_torchrun_job_checkpoints_on_sigusr1_requeues_and_resumes(tmp_path):
    env, logs = _fake_slurm(tmp_path)
    out = tmp_path / "run"
    args = ["--config", "configs/debug/synthetic_pretrain.yaml", f"output_dir={out}", "engine.name=ddp",
            "engine.precision=fp32", "schedule.max_steps=400", "schedule.warmup_steps=2",
            "checkpoint.keep_last=0"]
    job = subprocess.Popen(["bash", "launchers/slurm/torchrun.sbatch", *args], cwd=H.REPO, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and len(_steps(out)) < 3 and job.poll() is None:
        time.sleep(0.5)
    assert job.poll() is None, f"job ended early:\n{job.stdout.read()[-3000:]}\n" + \
        "\n".join((logs / f).read_text()[-2000:] for f in os.listdir(logs))
    job.send_signal(signal.SIGUSR1)                            # what --signal=B:USR1@300 sends
    text, _ = job.communicate(timeout=240)
    node0 = (logs / "node0.log").read_text()
    assert job.returncode == 75, text + node0[-3000:]                   # stopped on request, not done
    assert "SIGUSR1" in text and "requeueing job 777" in text
    assert (logs / "scontrol.calls").read_text().split() == ["requeue", "777"]
    stopped_at = _steps(out)[-1]
    assert stopped_at < 400
    ckpt = out / "checkpoints" / f"step_{stopped_at:08d}"
    meta = json.load(open(ckpt / "meta.json"))
    assert meta["world_size"] == 2 and meta["engine"] == "ddp"       # two torchrun agents, one rank each
    assert not (out / "STOP_AND_CHECKPOINT").exists()
    assert json.load(open(out / "STOPPED"))["step"] == stopped_at

    # the requeued job: the same command again; checkpoint.resume=auto continues from the step folder
    again = subprocess.run(["bash", "launchers/slurm/torchrun.sbatch", *args], cwd=H.REPO, env=env,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + (logs / "node0.log").read_text()[-3000:]
    steps = _steps(out)
    assert steps[-1] == 400
    assert steps[steps.index(stopped_at) + 1] == stopped_at + 1       # resumed right after the checkpoint
    assert (logs / "scontrol.calls").read_text().split() == ["requeue", "777"]    # no second requeue
    assert not (out / "STOPPED").exists()
