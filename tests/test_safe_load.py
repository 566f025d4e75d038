"""No file runs code: a pickle whose ``__reduce__`` would create a marker file is refused, naming the file and the type
it wanted, at every entry point (transfer --src, checkpoint.init_from, sample.py --ckpt, resume: trainer.pt,
engine.pt, the per-rank state, FSDP2's DCP files, DeepSpeed's files, the single-file VAE); the project's own files
load with weights_only=True; the official ``argparse.Namespace`` args are allowed."""
import argparse
import glob
import os
import shutil

import pytest
import torch

import _helpers_safety as S
from usp_scale.checkpoint.safe_load import CheckpointFileError, UnsafeCheckpointError, torch_load


@pytest.fixture
def marker(tmp_path):
    m = str(tmp_path / "PAYLOAD_RAN")
    yield m
    S.assert_payload_did_not_run(m)


def test_torch_load_allowlist_and_errors(tmp_path, marker):
    evil = S.evil_save(str(tmp_path / "evil.pth"), marker)
    with pytest.raises(UnsafeCheckpointError, match=r"evil\.pth: it needs the Python type\(s\) posix\.system"):
        torch_load(evil)
    official = str(tmp_path / "official.pth")  # the official MAE/DiT checkpoints keep argparse.Namespace args
    torch.save({"model": {"w": torch.ones(2)}, "args": argparse.Namespace(lr=1e-4, model="DiT-XL/2")}, official)
    assert torch_load(official)["args"].model == "DiT-XL/2"
    trunc = str(tmp_path / "trunc.pt")
    with open(official, "rb") as f, open(trunc, "wb") as g:
        g.write(f.read()[:200])
    with pytest.raises(CheckpointFileError, match=r"trunc\.pt.*truncated, damaged"):
        torch_load(trunc)
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        torch_load(str(tmp_path / "nowhere.pt"))


def test_transfer_launcher_src(tmp_path, marker):
    evil = S.evil_save(str(tmp_path / "mae.pth"), marker)
    r = S.launcher("transfer.py", "--src", evil, "--model", "DiT-tiny/2", "--out", str(tmp_path / "o.safetensors"))
    assert r.returncode == 2 and evil in r.stderr and "posix.system" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr


def test_sample_launcher_ckpt(tmp_path, marker):
    evil = S.evil_save(str(tmp_path / "dit.pt"), marker)
    r = S.launcher("sample.py", "--model", "DiT-tiny/2", "--ckpt", evil, "--vae", "tiny-random", "--image-size", "64",
                   "--num-samples", "2", "--out-dir", str(tmp_path / "s"), "--no-progress")
    assert r.returncode == 2 and evil in r.stderr and "posix.system" in r.stderr, r.stderr[-2000:]


def test_init_from(tmp_path, marker):
    evil = S.evil_save(str(tmp_path / "init.pth"), marker)
    with pytest.raises(UnsafeCheckpointError, match=r"init\.pth.*posix\.system"):
        S.run_tiny(str(tmp_path / "run"), **{"checkpoint.init_from": evil})


def test_single_file_vae(tmp_path, marker):
    from usp_scale.vae import FrozenVAE

    evil = S.evil_save(str(tmp_path / "vae.ckpt"), marker,
                       base={"state_dict": {"encoder.conv_in.weight": torch.ones(1)}})
    with pytest.raises(UnsafeCheckpointError, match=r"vae\.ckpt.*posix\.system"):
        FrozenVAE(path=evil)


@pytest.fixture(scope="module")
def ckpt_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ckpt") / "run")
    S.run_tiny(out, stop_after_steps=2)
    return out


def test_own_checkpoint_and_exports_need_no_allowlist(ckpt_run, tmp_path):
    """Everything the project writes loads with plain weights_only=True (RNG states as tensors/plain containers)."""
    files = glob.glob(os.path.join(ckpt_run, "checkpoints", "**", "*.pt"), recursive=True)
    assert {os.path.basename(f) for f in files} == {"trainer.pt"}  # engine state: DCP files (engine/dcp/)
    for f in files:
        assert torch.serialization.get_unsafe_globals_in_checkpoint(f) == [], f
        torch.load(f, weights_only=True)
    S.run_tiny(str(tmp_path / "full"))
    for f in glob.glob(str(tmp_path / "full" / "export" / "*.pth")):
        torch.load(f, weights_only=True)


