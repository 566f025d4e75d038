"""Resume on another world size and another engine: the engine state is one DCP checkpoint (model, optimizer, EMA)
that DCP reshards, and the host state (step counters, data position in global samples) does not depend on the
world size. A run of the classifier (deterministic loss: no dropout, no mixup, so the same global batch gives the
same loss on any world size) trained on 2 ranks (ddp), resumed on 1 (local), then on 4 (fsdp2), against the
uninterrupted 2-rank run: the same steps, the same lr (exact) and the same losses within the tolerance of
reducing a global batch over another number of ranks (rel 1e-5, as test_recipes.py's 1/2/4-rank check)."""
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _helpers_train as H  # noqa: E402

COMMON = ["ema.decay=0.999", "log_every=1", "checkpoint.every_steps=0"]


def _run(out, nproc, *extra):
    p = H.torchrun(["tests/_helpers_batch.py", "--out", str(out), *COMMON, *extra], nproc=nproc, timeout=600)
    assert p.returncode == 0 and p.stdout.count(H.OK) == nproc, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def _records(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(x) for x in f if '"kind": "train"' in x]


@pytest.mark.slow
def test_resume_2_ranks_to_1_to_4_and_across_engines(tmp_path):
    ref, split = tmp_path / "ref", tmp_path / "split"
    _run(ref, 2)
    _run(split, 2, "stop_after_steps=3")                            # ddp, 2 ranks: steps 1-3
    p = _run(split, 1, "engine.name=local", "stop_after_steps=2")   # local, 1 rank: steps 4-5 (epoch boundary at 4)
    assert "resumed from" in p.stdout and "step_00000003" in p.stdout
    p = _run(split, 4, "engine.name=fsdp2")                         # fsdp2, 4 ranks: steps 6-8
    assert "step_00000005" in p.stdout and "resumed from" in p.stdout
    a, b = _records(ref), _records(split)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 9))
    assert [r["lr"] for r in b] == pytest.approx([r["lr"] for r in a], rel=1e-12)
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-5, abs=1e-6)
    steps = sorted(os.listdir(split / "checkpoints"))
    assert steps[-1] == "step_00000008"
    meta = json.load(open(split / "checkpoints" / "step_00000008" / "meta.json"))
    assert meta["world_size"] == 4 and meta["engine"] == "fsdp2" and meta["format"] == 2
    # The final weights, AdamW moments and EMA (saved by 2 ddp ranks vs 4 fsdp2 shards) agree as the losses do.
    fa, fb = _full_state(ref, tmp_path / "a.pt"), _full_state(split, tmp_path / "b.pt")
    assert set(fa) == set(fb) and any(k.startswith("ema.") for k in fa) and any(".exp_avg_sq" in k for k in fa)
    # The key bias gets only reduction-order noise as gradient (softmax is invariant to it), which AdamW's
    # per-element normalisation turns into full-size steps: compared are its query and value thirds.
    for k in fa:
        if isinstance(fa[k], torch.Tensor) and fa[k].is_floating_point():
            x, y = fb[k], fa[k]
            if "attn.qkv.bias" in k and y.ndim == 1:
                q, _, v = y.chunk(3)
                y, x = torch.cat([q, v]), torch.cat([x.chunk(3)[0], x.chunk(3)[2]])
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6, msg=k)


def _full_state(run, path):
    """The final checkpoint's DCP folder as one flat dict of full tensors (DCP's own converter)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(str(run / "checkpoints" / "step_00000008" / "engine" / "dcp"), str(path))
    flat = {}

    def walk(d, prefix):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                flat[f"{prefix}{k}"] = v
    walk(torch.load(path, weights_only=False), "")  # written by this test from our own checkpoint
    return flat


@pytest.mark.slow
def test_other_global_batch_is_refused(tmp_path):
    """A world-size change that would change the batch of an optimizer step (data.batch_size fixed per rank, no
    data.global_batch_size) is refused, naming the key that keeps it."""
    out = tmp_path / "run"
    _run(out, 2, "stop_after_steps=1")
    p = H.torchrun(["tests/_helpers_batch.py", "--out", str(out), *COMMON, "data.global_batch_size=0",
                    "data.batch_size=8"], nproc=1, timeout=600)
    assert p.returncode != 0 and "global batch: checkpoint 16 vs now 8" in p.stderr, p.stderr[-3000:]
