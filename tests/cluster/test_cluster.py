"""The cluster tier: every multi-node launch path against real cluster software (see _cluster.py).

Each path trains the tiny MAE (configs/debug/synthetic_pretrain.yaml, random latents, gloo on the CPU, constant
LR so a run's first steps do not depend on its length) and is checked on its outcome: the per-step losses against
an uninterrupted run that uses no cluster software (``torchrun --standalone``, 2 ranks), exactly for the same
engine and within float rounding across engines; the checkpoint's world size and engine; the export.

Runs as root on Linux with Debian's ``slurmctld slurmd slurm-client munge openssh-server openssh-client pdsh``
(.ci/run installs them); skips otherwise, unless USP_SCALE_REQUIRE_CLUSTER=1 (CI), where that is a failure.
All tests share one cluster and run on one xdist worker (``--dist loadgroup``).
"""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _cluster as C  # noqa: E402
from _cluster import NODES, REPO, say  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("cluster")]

SHORT, LONG = 48, 200     # optimizer steps: plain paths / interrupted paths
EVERY = 25                # checkpoint.every_steps
TRAIN_TIMEOUT_S = 10      # engine.train_timeout_s for the lost-node/hung-rank runs (engine.timeout_min stays 30)
# what gloo raises when a collective passes the process group's timeout (directly, or through DDP's reducer)
GLOO_TIMEOUT = rf"Timed out waiting {TRAIN_TIMEOUT_S * 1000}ms|Application timeout caused pair closure"
TIMINGS = {}


def train_args(out, engine="ddp", steps=SHORT, *more):
    return ["--config", "configs/debug/synthetic_pretrain.yaml", f"output_dir={out}", f"engine.name={engine}",
            "engine.precision=fp32", f"schedule.max_steps={steps}", "schedule.name=constant", "log_every=1",
            f"checkpoint.every_steps={EVERY}", "checkpoint.keep_last=0", "progress=false", "plot=false", *more]


def losses(out) -> dict:
    path = Path(out) / "metrics.jsonl"
    if not path.exists():
        return {}
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in recs if r.get("kind") == "train"}


def last_step(out) -> int:
    return max(losses(out), default=0)


def complete_checkpoints(out) -> list:
    d = Path(out) / "checkpoints"
    return sorted(int(p.name[5:]) for p in d.glob("step_*") if (p / "meta.json").exists()) if d.exists() else []


def job_log(out) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted(Path(out).glob("slurm-*.out")))


def assert_losses(out, ref, steps, tol=0.0, what=""):
    got = losses(out)
    assert sorted(got) == list(range(1, steps + 1)), f"{what}: logged steps {sorted(got)[:5]}..{sorted(got)[-5:]}"
    worst = max(abs(got[s] - ref[s]) for s in got)
    assert worst <= tol, f"{what}: per-step losses differ from the uninterrupted run by up to {worst:.3g} (tol {tol})"
    say(f"{what}: {steps} per-step losses {'equal' if tol == 0 else f'within {tol:g} of'} the uninterrupted run")


def assert_outputs(out, steps, world, engine, what=""):
    from safetensors.torch import load_file

    meta = json.loads((Path(out) / "checkpoints" / f"step_{steps:08d}" / "meta.json").read_text())
    assert (meta["step"], meta["world_size"], meta["engine"]) == (steps, world, engine), (what, meta)
    sd = load_file(str(Path(out) / "export" / "model.safetensors"))
    assert sd and all(v.isfinite().all() for v in sd.values()), what
    assert (Path(out) / "export" / f"checkpoint-{steps}.pth").is_file(), what
    assert not (Path(out) / "STOPPED").exists() and not (Path(out) / "STOP_AND_CHECKPOINT").exists(), what
    return sd


def same_export(a, b):
    from safetensors.torch import load_file

    x, y = (load_file(str(Path(o) / "export" / "model.safetensors")) for o in (a, b))
    return sorted(x) == sorted(y) and all((x[k] == y[k]).all() for k in x)


def wait_for(pred, timeout, what, proc=None):
    t = time.time()
    while time.time() - t < timeout:
        if pred():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: the run ended first (exit code {proc.returncode})")
        time.sleep(0.2)
    raise TimeoutError(f"{what}: not after {timeout} s")


