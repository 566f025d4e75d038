"""benchmarks/effect/: the bookkeeping that keeps its results honest (settings records: reuse what is unchanged,
restart what changed, never a stale result), its k-NN classifier and its statistics; the convergence script's
settings records; the REPA miniature's summary. The benchmark's numbers live in benchmarks/reports/, not here."""
import json
import os
import sys

import importlib.util

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name, *path):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, *path))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


effect = _load("bench_effect_run", "benchmarks", "effect", "run.py")


def test_stages_reuse_unchanged_restart_changed_and_resume_interrupted(tmp_path, capsys):
    st = effect.Stages(str(tmp_path))
    out = tmp_path / "job_out"
    out.mkdir()
    (out / "result").write_text("old")
    assert st.begin("job", {"steps": 10}, [str(out)])           # never ran: run
    st.finish("job", seconds=1.0)
    assert not st.begin("job", {"steps": 10}, [str(out)])       # same settings, finished: reuse
    assert (out / "result").exists()
    tag = st.tag("job")
    assert st.begin("job", {"steps": 20}, [str(out)])           # changed: fresh, outputs gone, change named
    assert not out.exists()
    assert "steps: 10 -> 20" in capsys.readouterr().out
    assert st.tag("job") != tag                                  # what depends on it sees the change
    out.mkdir()
    (out / "partial").write_text("x")
    assert st.begin("job", {"steps": 20}, [str(out)])           # interrupted with the same settings: resumed
    assert (out / "partial").exists()
    st.finish("job")
    effect.Stages.fresh = True
    try:
        assert st.begin("job", {"steps": 20}, [str(out)]) and not out.exists()   # --fresh redoes it
    finally:
        effect.Stages.fresh = False


def test_run_jobs_orders_by_dependencies_and_recomputes_settings_after_them(tmp_path):
    st = effect.Stages(str(tmp_path))
    log = []
    jobs = [effect.Job("b", lambda: {"a": st.tag("a")}, [], fn=lambda: log.append("b"), deps=["a"]),
            effect.Job("a", {"x": 1}, [], fn=lambda: log.append("a"))]
    effect.run_jobs(jobs, st, parallel=2)
    assert log == ["a", "b"]
    effect.run_jobs(jobs, st, parallel=2)                        # nothing changed: nothing runs
    assert log == ["a", "b"]
    jobs[1].settings = {"x": 2}                                  # a changes, so b (which names a's record) reruns
    effect.run_jobs(jobs, st, parallel=2)
    assert log == ["a", "b", "a", "b"]
    cmd = effect.Job("c", {}, [], cmd=[sys.executable, "-c", "import sys; sys.exit(3)"],
                     log=str(tmp_path / "logs" / "c.log"))
    with pytest.raises(SystemExit, match="job c failed"):
        effect.run_jobs([cmd], st, parallel=1)


def test_probe_and_finetune_commands_read_the_labelled_caches_as_written(tmp_path):
    """The linear probe's recipe says data.augment=eval; the labelled cache is written with LAB_AUGMENT, and the
    loader refuses a cache made with another augmentation: both commands must name the cache's (the first real run
    of the benchmark stopped at its first probe on exactly this)."""
    from usp_scale.config import load_config
    from usp_scale.data import LatentCache, build_dataset, write_cache, write_manifest
    from usp_scale.data.shapes import make_shapes
    from usp_scale.vae import FrozenVAE

    a = effect.build_parser().parse_args(["--out", str(tmp_path / "out"), "--vae", "tiny-random"])
    P = effect.paths_of(a)
    make_shapes(P["data"], per_class=1, val_per_class=1, labeled_per_class=1, size=64, seed=0)
    cache = effect.cache_lab(a, 0)
    write_cache(build_dataset(P["data"], "labeled", "folder"), FrozenVAE(path="tiny-random"), cache, image_size=64,
                augment=effect.LAB_AUGMENT, views=1, seed=0, shard_size=100, batch_size=10, num_workers=0,
                progress=False)
    write_manifest(cache)
    for task in ("linprobe", "cls"):
        cmd = effect.cls_cmd(a, P, task, "random", 0, str(tmp_path / task))
        cfg = load_config(os.path.join(REPO, cmd[cmd.index("--config") + 1]), cmd[cmd.index("--config") + 2:],
                          check_missing=False)
        assert cfg.data.latent_cache == cache and cfg.data.augment == effect.LAB_AUGMENT
        LatentCache(cache).check(image_size=cfg.data.image_size, augment=cfg.data.augment,
                                 crop_scale_min=cfg.data.crop_scale_min)           # raises on a mismatch
    eval_cfg = load_config(os.path.join(REPO, "configs", "debug", "tiny_linprobe.yaml"), check_missing=False)
    with pytest.raises(Exception, match="augmentation"):                          # what the fix is for
        LatentCache(cache).check(image_size=64, augment=eval_cfg.data.augment)