@pytest.mark.parametrize("rel", ["trainer.pt"])
def test_resume(ckpt_run, tmp_path, marker, rel):
    out = str(tmp_path / "run")
    shutil.copytree(ckpt_run, out)
    step = os.path.join(out, "checkpoints", "step_00000002")
    target = os.path.join(step, rel)
    S.evil_save(target, marker, base=torch.load(target, weights_only=True))
    # a replaced file fails its checksum in meta.json ...
    with pytest.raises(CheckpointFileError, match=rf"{rel}: .*(bytes|content changed)"):
        S.run_tiny(out)
    # ... and with forged checksums the safe loader refuses the type, naming the file
    S.forge_meta(step)
    with pytest.raises(UnsafeCheckpointError, match=rf"{rel}: it needs the Python type\(s\) posix\.system"):
        S.run_tiny(out)


def test_resume_dcp_metadata(ckpt_run, tmp_path, marker):
    """The engine state's DCP metadata replaced by a pickled payload (checksums forged): resume refuses the type,
    naming the file."""
    import pickle

    out = str(tmp_path / "run")
    shutil.copytree(ckpt_run, out)
    step = os.path.join(out, "checkpoints", "step_00000002")
    with open(os.path.join(step, "engine", "dcp", ".metadata"), "wb") as f:
        pickle.dump(S.Payload(marker), f)
    S.forge_meta(step)
    with pytest.raises(UnsafeCheckpointError, match=r"dcp/\.metadata: it needs the Python type posix\.system"):
        S.run_tiny(out)
    assert not os.path.exists(marker)


def test_dcp_metadata_and_items(tmp_path, marker):
    """FSDP2's torch.distributed.checkpoint files: .metadata is unpickled with an allowlist, non-tensor items with
    weights_only; a legitimate checkpoint still round-trips."""
    import pickle

    import torch.distributed.checkpoint as dcp

    from usp_scale.checkpoint.safe_load import dcp_load

    good = str(tmp_path / "good")
    dcp.save({"w": torch.arange(6.0), "lr": 0.5, "groups": [{"betas": (0.9, 0.95)}]}, checkpoint_id=good)
    state = {"w": torch.zeros(6), "lr": 0.0, "groups": [{"betas": (0.0, 0.0)}]}
    dcp_load(state, good)
    assert torch.equal(state["w"], torch.arange(6.0)) and state["lr"] == 0.5
    assert state["groups"][0]["betas"] == (0.9, 0.95)
    bad = str(tmp_path / "bad")
    shutil.copytree(good, bad)
    with open(os.path.join(bad, ".metadata"), "wb") as f:
        pickle.dump(S.Payload(marker), f)
    with pytest.raises(UnsafeCheckpointError, match=r"bad/\.metadata: it needs the Python type posix\.system"):
        dcp_load({"w": torch.zeros(6)}, bad)
    item = str(tmp_path / "item")
    dcp.save({"w": torch.arange(6.0), "x": S.Payload(marker)}, checkpoint_id=item)
    with pytest.raises(UnsafeCheckpointError, match="refusing to load item 'x'"):
        dcp_load({"w": torch.zeros(6), "x": None}, item)


@pytest.mark.slow
def test_deepspeed_files(tmp_path, marker):
    """DeepSpeed's own checkpoint files go through the safe loader (its plain records allowed). Runs in a child
    process: DeepSpeed leaves a process group and rendezvous variables behind."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import glob, os, shutil, sys
        sys.path.insert(0, {os.path.join(S.REPO, "tests")!r})
        import torch
        import _helpers_safety as S
        from usp_scale.checkpoint.safe_load import UnsafeCheckpointError
        from usp_scale.training import run
        out, marker = {str(tmp_path / "ds")!r}, {marker!r}
        kw = {{"schedule.max_steps": 4, "zero_stage": 1, "engine.precision": "bf16"}}
        run(S.H.trainer_cfg("deepspeed", out, stop_after_steps=2, **kw))
        run(S.H.trainer_cfg("deepspeed", out, **kw))  # the real files resume
        step = os.path.join(out, "checkpoints", "step_00000002")
        shutil.rmtree(os.path.join(out, "checkpoints", "step_00000004"))
        (target,) = glob.glob(os.path.join(step, "engine", "ds", "*optim_states.pt"))
        torch.save({{"optimizer_state_dict": S.Payload(marker)}}, target)
        S.forge_meta(step)  # the checksums pass: only the safe loader stands in the way
        try:
            run(S.H.trainer_cfg("deepspeed", out, **kw))
        except UnsafeCheckpointError as e:
            print("REFUSED:", e)
    """)
    r = subprocess.run([sys.executable, "-c", script], cwd=S.REPO, env=S.H.child_env(), capture_output=True,
                       text=True, timeout=600)
    assert "REFUSED:" in r.stdout, r.stderr[-3000:]
    assert "optim_states.pt: it needs the Python type(s) posix.system" in r.stdout
