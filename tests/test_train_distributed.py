"""Two-process (gloo, CPU) tests: engine equivalence, exact resume, launches under torchrun / deepspeed / SLURM dry-run.

Each test is one launch that runs several engines in the same process group and asserts on the
success marker printed by every rank (DeepSpeed on CPU sometimes aborts in exit handlers after success).
"""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _helpers_train as H  # noqa: E402


def _launch_ok(proc, n=2):
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.stdout.count(H.OK) == n, f"rc={proc.returncode}\n{tail}"


def _check_equiv(path, cases, tol_loss, tol_w):
    def key(case):   # the single-process reference runs the same optimizer and FP8 setting
        spec = H.EQUIV_CASES[case]
        return bool(spec.get("fused")), spec.get("fp8", "off")

    refs = {}
    for fused, fp8 in sorted({key(c) for c in cases}):
        local = H.engine_cfg("local", fp8=fp8)
        refs[fused, fp8] = (H.engine_losses(local, clip=1.0, fused=fused),
                            H.engine_losses(local, steps=3, nan_at=1, fused=fused))
    res = json.load(open(path))
    for case in cases:
        (ref_l, ref_a, ref_sd), (nref_l, nref_a, nref_sd) = refs[key(case)]
        r = res[case]
        tl, tw = tol_loss.get(case, 1e-6), tol_w.get(case, 1e-6)
        assert r["applied"] == ref_a == [True] * 4
        assert r["losses"] == pytest.approx(ref_l, rel=tl), case
        for k, v in ref_sd.items():
            assert torch.allclose(torch.tensor(r["state"][k]), torch.tensor(v), atol=tw, rtol=0), (case, k)
        # a NaN loss on rank 1 only skips the step on every rank
        assert r["nan_applied"] == nref_a == [True, False, True], case
        for k, v in nref_sd.items():
            assert torch.allclose(torch.tensor(r["nan_state"][k]), torch.tensor(v), atol=tw, rtol=0), (case, k)
    for per_rank in res["_nan_applied_per_rank"]:
        assert all(per_rank[c] == [True, False, True] for c in cases)


def test_torch_engines_match_single_process(tmp_path):
    """ddp (fp32 and bf16 all-reduce) and fsdp2 (both reshard modes, bf16 params) on 2 ranks == local fp32 on
    the global batch (bf16 cases to a tolerance); a NaN loss on one rank skips the step on every rank, decided on
    the host (foreach AdamW) or on the device (fused AdamW, *_fused cases)."""
    cases = ["ddp", "ddp_bf16", "fsdp2", "fsdp2_noreshard", "fsdp2_bf16", "ddp_fused", "fsdp2_fused"]
    if importlib.util.find_spec("torchao") is not None:
        cases += ["ddp_fp8", "fsdp2_fp8"]
    p = H.torchrun(["tests/_helpers_train.py", "equiv", "--out", str(tmp_path), "--cases", *cases])
    _launch_ok(p)
    # FP8 tensorwise scales by the amax of each rank's own micro-batch, so the rounding differs from one process
    # on the global batch: equal to FP8 rounding (a few per cent), not exactly.
    _check_equiv(tmp_path / "equiv.json", cases,
                 tol_loss={"ddp_bf16": 2e-3, "fsdp2_bf16": 5e-3, "ddp_fp8": 3e-2, "fsdp2_fp8": 3e-2},
                 tol_w={"ddp_bf16": 5e-2, "fsdp2_bf16": 5e-2, "ddp_fp8": 5e-2, "fsdp2_fp8": 5e-2})


@pytest.mark.slow
def test_deepspeed_zero123_match_single_process(tmp_path):
    cases = ["ds1", "ds2", "ds3", "ds2_bf16"]
    p = H.torchrun(["tests/_helpers_train.py", "equiv", "--out", str(tmp_path), "--cases", *cases], timeout=600)
    _launch_ok(p)
    _check_equiv(tmp_path / "equiv.json", cases, tol_loss={"ds2_bf16": 5e-3}, tol_w={"ds2_bf16": 5e-2})


def _check_resume(path, specs):
    res = json.load(open(path))
    for spec in specs:
        r = res[spec]
        assert len(r["full"]) == 10, spec
        assert r["full"] == r["split"], spec  # exact, per step
        assert r["model_equal"] and r["ema_equal"], spec
    return res


