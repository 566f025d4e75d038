"""Multi-node scaling model of the project's engines: the collectives of one optimizer step, their bytes, their time
on stated links, how much of it hides behind compute, and what that makes of a whole run.

Everything here is arithmetic on a :class:`Net` (the parameters of a real model, in registration order, grouped into
the units the engines wrap: unit 0 = the root = every parameter outside the transformer blocks, unit i = block i) and
an :class:`EngineSpec`. No torch needed except in :func:`build_net`, which reads a real model built on the meta device.

What each engine moves per optimizer step (accumulation 1), as the engines of ``usp_scale/engine`` call them (checked
against gloo runs by ``measure_comm.py``):

* ``ddp``: one all-reduce per gradient bucket (trainable parameters in reverse registration order, the first bucket
  closed at >= 1 MiB, the others at >= 25 MiB, counted in the parameters' own 4 bytes), in the reduction dtype
  (``engine.reduce_dtype``: fp32 by default, or bf16), issued during backward as the buckets fill.
* ``fsdp2``: per unit an all-gather of its parameters (each padded on dim 0 to a multiple of the world size) in the
  param dtype before forward and, with ``reshard_after_forward``, again before backward (the root too); after its
  backward a reduce-scatter of its trainable gradients in fp32 (the engine's ``reduce_dtype``).
* ``hsdp``: fsdp2 within shard groups of ``shard_size`` consecutive ranks (a node), then an all-reduce of each
  reduced shard across the replicate group (one rank per shard group).
* ``zero1`` / ``zero2`` (DeepSpeed 0.19 defaults): gradients **all-reduced** (``use_multi_rank_bucket_allreduce``) in
  buckets of ``reduce_bucket_size`` = 5e8 elements in DeepSpeed's communication dtype (bf16 in bf16 runs), then after
  the optimizer step an all-gather of each param group's flat partition (padded to a multiple of 2 x world) in the
  param dtype. ``overlap_comm`` is off by default for stages 1/2: both are on the compute stream (exposed).
* ``zero3``: each parameter padded to a multiple of the world size; per module an all-gather in forward of its
  parameters above ``stage3_param_persistence_threshold`` (1e5 elements), again in backward for those released after
  forward (:func:`zero3_regathered`: reuse distance 1e9 elements, prefetch window 5e7); the persistent parameters
  all-gathered once after the step; gradients reduce-scattered in buckets of 5e8 elements, in the communication
  dtype; ``overlap_comm`` on.

Bytes each rank sends per collective of ``S`` payload bytes over a group of ``g`` ranks, ring algorithms (NCCL's
for large messages): all-reduce ``2(g-1)/g S`` (reduce-scatter + all-gather), reduce-scatter ``(g-1)/g S`` (``S`` =
the full input), all-gather ``(g-1)/g S`` (``S`` = the full output), broadcast / reduce ``(g-1)/g S`` on average.
Each rank receives as much as it sends.

Time of a collective: ``alpha + sent bytes / bandwidth`` where the bandwidth is NVLink's (x efficiency) within a node;
for a group spanning nodes, the slower of NVLink and the node's NICs: with rail-aligned rings (one NIC per GPU, NCCL's
multi-ring layout), ``1 / m`` of a rank's traffic crosses its NIC when ``m`` group members share a node (``net_share
= "ring"``), or all of it (``"all"``, a conservative bound, e.g. for trees or a non-rail fabric).

Compute of one step: ``local_batch / rate`` (the measured single-GPU samples/s, held at every local batch: optimistic
below ~32 samples per GPU), 1/3 forward and 2/3 backward, shared among the blocks in proportion to parameters x
tokens (the root's compute neglected); the optimizer step is inside the measured rate. Overlap: one communication
channel per rank (collectives run one at a time in issue order; FSDP2's separate all-gather and reduce-scatter
streams are treated as one), concurrent with compute. DDP buckets start when filled; FSDP2/HSDP/ZeRO-3 gather one unit
ahead (a unit's all-gather starts when the previous unit's compute starts) and reduce a unit's gradients after its
backward; ZeRO-1/2 collectives and ZeRO-3's post-step gathers are exposed. Exposed time = step time - compute time.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Sequence, Tuple

DTYPE_BYTES = {"fp64": 8, "fp32": 4, "bf16": 2, "fp16": 2, "i64": 8, "i32": 4, "u8": 1}  # ints: measured control ops
KINDS = ("all_reduce", "reduce_scatter", "all_gather", "broadcast", "reduce")
ENGINE_KINDS = ("ddp", "fsdp2", "hsdp", "zero1", "zero2", "zero3")


# ------------------------------------------------------------------------------------------------ the network

@dataclass(frozen=True)
class Param:
    name: str
    shape: Tuple[int, ...]
    trainable: bool
    unit: int           # 0 = root (outside the blocks), i = block i (forward order)
    group: int = 0      # optimizer param group of a trainable parameter (-1 for a frozen one)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def module(self) -> str:
        """Owning module's name (DeepSpeed ZeRO-3 gathers and releases per module)."""
        return self.name.rpartition(".")[0]