def test_knn_and_statistics():
    import torch

    ftr = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    ytr = torch.tensor([0, 0, 1, 1])
    fva = torch.tensor([[1.0, 0.05], [0.05, 1.0], [0.2, 1.0]])
    assert effect.knn_top1(ftr, ytr, fva, torch.tensor([0, 1, 1]), k=2, classes=2) == pytest.approx(100.0)
    assert effect.knn_top1(ftr, ytr, fva, torch.tensor([1, 1, 1]), k=2, classes=2) == pytest.approx(200 / 3)
    s = effect.stats([60.0, 62.0, 64.0], [50.0, 50.0, 66.0], higher_is_better=True)
    assert s["gain_mean"] == pytest.approx(20 / 3) and s["wins"] == 2 and s["n"] == 3
    f = effect.stats([20.0, 22.0], [25.0, 21.0], higher_is_better=False)   # FID: lower is better
    assert f["gain_mean"] == pytest.approx(2.0) and f["wins"] == 1


def test_report_names_keep_another_runs_report(tmp_path):
    """Two settings reported on one day keep both reports (a tag, else the next free suffix); --only-report rewrites."""
    d = str(tmp_path)
    assert effect.report_base(d, "2026-12-07") == os.path.join(d, "effect_cpu_2026-12-07")
    assert effect.report_base(d, "2026-12-07", "mae100").endswith("effect_cpu_2026-12-07_mae100")
    (tmp_path / "effect_cpu_2026-12-07.md").write_text("first")
    assert effect.report_base(d, "2026-12-07").endswith("effect_cpu_2026-12-07_2")
    (tmp_path / "effect_cpu_2026-12-07_2.md").write_text("second")
    assert effect.report_base(d, "2026-12-07").endswith("effect_cpu_2026-12-07_3")
    assert effect.report_base(d, "2026-12-07", rewrite=True).endswith("effect_cpu_2026-12-07")


def test_convergence_runs_are_not_reused_with_other_settings(tmp_path):
    conv = _load("bench_convergence_run", "benchmarks", "convergence", "run.py")
    d = tmp_path / "stage"
    d.mkdir()
    conv._record_settings(str(d), {"epochs": 20})
    assert conv._settings_match(str(d), {"epochs": 20}, own=True)
    with pytest.raises(SystemExit, match="epochs: 20 -> 40"):
        conv._settings_match(str(d), {"epochs": 40}, own=False)          # a folder passed in: refused, kept
    assert d.exists()
    assert not conv._settings_match(str(d), {"epochs": 40}, own=True)     # its own: removed, made fresh
    assert not d.exists()
    done = tmp_path / "DONE"
    done.write_text(json.dumps({"seconds": 1, "overrides": ["a=1"]}))
    assert conv._done_settings(str(done)) == ["a=1"]
    done.write_text("12.5\n")                                             # the old plain-text DONE: unknown
    assert conv._done_settings(str(done)) is None
    assert conv.steps_to_reach([(100, 50.0), (200, 30.0), (300, 20.0)], 25.0) == pytest.approx(250.0)


