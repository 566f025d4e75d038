"""benchmarks/cost_report.py: GPU-days of the USP pipeline from bench_step.py rows, checked by hand."""
import csv
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import cost_report as C  # noqa: E402

FIELDS = ["date", "device", "torch", "model", "registry", "batch", "compile", "kernels", "fp8", "samples_per_s"]


def _csv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in FIELDS})
    return str(path)


ROWS = [dict(device="NVIDIA H200", model="MAE-XL", batch=256, compile="True", kernels="torch", fp8="off",
             samples_per_s=2176.0),
        dict(device="NVIDIA H200", model="MAE-XL", batch=256, compile="False", kernels="torch", fp8="off",
             samples_per_s=1777.0),
        dict(device="NVIDIA H200", model="DiT-XL/2", batch=128, compile="True", kernels="torch", fp8="off",
             samples_per_s=577.0)]


def test_hand_computed_days(tmp_path):
    r = C.report(C.load_rows(_csv(tmp_path / "t.csv", ROWS)))
    items = {it["key"]: it for it in r["items"]}
    assert items["usp_pretrain"]["rate"] == 2176.0 and items["usp_pretrain"]["setting"] == "torch/compiled/off"
    assert items["usp_pretrain"]["gpu_days"] == pytest.approx(1600 * 1_281_167 / 2176 / 86400)      # 10.90
    assert items["usp_finetune"]["gpu_days"] == pytest.approx(400_000 * 256 / 577 / 86400)          # 2.05
    assert items["scratch_dit"]["gpu_days"] == pytest.approx(7e6 * 256 / 577 / 86400)               # 35.9
    total = items["usp_pretrain"]["gpu_days"] + items["usp_finetune"]["gpu_days"]
    assert r["pipeline_gpu_days"] == pytest.approx(total)
    assert r["pipeline_h20_days"] == pytest.approx(total * 989.4 / 148)
    assert r["pipeline_h100_equiv_days"] == pytest.approx(total)
    assert r["speedup_vs_scratch"] == pytest.approx(items["scratch_dit"]["gpu_days"] / total)
    md = C.to_markdown(r)
    assert "NOT met" in md and "98 H20-days" in md                 # 12.95 H100-days > the 12-day target


def test_pins_cache_sampling_and_errors(tmp_path):
    path = _csv(tmp_path / "t.csv", ROWS)
    sampling = tmp_path / "s.json"
    sampling.write_text(json.dumps({"batch": 256, "modes": {"eager": {"fid50k_gpu_hours": 3.0},
                                                            "compile": {"fid50k_gpu_hours": 1.7}}}))
    out = tmp_path / "cost.md"
    assert C.main(["--train-csv", path, "--pick", "MAE-XL=torch/eager/off", "--cache-img-per-s", "1200",
                   "--cache-views", "8", "--sampling-json", str(sampling), "--out", str(out)]) == 0
    text = out.read_text()
    assert "1777.0" in text and "torch/eager/off" in text and "FID-50K sampling" in text
    r = C.report(C.load_rows(path), pins={"MAE-XL": "torch/eager/off"}, cache_img_per_s=1200, cache_views=8,
                 sampling=json.loads(sampling.read_text()))
    items = {it["key"]: it for it in r["items"]}
    assert items["latent_cache"]["hours"] == pytest.approx(8 * 1_281_167 / 1200 / 3600)
    assert items["fid50k"]["hours"] == 1.7 and items["fid50k"]["setting"] == "compile"
    assert r["pipeline_gpu_days"] == pytest.approx(sum(items[k]["gpu_days"] for k in
                                                       ("usp_pretrain", "usp_finetune", "latent_cache", "fid50k",
                                                        "fid50k_eval")))
    # the evaluation next to the sampling, derived from its FLOPs without a measurement: 60,000 forwards of
    # 11.426 GFLOP at 40 % of the H200's 66.9 TFLOP/s fp32
    assert items["fid50k_eval"]["hours"] == pytest.approx(60000 * 11.426e9 / (0.4 * 66.9e12) / 3600)
    assert items["fid50k_eval"]["setting"].startswith("derived")
    with pytest.raises(SystemExit, match="no SiT"):
        C.pick_rate(C.load_rows(path), "SiT", None, None)
    with pytest.raises(SystemExit, match="several cards"):
        C.report(C.load_rows(_csv(tmp_path / "two.csv", ROWS + [dict(ROWS[0], device="NVIDIA H100")])))
    assert C.peak_of("NVIDIA H200") == 989.4 and C.peak_of("NVIDIA H20") == 148.0 and C.peak_of("CPU") is None


