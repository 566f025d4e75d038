"""The start-up agreement (issue 18 items 4 and 12), with real processes started by hand as a scheduler or a person
would (RANK/WORLD_SIZE/MASTER_* set, no torchrun to kill the others): ranks whose resolved configs differ are refused
naming the differing keys; a rank whose config fails is named by the others; a rank that never starts is named
within engine.startup_timeout_s instead of after engine.timeout_min (30 min)."""
import os
import subprocess
import sys
import time

import pytest

import _helpers_train as H

REPO = H.REPO
RECIPE = os.path.join(REPO, "configs", "debug", "synthetic_pretrain.yaml")


def _start(rank: int, world: int, port: int, out: str, *extra: str) -> subprocess.Popen:
    env = H.child_env()
    env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cmd = [sys.executable, os.path.join(REPO, "launchers", "pretrain.py"), "--config", RECIPE, f"output_dir={out}",
           "engine.name=ddp", "engine.precision=fp32", "schedule.max_steps=2", "optim.fused=false",
           "engine.startup_timeout_s=20", *extra]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(procs, timeout=240):
    outs = []
    for p in procs:
        try:
            o, e = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            o, e = p.communicate()
        outs.append((p.returncode, o, e))
    return outs


def test_ranks_with_different_configs_are_refused_naming_the_keys(tmp_path):
    port = H.free_port()
    out = str(tmp_path / "run")
    procs = [_start(0, 2, port, out), _start(1, 2, port, out, "optim.blr=3e-3", "mask.ratio=0.5")]
    t0 = time.monotonic()
    res = _finish(procs)
    assert time.monotonic() - t0 < 120
    for rc, _, err in res:
        assert rc == 3, err[-3000:]
        assert "resolved configs differ" in err and "rank 1" in err, err[-3000:]
        assert "optim.blr=0.003 (rank 0: 0.0015)" in err and "mask.ratio=0.5 (rank 0: 0.75)" in err, err[-3000:]
        assert "Traceback" not in err
    assert not os.path.exists(os.path.join(out, "checkpoints")) or not os.listdir(os.path.join(out, "checkpoints"))


def test_a_rank_whose_config_fails_is_named_by_the_others(tmp_path):
    port = H.free_port()
    out = str(tmp_path / "run")
    procs = [_start(0, 2, port, out), _start(1, 2, port, out, "optim.blr=-1")]
    t0 = time.monotonic()
    (rc0, _, err0), (rc1, _, err1) = _finish(procs)
    assert time.monotonic() - t0 < 120
    assert rc1 == 2 and "optim.blr" in err1, err1[-2000:]
    assert rc0 == 3, err0[-3000:]
    assert "start-up failed on rank 1" in err0 and "optim.blr" in err0 and "Traceback" not in err0, err0[-3000:]


@pytest.mark.parametrize("present", [0, 1])
def test_a_rank_that_never_starts_is_named_within_the_startup_timeout(tmp_path, present):
    port = H.free_port()
    out = str(tmp_path / "run")
    t0 = time.monotonic()
    ((rc, _, err),) = _finish([_start(present, 2, port, out, "engine.startup_timeout_s=5")])
    took = time.monotonic() - t0
    assert rc == 3 and took < 90, (took, err[-3000:])
    if present == 0:
        assert "rank 1 of 2 did not arrive within 5 s" in err, err[-3000:]
    else:  # rank 0 hosts the rendezvous: rank 1 names it
        assert "rank 1 of 2 could not reach the rendezvous" in err and "rank 0 did not start" in err, err[-3000:]
    assert "Traceback" not in err