@pytest.fixture(autouse=True)
def _timed(request):
    t = time.time()
    yield
    name = request.node.name.removeprefix("test_")
    TIMINGS[name] = time.time() - t
    say(f"{name}: {TIMINGS[name]:.0f} s")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = C.why_not()
    if reason:
        if os.environ.get("USP_SCALE_REQUIRE_CLUSTER") == "1":
            pytest.fail(f"cluster tier required (USP_SCALE_REQUIRE_CLUSTER=1) but unavailable: {reason}")
        pytest.skip(f"cluster tier: {reason}")
    t = time.time()
    cl = C.Cluster(tmp_path_factory.mktemp("cluster"))
    try:
        cl.up()
        TIMINGS["cluster set-up"] = time.time() - t
        yield cl
    finally:
        t = time.time()
        cl.down()
        TIMINGS["teardown"] = time.time() - t
        say("cluster tier timings: " + ", ".join(f"{k} {v:.0f} s" for k, v in TIMINGS.items()))


@pytest.fixture(scope="module")
def work(cluster, tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def ref(cluster, work):
    """The uninterrupted reference: ddp, 2 ranks, LONG steps, plain torchrun on this host (no cluster software)."""
    out = work / "ref"
    t = time.time()
    say(f"reference run: torchrun --standalone --nproc_per_node 2, ddp, {LONG} steps")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "launchers/pretrain.py", *train_args(out, "ddp", LONG)], cwd=REPO, env=cluster.env(),
                       capture_output=True, text=True, timeout=600, preexec_fn=C.no_core_dumps)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    TIMINGS["reference run"] = time.time() - t
    got = losses(out)
    assert sorted(got) == list(range(1, LONG + 1))
    return got


def _pair(cluster, script, runs, timeout=420):
    """Submit the runs at once (partition one and two hold different nodes), wait for both to complete."""
    jobs = []
    for (partition, nodes, ntasks, cpus, out, name, args, env) in runs:
        jobs.append(cluster.sbatch(script, args, partition=partition, nodes=nodes, ntasks_per_node=ntasks,
                                   cpus_per_task=cpus, out=out, name=name, MASTER_PORT=str(C.free_port()), **env))
    for jid, run in zip(jobs, runs):
        j = cluster.wait_job(jid, timeout)
        assert j["JobState"] == "COMPLETED" and j["ExitCode"] == "0:0", (j, job_log(run[4])[-5000:])
    return jobs


def test_torchrun_sbatch_one_node_two_procs_and_two_nodes_one_proc(cluster, work, ref):
    one, two = work / "tr_1x2", work / "tr_2x1"
    # a stop file and marker left by a killed job: removed when the job starts, so it trains to the end
    one.mkdir()
    for f in ("STOP_AND_CHECKPOINT", "STOPPED"):
        (one / f).write_text("{}")
        os.utime(one / f, (time.time() - 3600,) * 2)
    _pair(cluster, "launchers/slurm/torchrun.sbatch", [
        ("one", 1, 1, 2, one, "tr_1x2", train_args(one), {"GPUS_PER_NODE": "2"}),
        ("two", 2, 1, 2, two, "tr_2x1", train_args(two), {"GPUS_PER_NODE": "1"})])
    assert "left by an earlier job" in job_log(one)
    for out, what in ((one, "torchrun.sbatch 1 node x 2"), (two, "torchrun.sbatch 2 nodes x 1")):
        assert_losses(out, ref, SHORT, what=what)
        assert_outputs(out, SHORT, 2, "ddp", what)
    assert same_export(one, two)
    assert f"--rdzv_endpoint={NODES[0]}:" in job_log(two)          # rendezvous on the first node of usp-node[1-2]


def _deepspeed_pair(cluster, work, ref, stage):
    one, two = work / f"ds{stage}_1", work / f"ds{stage}_2"
    args = ("engine.zero_stage=" + str(stage),)
    _pair(cluster, "launchers/slurm/deepspeed.sbatch", [
        ("one", 1, 2, 1, one, f"ds{stage}_1node", train_args(one, "deepspeed", SHORT, *args), {}),
        ("two", 2, 1, 2, two, f"ds{stage}_2nodes", train_args(two, "deepspeed", SHORT, *args), {})])
    for out, what in ((one, f"deepspeed.sbatch ZeRO-{stage} 1 node"), (two, f"deepspeed.sbatch ZeRO-{stage} 2 nodes")):
        assert_losses(out, ref, SHORT, tol=1e-5, what=what + " vs ddp")
        assert_outputs(out, SHORT, 2, "deepspeed", what)
    assert losses(one) == losses(two), "1 node and 2 nodes: same ranks, same losses"
    assert same_export(one, two)
    log = job_log(two)
    assert "--launcher slurm" in log and "--no_ssh_check" in log     # no sshd runs on the nodes here
    return two