def test_given_rates_and_multi_node_projection(tmp_path):
    """--rate without a CSV, and the --scaling section (real MAE-XL / DiT-XL/2 parameter counts) with its plot."""
    out, png = tmp_path / "s.md", tmp_path / "s.png"
    argv = ["--rate", "MAE-XL=2061", "--rate", "DiT-XL/2=552", "--card", "NVIDIA H200", "--cache-img-per-s", "1782",
            "--cache-views", "8", "--fid-gpu-hours", "1.7", "--scaling", "--nodes", "1,2", "--cards", "H200,H20",
            "--pretrain-input", "both", "--reduce-dtype", "ddp=bf16", "--plot", str(png), "--out", str(out)]
    assert C.main(argv) == 0
    text = out.read_text()
    assert "| given |" in text and "2061.0" in text                       # the single-device table as before
    r = C.report(C.given_rows({"MAE-XL": 2061.0, "DiT-XL/2": 552.0}, "NVIDIA H200"))
    assert r["items"][0]["gpu_days"] == pytest.approx(1600 * 1_281_167 / 2061 / 86400)
    for needle in ("Multi-node projection", "Assumptions of the projection", "DDP, gradient all-reduce in bf16",
                   "Runs on H20 (= H200 rate x 0.15)", "cached once vs SD-VAE encoding online",
                   "| H20 (= H200 rate x 0.15) | online |", "98 H20-days", "s.png"):
        assert needle in text, needle
    assert png.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(SystemExit, match="--rate needs --card"):
        C.main(["--rate", "MAE-XL=1"])
    with pytest.raises(SystemExit, match="give --train-csv"):
        C.main([])
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        C.main(["--rate", "MAE-XL", "--card", "H200"])
    with pytest.raises(SystemExit, match="knows H100"):
        C.main(["--rate", "MAE-XL=1", "--rate", "DiT-XL/2=1", "--card", "A100", "--scaling"])


def test_evaluation_row_measured_and_its_flops(tmp_path):
    """--eval-json from eval/bench_eval.py: its rate and the Fréchet / precision-recall seconds; the FLOPs constant
    is the network's own count."""
    ev = {"device": "NVIDIA H100", "inception_img_per_s": 2000.0, "inception_batch": 200, "fid_seconds": 3.0,
          "sfid_seconds": 3.0, "pr_50k_seconds": 14.0}
    path = tmp_path / "eval.json"
    path.write_text(json.dumps(ev))
    out = tmp_path / "cost.md"
    assert C.main(["--train-csv", _csv(tmp_path / "t.csv", ROWS), "--eval-json", str(path), "--out", str(out)]) == 0
    r = C.report(C.load_rows(str(tmp_path / "t.csv")), eval_json=ev)
    it = {i["key"]: i for i in r["items"]}["fid50k_eval"]
    assert it["hours"] == pytest.approx((60000 / 2000 + 20) / 3600) and it["setting"] == "measured on NVIDIA H100"
    assert "ADM evaluation of FID-50K" in out.read_text() and "+ its evaluation" in out.read_text()
    sys.path.insert(0, os.path.join(os.path.dirname(C.__file__), "eval"))
    try:
        import bench_eval
    finally:
        sys.path.pop(0)
    assert bench_eval.inception_flops() / 1e9 == pytest.approx(C.INCEPTION_GFLOP, rel=1e-4)


def test_lightningdit_64_epoch_row_is_outside_the_usp_total(tmp_path):
    rows = C.load_rows(_csv(tmp_path / "t.csv", ROWS)) + C.given_rows({"LightningDiT-XL/1": 512.0}, "NVIDIA H200")
    r = C.report(rows, card="NVIDIA H200")
    items = {it["key"]: it for it in r["items"]}
    assert items["lightningdit_64ep"]["gpu_days"] == pytest.approx(80_000 * 1024 / 512.0 / 86400)   # 1.85
    assert not items["lightningdit_64ep"]["computed"] and items["lightningdit_64ep"]["setting"] == "given"
    base = C.report(C.load_rows(_csv(tmp_path / "u.csv", ROWS)))
    derived = {it["key"]: it for it in base["items"]}["lightningdit_64ep"]   # no rate: computed from FLOPs
    assert derived["computed"] and derived["setting"].startswith("derived")
    assert r["pipeline_gpu_days"] == pytest.approx(base["pipeline_gpu_days"])
    assert "LightningDiT-XL/1 on VA-VAE latents" in C.to_markdown(r)