@dataclass
class Net:
    """Parameters of a model in registration order (~ forward order) and the compute weight of every unit."""

    name: str
    params: List[Param]
    unit_names: List[str]              # unit 0 = "root"
    unit_tokens: List[int]             # tokens a block processes per sample (root: 0, its compute is neglected)

    @property
    def n_units(self) -> int:
        return len(self.unit_names)

    def unit_params(self, u: int) -> List[Param]:
        return [p for p in self.params if p.unit == u]

    @property
    def numel(self) -> int:
        return sum(p.numel for p in self.params)

    @property
    def trainable_numel(self) -> int:
        return sum(p.numel for p in self.params if p.trainable)

    def weights(self) -> List[float]:
        """Share of the step's compute per unit (sum 1): parameters x tokens (the linear layers' MACs)."""
        raw = [sum(p.numel for p in self.unit_params(u)) * self.unit_tokens[u] if u else 0.0
               for u in range(self.n_units)]
        tot = sum(raw)
        if tot <= 0:
            raise ValueError(f"{self.name}: no block carries compute (unit_tokens {self.unit_tokens})")
        return [r / tot for r in raw]

    def grad_ready(self, p: Param) -> float:
        """Fraction of backward after which ``p``'s gradient exists: block params when their block's backward ends;
        root params by their registration position (a head's gradient first, an embedding's last)."""
        return self.ready_map()[p.name]

    def ready_map(self) -> Dict[str, float]:
        if getattr(self, "_ready", None) is None:
            w = self.weights()
            done, seen, ready = 0.0, set(), {}
            for q in self.params:
                if q.unit and q.unit not in seen:
                    seen.add(q.unit)
                    done += w[q.unit]
                ready[q.name] = 1.0 - (done - w[q.unit] if q.unit else done)
            self._ready = ready
        return self._ready

    def grad_order(self) -> List[Param]:
        """Trainable parameters in the order their gradients appear (reverse registration within a block)."""
        idx = {p.name: i for i, p in enumerate(self.params)}
        return sorted((p for p in self.params if p.trainable), key=lambda p: (self.grad_ready(p), -idx[p.name]))


# ------------------------------------------------------------------------------------------------ engines and ops

