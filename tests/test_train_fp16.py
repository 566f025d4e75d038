"""engine.precision=fp16 (autocast + GradScaler) on 2 gloo ranks for ddp and fsdp2 against one process.

CPU autocast supports float16 for the ops of the tiny ViT, so this runs the real fp16 path (fp16 matmuls,
scaled backward, unscale, skip on overflow). An fp16 overflow in one gradient element is emulated by writing
+inf into it after the backward: under fsdp2 only the rank that owns that element's shard sees it, so the
GradScaler must agree on found-inf over the ranks (skip the step and back off the scale everywhere).
"""
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _helpers_train as H  # noqa: E402

CASES = ["ddp_fp16", "fsdp2_fp16", "ddp_fp16_fused", "fsdp2_fp16_fused"]


def _close(a: dict, b: dict, atol: float, what: str) -> None:
    for k, v in b.items():
        d = (torch.tensor(a[k]) - torch.tensor(v)).abs().max().item()
        assert d <= atol, (what, k, d)


def test_fp16_grad_scaler_ddp_fsdp2_match_single_process(tmp_path):
    p = H.torchrun(["tests/_helpers_train.py", "fp16", "--out", str(tmp_path), "--cases", *CASES])
    assert p.stdout.count(H.OK) == 2, f"rc={p.returncode}\n{(p.stdout + p.stderr)[-6000:]}"
    res = json.load(open(tmp_path / "fp16.json"))

    rec, irec = {}, {}
    ref_l, ref_a, ref_sd = H.engine_losses(H.engine_cfg("local", precision="fp16"), clip=1.0, record=rec)
    iref_l, iref_a, iref_sd = H.engine_losses(H.engine_cfg("local", precision="fp16"), clip=1.0, inf_at=1,
                                              record=irec)
    f32_l, _, f32_sd = H.engine_losses(H.engine_cfg("local"), clip=1.0)
    init = torch.amp.GradScaler("cpu").get_scale()
    assert ref_a == [True] * 4 and rec["scales"] == [init] * 4  # no overflow in the clean run
    # the overflow skips step 1 and halves the scale; later steps apply with the smaller scale
    assert iref_a == [True, False, True, True] and irec["scales"] == [init, init / 2, init / 2, init / 2]
    assert ref_l == pytest.approx(f32_l, rel=2e-3)  # fp16 is close to fp32 here
    _close(ref_sd, f32_sd, 2e-2, "local fp16 vs fp32")

    for case in CASES:
        r = res[case]
        for rank, pr in enumerate(r["per_rank"]):
            # every rank skipped the same step and holds the same scale as the single process
            assert pr["scales"] == rec["scales"], (case, rank)
            assert pr["inf_applied"] == iref_a and pr["inf_scales"] == irec["scales"], (case, rank, pr)
            assert pr["loaded_scale"] == init / 2, (case, rank, pr)  # the backed-off scale survives save/load
        assert r["applied"] == ref_a and r["inf_applied"] == iref_a, case
        # same global batch in fp16: reduction order and fp16 rounding of 2 half-batches differ
        assert r["losses"] == pytest.approx(ref_l, rel=1e-3), case
        assert r["inf_losses"] == pytest.approx(iref_l, rel=1e-3), case
        _close(r["state"], ref_sd, 5e-3, case)
        _close(r["inf_state"], iref_sd, 5e-3, case + " inf")


@pytest.mark.slow
def test_fp16_exact_resume_ddp_fsdp2(tmp_path):
    """The trainer with engine.precision=fp16: 10 steps == 5 + resume + 5 (GradScaler state in the checkpoint:
    engine.pt for ddp, DCP for fsdp2), per-step losses and exported weights bit-identical."""
    specs = ["ddp", "fsdp2"]
    p = H.torchrun(["tests/_helpers_train.py", "resume", "--out", str(tmp_path), "--cases", *specs,
                    "--set", "engine.precision=fp16"])
    assert p.stdout.count(H.OK) == 2, f"rc={p.returncode}\n{(p.stdout + p.stderr)[-6000:]}"
    res = json.load(open(tmp_path / "resume.json"))
    for spec in specs:
        r = res[spec]
        assert len(r["full"]) == 10 and r["full"] == r["split"], spec
        assert r["model_equal"] and r["ema_equal"], spec
    assert res["ddp"]["full"] == pytest.approx(res["fsdp2"]["full"], rel=1e-3)
