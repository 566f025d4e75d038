"""Docs and help texts that run as written (issue 24): the first example of finetune.py --help, --print-config in the
docs, no project file citing the design notes outside the project, measure_comm.py --out creating its folder,
checkpoint.resume=<run folder>, help texts pointing at the shipped synthetic-f8 / usp-synthetic, the cost report's
scaled-card rows labelled as such."""
import json
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _help(launcher):
    r = subprocess.run([sys.executable, launcher, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_first_finetune_help_example_runs_as_written(tmp_path):
    text = _help("launchers/finetune.py")
    first = re.search(r"^examples:\n\s+(python .*?)(?:\s+#.*)?$", text, flags=re.M).group(1).split()
    assert first[:2] == ["python", "launchers/finetune.py"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable] + first[1:] + [f"output_dir={tmp_path}", "schedule.max_steps=2",
                                                       "tensorboard=false"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert "[usp_scale] done: step 2" in r.stdout, (r.stdout + r.stderr)[-3000:]
    assert (tmp_path / "export" / "0000002.pt").is_file()   # an official export, for launchers/export.py
    assert "--print-config" in text


def test_print_config_is_documented():
    for doc in ("docs/training.md", "docs/config.md"):
        assert "--print-config" in open(os.path.join(REPO, doc)).read(), doc


def test_no_project_file_cites_the_design_notes_outside_the_project():
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    bad = []
    for f in files:
        if f == "tests/test_docs_run.py" or not f.endswith((".py", ".md", ".sh", ".yaml", ".txt", ".cfg", ".toml")):
            continue
        text = open(os.path.join(REPO, f), encoding="utf-8", errors="replace").read()
        for pat in ("shared/design", "performance-anchors.md", "usp-method.md", "results-methods.md",
                    "style-anchors.md", "cpu-feasibility.md"):
            if pat in text:
                bad.append(f"{f}: {pat}")
    assert not bad, "cite docs/ (docs/anchors.md), not the design notes:\n" + "\n".join(bad)
    assert os.path.isfile(os.path.join(REPO, "docs", "anchors.md"))


def test_measure_comm_creates_its_out_folder(tmp_path, monkeypatch):
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    from scaling import measure_comm as MC

    seen = {}
    monkeypatch.setattr(MC, "worker", lambda out, cases, models: seen.update(isdir=os.path.isdir(out)))
    monkeypatch.setattr(os, "_exit", lambda code: seen.update(code=code))
    MC.main(["--out", str(tmp_path / "new" / "comm"), "--cases", "ddp_fp32"])
    assert seen == {"isdir": True, "code": 0}


def test_resume_takes_the_newest_complete_step_of_a_run_folder(tmp_path):
    from usp_scale.checkpoint.manager import CheckpointManager

    run = tmp_path / "run"
    for step, complete in ((100, True), (200, True), (300, False)):
        d = run / "checkpoints" / f"step_{step:08d}"
        d.mkdir(parents=True)
        if complete:
            (d / "meta.json").write_text(json.dumps({"step": step}))
    m = CheckpointManager(str(tmp_path / "other" / "checkpoints"))
    newest = str(run / "checkpoints" / "step_00000200")
    assert m.resolve(str(run)) == newest                       # a run folder
    assert m.resolve(str(run / "checkpoints")) == newest       # its checkpoints/ folder
    assert m.resolve(newest) == newest                         # a step folder, as before
    with pytest.raises(FileNotFoundError, match="nor a run folder"):
        m.resolve(str(run / "checkpoints" / "step_00000300"))  # incomplete
    with pytest.raises(FileNotFoundError, match="nor a run folder"):
        m.resolve(str(tmp_path / "empty"))


def test_help_texts_point_at_the_shipped_synthetic_assets():
    from usp_scale.config.schema import JobConfig
    import dataclasses

    helps = {f.name: f.metadata.get("help", "") for sec in (JobConfig().vae, JobConfig().eval)
             for f in dataclasses.fields(sec)}
    assert "synthetic-f8" in helps["path"] and "only for tests" in helps["path"]
    assert "usp-synthetic" in helps["feature_extractor"]
    ev = open(os.path.join(REPO, "launchers", "evaluate.py")).read()
    assert "--feature-extractor usp-tiny" not in ev and "--feature-extractor usp-synthetic" in ev
    quick = open(os.path.join(REPO, "docs", "data.md")).read()
    assert "--vae-path synthetic-f8" in quick and "--vae-path tiny-random" not in quick


def test_scaled_cards_are_labelled_in_the_projection_and_cost_report():
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    import cost_report as C
    from scaling import projection as P

    s = P.Setup(rates={"MAE-XL": 2000.0, "DiT-XL/2": 500.0}, rate_card="H200", cards=("H100", "H200"), nodes=(1,),
                engines=("ddp",))
    assert s.label("H200") == "H200" and s.label("H100") == "H100 (= H200 rate x 1.00)"
    md = "\n".join(P.assumptions_md(s, {}))
    assert "memory bandwidth" in md and "3.35 TB/s" in md
    r = {"card": "H200", "size": "XL", "peak_tflops": 989.4, "items": [], "pipeline_gpu_days": 5.0,
         "pipeline_h20_days": 33.4, "pipeline_h100_equiv_days": 5.0, "speedup_vs_scratch": 3.0}
    text = C.to_markdown(r)
    assert "H100-equivalent days (H200 GPU-days x its peak / the H100's, 1.00: not an H100 measurement" in text