@dataclass(frozen=True)
class EngineSpec:
    """One engine configuration. Dtypes: "fp32" / "bf16" / "fp16"."""

    kind: str
    reduce_dtype: str = "fp32"          # gradient reduction (engine.reduce_dtype)
    param_dtype: str = "bf16"           # parameter all-gathers (fsdp2/hsdp/zero*): the autocast dtype
    reshard_after_forward: bool = True  # fsdp2/hsdp
    shard_size: int = 8                 # hsdp: ranks per shard group
    ddp_bucket_mb: float = 25.0
    ddp_first_bucket_mb: float = 1.0
    ddp_param_bytes: int = 4            # DDP sizes buckets in the parameters' dtype (fp32 masters)
    ds_reduce_bucket: int = 500_000_000
    ds_persistence: int = 100_000
    ds_max_reuse: int = 1_000_000_000
    ds_prefetch_bucket: int = 50_000_000
    ds_align: int = 2                   # ZeRO-1/2 flat partitions start on multiples of 2 elements
    ds_overlap_comm: Optional[bool] = None  # None = DeepSpeed's default (on for stage 3 only)

    def __post_init__(self):
        if self.kind not in ENGINE_KINDS:
            raise ValueError(f"engine {self.kind!r}: use one of {', '.join(ENGINE_KINDS)}")
        for what in ("reduce_dtype", "param_dtype"):
            if getattr(self, what) not in DTYPE_BYTES:
                raise ValueError(f"{what}={getattr(self, what)!r}: use one of {', '.join(DTYPE_BYTES)}")

    @property
    def overlap_comm(self) -> bool:
        return self.kind == "zero3" if self.ds_overlap_comm is None else self.ds_overlap_comm

    def describe(self) -> str:
        if self.kind == "ddp":
            return f"DDP, gradient all-reduce in {self.reduce_dtype}"
        if self.kind in ("fsdp2", "hsdp"):
            where = f", shards of {self.shard_size} ranks" if self.kind == "hsdp" else ""
            return (f"{self.kind.upper()}{where}, gathers {self.param_dtype}, reduce {self.reduce_dtype}, "
                    f"reshard_after_forward={self.reshard_after_forward}")
        extra = (f", persistence {self.ds_persistence:g}, reuse {self.ds_max_reuse:g}, prefetch "
                 f"{self.ds_prefetch_bucket:g}") if self.kind == "zero3" else ""
        return (f"DeepSpeed ZeRO-{self.kind[-1]}, gathers {self.param_dtype}, reduce {self.reduce_dtype}, "
                f"overlap_comm={self.overlap_comm}{extra}")


@dataclass(frozen=True)
class Op:
    """One collective of a step. ``numel``: all-reduce/broadcast/reduce tensor, reduce-scatter input, all-gather
    output (the full size, padding included)."""

    kind: str
    group: str          # "world", "shard" or "replicate"
    size: int           # ranks in the group
    numel: int
    dtype: str
    phase: str = "bwd"  # "fwd", "bwd" or "step" (after the optimizer step)
    unit: int = -1      # fsdp2/hsdp/zero3: the unit it belongs to
    ready: float = 1.0  # ddp/zero1/zero2: fraction of backward after which it can start

    @property
    def payload_bytes(self) -> int:
        return self.numel * DTYPE_BYTES[self.dtype]

    @property
    def send_bytes(self) -> float:
        return ring_send_bytes(self.kind, self.size, self.payload_bytes)

    def key(self) -> tuple:
        return (self.kind, self.size, self.numel, self.dtype)


def ring_send_bytes(kind: str, size: int, payload: float) -> float:
    """Bytes one rank sends (and receives) in a ring collective over ``size`` ranks (see the module docstring)."""
    if kind not in KINDS:
        raise ValueError(f"collective {kind!r}: use one of {', '.join(KINDS)}")
    if size <= 1:
        return 0.0
    f = (size - 1) / size
    return payload * (2 * f if kind == "all_reduce" else f)


