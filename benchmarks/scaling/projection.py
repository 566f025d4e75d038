"""GPU-days and wall-days of the paper's runs on N nodes x 8 GPUs per engine, from measured single-GPU rates and the
communication model of :mod:`scaling.comm_model`; markdown tables and the wall-days plot for ``cost_report.py``.

Runs (docs/anchors.md §7): USP pretraining, MAE-XL, 800 and 1600 epochs of ImageNet-1k at global batch 4096
(steps = epochs x 1,281,167 / 4096); DiT-XL/2 and SiT-XL/2, 400K steps at batch 256 (finetuning from USP, the same
cost from scratch); DiT-XL/2 from scratch, 7M steps; the latent cache and FID-50K sampling (no communication: they
split perfectly over the GPUs). The USP pipeline = MAE-XL 1600 epochs + DiT-XL/2 400K + the cache + FID-50K, against
the paper's 98 H20-days; DiT-XL/2 from scratch against its 622.

Pretraining input (``pretrain_input``): ``cache`` reads latents made once (the cache item, ``cache_img_per_s``);
``online`` encodes every 224^2 view with the SD-VAE encoder inside each step, adding ``1 / vae_img_per_s`` seconds
per sample of serial compute before the forward (no communication hides behind it). Without a measured encoder rate it
is derived from FLOPs at the MAE step's achieved FLOP/s: ``vae rate = MAE-XL rate x 166 / 207`` (MAE-XL train step
166 GFLOP per image, SD-VAE encoder forward 207 GFLOP per 224^2 image, docs/anchors.md A3).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Sequence

from . import comm_model as M

IMAGENET_TRAIN = 1_281_167
MAE_XL_TRAIN_GFLOP = 166.0      # 3 x forward of the MAE-XL step (encoder on 50 tokens + 512-wide decoder on 197)
VAE_ENCODER_GFLOP_224 = 207.0   # SD-VAE encoder forward, one 224^2 image
PAPER_H20_DAYS = {"usp_pipeline": 98.0, "scratch_dit": 622.0}
ENGINE_LABELS = {"ddp": "DDP", "fsdp2": "FSDP2", "hsdp": "HSDP", "zero1": "ZeRO-1", "zero2": "ZeRO-2",
                 "zero3": "ZeRO-3"}
# Default reduction dtypes in a bf16 run: engine.reduce_dtype, fp32 by default for every engine (DDP without a
# compression hook, FSDP2's MixedPrecisionPolicy(reduce_dtype), DeepSpeed's communication_data_type).
DEFAULT_REDUCE = {"ddp": "fp32", "fsdp2": "fp32", "hsdp": "fp32", "zero1": "fp32", "zero2": "fp32", "zero3": "fp32"}


@dataclass
class Setup:
    """Everything a projection depends on (printed with the report)."""

    rates: Dict[str, float]                       # samples/s per GPU on the measured card, by model
    rate_card: str                                # the card the rates were measured on (a key of M.CARDS)
    cards: Sequence[str] = ("H100", "H200", "H20")
    nodes: Sequence[int] = (1, 2, 4, 8, 16)
    engines: Sequence[str] = M.ENGINE_KINDS
    reduce_dtype: Dict[str, str] = field(default_factory=lambda: dict(DEFAULT_REDUCE))
    param_dtype: str = "bf16"
    link: M.LinkModel = field(default_factory=M.LinkModel)
    nic_gbps: Optional[float] = None              # override every card's inter-node Gb/s per GPU
    pretrain_epochs: Sequence[int] = (800, 1600)
    pretrain_batch: int = 4096
    finetune_steps: int = 400_000
    scratch_steps: int = 7_000_000
    batch: int = 256
    pretrain_input: str = "cache"                 # cache | online
    vae_img_per_s: float = 0.0                    # measured encoder rate on rate_card (0: derived from FLOPs)
    cache_img_per_s: float = 0.0                  # cache build rate on rate_card (0: no cache item)
    cache_views: int = 1
    fid_gpu_hours: float = 0.0                    # FID-50K GPU-hours on rate_card (0: no FID item)

    def __post_init__(self):
        if self.pretrain_input not in ("cache", "online"):
            raise ValueError(f"pretrain_input={self.pretrain_input!r}: use cache or online")
        for c in list(self.cards) + [self.rate_card]:
            if c not in M.CARDS:
                raise ValueError(f"card {c!r}: use one of {', '.join(M.CARDS)}")
        bad = [e for e in self.engines if e not in M.ENGINE_KINDS]
        if bad:
            raise ValueError(f"engines {bad}: use {', '.join(M.ENGINE_KINDS)}")

    def card(self, name: str) -> M.Card:
        c = M.CARDS[name]
        return replace(c, nic_Gbps=self.nic_gbps) if self.nic_gbps else c

    def scale(self, card: str) -> float:
        """Rate on ``card`` / rate on the measured card: the ratio of dense bf16 peaks (compute-bound)."""
        return M.CARDS[card].peak_tflops / M.CARDS[self.rate_card].peak_tflops

    def label(self, card: str) -> str:
        """How a card is named in the tables: the measured card as itself, another one as what it is here, the
        measured card's rate scaled by the peak ratio (e.g. "H100 (= H200 rate x 1.00)"): its own memory bandwidth
        (the H100's 3.35 TB/s against the H200's 4.8) is not modelled, and its links are the ones listed."""
        if card == self.rate_card:
            return card
        return f"{card} (= {self.rate_card} rate x {self.scale(card):.2f})"

    def rate(self, model: str, card: str) -> float:
        r = self.rates.get(model)
        if r is None and model == "SiT-XL/2":        # the same network as DiT-XL/2
            r = self.rates.get("DiT-XL/2")
        if r is None:
            raise ValueError(f"no measured rate for {model}: give one (cost_report.py --rate {model}=SAMPLES_PER_S)")
        return r * self.scale(card)

    def vae_rate(self, card: str) -> float:
        if self.vae_img_per_s > 0:
            return self.vae_img_per_s * self.scale(card)
        return self.rate("MAE-XL", card) * MAE_XL_TRAIN_GFLOP / VAE_ENCODER_GFLOP_224

    def spec(self, engine: str) -> M.EngineSpec:
        return M.EngineSpec(engine, reduce_dtype=self.reduce_dtype.get(engine, DEFAULT_REDUCE[engine]),
                            param_dtype=self.param_dtype, shard_size=self.link.gpus_per_node)


def runs(s: Setup) -> List[M.Run]:
    out = [M.Run(f"mae_{e}", f"USP pretraining, MAE-XL, {e} epochs ({s.pretrain_input} input)", "MAE-XL",
                 e * IMAGENET_TRAIN / s.pretrain_batch, s.pretrain_batch) for e in s.pretrain_epochs]
    out += [M.Run("dit_400k", f"DiT-XL/2, {s.finetune_steps // 1000}K steps x {s.batch} (USP finetuning)", "DiT-XL/2",
                  s.finetune_steps, s.batch),
            M.Run("sit_400k", f"SiT-XL/2, {s.finetune_steps // 1000}K steps x {s.batch}", "SiT-XL/2",
                  s.finetune_steps, s.batch),
            M.Run("scratch_dit", f"DiT-XL/2 from scratch, {s.scratch_steps / 1e6:g}M steps x {s.batch}", "DiT-XL/2",
                  s.scratch_steps, s.batch)]
    return out


@dataclass
class Point:
    run: str
    card: str
    engine: str
    nodes: int
    world: int
    local_batch: int
    step: Optional[M.StepTime]     # None: not applicable (batch does not split, or a parallel item)
    wall_days: float
    gpu_days: float


def project_all(s: Setup, nets: Optional[Dict[str, M.Net]] = None) -> List[Point]:
    """Every (run, card, engine, nodes) point, plus the cache and FID items (engine "-")."""
    nets = nets if nets is not None else {}
    gpn = s.link.gpus_per_node
    pts: List[Point] = []
    for run in runs(s):
        if run.model not in nets:
            nets[run.model] = M.build_net(run.model)
        for card in s.cards:
            rate = s.rate(run.model, card)
            pre = 1.0 / s.vae_rate(card) if run.model == "MAE-XL" and s.pretrain_input == "online" else 0.0
            for n in s.nodes:
                world = n * gpn
                if run.global_batch % world:
                    continue
                for e in s.engines:
                    st = M.project(nets[run.model], s.spec(e), s.card(card), s.link, rate=rate,
                                   global_batch=run.global_batch, world=world, pre_s_per_sample=pre)
                    wall, gpu = M.run_days(run, st, world)
                    pts.append(Point(run.key, card, e, n, world, run.global_batch // world, st, wall, gpu))
    for card in s.cards:
        items = []
        if s.cache_img_per_s > 0:
            items.append(("cache", IMAGENET_TRAIN * s.cache_views / (s.cache_img_per_s * s.scale(card)) / 86400))
        if s.fid_gpu_hours > 0:
            items.append(("fid50k", s.fid_gpu_hours / s.scale(card) / 24))
        for key, gpu_days in items:
            for n in s.nodes:
                pts.append(Point(key, card, "-", n, n * gpn, 0, None, gpu_days / (n * gpn), gpu_days))
    return pts


def best(pts: Sequence[Point], run: str, card: str, nodes: int) -> Optional[Point]:
    cand = [p for p in pts if p.run == run and p.card == card and p.nodes == nodes]
    return min(cand, key=lambda p: p.wall_days) if cand else None


def pipeline(pts: Sequence[Point], s: Setup, card: str, nodes: int) -> Optional[dict]:
    """USP pipeline (MAE-XL at the largest pretraining epochs + DiT-XL/2 400K + cache + FID) with the fastest engine
    of each stage; None when a stage has no point at this node count."""
    parts = [f"mae_{max(s.pretrain_epochs)}", "dit_400k"] + [k for k in ("cache", "fid50k") if
                                                            any(p.run == k for p in pts)]
    chosen = [best(pts, k, card, nodes) for k in parts]
    if any(c is None for c in chosen):
        return None
    return {"parts": chosen, "wall_days": sum(c.wall_days for c in chosen),
            "gpu_days": sum(c.gpu_days for c in chosen)}


# ------------------------------------------------------------------------------------------------ markdown

def assumptions_md(s: Setup, nets: Dict[str, M.Net]) -> List[str]:
    lk = s.link
    lines = ["### Assumptions of the projection", "",
             f"- Rates: measured on one {s.rate_card}, samples/s per GPU: " +
             ", ".join(f"{k} {v:g}" for k, v in s.rates.items()) +
             ("" if "SiT-XL/2" in s.rates else "; SiT-XL/2 = the DiT-XL/2 rate (the same 675M network)") +
             ". Other cards: x their dense bf16 peak / the measured card's (" +
             ", ".join(f"{c} {M.CARDS[c].peak_tflops:g}" for c in s.cards) + " TFLOP/s), labelled \"CARD (= "
             f"{s.rate_card} rate x RATIO)\": a compute-bound scaling that does not model each card's memory bandwidth "
             "(the H100 has the H200's peak but 3.35 TB/s of HBM against 4.8, so its memory-bound parts run slower "
             "than its rows say; the H20's relatively larger HBM bandwidth would make it somewhat faster).",
             "- Each GPU runs at that rate whatever its local batch (global batch / GPUs); optimistic below ~32 "
             "samples per GPU, where a real GPU is under-used. Step = local batch / rate, 1/3 forward, 2/3 "
             "backward, shared among the blocks by parameters x tokens; the optimizer step is inside the rate.",
             "- Links per GPU: " + "; ".join(f"{c}: NVLink {s.card(c).nvlink_GBps:g} GB/s per direction, network "
                                             f"{s.card(c).nic_Gbps:g} Gb/s" for c in s.cards) +
             f"; {lk.gpus_per_node} GPUs per node, efficiency NVLink {lk.nvlink_eff:g}, network {lk.nic_eff:g}; "
             f"a fixed {lk.alpha_intra_us:g} us per collective within a node, {lk.alpha_inter_us:g} us across nodes.",
             "- Rings over nodes: " + ("rail-aligned (one NIC per GPU): 1/m of a rank's ring traffic crosses its NIC "
                                       "when m group members share its node (HSDP's replicate group: all of it)"
                                       if lk.net_share == "ring" else
                                       "all of a rank's traffic crosses its NIC (conservative bound)") + ".",
             "- Ring factors: all-reduce sends 2(g-1)/g of the payload per rank, reduce-scatter and all-gather "
             "(g-1)/g of the full tensor; each rank receives as much as it sends.",
             "- Engines (dtypes in a bf16 run): " + "; ".join(s.spec(e).describe() for e in s.engines) + ".",
             "- Overlap: one collective at a time per rank, beside compute. DDP buckets (1 MiB first, then 25 MiB) "
             "start as they fill during backward; FSDP2/HSDP/ZeRO-3 gather one unit (block) ahead and reduce each "
             "unit after its backward; ZeRO-1/2 (overlap_comm off, DeepSpeed's default) and ZeRO-3's post-step "
             "gathers are exposed. At one node HSDP is FSDP2.",
             f"- Pretraining input: {s.pretrain_input}" + (
                 f" (SD-VAE encoder at {s.vae_rate(s.rate_card):.0f} img/s on the {s.rate_card}, "
                 + ("measured" if s.vae_img_per_s > 0 else
                    f"derived: MAE-XL rate x {MAE_XL_TRAIN_GFLOP:g}/{VAE_ENCODER_GFLOP_224:g} GFLOP")
                 + ", serial before each forward)" if s.pretrain_input == "online" else "") + ".",
             f"- Global batch: MAE-XL {s.pretrain_batch}, DiT/SiT {s.batch}; node counts whose GPU count does not "
             "divide the batch are left out.",
             "- Parallel items (no communication): latent cache " +
             (f"{IMAGENET_TRAIN * s.cache_views:,} encodes at {s.cache_img_per_s:g} img/s per {s.rate_card}"
              if s.cache_img_per_s > 0 else "not included") + "; FID-50K " +
             (f"{s.fid_gpu_hours:g} GPU-hours on the {s.rate_card}" if s.fid_gpu_hours > 0 else "not included") + ".",
             "- Parameters: " + ", ".join(f"{k} {n.numel / 1e6:.1f}M ({n.trainable_numel / 1e6:.1f}M trainable, "
                                           f"{n.n_units - 1} blocks)" for k, n in nets.items()) + ".", ""]
    return lines


def _fmt_days(d: float) -> str:
    return f"{d:.2f}" if d < 10 else f"{d:.1f}" if d < 100 else f"{d:.0f}"


def to_markdown(s: Setup, pts: Sequence[Point], nets: Dict[str, M.Net]) -> str:
    lines = [f"## Multi-node projection (N nodes x {s.link.gpus_per_node} GPUs)", ""]
    lines += assumptions_md(s, nets)
    gpn = s.link.gpus_per_node
    # bytes per step
    lines += ["### Bytes each rank sends (= receives) per step, MB", "",
              "| engine | " + " | ".join(f"{m} @ {n * gpn} GPUs" for m in nets for n in (s.nodes[0], s.nodes[-1])) +
              " |", "|---|" + "---|" * (2 * len(nets))]
    for e in s.engines:
        cells = []
        for m in nets:
            for n in (s.nodes[0], s.nodes[-1]):
                w = n * gpn
                sp = s.spec(e) if not (e == "hsdp" and w <= gpn) else replace(s.spec(e), kind="fsdp2")
                cells.append(f"{M.sent_bytes(M.step_ops(nets[m], sp, w)) / 1e6:.0f}")
        lines.append(f"| {ENGINE_LABELS[e]} | " + " | ".join(cells) + " |")
    lines.append("")
    # step tables
    for card in s.cards:
        for run in runs(s):
            if run.key not in (f"mae_{max(s.pretrain_epochs)}", "dit_400k"):
                continue
            lines += [f"### Step time on {s.label(card)}, {run.model} (global batch {run.global_batch}): ms (compute share)",
                      "", "| nodes | GPUs | local batch | compute ms | " +
                      " | ".join(ENGINE_LABELS[e] for e in s.engines) + " |",
                      "|---|---|---|---|" + "---|" * len(s.engines)]
            for n in s.nodes:
                row = [p for p in pts if p.run == run.key and p.card == card and p.nodes == n]
                if not row:
                    continue
                by = {p.engine: p for p in row}
                lines.append(f"| {n} | {n * gpn} | {row[0].local_batch} | {row[0].step.compute_s * 1e3:.1f} | " +
                             " | ".join(f"{by[e].step.step_s * 1e3:.1f} ({100 * by[e].step.efficiency:.0f} %)"
                                        for e in s.engines) + " |")
            lines.append("")
    # runs
    for card in s.cards:
        lines += [f"### Runs on {s.label(card)}: wall-days / GPU-days with the fastest engine", "",
                  "| run | " + " | ".join(f"{n} x {gpn}" for n in s.nodes) + " |", "|---|" + "---|" * len(s.nodes)]
        for key, what in [(r.key, r.what) for r in runs(s)] + [("cache", "latent cache"), ("fid50k", "FID-50K")]:
            cells = []
            for n in s.nodes:
                b = best(pts, key, card, n)
                cells.append("-" if b is None else f"{_fmt_days(b.wall_days)} / {_fmt_days(b.gpu_days)}"
                             + (f" {ENGINE_LABELS[b.engine]}" if b.engine != "-" else ""))
            if any(c != "-" for c in cells):
                lines.append(f"| {what} | " + " | ".join(cells) + " |")
        lines.append("")
    # headline
    lines += ["### USP pipeline and DiT-XL/2 from scratch against the paper", "",
              f"USP pipeline = MAE-XL {max(s.pretrain_epochs)} epochs + DiT-XL/2 {s.finetune_steps // 1000}K"
              + (" + latent cache" if s.cache_img_per_s > 0 else "") + (" + FID-50K" if s.fid_gpu_hours > 0 else "")
              + f" (paper: {PAPER_H20_DAYS['usp_pipeline']:g} H20-days); scratch = DiT-XL/2 "
              f"{s.scratch_steps / 1e6:g}M steps (paper: {PAPER_H20_DAYS['scratch_dit']:g} H20-days). "
              "Wall-days / GPU-days, the fastest engine per stage.", "",
              "| card | " + " | ".join(f"USP {n} x {gpn}" for n in s.nodes) + " | " +
              " | ".join(f"scratch {n} x {gpn}" for n in s.nodes) + " |", "|---|" + "---|" * (2 * len(s.nodes))]
    for card in s.cards:
        usp = [pipeline(pts, s, card, n) for n in s.nodes]
        scr = [best(pts, "scratch_dit", card, n) for n in s.nodes]
        lines.append(f"| {s.label(card)} | " + " | ".join("-" if u is None else
                                                 f"{_fmt_days(u['wall_days'])} / {_fmt_days(u['gpu_days'])}"
                                                 for u in usp) + " | " +
                     " | ".join("-" if b is None else f"{_fmt_days(b.wall_days)} / {_fmt_days(b.gpu_days)}"
                                for b in scr) + " |")
    lines.append("")
    return "\n".join(lines) + "\n"


def input_comparison_md(cache: Setup, online: Setup, pts_cache: Sequence[Point], pts_online: Sequence[Point]) -> str:
    """Pretraining on cached latents vs online SD-VAE encoding: GPU-days / wall-days per card and node count."""
    gpn = cache.link.gpus_per_node
    ep = max(cache.pretrain_epochs)
    lines = [f"### Pretraining input: latents cached once vs SD-VAE encoding online (MAE-XL, {ep} epochs)", "",
             f"Online: every view encoded in the step (encoder {online.vae_rate(online.rate_card):.0f} img/s on the "
             f"{online.rate_card}, " + ("measured" if online.vae_img_per_s > 0 else "derived from FLOPs") +
             "). Cached: the pretraining steps plus building the cache once (" +
             (f"{IMAGENET_TRAIN * cache.cache_views:,} encodes" if cache.cache_img_per_s > 0 else
              "cache cost not given") + "). Wall-days / GPU-days, the fastest engine.", "",
             "| card | input | " + " | ".join(f"{n} x {gpn}" for n in cache.nodes) + " |",
             "|---|---|" + "---|" * len(cache.nodes)]
    for card in cache.cards:
        for name, pts in (("cached", pts_cache), ("online", pts_online)):
            cells = []
            for n in cache.nodes:
                b = best(pts, f"mae_{ep}", card, n)
                c = best(pts, "cache", card, n) if name == "cached" else None
                if b is None:
                    cells.append("-")
                    continue
                g, w = b.gpu_days + (c.gpu_days if c else 0), b.wall_days + (c.wall_days if c else 0)
                cells.append(f"{_fmt_days(w)} / {_fmt_days(g)}")
            lines.append(f"| {cache.label(card)} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n"


def plot(s: Setup, pts: Sequence[Point], path: str) -> str:
    """PNG: wall-days against the number of GPUs per engine (and perfect scaling), for MAE-XL pretraining and DiT-XL/2
    400K on every card."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [(f"mae_{max(s.pretrain_epochs)}", f"MAE-XL {max(s.pretrain_epochs)} ep"), ("dit_400k", "DiT-XL/2 400K")]
    fig, axes = plt.subplots(len(keys), len(s.cards), figsize=(4.2 * len(s.cards), 3.4 * len(keys)), squeeze=False)
    for i, (key, title) in enumerate(keys):
        for j, card in enumerate(s.cards):
            ax = axes[i][j]
            ideal = None
            for e in s.engines:
                sel = sorted((p for p in pts if p.run == key and p.card == card and p.engine == e),
                             key=lambda p: p.world)
                if not sel:
                    continue
                ax.plot([p.world for p in sel], [p.wall_days for p in sel], marker="o", ms=3, label=ENGINE_LABELS[e])
                if ideal is None:   # compute time only: the run without communication
                    ideal = ([p.world for p in sel], [p.wall_days * p.step.efficiency for p in sel])
            if ideal:
                ax.plot(*ideal, "k--", lw=1, label="no communication")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{title}, {s.label(card)}", fontsize=9)
            ax.set_xlabel("GPUs")
            ax.set_ylabel("wall-days")
            ax.grid(True, which="both", alpha=0.3)
            if i == 0 and j == 0:
                ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