def test_deepspeed_sbatch_zero2_one_and_two_nodes(cluster, work, ref):
    _deepspeed_pair(cluster, work, ref, 2)


def test_deepspeed_sbatch_zero3_one_and_two_nodes(cluster, work, ref):
    _deepspeed_pair(cluster, work, ref, 3)


def _torchrun_nnodes(cluster, out, engine, steps, port, extra=(), **env):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
           "--rdzv_backend", "c10d", "--rdzv_endpoint", f"{NODES[0]}:{port}", "--rdzv_id", out.name, *extra,
           "launchers/pretrain.py", *train_args(out, engine, steps)]
    out.mkdir(parents=True, exist_ok=True)
    return [cluster.popen_on_node(n, cmd, out / f"{n}.log", **env) for n in NODES]


def _wait_all(procs, out, timeout=300):
    for p in procs:
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                os.killpg(q.pid, signal.SIGKILL)
            raise
    logs = "\n".join(f.read_text(errors="replace")[-3000:] for f in sorted(Path(out).glob("*.log")))
    return [p.returncode for p in procs], logs


def test_torchrun_nnodes_two_c10d_across_namespaces_ddp_and_fsdp2(cluster, work, ref):
    say(f"torchrun --nnodes 2 --rdzv_backend c10d on {NODES[0]} and {NODES[1]}: ddp, and fsdp2 with "
        "GLOO_SOCKET_IFNAME=usp0")
    ddp, fsdp = work / "nn_ddp", work / "nn_fsdp2"
    runs = [(ddp, _torchrun_nnodes(cluster, ddp, "ddp", SHORT, C.free_port())),
            (fsdp, _torchrun_nnodes(cluster, fsdp, "fsdp2", SHORT, C.free_port(), GLOO_SOCKET_IFNAME="usp0"))]
    for out, procs in runs:
        rcs, logs = _wait_all(procs, out)
        assert rcs == [0, 0], logs
    assert_losses(ddp, ref, SHORT, what="torchrun --nnodes 2 ddp")
    assert_outputs(ddp, SHORT, 2, "ddp", "torchrun --nnodes 2 ddp")
    assert same_export(ddp, work / "tr_1x2") if (work / "tr_1x2" / "export").exists() else True
    assert_losses(fsdp, ref, SHORT, tol=1e-5, what="torchrun --nnodes 2 fsdp2 vs ddp")
    assert_outputs(fsdp, SHORT, 2, "fsdp2", "torchrun --nnodes 2 fsdp2")


PROBE = """import json, os, socket
_argv = open("/proc/self/cmdline", "rb").read().split(b"\\0")
if "RANK" in os.environ and any(a.endswith(b"pretrain.py") for a in _argv[:3]):
    with open(os.path.join({out!r}, "env_%s_%d.json" % (socket.gethostname(), os.getpid())), "w") as f:
        json.dump({{k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                   "USP_CLUSTER_PROBE", "OMP_NUM_THREADS", "HF_HUB_OFFLINE")}}, f)
"""