def _ceil_to(n: int, m: int) -> int:
    return -(-n // m) * m


def fsdp_padded(p: Param, g: int) -> int:
    """Elements of ``p`` in an FSDP2 all-gather over ``g`` ranks: dim 0 padded to a multiple of ``g``."""
    if not p.shape:
        return g
    return _ceil_to(p.shape[0], g) * (p.numel // p.shape[0])


def _greedy_buckets(params: Sequence[Param], size, cap, flush_before: bool) -> List[List[Param]]:
    """Split ``params`` in order into buckets of ``size(p)`` units, ``cap(i)`` for bucket i. DDP closes a bucket once
    it reaches its cap (``flush_before=False``); DeepSpeed flushes before a parameter that would overflow it."""
    out, cur, n = [], [], 0
    for p in params:
        if flush_before and cur and n + size(p) > cap(len(out)):
            out.append(cur)
            cur, n = [], 0
        cur.append(p)
        n += size(p)
        if not flush_before and n >= cap(len(out)):
            out.append(cur)
            cur, n = [], 0
    if cur:
        out.append(cur)
    return out


def zero3_persistent(p: Param, spec: EngineSpec) -> bool:
    return p.numel <= spec.ds_persistence


def zero3_regathered(net: Net, spec: EngineSpec) -> List[Param]:
    """Non-persistent parameters ZeRO-3 releases after forward and gathers again in backward. DeepSpeed keeps a module's
    parameters when their next use in the trace (forward order, then backward in reverse) lies within
    ``stage3_max_reuse_distance`` elements, or within the prefetch window (``stage3_prefetch_bucket_size``), which
    does not protect the top-level module's own parameters (checked on gloo: ``measure_comm.py``). The distance to a
    module's backward use is taken as 2 x the elements of the modules registered after it."""
    modules: List[str] = []
    numel: Dict[str, int] = {}
    for p in net.params:
        if p.module not in numel:
            modules.append(p.module)
            numel[p.module] = 0
        numel[p.module] += p.numel
    after, acc = {}, 0
    for m in reversed(modules):
        after[m] = acc
        acc += numel[m]

    def kept(m: str) -> bool:
        d = 2 * after[m]
        return d < spec.ds_max_reuse or (m != "" and d < spec.ds_prefetch_bucket)

    return [p for p in net.params if not zero3_persistent(p, spec) and not kept(p.module)]


def _by_module(params: Sequence[Param]) -> List[List[Param]]:
    out: Dict[str, List[Param]] = {}
    for p in params:
        out.setdefault(p.module, []).append(p)
    return list(out.values())


def step_ops(net: Net, spec: EngineSpec, world: int) -> List[Op]:
    """Collectives of one optimizer step on each rank (identical on every rank), in issue order."""
    if world < 1:
        raise ValueError(f"world size {world} < 1")
    if world == 1:
        return []
    train = [p for p in net.params if p.trainable]
    rd, pd = spec.reduce_dtype, spec.param_dtype
    ops: List[Op] = []
    if spec.kind == "ddp":
        mib = 1 << 20
        caps = (spec.ddp_first_bucket_mb * mib, spec.ddp_bucket_mb * mib)
        for b in _greedy_buckets(train[::-1], lambda p: p.numel * spec.ddp_param_bytes, lambda i: caps[min(i, 1)],
                                 flush_before=False):
            ops.append(Op("all_reduce", "world", world, sum(p.numel for p in b), rd, "bwd",
                          ready=max(net.grad_ready(p) for p in b)))
        return ops
    if spec.kind in ("fsdp2", "hsdp"):
        g = world
        if spec.kind == "hsdp":
            g = spec.shard_size
            if g < 1 or world % g or g == world:
                raise ValueError(f"hsdp: shard_size {g} must divide the world size {world} and be smaller")
        grp = "shard" if spec.kind == "hsdp" else "world"
        units = range(net.n_units)
        gather = {u: sum(fsdp_padded(p, g) for p in net.unit_params(u)) for u in units}
        reduce = {u: sum(fsdp_padded(p, g) for p in net.unit_params(u) if p.trainable) for u in units}
        for u in units:
            ops.append(Op("all_gather", grp, g, gather[u], pd, "fwd", u))
        bwd_order = list(range(net.n_units - 1, 0, -1)) + [0]
        for u in bwd_order:
            if spec.reshard_after_forward:
                ops.append(Op("all_gather", grp, g, gather[u], pd, "bwd", u))
        for u in bwd_order:
            if reduce[u]:
                ops.append(Op("reduce_scatter", grp, g, reduce[u], rd, "bwd", u))
                if spec.kind == "hsdp":
                    ops.append(Op("all_reduce", "replicate", world // g, reduce[u] // g, rd, "bwd", u))
        return ops
    if spec.kind in ("zero1", "zero2"):
        for b in _greedy_buckets(net.grad_order(), lambda p: p.numel, lambda i: spec.ds_reduce_bucket,
                             flush_before=True):
            ops.append(Op("all_reduce", "world", world, sum(p.numel for p in b), rd, "bwd",
                          ready=max(net.grad_ready(p) for p in b) if spec.kind == "zero2" else 1.0))
        groups = sorted({p.group for p in train})
        for gi in groups:
            n = sum(p.numel for p in train if p.group == gi)
            ops.append(Op("all_gather", "world", world, _ceil_to(n, spec.ds_align * world), pd, "step"))
        return ops
    # zero3: gathers coalesced per module (DeepSpeed fetches a module's parameters together)
    regather = {p.name for p in zero3_regathered(net, spec)}
    live = [p for p in net.params if not zero3_persistent(p, spec)]
    for ps in _by_module(live):
        ops.append(Op("all_gather", "world", world, sum(_ceil_to(p.numel, world) for p in ps), pd, "fwd", ps[0].unit))
    for ps in _by_module([p for p in reversed(net.params) if p.name in regather]):
        ops.append(Op("all_gather", "world", world, sum(_ceil_to(p.numel, world) for p in ps), pd, "bwd", ps[0].unit))
    for b in _greedy_buckets(net.grad_order(), lambda p: p.numel, lambda i: spec.ds_reduce_bucket,
                             flush_before=True):
        last = b[-1]                                     # the bucket is reduced once its last gradient exists
        ops.append(Op("reduce_scatter", "world", world, sum(_ceil_to(p.numel, world) for p in b), rd, "bwd",
                      last.unit, ready=net.grad_ready(last)))
    persistent = [p for p in net.params if zero3_persistent(p, spec)]
    if persistent:                                       # updated partitions of the persistent parameters
        ops.append(Op("all_gather", "world", world, sum(_ceil_to(p.numel, world) for p in persistent), pd, "step"))
    return ops


def sent_bytes(ops: Sequence[Op]) -> float:
    """Bytes one rank sends (= receives) per step."""
    return sum(op.send_bytes for op in ops)


# ------------------------------------------------------------------------------------------------ links and time

@dataclass(frozen=True)
class Card:
    name: str
    peak_tflops: float          # dense bf16
    nvlink_GBps: float          # NVLink per GPU and direction
    nic_Gbps: float             # inter-node network per GPU (one NIC per GPU)


# NVLink 4 on all three: 900 GB/s bidirectional = 450 GB/s per direction. Inter-node: 400 Gb/s per GPU
# (8 x ConnectX-7 NDR per HGX node) assumed for all three.
CARDS = {"H100": Card("H100", 989.4, 450.0, 400.0), "H200": Card("H200", 989.4, 450.0, 400.0),
         "H20": Card("H20", 148.0, 450.0, 400.0)}


@dataclass(frozen=True)
class LinkModel:
    gpus_per_node: int = 8
    nvlink_eff: float = 0.80        # achieved / nominal bus bandwidth (NCCL on NVLink)
    nic_eff: float = 0.80           # achieved / nominal on the inter-node network
    alpha_intra_us: float = 10.0    # fixed cost of one collective within a node
    alpha_inter_us: float = 25.0    # ... and across nodes
    net_share: str = "ring"         # "ring": 1/m of the traffic crosses the NIC (m members per node); "all": all

    def __post_init__(self):
        if self.net_share not in ("ring", "all"):
            raise ValueError(f"net_share={self.net_share!r}: use ring or all")


def group_layout(op: Op, world: int, spec: EngineSpec, gpn: int) -> Tuple[int, int]:
    """(nodes the group spans, group members per node) with ranks packed node by node."""
    if op.group == "world":
        return -(-world // gpn), min(world, gpn)
    s = spec.shard_size
    if op.group == "shard":
        return -(-s // gpn), min(s, gpn)
    # replicate: the ranks with the same index inside their shard group
    if s >= gpn:
        return op.size, 1
    return -(-world // gpn), gpn // s


def op_seconds(op: Op, card: Card, link: LinkModel, world: int, spec: EngineSpec) -> float:
    v = op.send_bytes
    if v <= 0:
        return 0.0
    nodes, per_node = group_layout(op, world, spec, link.gpus_per_node)
    nvl = card.nvlink_GBps * 1e9 * link.nvlink_eff
    if nodes <= 1:
        return link.alpha_intra_us * 1e-6 + v / nvl
    nic = card.nic_Gbps / 8 * 1e9 * link.nic_eff
    share = 1.0 / per_node if link.net_share == "ring" else 1.0
    t_nvl = v / nvl if per_node > 1 else 0.0
    return link.alpha_inter_us * 1e-6 + max(t_nvl, v * share / nic)


@dataclass
class StepTime:
    compute_s: float
    step_s: float
    comm_busy_s: float       # sum of the collectives' times
    sent_bytes: float        # per rank

    @property
    def exposed_s(self) -> float:
        return self.step_s - self.compute_s

    @property
    def efficiency(self) -> float:
        return self.compute_s / self.step_s if self.step_s else 1.0


def _fifo(chan: float, start: float, dur: float) -> float:
    return max(chan, start) + dur


def simulate(net: Net, spec: EngineSpec, ops: Sequence[Op], *, t_fwd: float, t_bwd: float, t_pre: float,
             card: Card, link: LinkModel, world: int) -> StepTime:
    """Step time under the overlap model of the module docstring. ``t_pre``: compute before the forward that hides
    no communication (online VAE encoding)."""
    sec = [op_seconds(op, card, link, world, spec) for op in ops]
    step = timeline(net.weights(), spec, ops, sec, t_fwd=t_fwd, t_bwd=t_bwd, t_pre=t_pre)
    return StepTime(t_pre + t_fwd + t_bwd, step, sum(sec), sent_bytes(ops))


def timeline(w: Sequence[float], spec: EngineSpec, ops: Sequence[Op], sec: Sequence[float], *, t_fwd: float,
             t_bwd: float, t_pre: float = 0.0) -> float:
    """Step time from each collective's duration ``sec[i]`` and the units' compute shares ``w`` (unit 0 = root)."""
    compute = t_pre + t_fwd + t_bwd
    if not ops:
        return compute
    post = sum(s for op, s in zip(ops, sec) if op.phase == "step")
    if spec.kind == "ddp" or (spec.kind in ("zero1", "zero2") and spec.overlap_comm):
        chan = 0.0
        for op, s in zip(ops, sec):
            if op.phase != "step":
                chan = _fifo(chan, t_pre + t_fwd + t_bwd * op.ready, s)
        return max(compute, chan) + post
    if spec.kind in ("zero1", "zero2"):
        return compute + sum(sec)
    # fsdp2 / hsdp / zero3: per-unit pipeline, gathers one unit ahead
    n = len(w)
    fwd_ag, bwd_ag, red = [0.0] * n, [0.0] * n, [0.0] * n
    for op, s in zip(ops, sec):
        if op.phase == "step":
            continue
        if op.kind == "all_gather":
            (fwd_ag if op.phase == "fwd" else bwd_ag)[op.unit] += s
        else:
            red[op.unit] += s
    chan, t, gate = 0.0, t_pre, 0.0
    for u in range(n):                                   # forward: root, then the blocks
        ag_end = chan = _fifo(chan, gate, fwd_ag[u])
        gate = start = max(t, ag_end)                    # the next unit's gather may start now
        t = start + t_fwd * w[u]
    order = list(range(n - 1, 0, -1)) + [0]              # backward: the blocks in reverse, the root last
    ag_end = chan = _fifo(chan, t, bwd_ag[order[0]])
    for k, u in enumerate(order):
        start = max(t, ag_end)
        if k + 1 < len(order):
            ag_end = chan = _fifo(chan, start, bwd_ag[order[k + 1]])
        t = start + t_bwd * w[u]
        chan = _fifo(chan, t, red[u])
    return max(t, chan) + post


# ------------------------------------------------------------------------------------------------ runs

@dataclass(frozen=True)
class Run:
    """A training run: ``steps`` optimizer steps of ``global_batch`` samples of the model ``model``."""

    key: str
    what: str
    model: str               # short model name (MAE-XL, DiT-XL/2, SiT-XL/2)
    steps: float
    global_batch: int


def project(net: Net, spec: EngineSpec, card: Card, link: LinkModel, *, rate: float, global_batch: int,
            nodes: int = 0, world: int = 0, pre_s_per_sample: float = 0.0) -> StepTime:
    """One step of ``global_batch`` on ``world`` GPUs (or ``nodes`` x gpus_per_node) at ``rate`` samples/s per GPU.
    ``pre_s_per_sample``: extra serial compute per sample before the forward (online VAE encoding)."""
    if rate <= 0:
        raise ValueError(f"rate {rate} samples/s must be > 0")
    world = world or nodes * link.gpus_per_node
    if world < 1 or global_batch % world:
        raise ValueError(f"global batch {global_batch} does not split over {world} GPUs")
    local = global_batch // world
    t = local / rate
    s = spec
    if s.kind == "hsdp" and world <= s.shard_size:   # one shard group: plain FSDP2 over the world
        s = replace(s, kind="fsdp2")
    ops = step_ops(net, s, world)
    return simulate(net, s, ops, t_fwd=t / 3, t_bwd=2 * t / 3, t_pre=local * pre_s_per_sample, card=card, link=link,
                    world=world)


def run_days(run: Run, step: StepTime, world: int) -> Tuple[float, float]:
    """(wall-days, GPU-days) of ``run`` at ``step``."""
    wall = run.steps * step.step_s / 86400
    return wall, wall * world


# ------------------------------------------------------------------------------------------------ real models

def build_net(short: str) -> Net:
    """The :class:`Net` of a model of ``benchmarks/train/bench_step.py``'s ``MODELS`` (e.g. MAE-XL, DiT-XL/2,
    MAE-tiny), built by its task on the meta device, with the task's optimizer param groups."""
    import os
    import sys

    import torch

    here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, os.path.join(os.path.dirname(here), "train"))
    sys.path.insert(0, os.path.dirname(os.path.dirname(here)))
    from bench_step import MODELS

    from usp_scale.config import JobConfig
    from usp_scale.training.tasks import build_task

    if short not in MODELS:
        raise ValueError(f"model {short!r}: use one of {', '.join(MODELS)}")
    task_name, reg, side = MODELS[short]
    cfg = JobConfig()
    cfg.task, cfg.model.name, cfg.model.img_size = task_name, reg, side
    task = build_task(cfg)
    with torch.device("meta"):
        model = task.build_model()
    return net_from_module(model, short, task.param_groups(model))


def net_from_module(model, name: str, groups: Optional[list] = None) -> Net:
    """A :class:`Net` from a torch module: units = ``blocks`` then ``decoder_blocks`` (as the engines wrap them),
    tokens per block from the model's patch count (an MAE's encoder sees the 25 % kept + cls, its decoder all + cls;
    DiT/SiT all patches; a ViT all + cls)."""
    from usp_scale.layers.masking import num_kept

    L = getattr(model, "num_patches", None)
    L = L() if callable(L) else L
    if L is None:
        L = model.patch_embed.num_patches
    mae = hasattr(model, "decoder_blocks")
    dit = hasattr(model, "x_embedder")
    unit_of, names, tokens = {}, ["root"], [0]
    for attr in ("blocks", "decoder_blocks"):
        for i, b in enumerate(getattr(model, attr, None) or []):
            names.append(f"{attr}.{i}")
            tokens.append((L + 1) if attr == "decoder_blocks" else (num_kept(L, 0.75) + 1) if mae else
                          L if dit else L + 1)
            for p in b.parameters():
                unit_of[id(p)] = len(names) - 1
    group_of = {}
    for gi, g in enumerate(groups or []):
        for p in g["params"]:
            group_of[id(p)] = gi
    params = [Param(n, tuple(p.shape), bool(p.requires_grad), unit_of.get(id(p), 0),
                    group_of.get(id(p), 0) if p.requires_grad else -1) for n, p in model.named_parameters()]
    return Net(name, params, names, tokens)


__all__ = ["DTYPE_BYTES", "KINDS", "ENGINE_KINDS", "Param", "Net", "EngineSpec", "Op", "ring_send_bytes",
           "fsdp_padded", "step_ops", "sent_bytes", "Card", "CARDS", "LinkModel", "op_seconds", "StepTime",
           "simulate", "Run", "project", "run_days", "build_net", "net_from_module", "zero3_regathered"]
