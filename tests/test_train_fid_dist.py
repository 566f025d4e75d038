"""In-training FID on several gloo ranks: a failure on rank 0 alone stops every rank with its error (no wait for
the collective timeout), and fewer FID samples than ranks (a rank samples nothing) still gives the right FID."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _helpers_train as H  # noqa: E402
import _helpers_train_fid as F  # noqa: E402


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    from usp_scale.data.synthetic import make_synthetic

    root = tmp_path_factory.mktemp("fiddist_data") / "synthetic"
    make_synthetic(str(root), classes=4, per_class=8, size=64, val_per_class=4)
    return str(root)


def _launch(mode, tmp_path, synthetic, nproc):
    env_cache = os.environ.get("USP_SCALE_CACHE")
    os.environ["USP_SCALE_CACHE"] = str(tmp_path / "eval_cache")  # reference-feature cache of the children
    try:
        p = H.torchrun(["tests/_helpers_train_fid.py", mode, "--out", str(tmp_path), "--data", synthetic],
                       nproc=nproc, timeout=240)
    finally:
        if env_cache is None:
            os.environ.pop("USP_SCALE_CACHE")
        else:
            os.environ["USP_SCALE_CACHE"] = env_cache
    assert p.stdout.count(F.OK) == nproc, f"rc={p.returncode}\n{(p.stdout + p.stderr)[-6000:]}"
    return json.load(open(tmp_path / f"{mode}.json"))


def test_fid_failure_on_rank0_only_stops_every_rank_with_its_error(tmp_path, synthetic):
    res = _launch("fail", tmp_path, synthetic, 2)
    for part in ("fid", "sampling", "grid"):
        for rank, got in enumerate(res[part]["per_rank"]):
            assert got["raised"] == "DistributedEvalError", (part, rank, got)
            msg = got["msg"]
            assert "failed on rank 0 (of 2)" in msg and f"ValueError: injected failure in {part}" in msg, msg
            assert got["seconds"] < 50, (part, rank, got["seconds"])  # not the 60 s collective timeout
            if rank == 0:  # rank 0 raises from its own error and carries the traceback
                assert "--- traceback on rank 0 ---" in msg and "Traceback (most recent call last)" in msg
                assert "injected failure" in got["cause"]
            else:
                assert "Traceback" not in msg and got["cause"] == "None"
    assert "in-training FID at step 2" in res["grid"]["per_rank"][1]["msg"]
    # resumed without the fault: the FID of step 2 (its checkpoint was written first) is caught up, once
    assert res["fid"]["resumed_eval_steps"] == [2] and res["fid"]["resumed_side_steps"] == [2]


def test_fid_with_fewer_samples_than_ranks(tmp_path, synthetic):
    """3 ranks, eval.fid_samples=2, bf16 sampling: rank 2 samples nothing but joins every collective; the FID
    equals a single-process FID of the exported EMA."""
    from safetensors.torch import load_file

    from usp_scale.eval import evaluate_fid
    from usp_scale.training.tasks import build_task
    from usp_scale.vae import FrozenVAE

    res = _launch("few", tmp_path, synthetic, 3)
    ev = res["eval"]
    assert [r["step"] for r in ev] == [2] and ev[0]["num_samples"] == 2 and ev[0]["sampling_precision"] == "bf16"
    c = F.cfg(str(tmp_path / "few"), synthetic, "eval.fid_samples=2", "eval.precision=bf16")
    task = build_task(c)
    model = task.build_model()
    model.load_state_dict(load_file(str(tmp_path / "few" / "export" / "ema.safetensors")))
    ref = evaluate_fid(model, task.diffusion, FrozenVAE.from_config(c.vae), c.eval, 2,
                       cache_dir=str(tmp_path / "eval_cache"))
    assert ref["num_samples"] == 2
    assert ev[0]["fid"] == pytest.approx(ref["fid"], rel=1e-4)