def test_deepspeed_hostfile_through_pdsh_and_ssh_with_user_variable_on_every_rank(cluster, work, ref):
    """`deepspeed --hostfile` as a user types it, on the first node: DeepSpeed checks ssh to the first host, asks it
    for its address (ssh hostname -I, no --master_addr), and starts one launcher per host through pdsh over ssh.
    A variable the user exported reaches every rank through the .deepspeed_env that
    `python -m usp_scale.cluster.slurm deepspeed-env VAR` writes (DS_ENV_FILE names it)."""
    out = work / "pdsh"
    probe = out / "probe"
    probe.mkdir(parents=True)
    (probe / "sitecustomize.py").write_text(PROBE.format(out=str(out)))   # records each rank's environment
    cluster.start_sshd()
    try:
        (out / "hostfile").write_text("".join(f"{n} slots=1\n" for n in NODES))
        token = f"probe-{os.getpid()}"
        env = dict(USP_CLUSTER_PROBE=token, PYTHONPATH=f"{probe}:{cluster.env()['PYTHONPATH']}")
        r = cluster.on_node(NODES[0], [sys.executable, "-m", "usp_scale.cluster.slurm", "deepspeed-env",
                                       "USP_CLUSTER_PROBE", "--out", str(out / ".deepspeed_env")], **env)
        assert r.returncode == 0, r.stderr
        assert f"USP_CLUSTER_PROBE={token}\n" in (out / ".deepspeed_env").read_text()
        say(f"deepspeed --hostfile {out}/hostfile (pdsh, ssh) on {NODES[0]}, ZeRO-2")
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(out / "hostfile"),
               "--master_port", str(C.free_port()), "launchers/pretrain.py",
               *train_args(out, "deepspeed", SHORT, "engine.zero_stage=2")]
        p = cluster.popen_on_node(NODES[0], cmd, out / "launcher.log", DS_ENV_FILE=str(out / ".deepspeed_env"),
                                  **env)
        rcs, logs = _wait_all([p], out)
        assert rcs == [0], logs
    finally:
        cluster.stop_sshd()
    logs = (out / "launcher.log").read_text()
    assert f"pdsh -S -f 1024 -w {NODES[0]},{NODES[1]}" in logs and f"{NODES[1]}: " in logs, logs[-3000:]
    seen = [json.loads(f.read_text()) | {"host": f.name.split("_")[1]} for f in sorted(out.glob("env_*.json"))]
    assert sorted((s["host"], s["RANK"]) for s in seen) == [(NODES[0], "0"), (NODES[1], "1")], seen
    assert all(s["USP_CLUSTER_PROBE"] == token and s["OMP_NUM_THREADS"] == "1" and s["HF_HUB_OFFLINE"] == "1"
               and s["MASTER_ADDR"] == cluster.ip(NODES[0]) for s in seen), seen
    say(f"every rank saw USP_CLUSTER_PROBE, OMP_NUM_THREADS, HF_HUB_OFFLINE; master {cluster.ip(NODES[0])}")
    assert_losses(out, ref, SHORT, tol=1e-5, what="deepspeed --hostfile ZeRO-2 vs ddp")
    assert_outputs(out, SHORT, 2, "deepspeed", "deepspeed --hostfile")
    if (work / "ds2_2" / "metrics.jsonl").exists():
        assert losses(out) == losses(work / "ds2_2")


def _interrupt_when(cluster, jid, out, min_step):
    t = time.time()
    while time.time() - t < 300:
        j = cluster.job(jid)
        if j.get("JobState") in C.TERMINAL:
            raise AssertionError(f"job {jid} ended before step {min_step}: {j}\n{job_log(out)[-4000:]}")
        if last_step(out) >= min_step and complete_checkpoints(out):
            return last_step(out)
        time.sleep(0.2)
    raise TimeoutError(f"job {jid} did not reach step {min_step}")


def test_preemption_usr1_and_scontrol_requeue_resume_exactly(cluster, work, ref):
    """SIGUSR1 to the batch script (what `#SBATCH --signal=B:USR1@300` sends before the time limit, here by
    `scancel --signal=USR1 --batch`) on a 2-node job, and `scontrol requeue` (SIGTERM to the ranks) on a 1-node
    job: the run checkpoints, exits with code 75, SLURM requeues the job, and the requeued job resumes from the
    newest complete checkpoint and finishes with the uninterrupted run's losses."""
    usr1, req = work / "pre_usr1", work / "pre_requeue"
    j1 = cluster.sbatch("launchers/slurm/torchrun.sbatch", train_args(usr1, "ddp", LONG), partition="two", nodes=2,
                        ntasks_per_node=1, cpus_per_task=2, out=usr1, name="usr1", GPUS_PER_NODE="1",
                        MASTER_PORT=str(C.free_port()))
    j2 = cluster.sbatch("launchers/slurm/torchrun.sbatch", train_args(req, "ddp", LONG), partition="one", nodes=1,
                        ntasks_per_node=1, cpus_per_task=2, out=req, name="requeue", GPUS_PER_NODE="2",
                        MASTER_PORT=str(C.free_port()))
    at = _interrupt_when(cluster, j1, usr1, 10)
    say(f"job {j1} at step {at}: scancel --signal=USR1 --batch {j1}")
    C._run(["scancel", "--signal=USR1", "--batch", j1], env=cluster.env())
    at2 = _interrupt_when(cluster, j2, req, 10)
    say(f"job {j2} at step {at2}: scontrol requeue {j2}")
    cluster.scontrol("requeue", j2)
    for jid, out in ((j1, usr1), (j2, req)):
        j = cluster.wait_job(jid, 420)
        log = job_log(out)
        assert j["JobState"] == "COMPLETED" and j["Restarts"] == "1", (j, log[-5000:])
        resumed = [line for line in log.splitlines() if "resumed from" in line]
        assert len(resumed) == 1, log[-5000:]
        step = int(resumed[0].split(" at step ")[1].split()[0])
        say(f"job {jid}: requeued once, resumed at step {step}")
        assert_losses(out, ref, LONG, what=f"job {jid} interrupted and requeued")
        assert_outputs(out, LONG, 2, "ddp", f"job {jid}")
    log1 = job_log(usr1)
    assert "SIGUSR1: asking the trainer to checkpoint" in log1 and f"requeueing job {j1}" in log1
    assert "exit code 75" in log1                          # a stop on request, not "done"
    stopped_at = int(log1.split("stopped on request at step ")[1].split()[0])
    assert f"resumed from {usr1}/checkpoints/step_{stopped_at:08d} at step {stopped_at}" in log1