def test_repa_miniature_pairs_seeds_and_reports_the_alignment_loss(tmp_path):
    """benchmarks/repa/run.py: the REPA arm of each run is the convergence benchmark's run with the REPA overrides
    (its own folder), and the summary pairs the arms by seed: final-FID gain per seed, its mean and spread, the
    proj_loss curve of the REPA arm only."""
    repa = _load("bench_repa_run", "benchmarks", "repa", "run.py")
    a = repa.build_parser().parse_args(["--out", str(tmp_path)])
    assert a.families == ["sit"] and a.inits == ["scratch"] and a.seeds == [0, 1, 2] and a.teacher == "synthetic-vit"
    assert repa.arms(a) == ["scratch", "scratch+repa"]
    ov = repa.repa_overrides(a, "/c")
    assert "repa.enabled=true" in ov and "repa.teacher_cache=/c" in ov and "repa.features=cache" in ov
    fid = {"scratch": [[50, 30], [52, 31], [49, 29]], "scratch+repa": [[45, 28], [50, 32], [44, 27]]}
    res = {arm: {str(s): {"fid": [(250, f[0]), (500, f[1])], "proj": [(50, -0.1), (100, -0.5)] if "repa" in arm
                          else []} for s, f in enumerate(rows)} for arm, rows in fid.items()}
    sm = repa.summarize(res)
    p = sm["pairs"]["scratch+repa"]
    assert p["final_fid_gain_per_seed"] == pytest.approx([2, -1, 2]) and p["repa_better_seeds"] == 2
    assert p["final_fid_gain_mean"] == pytest.approx(1.0) and p["final_fid_gain_std"] == pytest.approx(3 ** 0.5)
    assert "proj_mean" not in sm["arms"]["scratch"]
    assert sm["arms"]["scratch+repa"]["proj_mean"] == pytest.approx([-0.1, -0.5])
    meta = {"date": "d", "machine": "CPU", "torch_threads": 1, "versions": {"torch": "t"}, "wall_minutes": 1.0,
            "load_start": "0", "load_end": "0", "command": "c", "data": "syn", "vae": "v", "feature_extractor": "e",
            "fid_samples": 200, "fid_reference": "val", "sampler": "sde:50", "seeds": [0, 1, 2], "steps": 500,
            "sit_model": "m", "repa_model": "mr", "teacher": "synthetic-vit", "teacher_path": "synthetic-vit",
            "encoder_depth": 1, "projector_dim": 256, "proj_coeff": 0.5}
    png = repa.plot(sm, str(tmp_path / "p.png"), "t")
    md = repa.markdown(sm, meta, png)
    assert os.path.getsize(png) > 0 and "| 500 | 30.00 ± 1.00 | 29.00 ± 2.65 |" in md
    assert "REPA better in 2 of 3" in md
    # publishing into a reports folder twice on one day keeps both (the convergence benchmark's publish_report)
    res = tmp_path / "r.json"
    res.write_text("{}")
    first = repa.conv.publish_report(str(tmp_path / "reports"), "repa_miniature", meta, png, str(res), md)
    second = repa.conv.publish_report(str(tmp_path / "reports"), "repa_miniature", meta, png, str(res), md)
    assert first.endswith("repa_miniature_cpu_d") and second.endswith("repa_miniature_cpu_d_2")
    assert "](repa_miniature_cpu_d_2.png)" in open(second + ".md").read() and os.path.isfile(second + ".png")


def test_convergence_job_with_one_initialisation_ends_without_a_comparison(tmp_path, capsys):
    """The effect benchmark runs each DiT/SiT run as its own convergence job (one init, one seed) and compares once
    all have finished: such a job keeps its results and ends cleanly instead of failing in the comparison."""
    conv = _load("bench_conv_run", "benchmarks", "convergence", "run.py")
    doc = {"meta": {}, "results": {"sit": {"scratch": {"0": [[500, 17.8], [1000, 18.4]]}}}}
    (tmp_path / "results.json").write_text(json.dumps(doc))
    assert conv.main(["--out", str(tmp_path), "--only-report"]) == 0
    assert "sit ran with one initialisation" in capsys.readouterr().out
    assert not (tmp_path / "report.md").exists()