def test_exact_resume_ddp_fsdp2(tmp_path):
    specs = ["ddp", "fsdp2"]
    p = H.torchrun(["tests/_helpers_train.py", "resume", "--out", str(tmp_path), "--cases", *specs])
    _launch_ok(p)
    res = _check_resume(tmp_path / "resume.json", specs)
    # same data, same seeds, fp32: the engines agree with each other too
    assert res["ddp"]["full"] == pytest.approx(res["fsdp2"]["full"], rel=1e-5)


@pytest.mark.slow
def test_exact_resume_deepspeed_zero2_zero3(tmp_path):
    specs = ["deepspeed:2", "deepspeed:3"]
    p = H.torchrun(["tests/_helpers_train.py", "resume", "--out", str(tmp_path), "--cases", *specs], timeout=600)
    _launch_ok(p)
    res = _check_resume(tmp_path / "resume.json", specs)
    from safetensors.torch import load_file

    assert res["deepspeed:2"]["full"] == pytest.approx(res["deepspeed:3"]["full"], rel=1e-5)
    # ZeRO-2 and ZeRO-3 exports (fp32 masters gathered from the partitions) agree up to reduction order
    a = load_file(str(tmp_path / "deepspeed2" / "full" / "export" / "model.safetensors"))
    b = load_file(str(tmp_path / "deepspeed3" / "full" / "export" / "model.safetensors"))
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert sorted(a) == sorted(b) and worst < 1e-4, worst


def _launcher_args(out, engine, steps=3):
    return ["launchers/pretrain.py", "--config", "configs/debug/synthetic_pretrain.yaml", f"output_dir={out}",
            f"engine.name={engine}", "engine.precision=fp32", f"schedule.max_steps={steps}", "optim.fused=false"]


def test_torchrun_launch_of_pretrain_launcher(tmp_path):
    out = tmp_path / "tr"
    p = H.torchrun(_launcher_args(out, "ddp"))
    assert "[usp_scale] done: step 3" in p.stdout, (p.stdout + p.stderr)[-4000:]
    assert (out / "export" / "model.safetensors").is_file() and (out / "loss_curve.png").is_file()
    recs = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in recs] == [1, 2, 3]


def test_plain_python_launch_with_deepspeed_engine(tmp_path):
    """`python launchers/pretrain.py engine.name=deepspeed` (no launcher: one process; DeepSpeed needs LOCAL_RANK,
    which the 1-rank process group sets up), with the default fused AdamW."""
    out = tmp_path / "py"
    args = [a for a in _launcher_args(out, "deepspeed") if a != "optim.fused=false"]
    env = {k: v for k, v in H.child_env().items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    env["CUDA_HOME"] = str(tmp_path)  # with no CUDA device: cpp_extension's benign "No CUDA runtime" (runtime/quiet.py)
    p = subprocess.run([sys.executable] + args, cwd=H.REPO, env=env, capture_output=True, text=True, timeout=300)
    assert "[usp_scale] done: step 3" in p.stdout, (p.stdout + p.stderr)[-4000:]
    assert "No CUDA runtime is found" not in p.stderr  # silenced at start-up on a CPU (docs/training.md)
    meta = json.load(open(out / "checkpoints" / "step_00000003" / "meta.json"))
    assert meta["world_size"] == 1 and meta["engine"] == "deepspeed"
    # DeepSpeed's own conversion, as its users run it: `python ENGINE/zero_to_fp32.py ENGINE OUT` (no --tag: our
    # `latest` file names the tag), equal to our export of the same weights
    from safetensors.torch import load_file

    eng = out / "checkpoints" / "step_00000003" / "engine"
    assert (eng / "latest").read_text() == "ds"
    z = subprocess.run([sys.executable, str(eng / "zero_to_fp32.py"), str(eng), str(tmp_path / "fp32"),
                        "--safe_serialization"], cwd=H.REPO, env=env, capture_output=True, text=True, timeout=300)
    assert z.returncode == 0, z.stderr[-3000:]
    theirs = load_file(str(tmp_path / "fp32" / "model.safetensors"))
    ours = load_file(str(out / "export" / "model.safetensors"))
    assert set(theirs) <= set(ours) and len(theirs) > 10
    assert all(torch.equal(theirs[k], ours[k]) for k in theirs)


@pytest.mark.slow
def test_deepspeed_hostfile_launch_of_pretrain_launcher(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    out = tmp_path / "ds"
    # `python -m deepspeed.launcher.runner` == the `deepspeed` command, with this interpreter for every rank
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile), "--no_ssh_check", "--master_addr", "127.0.0.1",
           "--master_port", str(H.free_port())] + _launcher_args(out, "deepspeed") + ["engine.zero_stage=2"]
    p = subprocess.run(cmd, cwd=H.REPO, env=H.child_env(), capture_output=True, text=True, timeout=600)
    assert "[usp_scale] done: step 3" in p.stdout, (p.stdout + p.stderr)[-4000:]
    meta = json.load(open(out / "checkpoints" / "step_00000003" / "meta.json"))
    assert meta["world_size"] == 2 and meta["engine"] == "deepspeed"
    assert (out / "export" / "model.safetensors").is_file()