def test_node_lost_mid_run_ends_in_minutes_and_resumes_from_last_complete_checkpoint(cluster, work, ref):
    """A 2-node job loses usp-node2's link (training and SLURM traffic) mid-run. The surviving rank's collective
    fails after engine.train_timeout_s (10 s here; engine.timeout_min is 30 min), slurmctld declares the node
    failed after SlurmdTimeout (20 s here, 300 s by default), and the job ends within a bound of minutes; with the
    link back the requeued (node failure) or resubmitted job resumes from the last complete checkpoint and
    finishes with the uninterrupted run's losses."""
    out = work / "lost"
    args = train_args(out, "ddp", LONG, f"engine.train_timeout_s={TRAIN_TIMEOUT_S}")
    submit = dict(partition="two", nodes=2, ntasks_per_node=1, cpus_per_task=2, out=out, name="lost",
                  GPUS_PER_NODE="1")
    jid = cluster.sbatch("launchers/slurm/torchrun.sbatch", args, MASTER_PORT=str(C.free_port()), **submit)
    at = _interrupt_when(cluster, jid, out, 2 * EVERY + 5)
    ckpts = complete_checkpoints(out)
    t_cut = time.time()
    cluster.cut_link(NODES[1])
    try:
        wait_for(lambda: cluster.job(jid).get("JobState") != "RUNNING", 300, f"job {jid} to end after the cut")
        ended = time.time() - t_cut
        j = cluster.job(jid)
        say(f"link cut at step {at} (complete checkpoints {ckpts[-2:]}): job {jid} left RUNNING after "
            f"{ended:.0f} s as {j['JobState']} ({j.get('Reason')})")
        assert ended < 180, f"the job took {ended:.0f} s to end after losing a node"
        assert re.search(GLOO_TIMEOUT, job_log(out)), job_log(out)[-5000:]    # the surviving rank's train timeout
    finally:
        cluster.restore_link(NODES[1])
    last_complete = complete_checkpoints(out)[-1]
    try:
        cluster.wait_nodes_idle(NODES, 90)
    except TimeoutError:
        say(f"{NODES[1]} did not come back by itself: restarting its slurmd (a node reboot)")
        cluster._stop(f"slurmd-{NODES[1]}")
        cluster.start_slurmd(NODES[1])
        cluster.wait_nodes_idle(NODES, 60)
    wait_for(lambda: cluster.job(jid).get("JobState") != "COMPLETING", 120, f"job {jid} to finish completing")
    # The node that came back still runs the lost job's step until slurmctld's kill reaches it; a requeued job keeps
    # its id, so that kill would also end a new step started there before it lands (seen in CI): start only then.
    t_left = time.time()
    wait_for(lambda: not cluster.job_processes(NODES[1]) or cluster.job(jid).get("JobState") == "RUNNING", 120,
             f"the lost job's processes on {NODES[1]} to end")
    say(f"{NODES[1]}: no process of the lost job left after {time.time() - t_left:.1f} s")
    j = cluster.job(jid)
    if j.get("JobState") in C.TERMINAL:
        say(f"job {jid} ended {j['JobState']}: resubmitting the same command")
        jid = cluster.sbatch("launchers/slurm/torchrun.sbatch", args, MASTER_PORT=str(C.free_port()), **submit)
    else:
        say(f"job {jid} requeued by SLURM after the node failure")
    j = cluster.wait_job(jid, 420)
    log = job_log(out)
    if j["JobState"] != "COMPLETED":  # pytest cuts a long assertion message: the whole story into the output
        say(f"job {jid} ended {j['JobState']}: {j}\n--- its log (tail)\n{log[-12000:]}\n--- SLURM logs\n"
            f"{cluster.log_tail(60)}")
    assert j["JobState"] == "COMPLETED", (j, log[-5000:])
    assert f"resumed from {out}/checkpoints/step_{last_complete:08d} at step {last_complete}" in log, log[-5000:]
    assert_losses(out, ref, LONG, what="lost node, resumed")
    assert_outputs(out, LONG, 2, "ddp", "lost node")