def test_lightningdit_and_vavae_cost_rows_from_flops_agree_with_a_direct_count(tmp_path):
    """Issue 21's cost: LightningDiT-XL/1's 64 epochs and the VA-VAE extraction priced from FLOPs at the assumed MFU
    (labelled computed), the FLOPs equal to torch's FlopCounterMode on the real layer sizes (meta device)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from usp_scale.models import create_model
    from usp_scale.vae.frozen import _random_vae

    m = create_model("LightningDiT-XL/1", input_size=16, in_channels=32, num_classes=1000, learn_sigma=False,
                     device="meta").eval()
    with FlopCounterMode(display=False) as fc:
        m(torch.zeros(1, 32, 16, 16, device="meta"), torch.zeros(1, device="meta"),
          torch.zeros(1, dtype=torch.long, device="meta"))
    assert C.lightningdit_flops() == pytest.approx(fc.get_total_flops(), rel=1e-9)
    assert 230e9 < C.lightningdit_flops() < 245e9            # ~ DiT-XL/2's: 256 tokens of 1152
    with torch.device("meta"):
        vae = _random_vae("f16d32", full=True)                # VA-VAE's sizes: 128 x (1, 1, 2, 2, 4), 2 layers, 32 ch
    assert vae.config.block_out_channels == (128, 128, 256, 256, 512) and vae.config.latent_channels == 32
    with FlopCounterMode(display=False) as fc:
        vae.quant_conv(vae.encoder(torch.zeros(1, 3, 256, 256, device="meta")))
    assert C.vavae_encoder_flops(**C.VAVAE_ENCODER) == pytest.approx(fc.get_total_flops(), rel=1e-9)
    # and at another size and layout (attention nowhere but the middle, 1 layer, 64 px)
    with torch.device("meta"):
        small = _random_vae("d8")
    cfg = small.config
    with FlopCounterMode(display=False) as fc:
        small.quant_conv(small.encoder(torch.zeros(1, 3, 64, 64, device="meta")))
    mult = tuple(c // cfg.block_out_channels[0] for c in cfg.block_out_channels)
    assert C.vavae_encoder_flops(64, cfg.block_out_channels[0], mult, cfg.layers_per_block, (), 4) == \
        pytest.approx(fc.get_total_flops(), rel=1e-9)

    # the rows, by hand: 80K x 1024 images at 3 x forward / (37 % of the H100's 989.4 TFLOP/s); ImageNet twice
    # through the encoder at 37 % of its 66.9 TFLOP/s fp32
    items = {it["key"]: it for it in C.lightningdit_items("NVIDIA H100", [])}
    fwd, enc = C.lightningdit_flops(), C.vavae_encoder_flops(**C.VAVAE_ENCODER)
    train, ext = items["lightningdit_64ep"], items["vavae_extraction"]
    assert train["hours"] == pytest.approx(80_000 * 1024 * 3 * fwd / (0.37 * 989.4e12) / 3600)
    assert ext["hours"] == pytest.approx(2 * 1_281_167 * enc / (0.37 * 66.9e12) / 3600)
    assert train["computed"] and ext["computed"]
    bf16 = {it["key"]: it for it in C.lightningdit_items("NVIDIA H100", [], extract_dtype="bf16")}
    assert bf16["vavae_extraction"]["hours"] == pytest.approx(ext["hours"] * 66.9 / 989.4)
    given = {it["key"]: it for it in C.lightningdit_items("NVIDIA H100", [], extract_img_per_s=1000.0)}
    assert given["vavae_extraction"]["hours"] == pytest.approx(2 * 1_281_167 / 1000 / 3600)
    assert not given["vavae_extraction"]["computed"]
    # the command line: --card alone prints these rows, the wall time on N GPUs and the computed label
    out = tmp_path / "l.md"
    assert C.main(["--card", "NVIDIA H100", "--gpus", "16", "--out", str(out)]) == 0
    text = out.read_text()
    for needle in ("LightningDiT-XL/1 on VA-VAE latents", "VA-VAE latent extraction", "**computed** from FLOPs",
                   f"{train['hours']:.1f} GPU-hours** = {train['hours'] / 16:.2f} h wall on 16 GPUs",
                   f"{enc / 1e9:.1f} GFLOP per encode"):
        assert needle in text, needle
    # and beside the USP report, where a measured rate replaces the derived one
    full = C.to_markdown(C.report(C.given_rows({"MAE-XL": 2061.0, "DiT-XL/2": 552.0}, "NVIDIA H200"), gpus=64))
    assert "on 64 x NVIDIA H200" in full and "VA-VAE latent extraction" in full
    with pytest.raises(SystemExit, match="assumed-mfu"):
        C.main(["--card", "NVIDIA H100", "--assumed-mfu", "0"])
    with pytest.raises(SystemExit, match="no peak known"):
        C.main(["--card", "CPU"])


def test_repa_rows_price_both_teacher_modes(tmp_path):
    """Issue 20's cost: SiT-XL/2 + REPA with the teacher online (3 x student + teacher forward per sample) against
    the teacher-feature cache (3 x student, plus the cache once), from FLOPs equal to torch's FlopCounterMode on the
    real sizes (meta device), or from a measured SiT-XL/2-REPA rate; the cache's size and read rate."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from usp_scale.models import create_model
    from usp_scale.models.teacher import TEACHERS, DINOv2ViT

    m = create_model("SiT-XL/2-REPA", device="meta").eval()
    with FlopCounterMode(display=False) as fc:
        m(torch.zeros(1, 4, 32, 32, device="meta"), torch.zeros(1, device="meta"),
          torch.zeros(1, dtype=torch.long, device="meta"))
    student, teacher = C.repa_flops()
    assert student == pytest.approx(fc.get_total_flops(), rel=1e-9)     # the projector included
    with torch.device("meta"):
        t = DINOv2ViT(TEACHERS["dinov2_vitb14"], grid=16).eval()
    with FlopCounterMode(display=False) as fc:
        t(torch.zeros(1, 3, 224, 224, device="meta"))
    assert teacher == pytest.approx(fc.get_total_flops(), rel=2e-3) and 45e9 < teacher < 48e9   # REPA's ~47 GFLOP
    # by hand, from FLOPs at 37 % of the H100's bf16 peak
    items = {it["key"]: it for it in C.repa_items("NVIDIA H100", [])}
    rate = 0.37 * 989.4e12
    assert items["repa_online"]["hours"] == pytest.approx(400_000 * 256 * (3 * student + teacher) / rate / 3600)
    assert items["repa_cache"]["hours"] == pytest.approx(400_000 * 256 * 3 * student / rate / 3600)
    assert items["repa_teacher_cache"]["hours"] == pytest.approx(2 * 1_281_167 * teacher / rate / 3600)
    assert all(it["computed"] for it in items.values())
    # a measured online rate prices the online row as given and the cached row by the FLOPs ratio
    rows = C.given_rows({"SiT-XL/2-REPA": 500.0}, "NVIDIA H100")
    got = {it["key"]: it for it in C.repa_items("NVIDIA H100", rows, teacher_img_per_s=4000.0)}
    assert got["repa_online"]["rate"] == 500.0 and not got["repa_online"]["computed"]
    assert got["repa_cache"]["rate"] == pytest.approx(500.0 * (3 * student + teacher) / (3 * student))
    assert got["repa_teacher_cache"]["hours"] == pytest.approx(2 * 1_281_167 / 4000.0 / 3600)
    # the paragraph: both modes, the cache's size (REPA's 256 x 768 bf16 per view) and read rate
    assert C.teacher_cache_bytes_per_image() == 256 * 768 * 2 * 2
    text = "\n".join(C.repa_lines(list(items.values()), 8, "NVIDIA H100"))
    for needle in ("teacher online", "teacher tokens cached", "1.01 TB for ImageNet train", "0.50 TB without flips",
                   f"{items['repa_online']['hours']:.1f} GPU-hours", "**computed** from FLOPs"):
        assert needle in text, needle
    read = items["repa_cache"]["rate"] * 256 * 768 * 2 / 1e6
    assert f"read at {read:.0f} MB/s per GPU" in text
    out = tmp_path / "c.md"
    assert C.main(["--card", "NVIDIA H100", "--out", str(out)]) == 0
    assert "REPA (issue 20" in out.read_text() and "VA-VAE + LightningDiT" in out.read_text()
    full = C.to_markdown(C.report(C.given_rows({"MAE-XL": 2061.0, "DiT-XL/2": 552.0}, "NVIDIA H200")))
    assert "teacher tokens cached" in full
