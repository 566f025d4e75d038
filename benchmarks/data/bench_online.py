#!/usr/bin/env python
"""Online pretraining input cost: the frozen SD-VAE encoder alone, and end-to-end images/s of online pretraining
next to the cached step, in one run on one device.

    python benchmarks/data/bench_online.py --out OUT            # GPU: ~6 min on an H200, most of it compiling
    python benchmarks/data/bench_online.py --smoke               # tiny VAE and MAE on the CPU: checks the script

Part ``encoder`` (224 px, --batch, posterior mean, random SD-VAE weights: speed does not depend on them; cuDNN
benchmark mode on for every row, as the official code sets it):
  * ``diffusers eager, fp16 autocast``    what the official pretraining runs (fp32 weights under fp16 autocast);
  * ``diffusers compiled bf16 CL``        the baseline: ``torch.compile(vae.encoder)`` on a bf16 channels_last
                                          AutoencoderKL + quant_conv + mean (the anchor's "compiled bf16 channels_last");
  * ``usp_scale <mode>``                  :class:`usp_scale.vae.FrozenVAE` (bf16 weights, channels_last, the one-graph
                                          mean-only encode, compiled with each --compile-modes), and its ratio to the
                                          baseline (goal >= 1.3x).
Part ``e2e`` (MAE --mae at --batch, bf16, compiled, the trainer's step through the local engine):
  * ``cached``                            latents already on the device (what the latent-cache reader feeds);
  * ``online gpu-decode, overlap on/off`` JPEGs -> data.loader=gpu (nvJPEG through torchvision.io, the PIL path's
                                          crops) -> the fast encoder on a side stream (OnlineEncodingLoader) -> step;
  * ``online PIL workers``                the paper's loader (PIL decode + crop in --workers processes) -> encoder;
  * ``decode only``                       the gpu loader alone, to show whether decode bounds the online rate.
The JPEGs are a synthetic ImageNet-sized set (short side --src-size, aspect up to 4/3) written to a temporary
folder, so decode cost is realistic; nvJPEG vs libjpeg-turbo pixels are not compared here (that needs real photos).
Writes OUT/online.md (machine, versions, date, rows) and OUT/online.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "train"))

import torch  # noqa: E402


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rate(fn, n_items: int, steps: int, warmup: int, device) -> float:
    """Items/s of ``fn`` (one call = ``n_items``) over ``steps`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync(device)
    return n_items * steps / (time.perf_counter() - t)


# --------------------------------------------------------------------------------------------- encoder alone

def encoder_rows(a, device) -> list:
    from usp_scale.vae import FrozenVAE
    from usp_scale.vae.frozen import load_autoencoder

    x = torch.rand(a.batch, 3, a.size, a.size, device=device) * 2 - 1
    rows = []

    def add(name, fn):
        try:
            r = rate(fn, a.batch, a.steps, a.warmup, device)
        except Exception as e:  # noqa: BLE001 -- one failing variant must not cost the others
            print(f"FAILED encoder {name}: {type(e).__name__}: {e}", flush=True)
            rows.append({"part": "encoder", "name": name, "img_per_s": None, "error": f"{type(e).__name__}: {e}"})
            return
        rows.append({"part": "encoder", "name": name, "img_per_s": round(r, 1)})
        print(rows[-1], flush=True)

    ref = load_autoencoder(a.vae, "d8").to(device).eval().requires_grad_(False)
    amp = torch.float16 if device.type == "cuda" else torch.bfloat16

    @torch.no_grad()
    def official():
        with torch.autocast(device.type, dtype=amp):
            return ref.encode(x).latent_dist.mean * 0.18215

    add(f"diffusers eager, {'fp16' if device.type == 'cuda' else 'bf16'} autocast (official)", official)
    low = load_autoencoder(a.vae, "d8").to(device, torch.bfloat16).to(memory_format=torch.channels_last)
    low.eval().requires_grad_(False)
    enc = torch.compile(low.encoder) if a.compile else low.encoder
    xl = x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)

    @torch.no_grad()
    def baseline():
        return low.quant_conv(enc(xl)).chunk(2, dim=1)[0].float() * 0.18215

    base_name = f"diffusers {'compiled' if a.compile else 'eager'} bf16 channels_last (baseline)"
    add(base_name, baseline)
    del low, enc
    for mode in (a.compile_modes.split(",") if a.compile else ["eager"]):
        vae = FrozenVAE(path=a.vae, dtype="bf16", device=device, channels_last=True, compile=a.compile,
                        compile_mode=mode if a.compile else "default")
        add(f"usp_scale FrozenVAE bf16 channels_last, mean-only graph, {mode}", lambda v=vae: v.encode(x))
        del vae
        if device.type == "cuda":
            torch.cuda.empty_cache()
    base = next((r["img_per_s"] for r in rows if r["name"] == base_name), None)
    for r in rows:
        r["vs_baseline"] = round(r["img_per_s"] / base, 3) if base and r["img_per_s"] else ""
    return rows


# --------------------------------------------------------------------------------------------- end to end

def e2e_rows(a, runtime, root) -> list:
    device = runtime.device
    from bench_step import make_step

    from usp_scale.config import DataConfig, JobConfig
    from usp_scale.data import build_image_loader
    from usp_scale.data.online import OnlineEncodingLoader
    from usp_scale.training.tasks import PretrainTask
    from usp_scale.vae import FrozenVAE

    rows = []
    step, eng, _, _ = make_step(a.mae, batch=a.batch, compile_=a.compile, kernels="torch", precision=a.precision,
                                runtime=runtime, ac=False)
    r = rate(step, a.batch, a.steps, a.warmup, device)
    rows.append({"part": "e2e", "name": f"cached: {a.mae} step, latents on the device", "img_per_s": round(r, 1)})
    print(rows[-1], flush=True)
    task = PretrainTask(JobConfig())
    vae = FrozenVAE(path=a.vae, dtype="bf16", device=device, compile=a.compile,
                    compile_mode=a.compile_modes.split(",")[0])

    def images(loader):
        cfg = DataConfig(root=root, image_size=a.size, batch_size=a.batch, num_workers=a.workers, loader=loader,
                         augment="pretrain", drop_last=True)
        return build_image_loader(cfg, train=True, device=device)

    def run_stream(loader, train: bool) -> float:
        n, t0, epoch = 0, None, 0
        done = 0
        while done < a.steps + a.warmup:
            loader.set_epoch(epoch)
            for b in loader:
                if train:
                    with eng.autocast():
                        loss = task.loss(eng, b)
                    eng.backward(loss)
                    eng.step()
                done += 1
                if done == a.warmup:
                    _sync(device)
                    t0 = time.perf_counter()
                elif done > a.warmup:
                    n += len(b["labels"])
                if done >= a.steps + a.warmup:
                    break
            epoch += 1
        _sync(device)
        return n / (time.perf_counter() - t0)

    variants = [("online gpu-decode, overlap on", "gpu", True), ("online gpu-decode, overlap off", "gpu", False),
                (f"online PIL workers ({a.workers}), overlap on", "torchvision", True)]
    for name, backend, overlap in variants:
        try:
            ld = OnlineEncodingLoader(images(backend), vae, posterior="mean", overlap=overlap)
            r = run_stream(ld, train=True)
        except Exception as e:  # noqa: BLE001
            print(f"FAILED e2e {name}: {type(e).__name__}: {e}", flush=True)
            rows.append({"part": "e2e", "name": name, "img_per_s": None, "error": f"{type(e).__name__}: {e}"})
            continue
        rows.append({"part": "e2e", "name": f"{name}: {a.mae} step + encoder + decode", "img_per_s": round(r, 1)})
        print(rows[-1], flush=True)
    for backend in ("gpu", "torchvision"):
        try:
            r = run_stream(images(backend), train=False)
            rows.append({"part": "e2e", "name": f"decode + crop only, loader {backend} ({a.workers} workers)",
                         "img_per_s": round(r, 1)})
        except Exception as e:  # noqa: BLE001
            rows.append({"part": "e2e", "name": f"decode only {backend}", "img_per_s": None,
                         "error": f"{type(e).__name__}: {e}"})
        print(rows[-1], flush=True)
    cached = rows[0]["img_per_s"]
    for r in rows:
        r["vs_cached"] = round(r["img_per_s"] / cached, 3) if r.get("img_per_s") and cached else ""
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="encoder,e2e", help="comma list of encoder, e2e")
    ap.add_argument("--vae", default="sd-random", help="VAE path (default sd-random: the SD-VAE architecture, "
                                                       "random weights)")
    ap.add_argument("--mae", default="MAE-XL", help="the pretraining model of the e2e part (bench_step names)")
    ap.add_argument("--batch", type=int, default=128, help="images per step (default 128, the anchors' batch)")
    ap.add_argument("--size", type=int, default=224, help="image side (default 224)")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True, help="torch.compile (default on)")
    ap.add_argument("--compile-modes", default="default,max-autotune-no-cudagraphs,reduce-overhead",
                    help="vae.compile_mode values to time for the usp_scale encoder (the first feeds e2e)")
    ap.add_argument("--precision", default="bf16", help="MAE step precision (default bf16)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per row")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation happens here)")
    ap.add_argument("--images", type=int, default=2048, help="synthetic JPEGs for the e2e part")
    ap.add_argument("--src-size", type=int, default=400, help="short side of the synthetic JPEGs (default 400)")
    ap.add_argument("--workers", type=int, default=12, help="DataLoader workers of the image loaders")
    ap.add_argument("--smoke", action="store_true", help="tiny VAE, MAE-tiny, 64 px, batch 4, eager: checks the script")
    ap.add_argument("--out", default="", help="write OUT/online.md and OUT/online.json")
    a = ap.parse_args(argv)
    if a.smoke:
        a.vae, a.mae, a.size, a.batch, a.steps, a.warmup, a.compile = "tiny-random", "MAE-tiny", 64, 4, 2, 1, False
        a.images, a.src_size, a.workers = 16, 80, 0
    warnings.filterwarnings("ignore")
    from usp_scale.config import JobConfig
    from usp_scale.runtime import init_runtime
    base = JobConfig()
    base.engine.tf32 = torch.cuda.is_available()
    runtime = init_runtime(base)   # one process: device, TF32, the attention kernel (as bench_step.py)
    device = runtime.device
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    parts = [p for p in a.parts.split(",") if p]
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "batch": a.batch, "size": a.size, "compile": a.compile,
            "vae": a.vae, "mae": a.mae}
    import torchvision
    meta["torchvision"] = torchvision.__version__
    rows = []
    if "encoder" in parts:
        rows += encoder_rows(a, device)
    if "e2e" in parts:
        from usp_scale.data.synthetic import make_synthetic
        with tempfile.TemporaryDirectory() as tmp:
            make_synthetic(tmp, classes=16, per_class=max(1, a.images // 16), size=a.src_size, val_per_class=1,
                           seed=0, max_aspect=4 / 3)
            rows += e2e_rows(a, runtime, tmp)
    lines = ["# Online pretraining inputs: encoder and end-to-end throughput", "", "| item | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in meta.items()]
    lines += ["", f"Command: `bench_online.py {' '.join(argv if argv is not None else sys.argv[1:])}`", "",
              "| part | measurement | img/s | ratio |", "|---|---|---|---|"]
    for r in rows:
        ratio = r.get("vs_baseline", r.get("vs_cached", ""))
        lines.append(f"| {r['part']} | {r['name']} | {r['img_per_s'] if r['img_per_s'] is not None else r['error']} "
                     f"| {ratio} |")
    report = "\n".join(lines) + "\n"
    print(report)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "online.md"), "w") as f:
            f.write(report)
        with open(os.path.join(a.out, "online.json"), "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    return 1 if any(r.get("img_per_s") is None for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
