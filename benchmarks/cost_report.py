#!/usr/bin/env python
"""GPU-day cost of the USP pipeline from measured throughput, against the paper's figures; multi-node projection.

    python benchmarks/cost_report.py --train-csv OUT/train_step.csv [--sampling-json OUT/sampling.json] \
        [--cache-img-per-s 1200] [--out benchmarks/reports/cost_<card>_<date>.md]
    python benchmarks/cost_report.py --rate MAE-XL=2061 --rate DiT-XL/2=552 --card "NVIDIA H200" \
        --scaling --nodes 1,2,4,8,16 --pretrain-input both --plot OUT/scaling.png --out OUT/scaling.md

Reads the samples/s that ``train/bench_step.py`` measured (for each model the fastest row of the chosen card,
or the one you pin with ``--pick MODEL=kernels/compile/fp8``) and multiplies out the schedules of the method
(docs/method.md §2.6, §4.1, §5.4):

* USP pretraining, MAE-XL on cached latents: 1600 epochs (the released weights; ``--pretrain-epochs 800`` for
  the paper's default) x 1,281,167 images;
* USP finetuning, DiT-XL/2: 400K steps x batch 256;
* from-scratch DiT-XL/2 (the paper's baseline): 7M steps x 256;
* REPA (issue 20): the 400K-step SiT-XL/2 + REPA run with the teacher online against cached teacher tokens plus
  the cache once (``--teacher-img-per-s``), the cache's size and read rate; from a measured ``SiT-XL/2-REPA`` rate or
  computed from FLOPs like the LightningDiT rows; not part of the USP DiT total;
* LightningDiT-XL/1 on VA-VAE latents (issue 21): LightningDiT's 64-epoch recipe, 80K steps x 1024 (about 64
  epochs of ImageNet), at a given or measured ``LightningDiT-XL/1`` rate, else **computed** from its FLOPs (the
  registry model's count, 3 x forward) at ``--assumed-mfu`` of the card's bf16 peak; and the VA-VAE latent
  extraction (ImageNet train, 256 px, plain + flipped; the encoder's FLOPs counted analytically from its layers) at
  ``--extract-img-per-s`` or computed the same way; with the wall time on ``--gpus`` GPUs. Not part of the USP DiT
  total. ``--card`` alone (no CSV, no rates) prints these rows only:
  ``python benchmarks/cost_report.py --card "NVIDIA H100" --gpus 8``;
* optionally the latent cache (``--cache-img-per-s``: SD-VAE encode + DALI decode rate, ``--cache-views`` views
  per image) and FID-50K sampling (``--sampling-json`` from ``sample/bench_sampling.py``);
* next to the sampling, the ADM evaluation of those 50,000 samples: 60,000 Inception forwards (the samples and the
  reference batch's 10,000 images, which precision/recall need) of 11.43 GFLOP each (float32, TF32 off; counted
  by ``eval/bench_eval.py``), the two Fréchet distances and precision/recall. Measured by ``eval/bench_eval.py``
  (``--eval-json``) or a given rate (``--eval-img-per-s``); otherwise derived at 40 % of the card's fp32 peak
  (labelled so).

GPU-days are single-device days at the measured rate (perfect scaling assumed; weak-scaling losses come on
top). They are also given as peak-FLOP-normalised H20-days (x peak of the card / 148 TFLOP/s), the unit of
the paper's 98 (USP) / 622 (scratch) / 1904 (REPA) H20-days, and checked against the target of <= 12
H100-days for the whole USP DiT-XL/2 pipeline (docs/anchors.md §7).

``--scaling`` adds the multi-node projection (``benchmarks/scaling/``): for N nodes x 8 GPUs of H100, H200 and H20,
per engine (DDP, FSDP2, HSDP, ZeRO-1/2/3), the bytes each rank sends per step, the step time with the overlap model,
and GPU-days and wall-days of MAE-XL 800/1600 epochs, DiT-XL/2 and SiT-XL/2 400K, DiT-XL/2 from scratch, the latent
cache and FID-50K, every assumption printed with the tables. The collectives the model counts are checked against
gloo runs of the tiny models through the project's engines (``scaling/measure_comm.py``,
tests/test_bench_scaling_dist.py). ``--pretrain-input online`` costs pretraining with the SD-VAE encoder run in
every step instead of the cache made once (``--vae-img-per-s``: the measured encoder rate; derived from FLOPs
without it); ``both`` adds the comparison table.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import sys
from typing import Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # the scaling package beside this script

IMAGENET_TRAIN = 1_281_167
# dense bf16 peak (TFLOP/s) by card-name fragment; H20 is the paper's card
PEAK_TFLOPS = {"H20": 148.0, "H100": 989.4, "H200": 989.4, "A100": 312.0, "B200": 2250.0}
PAPER_H20_DAYS = {"usp_pipeline": 98.0, "scratch_dit": 622.0, "repa": 1904.0}
# the evaluation: Inception forward FLOPs per image (conv + matmul at 299 x 299; eval/bench_eval.py counts them),
# forwards per FID-50K evaluation (50,000 samples + the 10,000 reference images of precision/recall), fp32 peak
# (TFLOP/s, non-tensor-core: the ADM protocol runs the network in float32 without TF32), assumed utilisation
INCEPTION_GFLOP = 11.426
EVAL_IMAGES = 60_000
FP32_PEAK_TFLOPS = {"H20": 44.0, "H100": 66.9, "H200": 66.9, "A100": 19.5, "B200": 80.0}
EVAL_DERIVED_UTIL = 0.4
PAPER_H20_DAYS_PEAK = PEAK_TFLOPS["H20"]
# LightningDiT's 64-epoch recipe (configs/finetune/lightningdit_xl1_256_vavae.yaml): steps x global batch
LIGHTNINGDIT_MODEL, LIGHTNINGDIT_STEPS, LIGHTNINGDIT_BATCH = "LightningDiT-XL/1", 80_000, 1024
# Without a measured LightningDiT-XL/1 rate, its rows are derived from FLOPs at this model FLOP utilisation: the
# DiT-XL/2 training step's measured MFU on an H200 (37 %, eager bf16, README "Measured"), the closest measured
# transformer of the same width and token count (LightningDiT-XL/1 sees 256 tokens of 1152, as DiT-XL/2).
ASSUMED_MFU = 0.37
# REPA's recipe (configs/finetune/sit_xl_256_repa.yaml, sit_xl_256_usp_repa.yaml): SiT-XL/2 + projector after block 8,
# 400K steps x 256; the DINOv2 ViT-B/14 teacher at 224 px (16 x 16 patch tokens of 768)
REPA_MODEL, REPA_STEPS, REPA_BATCH, REPA_TEACHER = "SiT-XL/2-REPA", 400_000, 256, "dinov2_vitb14"
REPA_FLIPS = 2           # the teacher-feature cache holds plain + flipped tokens, as the latent cache
# VA-VAE (hustvl/LightningDiT vavae-imagenet256-f16d32-dinov2): LDM encoder ch 128, ch_mult (1, 1, 2, 2, 4), 2
# res-blocks per level, attention at the lowest level (16 x 16 at 256 px) and in the middle, 32 latent channels,
# quant_conv 64 -> 64. The cache encodes every image twice (plain and flipped, as the reference extraction does).
VAVAE_ENCODER = dict(ch=128, ch_mult=(1, 1, 2, 2, 4), layers=2, attn_levels=(4,), z_channels=32)
VAVAE_SIDE, VAVAE_VIEWS = 256, 2


def vavae_encoder_flops(side: int = VAVAE_SIDE, ch: int = 128, ch_mult=(1, 1, 2, 2, 4), layers: int = 2,
                        attn_levels=(4,), z_channels: int = 32) -> float:
    """Forward FLOPs (2 per multiply-add) of one ``side`` x ``side`` image through the LDM / diffusers AutoencoderKL
    encoder and quant_conv, counted analytically from its layers: every convolution (2 Cin Cout k^2 Hout Wout), the
    attention blocks' four C x C projections over the H W tokens and their two H W x H W x C matmuls (scores, values).
    Norms and activations are not counted (as torch's FlopCounterMode, which tests/test_bench_cost.py checks this
    against on the real layer sizes)."""
    def conv(cin, cout, k, res):
        return 2.0 * cin * cout * k * k * res * res

    def attn(c, res):
        t = res * res
        return 4 * 2.0 * t * c * c + 2 * 2.0 * t * t * c

    def resnet(cin, cout, res):
        return conv(cin, cout, 3, res) + conv(cout, cout, 3, res) + (conv(cin, cout, 1, res) if cin != cout else 0.0)

    res, cin = side, ch
    f = conv(3, ch, 3, res)                                            # conv_in
    for i, m in enumerate(ch_mult):
        cout = ch * m
        for _ in range(layers):
            f += resnet(cin, cout, res) + (attn(cout, res) if i in attn_levels else 0.0)
            cin = cout
        if i != len(ch_mult) - 1:                                      # stride-2 downsampling conv
            res //= 2
            f += conv(cout, cout, 3, res)
    f += 2 * resnet(cin, cin, res) + attn(cin, res)                    # middle: resnet, attention, resnet
    f += conv(cin, 2 * z_channels, 3, res)                             # conv_out -> (mean, logvar)
    f += conv(2 * z_channels, 2 * z_channels, 1, res)                  # quant_conv
    return f


def one_off_item(base: dict, given_rate: float, peak: Optional[float], mfu: float, flops: float,
                 dtype: str) -> List[dict]:
    """A one-off pass over a dataset (latent or teacher-feature extraction) as a cost row: at ``given_rate``
    (images/s) when measured, else derived from ``flops`` per image at ``mfu`` of ``peak`` TFLOP/s in ``dtype``
    (labelled computed); no row without either."""
    if given_rate > 0:
        return [dict(base, rate=given_rate, setting="given", batch="", computed=False)]
    if peak is None:
        return []
    return [dict(base, rate=peak * 1e12 * mfu / flops, batch="", computed=True,
                 setting=f"derived: {mfu:.0%} of {peak:g} TFLOP/s {dtype}")]


def lightningdit_flops() -> float:
    """Forward FLOPs of one 256 px image (16 x 16 x 32 latents) through LightningDiT-XL/1, the registry model's own
    count (:meth:`usp_scale.models.lightningdit.LightningDiT.flops_per_sample`; built on the meta device)."""
    from usp_scale.models import create_model

    m = create_model(LIGHTNINGDIT_MODEL, input_size=16, in_channels=32, num_classes=1000, learn_sigma=False,
                     device="meta")
    return float(m.flops_per_sample())


def lightningdit_items(card: str, rows: List[dict], pin: Optional[str] = None, mfu: float = ASSUMED_MFU,
                       extract_dtype: str = "fp32", extract_img_per_s: float = 0.0) -> List[dict]:
    """The VA-VAE + LightningDiT rows (outside the USP DiT pipeline total): LightningDiT-XL/1's 64-epoch recipe at a
    measured rate when ``rows`` hold one for ``card``, else derived from its FLOPs (3 x forward per training image)
    at ``mfu`` of the card's bf16 peak; and the VA-VAE latent extraction of ImageNet's train split (ADM crop at 256,
    plain + flipped) at a given rate, else from the encoder's FLOPs at ``mfu`` of the card's peak in
    ``extract_dtype`` (fp32: vae.dtype's default, without tensor cores; bf16/fp16: the dense bf16 peak)."""
    out = []
    n = LIGHTNINGDIT_STEPS * LIGHTNINGDIT_BATCH
    fwd = lightningdit_flops()
    what = (f"{LIGHTNINGDIT_MODEL} on VA-VAE latents, LightningDiT's 64-epoch recipe, "
            f"{LIGHTNINGDIT_STEPS / 1000:g}K steps x {LIGHTNINGDIT_BATCH}")
    base = {"key": "lightningdit_64ep", "what": what, "samples": n, "gflop_per_sample": 3 * fwd / 1e9}
    measured = [r for r in rows if r["model"] == LIGHTNINGDIT_MODEL and r["device"] == card]
    peak = peak_of(card)
    if measured:
        r = pick_rate(rows, LIGHTNINGDIT_MODEL, card, pin)
        out.append(dict(base, rate=float(r["samples_per_s"]), setting=_setting(r), batch=r.get("batch", ""),
                        computed=False))
    elif peak is not None:
        rate = peak * 1e12 * mfu / (3 * fwd)
        out.append(dict(base, rate=rate, batch="", computed=True,
                        setting=f"derived: {3 * fwd / 1e9:.0f} GFLOP/img (3 x forward) at {mfu:.0%} of "
                                f"{peak:g} TFLOP/s bf16"))
    enc = vavae_encoder_flops(**VAVAE_ENCODER)
    n = IMAGENET_TRAIN * VAVAE_VIEWS
    what = (f"VA-VAE latent extraction, ImageNet train at {VAVAE_SIDE} px, plain + flipped "
            f"({enc / 1e9:.1f} GFLOP per encode)")
    base = {"key": "vavae_extraction", "what": what, "samples": n, "gflop_per_sample": enc / 1e9}
    epeak = peak_of(card, FP32_PEAK_TFLOPS) if extract_dtype == "fp32" else peak
    out += one_off_item(base, extract_img_per_s, epeak, mfu, enc, extract_dtype)
    for it in out:
        it["hours"] = it["samples"] / it["rate"] / 3600
    return out
def repa_flops() -> tuple:
    """(student, teacher) forward FLOPs of one 256 px image: SiT-XL/2 with REPA's projector (the registry model's
    own count, projector included) and DINOv2 ViT-B/14 at 224 px (the teacher module's count), both on the meta
    device."""
    import torch

    from usp_scale.models import create_model
    from usp_scale.models.teacher import TEACHERS, DINOv2ViT

    student = float(create_model(REPA_MODEL, device="meta").flops_per_sample())
    with torch.device("meta"):
        teacher = float(DINOv2ViT(TEACHERS[REPA_TEACHER], grid=16).flops_per_image())
    return student, teacher


def teacher_cache_bytes_per_image(tokens: int = 256, dim: int = 768, flips: int = REPA_FLIPS) -> int:
    """Bytes per image of the teacher-feature cache: bf16 patch tokens, ``flips`` views (plain + flipped)."""
    return tokens * dim * 2 * flips


def repa_items(card: str, rows: List[dict], pin: Optional[str] = None, mfu: float = ASSUMED_MFU,
               teacher_img_per_s: float = 0.0) -> List[dict]:
    """REPA's two ways to get the teacher's tokens, priced side by side (outside the USP DiT total): the 400K-step
    SiT-XL/2 + REPA run with the teacher **online** (every training image also through DINOv2-B: 3 x the student's
    forward + the teacher's forward per sample) or from the **cache** (3 x the student's forward), and the cache's
    one-off extraction (ImageNet train, plain + flipped, through the teacher). Training at a measured
    ``SiT-XL/2-REPA`` rate on ``card`` when ``rows`` hold one (teacher online, the recipes' default), else derived
    from FLOPs at ``mfu`` of the card's bf16 peak; the extraction at ``teacher_img_per_s`` or derived the same way."""
    fwd, tea = repa_flops()
    n = REPA_STEPS * REPA_BATCH
    peak = peak_of(card)
    out = []
    measured = [r for r in rows if r["model"] == REPA_MODEL and r["device"] == card]
    for key, per, mode in (("repa_online", 3 * fwd + tea, "teacher online"), ("repa_cache", 3 * fwd,
                                                                               "teacher tokens from the cache")):
        base = {"key": key, "samples": n, "gflop_per_sample": per / 1e9,
                "what": f"{REPA_MODEL} (REPA), {REPA_STEPS / 1000:g}K steps x {REPA_BATCH}, {mode}"}
        if measured and key == "repa_online":
            r = pick_rate(rows, REPA_MODEL, card, pin)
            out.append(dict(base, rate=float(r["samples_per_s"]), setting=_setting(r), batch=r.get("batch", ""),
                            computed=False))
        elif measured:   # the same run without the teacher's forward: the measured rate scaled by the FLOPs
            online = float(pick_rate(rows, REPA_MODEL, card, pin)["samples_per_s"])
            out.append(dict(base, rate=online * (3 * fwd + tea) / per, batch="", computed=True,
                            setting=f"derived: the measured online rate x {(3 * fwd + tea) / per:.3f} (FLOPs)"))
        elif peak is not None:
            out.append(dict(base, rate=peak * 1e12 * mfu / per, batch="", computed=True,
                            setting=f"derived: {per / 1e9:.0f} GFLOP/img at {mfu:.0%} of {peak:g} TFLOP/s bf16"))
    n = IMAGENET_TRAIN * REPA_FLIPS
    base = {"key": "repa_teacher_cache", "samples": n, "gflop_per_sample": tea / 1e9,
            "what": f"REPA teacher-feature cache, ImageNet train, plain + flipped ({tea / 1e9:.1f} GFLOP per image "
                    f"through DINOv2-B/14 at 224 px)"}
    out += one_off_item(base, teacher_img_per_s, peak, mfu, tea, "bf16")
    for it in out:
        it["hours"] = it["samples"] / it["rate"] / 3600
    return out


def repa_lines(items: List[dict], gpus: int, card: str) -> List[str]:
    """The REPA paragraph: online against cached teacher tokens in GPU-hours and wall time on ``gpus`` GPUs, the
    cache's size and the read rate it needs, and which numbers are computed rather than measured."""
    by = {it["key"]: it for it in items}
    on, ca, ext = by.get("repa_online"), by.get("repa_cache"), by.get("repa_teacher_cache")
    if on is None or ca is None:
        return []
    per_img = teacher_cache_bytes_per_image()
    total = per_img * IMAGENET_TRAIN
    read = ca["rate"] * per_img / REPA_FLIPS   # per GPU (the rate is one device's), one view per sample
    label = lambda it: ("**computed** from FLOPs, not measured" if it["computed"] else "at the measured/given rate")
    out = ["", f"REPA (issue 20; its own run, not in the USP total), on {gpus} x {card} at perfect scaling; the "
               "teacher's tokens online or from a cache (`repa.features`):"]
    out.append(f"- teacher online (REPA's way, the recipes' default): **{on['hours']:.1f} GPU-hours** = "
               f"{on['hours'] / gpus:.2f} h wall; {on['gflop_per_sample']:.1f} GFLOP per sample (3 x the student's "
               f"forward + the teacher's {on['gflop_per_sample'] - ca['gflop_per_sample']:.1f}); {label(on)} "
               f"({on['setting']})")
    cache_h = ca["hours"] + (ext["hours"] if ext else 0.0)
    out.append(f"- teacher tokens cached: training **{ca['hours']:.1f} GPU-hours** ({label(ca)}), plus the cache "
               f"once: {ext['hours']:.1f} GPU-hours ({label(ext)}); together {cache_h:.1f} GPU-hours = "
               f"{cache_h / gpus:.2f} h wall: {abs(on['hours'] - cache_h):.1f} GPU-hours "
               f"{'less' if cache_h <= on['hours'] else 'more'} than online" if ext else
               f"- teacher tokens cached: training **{ca['hours']:.1f} GPU-hours** ({label(ca)})")
    out.append(f"- the cache: {per_img / 1e6:.2f} MB per image (256 tokens x 768 bf16, plain + flipped), "
               f"{total / 1e12:.2f} TB for ImageNet train ({total / 2e12:.2f} TB without flips); read at "
               f"{read / 1e6:.0f} MB/s per GPU at the training rate above (one view per sample)")
    return out


TARGET_H100_DAYS = 12.0


def peak_of(card: str, table: Optional[dict] = None) -> Optional[float]:
    table = PEAK_TFLOPS if table is None else table
    up = card.upper()
    for frag in sorted(table, key=len, reverse=True):   # "H200" before "H20"
        if frag in up:
            return table[frag]
    return None


def eval_item(card: str, eval_json: Optional[dict] = None, eval_img_per_s: float = 0.0) -> Optional[dict]:
    """The FID-50K evaluation's row: measured (bench_eval.py JSON or a given rate) or derived from its FLOPs."""
    extra_s = 0.0
    if eval_json:
        rate = float(eval_json["inception_img_per_s"])
        extra_s = sum(float(eval_json.get(k, 0.0)) for k in ("fid_seconds", "sfid_seconds", "pr_50k_seconds"))
        setting = f"measured on {eval_json.get('device', '?')}"
    elif eval_img_per_s > 0:
        rate, setting = eval_img_per_s, "given"
    else:
        peak = peak_of(card, FP32_PEAK_TFLOPS)
        if peak is None:
            return None
        rate = peak * 1e12 * EVAL_DERIVED_UTIL / (INCEPTION_GFLOP * 1e9)
        setting = f"derived: {EVAL_DERIVED_UTIL:.0%} of {peak:g} TFLOP/s fp32"
    return {"key": "fid50k_eval", "what": f"ADM evaluation of FID-50K ({EVAL_IMAGES:,} Inception forwards, "
            f"{INCEPTION_GFLOP:.2f} GFLOP each)", "samples": EVAL_IMAGES, "rate": rate, "setting": setting,
            "batch": eval_json.get("inception_batch", "") if eval_json else "",
            "hours": (EVAL_IMAGES / rate + extra_s) / 3600}


def load_rows(path: str) -> List[dict]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise SystemExit(f"{path}: no rows")
    missing = {"model", "samples_per_s", "device", "kernels", "compile"} - set(rows[0])
    if missing:
        raise SystemExit(f"{path}: not a bench_step.py CSV (missing columns {sorted(missing)})")
    return rows


def _setting(r: dict) -> str:
    if r.get("kernels") == "given":
        return "given"
    comp = "compiled" if str(r.get("compile")) in ("True", "true", "1") else "eager"
    return f"{r.get('kernels')}/{comp}/{r.get('fp8', 'off') or 'off'}"


def given_rows(rates: Dict[str, float], card: str) -> List[dict]:
    """Rows like bench_step.py's for rates given on the command line (``--rate MODEL=SAMPLES_PER_S``)."""
    return [{"model": m, "samples_per_s": v, "device": card, "kernels": "given", "compile": "", "fp8": "",
             "batch": ""} for m, v in rates.items()]


def card_key(card: str) -> str:
    """The scaling model's card name (H100 / H200 / H20) in a device name such as "NVIDIA H200"."""
    from scaling.comm_model import CARDS

    up = card.upper()
    for k in sorted(CARDS, key=len, reverse=True):
        if k in up:
            return k
    raise SystemExit(f"card {card!r}: the scaling model knows {', '.join(CARDS)}; choose one with --card")


def pick_rate(rows: List[dict], model: str, card: Optional[str], pin: Optional[str]) -> dict:
    """The row used for ``model``: the pinned setting (kernels/compile/fp8) or the fastest one."""
    cand = [r for r in rows if r["model"] == model and (card is None or r["device"] == card)]
    if pin:
        cand = [r for r in cand if _setting(r) == pin]
    if not cand:
        where = f" on {card}" if card else ""
        raise SystemExit(f"no {model} row{where}" + (f" with setting {pin}" if pin else "") +
                         "; run benchmarks/train/bench_step.py for it first")
    return max(cand, key=lambda r: float(r["samples_per_s"]))


def workloads(pretrain_epochs: int, finetune_steps: int, scratch_steps: int, batch: int,
              size: str = "XL") -> Dict[str, dict]:
    """The method's runs at model size ``size`` (XL: the paper's; B / L: MAE-B + DiT-B/2, ...; the rates are
    looked up under those names)."""
    mae, dit = f"MAE-{size}", f"DiT-{size}/2"
    return {
        "usp_pretrain": {"model": mae, "samples": pretrain_epochs * IMAGENET_TRAIN,
                         "what": f"USP pretraining, {mae}, {pretrain_epochs} epochs on cached latents"},
        "usp_finetune": {"model": dit, "samples": finetune_steps * batch,
                         "what": f"{dit} finetuning from USP, {finetune_steps / 1000:g}K steps x {batch}"},
        "scratch_dit": {"model": dit, "samples": scratch_steps * batch,
                        "what": f"{dit} from scratch, {scratch_steps / 1e6:g}M steps x {batch}"},
    }


def report(rows: List[dict], *, card: Optional[str] = None, pins: Optional[Dict[str, str]] = None,
           pretrain_epochs: int = 1600, finetune_steps: int = 400_000, scratch_steps: int = 7_000_000,
           batch: int = 256, cache_img_per_s: float = 0.0, cache_views: int = 1,
           sampling: Optional[dict] = None, eval_json: Optional[dict] = None, eval_img_per_s: float = 0.0,
           size: str = "XL", mfu: float = ASSUMED_MFU, extract_dtype: str = "fp32",
           extract_img_per_s: float = 0.0, gpus: int = 8, teacher_img_per_s: float = 0.0) -> dict:
    """All numbers of the report (hours per item, GPU-days, H20-normalised days, the pipeline total)."""
    pins = pins or {}
    if card is None:
        cards = sorted({r["device"] for r in rows})
        if len(cards) != 1:
            raise SystemExit(f"the CSV holds several cards {cards}: choose one with --card")
        card = cards[0]
    peak = peak_of(card)
    items = []
    for key, w in workloads(pretrain_epochs, finetune_steps, scratch_steps, batch, size).items():
        r = pick_rate(rows, w["model"], card, pins.get(w["model"]))
        rate = float(r["samples_per_s"])
        items.append({"key": key, "what": w["what"], "samples": w["samples"], "rate": rate,
                      "setting": _setting(r), "batch": r.get("batch", ""), "hours": w["samples"] / rate / 3600})
    # the VA-VAE + LightningDiT rows (its own run, outside the USP DiT pipeline total): measured or derived
    items += lightningdit_items(card, rows, pins.get(LIGHTNINGDIT_MODEL), mfu, extract_dtype, extract_img_per_s)
    items += repa_items(card, rows, pins.get(REPA_MODEL), mfu, teacher_img_per_s)   # REPA's run, outside it too
    if cache_img_per_s > 0:
        n = IMAGENET_TRAIN * cache_views
        items.append({"key": "latent_cache", "what": f"latent cache, {cache_views} view(s) per image", "samples": n,
                      "rate": cache_img_per_s, "setting": "given", "batch": "",
                      "hours": n / cache_img_per_s / 3600})
    if sampling:
        modes = sampling.get("modes", {})
        if not modes:
            raise SystemExit("the sampling JSON has no 'modes' (not a bench_sampling.py output?)")
        best = min(modes.items(), key=lambda kv: kv[1]["fid50k_gpu_hours"])
        items.append({"key": "fid50k", "what": "FID-50K sampling", "samples": 50_000, "rate": None,
                      "setting": best[0], "batch": sampling.get("batch", ""), "hours": best[1]["fid50k_gpu_hours"]})
    if sampling or eval_json or eval_img_per_s > 0:
        ev = eval_item(card, eval_json, eval_img_per_s)
        if ev is not None:
            items.append(ev)
    for it in items:
        it["gpu_days"] = it["hours"] / 24
        it["h20_days"] = it["gpu_days"] * peak / PAPER_H20_DAYS_PEAK if peak else None
    pipeline = [it for it in items if it["key"] in ("usp_pretrain", "usp_finetune", "latent_cache", "fid50k",
                                                    "fid50k_eval")]
    total = sum(it["gpu_days"] for it in pipeline)
    out = {"card": card, "size": size, "peak_tflops": peak, "items": items, "pipeline_gpu_days": total,
           "gpus": gpus, "assumed_mfu": mfu,
           "pipeline_h20_days": total * peak / PAPER_H20_DAYS_PEAK if peak else None,
           "pipeline_h100_equiv_days": total * peak / PEAK_TFLOPS["H100"] if peak else None,
           "scratch_gpu_days": next(it["gpu_days"] for it in items if it["key"] == "scratch_dit")}
    out["speedup_vs_scratch"] = out["scratch_gpu_days"] / max(
        sum(it["gpu_days"] for it in items if it["key"] in ("usp_pretrain", "usp_finetune")), 1e-12)
    return out



def to_markdown(r: dict) -> str:
    lines = [f"# GPU-day cost of the USP pipeline on {r['card']} ({datetime.date.today().isoformat()})", "",
             "Single-device days at the measured rates (perfect scaling assumed). H20-days = GPU-days x peak of "
             f"this card ({r['peak_tflops']} TFLOP/s) / 148, the paper's unit.", "",
             ] + _item_table(r["items"])
    has = {i["key"] for i in r["items"]}
    lines += ["", f"USP pipeline (pretrain + finetune{' + cache' if 'latent_cache' in has else ''}"
              f"{' + FID-50K' if 'fid50k' in has else ''}{' + its evaluation' if 'fid50k_eval' in has else ''}): "
              f"**{r['pipeline_gpu_days']:.2f} GPU-days** on {r['card']}"]
    if r["pipeline_h20_days"] is not None:
        lines += [f"= {r['pipeline_h20_days']:.1f} H20-days at equal peak-FLOP use (paper: "
                  f"{PAPER_H20_DAYS['usp_pipeline']:.0f} H20-days; scratch {PAPER_H20_DAYS['scratch_dit']:.0f}, "
                  f"REPA {PAPER_H20_DAYS['repa']:.0f})",
                  f"= {r['pipeline_h100_equiv_days']:.2f} H100-equivalent days ({r['card']} GPU-days x its peak / the "
                  f"H100's, {r['peak_tflops'] / PEAK_TFLOPS['H100']:.2f}: not an H100 measurement; its memory bandwidth "
                  f"and links are not modelled) (target <= {TARGET_H100_DAYS:g}: "
                  f"{'met' if r['pipeline_h100_equiv_days'] <= TARGET_H100_DAYS else 'NOT met'})"]
    lines.append(f"From scratch DiT-{r.get('size', 'XL')}/2 / USP (pretrain + finetune), both at these rates: "
                 f"{r['speedup_vs_scratch']:.1f}x fewer GPU-days")
    lines += lightningdit_lines(r["items"], r.get("gpus", 8), r["card"])
    lines += repa_lines(r["items"], r.get("gpus", 8), r["card"])
    return "\n".join(lines) + "\n"


def _item_table(items: List[dict]) -> List[str]:
    lines = ["| item | samples | rate (samples/s) | setting | GPU-hours | GPU-days | H20-days (peak-normalised) |",
             "|---|---|---|---|---|---|---|"]
    for it in items:
        rate = f"{it['rate']:.1f}" if it["rate"] else "-"
        h20 = f"{it['h20_days']:.1f}" if it.get("h20_days") is not None else "-"
        lines.append(f"| {it['what']} | {it['samples']:,} | {rate} | {it['setting']} | {it['hours']:.1f} | "
                     f"{it['gpu_days']:.2f} | {h20} |")
    return lines


def lightningdit_lines(items: List[dict], gpus: int, card: str) -> List[str]:
    """The VA-VAE + LightningDiT paragraph: its GPU-hours, the wall time on ``gpus`` GPUs, the FLOPs it rests on and
    which numbers are computed rather than measured."""
    by = {it["key"]: it for it in items}
    train, ext = by.get("lightningdit_64ep"), by.get("vavae_extraction")
    if train is None and ext is None:
        return []
    out = ["", f"VA-VAE + LightningDiT (issue 21; its own run, not in the USP total), on {gpus} x {card} at perfect "
               "scaling:"]
    for it, name in ((ext, "VA-VAE latent extraction (once)"), (train, "LightningDiT-XL/1, 64 epochs (80K steps x "
                                                                         "1024)")):
        if it is None:
            continue
        how = ("**computed** from FLOPs at an assumed utilisation, not measured" if it["computed"]
               else "at the measured/given rate")
        out.append(f"- {name}: **{it['hours']:.1f} GPU-hours** = {it['hours'] / gpus:.2f} h wall on {gpus} GPUs; "
                   f"{it['gflop_per_sample']:.1f} GFLOP per sample; {how} ({it['setting']})")
    if train is not None and ext is not None:
        tot = train["hours"] + ext["hours"]
        out.append(f"- together: {tot:.1f} GPU-hours = {tot / gpus:.2f} h wall on {gpus} GPUs")
    out.append("- FLOPs: LightningDiT-XL/1's forward is the registry model's own count (flops_per_sample, 3 x for "
               "forward + backward); the VA-VAE encoder's is counted analytically from its convolutions and "
               "attention (vavae_encoder_flops, equal to torch's FlopCounterMode on the real layer sizes). "
               "JPEG decoding and data loading are not priced.")
    return out


def _pairs(items: List[str], flag: str, conv=str) -> Dict[str, object]:
    out = {}
    for p in items:
        k, sep, v = p.partition("=")
        if not sep or not k:
            raise SystemExit(f"{flag} {p!r}: use KEY=VALUE")
        try:
            out[k] = conv(v)
        except ValueError:
            raise SystemExit(f"{flag} {p!r}: {v!r} is not a valid value") from None
    return out


def _ints(text: str, flag: str) -> List[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        vals = []
    if not vals or any(v < 1 for v in vals):
        raise SystemExit(f"{flag} {text!r}: give a comma list of positive integers")
    return vals


def scaling_setup(a, r: dict, rows: List[dict], pretrain_input: str):
    """The :class:`scaling.projection.Setup` of the command line, rates from the report's chosen rows."""
    from scaling import comm_model as M
    from scaling import projection as P

    rates = {}
    for it in r["items"]:
        if it["key"] == "usp_pretrain":
            rates["MAE-XL"] = it["rate"]
        elif it["key"] == "usp_finetune":
            rates["DiT-XL/2"] = it["rate"]
    sit = [x for x in rows if x["model"] == "SiT-XL/2" and x["device"] == r["card"]]
    if sit:
        rates["SiT-XL/2"] = float(pick_rate(rows, "SiT-XL/2", r["card"], None)["samples_per_s"])
    reduce = dict(P.DEFAULT_REDUCE)
    reduce.update(_pairs(a.reduce_dtype, "--reduce-dtype"))
    engines = [e for e in a.engines.split(",") if e]
    link = M.LinkModel(gpus_per_node=a.gpus_per_node, nvlink_eff=a.nvlink_eff, nic_eff=a.nic_eff,
                       alpha_intra_us=a.alpha_intra_us, alpha_inter_us=a.alpha_inter_us, net_share=a.net_share)
    fid = a.fid_gpu_hours
    if a.sampling_json and not fid:
        fid = next(it["hours"] for it in r["items"] if it["key"] == "fid50k")
    try:
        return P.Setup(rates=rates, rate_card=card_key(r["card"]),
                       cards=[c for c in a.cards.split(",") if c], nodes=_ints(a.nodes, "--nodes"), engines=engines,
                       reduce_dtype=reduce, param_dtype=a.param_dtype, link=link, nic_gbps=a.nic_gbps,
                       pretrain_epochs=sorted({a.pretrain_epochs, 800}), pretrain_batch=a.pretrain_batch,
                       finetune_steps=a.finetune_steps, scratch_steps=a.scratch_steps, batch=a.batch,
                       pretrain_input=pretrain_input, vae_img_per_s=a.vae_img_per_s,
                       cache_img_per_s=a.cache_img_per_s, cache_views=a.cache_views, fid_gpu_hours=fid)
    except ValueError as e:
        raise SystemExit(str(e)) from None


def scaling_markdown(a, r: dict, rows: List[dict]) -> str:
    """The ``--scaling`` section (and, with ``--plot``, the PNG)."""
    from scaling import projection as P

    modes = ["cache", "online"] if a.pretrain_input == "both" else [a.pretrain_input]
    nets: dict = {}
    setups = {m: scaling_setup(a, r, rows, m) for m in modes}
    pts = {m: P.project_all(setups[m], nets) for m in modes}
    main_mode = modes[0]
    md = P.to_markdown(setups[main_mode], pts[main_mode], nets)
    if len(modes) == 2:
        md += P.input_comparison_md(setups["cache"], setups["online"], pts["cache"], pts["online"])
    if a.plot:
        os.makedirs(os.path.dirname(os.path.abspath(a.plot)), exist_ok=True)
        P.plot(setups[main_mode], pts[main_mode], a.plot)
        md += f"![wall-days against GPUs per engine]({os.path.basename(a.plot)})\n"
    return md


def emit(md: str, out: Optional[str]) -> None:
    """Print the report, and write it to ``out`` too when given (its folder made)."""
    print(md)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            f.write(md)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-csv", default=None, help="CSV written by benchmarks/train/bench_step.py")
    ap.add_argument("--rate", action="append", default=[],
                    help="MODEL=SAMPLES_PER_S measured on --card, instead of (or beside) --train-csv, e.g. "
                         "MAE-XL=2061 (repeatable)")
    ap.add_argument("--card", default=None, help="device name in the CSV (default: its only card); with --rate: the "
                                                 "card the rates were measured on, e.g. 'NVIDIA H200'")
    ap.add_argument("--pick", action="append", default=[],
                    help="MODEL=kernels/compile/fp8 to use that row instead of the fastest, e.g. "
                         "DiT-XL/2=torch/compiled/off (repeatable)")
    ap.add_argument("--pretrain-epochs", type=int, default=1600, help="USP pretraining epochs (paper: 800/1600)")
    ap.add_argument("--size", default="XL", choices=["B", "L", "XL"], help="model size of the runs costed (default "
                    "XL, the paper's headline; B: MAE-B + DiT-B/2, rates given as MAE-B=... DiT-B/2=...)")
    ap.add_argument("--finetune-steps", type=int, default=400_000, help="DiT-XL/2 finetuning steps")
    ap.add_argument("--scratch-steps", type=int, default=7_000_000, help="from-scratch DiT-XL/2 steps")
    ap.add_argument("--batch", type=int, default=256, help="global batch of the DiT runs")
    ap.add_argument("--cache-img-per-s", type=float, default=0.0,
                    help="latent-cache build rate (decode + SD-VAE encode, img/s); 0 = leave the cache out")
    ap.add_argument("--cache-views", type=int, default=1, help="augmented views cached per image")
    ap.add_argument("--sampling-json", default=None, help="output of benchmarks/sample/bench_sampling.py --out")
    ap.add_argument("--eval-json", default=None, help="output of benchmarks/eval/bench_eval.py --out (the FID-50K "
                    "evaluation's measured cost; without it the row is derived from the Inception FLOPs)")
    ap.add_argument("--eval-img-per-s", type=float, default=0.0,
                    help="measured Inception forwards per second on --card (instead of --eval-json)")
    ap.add_argument("--out", default=None, help="write the markdown report here as well")
    ap.add_argument("--gpus", type=int, default=8, help="GPUs of the VA-VAE + LightningDiT wall-time line (default 8; "
                    "perfect scaling assumed)")
    ap.add_argument("--assumed-mfu", type=float, default=ASSUMED_MFU,
                    help=f"model FLOP utilisation of the rows derived from FLOPs (LightningDiT-XL/1 without a measured "
                         f"rate, the VA-VAE extraction without --extract-img-per-s); default {ASSUMED_MFU} (the "
                         "DiT-XL/2 step's measured MFU on an H200)")
    ap.add_argument("--extract-dtype", choices=["fp32", "bf16"], default="fp32",
                    help="precision of the VA-VAE extraction (vae.dtype; default fp32: priced at the card's fp32 peak)")
    ap.add_argument("--teacher-img-per-s", type=float, default=0.0,
                    help="measured DINOv2-B/14 forwards per second on --card at 224 px (the REPA teacher-feature "
                         "cache's extraction; default: derived from its FLOPs)")
    ap.add_argument("--extract-img-per-s", type=float, default=0.0,
                    help="measured VA-VAE encodes per second on --card (256 px; default: derived from its FLOPs)")
    g = ap.add_argument_group("multi-node projection (--scaling)")
    g.add_argument("--scaling", action="store_true", help="add the multi-node projection per engine")
    g.add_argument("--nodes", default="1,2,4,8,16", help="comma list of node counts")
    g.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node")
    g.add_argument("--cards", default="H100,H200,H20", help="cards to project for (rates scaled by dense bf16 peak)")
    g.add_argument("--engines", default="ddp,fsdp2,hsdp,zero1,zero2,zero3", help="engines to project")
    g.add_argument("--reduce-dtype", action="append", default=[],
                   help="ENGINE=DTYPE gradient-reduction dtype (fp32/bf16); defaults fp32 for every engine "
                        "(engine.reduce_dtype's default)")
    g.add_argument("--param-dtype", default="bf16", help="dtype of parameter all-gathers (FSDP2, ZeRO)")
    g.add_argument("--pretrain-batch", type=int, default=4096, help="global batch of MAE-XL pretraining")
    g.add_argument("--pretrain-input", choices=["cache", "online", "both"], default="cache",
                   help="MAE pretraining on latents cached once, SD-VAE encoding online in every step, or both "
                        "(adds an online-vs-cache table)")
    g.add_argument("--vae-img-per-s", type=float, default=0.0,
                   help="measured SD-VAE encoder rate at 224^2 on --card for --pretrain-input online "
                        "(0: derived, MAE-XL rate x 166/207 GFLOP)")
    g.add_argument("--fid-gpu-hours", type=float, default=0.0,
                   help="FID-50K GPU-hours on --card (default: from --sampling-json, else left out)")
    g.add_argument("--nvlink-eff", type=float, default=0.8, help="achieved / nominal NVLink bandwidth")
    g.add_argument("--nic-eff", type=float, default=0.8, help="achieved / nominal inter-node bandwidth")
    g.add_argument("--nic-gbps", type=float, default=None, help="inter-node Gb/s per GPU for every card (default 400)")
    g.add_argument("--alpha-intra-us", type=float, default=10.0, help="fixed cost per collective within a node")
    g.add_argument("--alpha-inter-us", type=float, default=25.0, help="fixed cost per collective across nodes")
    g.add_argument("--net-share", choices=["ring", "all"], default="ring",
                   help="share of a rank's ring traffic on its NIC: ring = 1/(group members per node), all = 1")
    g.add_argument("--plot", default=None, help="write the wall-days plot (PNG) here")
    a = ap.parse_args(argv)
    pins = {}
    for p in a.pick:
        if "=" not in p:
            raise SystemExit(f"--pick {p!r}: use MODEL=kernels/compile/fp8")
        k, v = p.split("=", 1)
        pins[k] = v
    rates = _pairs(a.rate, "--rate", float)
    if not (0 < a.assumed_mfu <= 1) or a.gpus < 1:
        raise SystemExit(f"--assumed-mfu {a.assumed_mfu} must be in (0, 1] and --gpus {a.gpus} at least 1")
    if not a.train_csv and not rates and a.card:
        # the VA-VAE + LightningDiT rows alone, from FLOPs (nothing measured)
        if peak_of(a.card) is None:
            raise SystemExit(f"--card {a.card!r}: no peak known (cards: {', '.join(PEAK_TFLOPS)})")
        items = lightningdit_items(a.card, [], None, a.assumed_mfu, a.extract_dtype, a.extract_img_per_s)
        items += repa_items(a.card, [], None, a.assumed_mfu, a.teacher_img_per_s)
        for it in items:
            it["gpu_days"] = it["hours"] / 24
            it["h20_days"] = it["gpu_days"] * peak_of(a.card) / PAPER_H20_DAYS_PEAK
        md = "\n".join([f"# GPU cost of the VA-VAE + LightningDiT and REPA recipes on {a.card} "
                        f"({datetime.date.today().isoformat()})", ""] + _item_table(items)
                       + lightningdit_lines(items, a.gpus, a.card) + repa_lines(items, a.gpus, a.card)) + "\n"
        emit(md, a.out)
        return 0
    if not a.train_csv and not rates:
        raise SystemExit("give --train-csv (bench_step.py's CSV) or --rate MODEL=SAMPLES_PER_S (or --card alone for "
                         "the VA-VAE + LightningDiT rows from FLOPs)")
    rows = load_rows(a.train_csv) if a.train_csv else []
    if rates:
        if not a.card:
            raise SystemExit("--rate needs --card: the card the rates were measured on")
        rows += given_rows(rates, a.card)
    sampling = None
    if a.sampling_json:
        with open(a.sampling_json) as f:
            sampling = json.load(f)
    eval_json = None
    if a.eval_json:
        with open(a.eval_json) as f:
            eval_json = json.load(f)
        if "inception_img_per_s" not in eval_json:
            raise SystemExit(f"{a.eval_json}: not a bench_eval.py output (no inception_img_per_s)")
    r = report(rows, card=a.card, pins=pins, pretrain_epochs=a.pretrain_epochs,
               finetune_steps=a.finetune_steps, scratch_steps=a.scratch_steps, batch=a.batch,
               cache_img_per_s=a.cache_img_per_s, cache_views=a.cache_views, sampling=sampling,
               eval_json=eval_json, eval_img_per_s=a.eval_img_per_s, size=a.size, mfu=a.assumed_mfu,
               extract_dtype=a.extract_dtype, extract_img_per_s=a.extract_img_per_s, gpus=a.gpus,
               teacher_img_per_s=a.teacher_img_per_s)
    md = to_markdown(r)
    if a.scaling:
        if a.size != "XL":
            raise SystemExit("--scaling projects the XL runs only; drop --size or --scaling")
        md += "\n" + scaling_markdown(a, r, rows)
    emit(md, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