def test_speedup_is_flagged_when_the_scratch_curve_is_not_monotone():
    """The paper's speed-up (scratch's last step over the step where USP reaches scratch's final FID) measures the
    curve, not the initialisation, when scratch was at its final FID earlier: the summary says so and gives the
    first-reach ratio; a monotone curve keeps the paper's number and no caution."""
    conv = effect._convergence()
    steps = [400, 800, 1200, 1600]
    curve = lambda *fids: list(zip(steps, fids))
    mono = {"dit": {"scratch": {0: curve(40.0, 30.0, 25.0, 20.0), 1: curve(42.0, 31.0, 24.0, 20.0)},
                    "usp": {0: curve(30.0, 20.0, 18.0, 17.0), 1: curve(31.0, 20.0, 19.0, 18.0)}}}
    sm = conv.summarize(mono)["dit"]
    assert not sm["scratch_nonmonotone"] and sm["speedup_first_reach"] == pytest.approx(sm["speedup"])
    assert sm["usp_steps_to_scratch_final"] == pytest.approx(800.0) and sm["speedup"] == pytest.approx(2.0)
    assert "Caution" not in conv.speedup_sentence(sm, "dit") and conv.speedup_label(sm) == "2.00x"
    bumpy = {"sit": {"scratch": {0: curve(10.0, 20.0, 19.5, 19.0)}, "usp": {0: curve(25.0, 19.0, 19.0, 19.0)}}}
    sm = conv.summarize(bumpy)["sit"]
    assert sm["scratch_nonmonotone"] and sm["scratch_first_reach"] == pytest.approx(400.0)
    assert sm["speedup"] == pytest.approx(1600 / 800) and sm["speedup_first_reach"] == pytest.approx(0.5)
    text = conv.speedup_sentence(sm, "sit")
    assert "Caution: this speed-up is an artefact" in text and "0.50x (USP slower)" in text
    assert conv.speedup_label(sm).endswith("(non-monotone scratch curve)")


def test_sweep_points_scale_the_warmup_and_report_partial_sweeps(tmp_path):
    """benchmarks/effect/sweep.py: one axis at a time around the default; the pool axis keeps the pretraining steps
    (and the warmup steps) of the default; --run-set comes last; a stopped sweep's report says it is partial."""
    sys.path.insert(0, os.path.join(REPO, "benchmarks", "effect"))
    sweep = _load("bench_effect_sweep", "benchmarks", "effect", "sweep.py")
    a = sweep.build_parser().parse_args(["--out", str(tmp_path), "--seeds", "0", "1",
                                         "--run-set=--probe-epochs 7 --mae-epochs 3"])
    pts = sweep.points(a)
    assert [(ax, v) for ax, v, _ in pts] == [("epochs", 5), ("epochs", 15), ("epochs", 40), ("epochs", 100),
                                            ("pool", 100), ("pool", 300), ("pool", 1000), ("size", "tiny"),
                                            ("size", "mini")]
    by = {(ax, v): s for ax, v, s in pts}
    assert by[("pool", 100)]["epochs"] == 400 and by[("pool", 300)]["epochs"] == 133
    assert by[("epochs", 40)] == by[("pool", 1000)] == by[("size", "tiny")] == sweep.BASE   # one run, reused

    def warmup(s):
        args = sweep.run_args(a, s)
        return [x for x in args if x.startswith("schedule.warmup_epochs=")]

    assert warmup(sweep.BASE) == ["schedule.warmup_epochs=2"]                 # run.py's default setting
    assert warmup(by[("pool", 100)]) == ["schedule.warmup_epochs=20"]         # same warmup steps, 10x fewer images
    assert warmup(by[("epochs", 5)]) == ["schedule.warmup_epochs=0.25"]
    args = sweep.run_args(a, by[("size", "mini")])
    assert args[-4:] == ["--probe-epochs", "7", "--mae-epochs", "3"] and "vit_mini_patch_vae" in args
    assert args[args.index("--only") + 1:args.index("--only") + 3] == ["repr", "finetune"]

    res = {"comparisons": {"linprobe": {"usp": [20.0, 22.0], "baseline": [10.0, 16.0], "higher_is_better": True}}}
    g = sweep.gains(res)["linprobe"]
    assert g["mean"] == pytest.approx(8.0) and g["wins"] == 2 and g["n"] == 2
    doc = {"date": "2026-12-07", "machine": "CPU", "command": "sweep", "load_start": "0", "load_end": "0",
           "wall_minutes": 1.0, "seeds": [0, 1], "complete": False,
           "points": [{"axis": "epochs", "value": 5, "setting": by[("epochs", 5)], "gains": {"linprobe": g},
                       "seconds": 60.0, "mae_seconds": 10.0}]}
    md = sweep.markdown(doc, sweep.plot(doc, str(tmp_path / "sweep.png")))
    assert "**Partial**: the sweep stopped after 1 point(s)" in md
    assert "| epochs | 5 | linear probe vs random init |" in md
    assert "H200-hours" in md and os.path.getsize(tmp_path / "sweep.png") > 0
