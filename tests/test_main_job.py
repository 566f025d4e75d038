"""The README's main job (launchers/run_tiny.sh) runs end to end and leaves every stage's outputs."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_run_tiny_pipeline(tmp_path):
    out = tmp_path / "tiny"
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable)
    r = subprocess.run(["bash", os.path.join(ROOT, "launchers", "run_tiny.sh")], env=env, capture_output=True,
                       text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for f in ("cache/manifest.json", "pretrain/export/model.safetensors", "pretrain/loss_curve.png",
              "pretrain/config.yaml", "transfer/dit.safetensors", "transfer/dit.safetensors.report.json",
              "dit/export/ema.safetensors", "samples/grid.png", "samples/samples_80x64x64x3.npz"):
        assert (out / f).exists(), f
    pre = [json.loads(line) for line in open(out / "pretrain" / "metrics.jsonl") if '"train"' in line]
    assert pre[-1]["loss"] < pre[0]["loss"], "pretraining loss did not go down"
    metrics = [json.loads(line) for line in open(out / "samples" / "metrics.jsonl")]
    fid = [m for m in metrics if m["metric"] == "fid"]
    assert len(fid) == 1 and fid[0]["value"] >= 0 and fid[0]["num_samples"] == 80 and fid[0]["sampler"] == "ddpm"
    probe = [json.loads(line) for line in open(out / "linprobe" / "metrics.jsonl") if '"eval"' in line]
    assert probe and probe[-1]["val_samples"] == 80