def test_slurm_dry_run_for_a_fake_two_node_allocation(tmp_path):
    env = H.child_env()
    env.update(SLURM_JOB_NODELIST="gpu[07-08]", SLURM_JOB_NUM_NODES="2", SLURM_JOB_ID="4242", DRY_RUN="1",
               SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="1", PYTHON=sys.executable, GPUS_PER_NODE="8",
               OUTPUT_DIR=str(tmp_path / "run"))
    args = ["--config", "configs/debug/synthetic_pretrain.yaml", "engine.name=fsdp2"]
    p = subprocess.run(["bash", "launchers/slurm/torchrun.sbatch", *args], cwd=H.REPO, env=env, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("[node")]
    assert len(lines) == 2 and lines[0].startswith("[node 0 gpu07]") and lines[1].startswith("[node 1 gpu08]")
    for ln in lines:
        assert "--nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=gpu07:29500" in ln
        assert "--rdzv_id=4242 launchers/pretrain.py --config configs/debug/synthetic_pretrain.yaml engine.name=fsdp2" in ln
    p = subprocess.run(["bash", "launchers/slurm/deepspeed.sbatch", *args[:2], "engine.name=deepspeed"], cwd=H.REPO,
                       env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "run" / "hostfile").read_text() == "gpu07 slots=8\ngpu08 slots=8\n"
    assert "deepspeed --hostfile" in p.stdout and "--launcher slurm --master_addr gpu07" in p.stdout


@pytest.mark.slow
def test_hsdp_four_ranks_match_single_process_and_resume_exactly(tmp_path):
    """FSDP2 with engine.fsdp_shard_size=2 on 4 ranks: a 2x2 mesh (shards within pairs, replicas across them)
    trains like one process on the global batch (foreach and fused AdamW, NaN skip on every rank), and
    resumes exactly through the trainer (DCP checkpoint of 2-D DTensors, EMA included)."""
    cases = ["hsdp", "hsdp_fused"]
    p = H.torchrun(["tests/_helpers_train.py", "equiv", "--out", str(tmp_path), "--cases", *cases], nproc=4,
                   timeout=600)
    _launch_ok(p, n=4)
    _check_equiv(tmp_path / "equiv.json", cases, tol_loss={}, tol_w={})
    out = tmp_path / "resume"
    out.mkdir()
    p = H.torchrun(["tests/_helpers_train.py", "resume", "--out", str(out), "--cases", "fsdp2",
                    "--set", "engine.fsdp_shard_size=2"], nproc=4, timeout=600)
    _launch_ok(p, n=4)
    _check_resume(out / "resume.json", ["fsdp2"])
    meta = json.load(open(next((out / "fsdp2" / "full" / "checkpoints").glob("step_*")) / "meta.json"))
    assert meta["world_size"] == 4 and meta["config"]["engine"]["fsdp_shard_size"] == 2


def test_hsdp_shard_size_must_divide_the_world(monkeypatch):
    """A rule of the config, checked at start-up for the world size (usp_scale.config.resolve_job); the engine's
    mesh trusts it."""
    from usp_scale import runtime as D
    from usp_scale.config import ConfigError, load_config, resolve_job
    from usp_scale.engine.fsdp import hsdp_mesh

    cfg = load_config(os.path.join(H.REPO, "configs", "debug", "synthetic_pretrain.yaml"),
                      ["engine.name=fsdp2", "engine.fsdp_shard_size=4"])
    with pytest.raises(ConfigError, match=r"engine.fsdp_shard_size=4 .*4 does not divide the world size 6"):
        resolve_job(cfg, 6)
    monkeypatch.setattr(D, "get_world_size", lambda: 6)
    assert hsdp_mesh(0, torch.device("cpu")) is None and hsdp_mesh(6, torch.device("cpu")) is None