def test_hung_rank_ends_the_job_within_the_train_timeout(cluster, work):
    """A rank that stops responding while its node stays healthy (SIGSTOP; slurmd keeps answering, so SLURM
    never steps in): the other rank's collective fails after engine.train_timeout_s, srun's --kill-on-bad-exit
    ends the step, and the job fails within seconds of the timeout instead of engine.timeout_min (30 min)."""
    out = work / "hung"
    jid = cluster.sbatch("launchers/slurm/torchrun.sbatch",
                         train_args(out, "ddp", LONG, f"engine.train_timeout_s={TRAIN_TIMEOUT_S}"), partition="two",
                         nodes=2, ntasks_per_node=1, cpus_per_task=2, out=out, name="hung", GPUS_PER_NODE="1",
                         MASTER_PORT=str(C.free_port()))
    at = _interrupt_when(cluster, jid, out, EVERY + 5)
    rank = [p for p in cluster.node_pids(NODES[1]) if "launchers/pretrain.py" in C.cmdline(p)[:3]]
    assert len(rank) == 1, [C.cmdline(p) for p in cluster.node_pids(NODES[1])]
    say(f"SIGSTOP the rank on {NODES[1]} (pid {rank[0]}) at step {at}")
    t = time.time()
    os.kill(rank[0], signal.SIGSTOP)
    j = cluster.wait_job(jid, 300)
    took = time.time() - t
    say(f"job {jid} ended {j['JobState']} {took:.0f} s after the rank hung (engine.train_timeout_s="
        f"{TRAIN_TIMEOUT_S})")
    assert j["JobState"] == "FAILED" and took < TRAIN_TIMEOUT_S + 60, (j, took)
    assert re.search(GLOO_TIMEOUT, job_log(out)), job_log(out)[-5000:]
    assert "stopped on request" not in job_log(out) and not (out / "STOPPED").exists()


def test_elastic_restart_after_a_killed_rank_resumes_by_itself(cluster, work, ref):
    """torchrun --nnodes 2 --max-restarts 1 across the namespaces (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, as
    docs/training.md says); the rank on usp-node2 is SIGKILLed mid-run.
    Both agents restart their workers, which resume from the newest complete checkpoint by themselves (checkpoint.
    resume=auto), and the run finishes with the uninterrupted run's losses."""
    out = work / "elastic"
    # TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: without it the restarted workers can read the first round's addresses
    # from the rendezvous store torchrun keeps across rounds and fail (pytorch/pytorch#135712; seen here 2 in 4)
    procs = _torchrun_nnodes(cluster, out, "ddp", LONG, C.free_port(), extra=("--max-restarts", "1"),
                             TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    wait_for(lambda: last_step(out) >= EVERY + 8 and complete_checkpoints(out), 300, "elastic run mid-way",
             procs[0])
    workers = [p for p in cluster.node_pids(NODES[1]) if "launchers/pretrain.py" in C.cmdline(p)[:3]]
    assert len(workers) == 1, [C.cmdline(p) for p in cluster.node_pids(NODES[1])]
    at, ckpt = last_step(out), complete_checkpoints(out)[-1]
    say(f"SIGKILL the rank on {NODES[1]} (pid {workers[0]}) at step {at}, newest checkpoint {ckpt}")
    os.kill(workers[0], signal.SIGKILL)
    rcs, logs = _wait_all(procs, out)
    assert rcs == [0, 0], logs
    text = logs + "".join((out / f"{n}.log").read_text() for n in NODES)     # rank 0 may be on either node
    resumed = int(text.split("resumed from ")[1].split(" at step ")[1].split()[0])
    assert ckpt <= resumed <= at, (ckpt, resumed, at)
    say(f"workers restarted and resumed at step {resumed}")
    assert_losses(out, ref, LONG, what="elastic restart")
    assert_outputs(out, LONG, 2, "ddp", "elastic restart")
