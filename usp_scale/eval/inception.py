"""The Inception network of the ADM evaluator (TF graph ``classify_image_graph_def.pb``, 2015-12-05) in torch.

One table, :data:`CONVS`, lists every convolution of the graph in graph order: its TF name (``mixed_6/conv``),
its key in torch-fidelity's weight file (``Mixed_6d.branch1x1``), kernel, stride, padding and the standard
number of output channels. The network (:class:`Inception2015`), the converter from the TF graph
(:mod:`usp_scale.eval.inception_graph`) and the test-graph writer all read it, so the three cannot disagree.

What the graph does, and so this module (uint8 NHWC images fed as float32 into ``ExpandDims:0``):

1. ``ResizeBilinear`` to 299 x 299, TF 1 semantics (``align_corners=False``, no half-pixel centres: source
   coordinate ``i * in/out``) in float32 (:func:`resize_bilinear_tf1`); the ADM evaluator feeds 256 x 256.
2. ``Sub`` 128, ``Mul`` 1/128.
3. Conv2D (no bias) -> BatchNormWithGlobalNormalization (eps 0.001) -> ReLU for every entry of :data:`CONVS`;
   TF "SAME" padding of the stride-1 convolutions is symmetric (odd kernels), the stride-2 ones are "VALID".
4. Pooling: the stem's max pools 3x3/2 VALID; the towers' 3x3/1 SAME average pools exclude the padding from
   the count; ``mixed_10``'s tower pool is a max pool (the graph's own quirk); ``pool_3`` averages 8 x 8.
5. Outputs the evaluator reads: ``pool_3`` (N, 2048); ``mixed_6/conv`` (the 1x1 branch of mixed_6 after BN +
   ReLU, N x 17 x 17 x 192), of which ADM keeps channels 0..6 in (h, w, c) order (2,023 values); and
   ``softmax/logits/MatMul``, pool_3 times ``softmax/weights`` without the bias (IS uses its softmax).

State-dict keys are torch-fidelity's (``weights-inception-2015-12-05-6726825d.pth``), so that file and the
converter's output load alike. Channel counts are read from the weights (:meth:`Inception2015.from_state_dict`),
so the small test graphs of :mod:`usp_scale.eval.inception_graph` (``--width``) load too.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..runtime import full_fp32

INPUT_SIZE = 299
BN_EPS = 1e-3
NUM_CLASSES = 1008          # softmax/weights: 2048 x 1008 (1,000 ImageNet classes + 8 unused)
SPATIAL_CHANNELS = 7        # ADM keeps mixed_6/conv[..., :7]
# Feature names (the same as torch-fidelity's extractor uses, so caches and records read alike)
POOL = "2048"
SPATIAL = "mixed_6_conv_7ch"
LOGITS = "logits_unbiased"
FEATURES = (POOL, SPATIAL, LOGITS)


@dataclass(frozen=True)
class ConvSpec:
    tf: str          # TF name scope: <tf>/conv2d_params, <tf>/Conv2D, <tf>/batchnorm, <tf> (the ReLU)
    pt: str          # torch-fidelity key prefix: <pt>.conv.weight, <pt>.bn.{weight,bias,running_mean,running_var}
    kernel: tuple    # (kh, kw)
    stride: int
    padding: str     # "SAME" or "VALID"
    out: int         # output channels of the real graph


def _block_convs() -> list:
    c = []

    def add(tf, pt, k, out, stride=1, padding="SAME"):
        c.append(ConvSpec(tf, pt, (k, k) if isinstance(k, int) else tuple(k), stride, padding, out))

    add("conv", "Conv2d_1a_3x3", 3, 32, 2, "VALID")
    add("conv_1", "Conv2d_2a_3x3", 3, 32, 1, "VALID")
    add("conv_2", "Conv2d_2b_3x3", 3, 64)
    add("conv_3", "Conv2d_3b_1x1", 1, 80, 1, "VALID")
    add("conv_4", "Conv2d_4a_3x3", 3, 192, 1, "VALID")
    for tf, pt, pool in (("mixed", "Mixed_5b", 32), ("mixed_1", "Mixed_5c", 64), ("mixed_2", "Mixed_5d", 64)):
        add(f"{tf}/conv", f"{pt}.branch1x1", 1, 64)
        add(f"{tf}/tower/conv", f"{pt}.branch5x5_1", 1, 48)
        add(f"{tf}/tower/conv_1", f"{pt}.branch5x5_2", 5, 64)
        add(f"{tf}/tower_1/conv", f"{pt}.branch3x3dbl_1", 1, 64)
        add(f"{tf}/tower_1/conv_1", f"{pt}.branch3x3dbl_2", 3, 96)
        add(f"{tf}/tower_1/conv_2", f"{pt}.branch3x3dbl_3", 3, 96)
        add(f"{tf}/tower_2/conv", f"{pt}.branch_pool", 1, pool)
    add("mixed_3/conv", "Mixed_6a.branch3x3", 3, 384, 2, "VALID")
    add("mixed_3/tower/conv", "Mixed_6a.branch3x3dbl_1", 1, 64)
    add("mixed_3/tower/conv_1", "Mixed_6a.branch3x3dbl_2", 3, 96)
    add("mixed_3/tower/conv_2", "Mixed_6a.branch3x3dbl_3", 3, 96, 2, "VALID")
    for tf, pt, c7 in (("mixed_4", "Mixed_6b", 128), ("mixed_5", "Mixed_6c", 160), ("mixed_6", "Mixed_6d", 160),
                       ("mixed_7", "Mixed_6e", 192)):
        add(f"{tf}/conv", f"{pt}.branch1x1", 1, 192)
        add(f"{tf}/tower/conv", f"{pt}.branch7x7_1", 1, c7)
        add(f"{tf}/tower/conv_1", f"{pt}.branch7x7_2", (1, 7), c7)
        add(f"{tf}/tower/conv_2", f"{pt}.branch7x7_3", (7, 1), 192)
        add(f"{tf}/tower_1/conv", f"{pt}.branch7x7dbl_1", 1, c7)
        add(f"{tf}/tower_1/conv_1", f"{pt}.branch7x7dbl_2", (7, 1), c7)
        add(f"{tf}/tower_1/conv_2", f"{pt}.branch7x7dbl_3", (1, 7), c7)
        add(f"{tf}/tower_1/conv_3", f"{pt}.branch7x7dbl_4", (7, 1), c7)
        add(f"{tf}/tower_1/conv_4", f"{pt}.branch7x7dbl_5", (1, 7), 192)
        add(f"{tf}/tower_2/conv", f"{pt}.branch_pool", 1, 192)
    add("mixed_8/tower/conv", "Mixed_7a.branch3x3_1", 1, 192)
    add("mixed_8/tower/conv_1", "Mixed_7a.branch3x3_2", 3, 320, 2, "VALID")
    add("mixed_8/tower_1/conv", "Mixed_7a.branch7x7x3_1", 1, 192)
    add("mixed_8/tower_1/conv_1", "Mixed_7a.branch7x7x3_2", (1, 7), 192)
    add("mixed_8/tower_1/conv_2", "Mixed_7a.branch7x7x3_3", (7, 1), 192)
    add("mixed_8/tower_1/conv_3", "Mixed_7a.branch7x7x3_4", 3, 192, 2, "VALID")
    for tf, pt in (("mixed_9", "Mixed_7b"), ("mixed_10", "Mixed_7c")):
        add(f"{tf}/conv", f"{pt}.branch1x1", 1, 320)
        add(f"{tf}/tower/conv", f"{pt}.branch3x3_1", 1, 384)
        add(f"{tf}/tower/mixed/conv", f"{pt}.branch3x3_2a", (1, 3), 384)
        add(f"{tf}/tower/mixed/conv_1", f"{pt}.branch3x3_2b", (3, 1), 384)
        add(f"{tf}/tower_1/conv", f"{pt}.branch3x3dbl_1", 1, 448)
        add(f"{tf}/tower_1/conv_1", f"{pt}.branch3x3dbl_2", 3, 384)
        add(f"{tf}/tower_1/mixed/conv", f"{pt}.branch3x3dbl_3a", (1, 3), 384)
        add(f"{tf}/tower_1/mixed/conv_1", f"{pt}.branch3x3dbl_3b", (3, 1), 384)
        add(f"{tf}/tower_2/conv", f"{pt}.branch_pool", 1, 192)
    return c


CONVS = tuple(_block_convs())                 # 94 convolutions in graph order
CONV_BY_PT = {c.pt: c for c in CONVS}
SPATIAL_CONV = "Mixed_6d.branch1x1"           # TF mixed_6/conv
# The blocks in order: (torch-fidelity module, TF scope, kind); the kind says how the block joins its branches
BLOCKS = (("Mixed_5b", "mixed", "A"), ("Mixed_5c", "mixed_1", "A"), ("Mixed_5d", "mixed_2", "A"),
          ("Mixed_6a", "mixed_3", "B"), ("Mixed_6b", "mixed_4", "C"), ("Mixed_6c", "mixed_5", "C"),
          ("Mixed_6d", "mixed_6", "C"), ("Mixed_6e", "mixed_7", "C"), ("Mixed_7a", "mixed_8", "D"),
          ("Mixed_7b", "mixed_9", "E"), ("Mixed_7c", "mixed_10", "E"))


def standard_channels(width: float = 1.0) -> Dict[str, int]:
    """Output channels of every convolution (torch-fidelity prefix -> count): the real graph's at ``width`` 1,
    scaled (at least 8, so that ADM's 7 spatial channels exist) for the small test graphs."""
    return {c.pt: c.out if width == 1.0 else max(8, int(round(c.out * width))) for c in CONVS}


# --------------------------------------------------------------------------- the graph's resize
def resize_bilinear_tf1(x: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """TF 1 ``ResizeBilinear`` (align_corners=False, half_pixel_centers=False) of float32 (N, C, H, W) to
    (size, size): source coordinate ``in = float32(i) * float32(in_size / size)``, neighbours ``floor(in)`` and
    ``min(ceil(in), in_size - 1)``, weights ``in - floor(in)``; ``top + (bottom - top) * dy`` in float32."""
    def axis(n_in: int):
        scale = torch.tensor(n_in, dtype=torch.float32) / torch.tensor(size, dtype=torch.float32)
        src = torch.arange(size, dtype=torch.float32, device=x.device) * scale.to(x.device)
        lo = torch.floor(src)
        hi = torch.clamp(torch.ceil(src), max=n_in - 1).long()
        return lo.long(), hi, src - lo

    if x.shape[-2:] == (size, size):
        return x                                  # scale 1: the graph's resize is the identity
    y0, y1, dy = axis(x.shape[-2])
    x0, x1, dx = axis(x.shape[-1])
    rows0, rows1 = x[..., y0, :], x[..., y1, :]
    tl, tr, bl, br = rows0[..., x0], rows0[..., x1], rows1[..., x0], rows1[..., x1]
    top = tl + (tr - tl) * dx
    bottom = bl + (br - bl) * dx
    return top + (bottom - top) * dy[:, None]


# --------------------------------------------------------------------------- the network
class BasicConv(nn.Module):
    """Conv2D (no bias) -> BatchNormWithGlobalNormalization -> ReLU (keys ``conv.weight``, ``bn.*``)."""

    def __init__(self, cin: int, spec: ConvSpec, out: int):
        super().__init__()
        kh, kw = spec.kernel
        if spec.padding == "SAME":
            if spec.stride != 1 or kh % 2 == 0 or kw % 2 == 0:
                raise ValueError(f"{spec.tf}: SAME padding is symmetric only for stride 1 and odd kernels")
            pad = (kh // 2, kw // 2)
        else:
            pad = (0, 0)
        self.conv = nn.Conv2d(cin, out, (kh, kw), stride=spec.stride, padding=pad, bias=False)
        self.bn = nn.BatchNorm2d(out, eps=BN_EPS)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg_same(x):
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


def _max_same(x):
    return F.max_pool2d(x, 3, stride=1, padding=1)


def _max_valid(x):
    return F.max_pool2d(x, 3, stride=2)


class _Block(nn.Module):
    """One mixed block; its convolutions are attributes named as in torch-fidelity (``branch1x1``, ...)."""

    def __init__(self, prefix: str, kind: str, cin: int, ch: Dict[str, int], tower_pool: str = "avg"):
        super().__init__()
        self.kind, self.tower_pool = kind, tower_pool
        names = [c.pt[len(prefix) + 1:] for c in CONVS if c.pt.startswith(prefix + ".")]
        width = {}
        for n in names:                             # in-channels: the block input or the previous conv of a tower
            spec = CONV_BY_PT[f"{prefix}.{n}"]
            width[n] = cin if self._first(n) else width[self._prev(n)]
            setattr(self, n, BasicConv(width[n], spec, ch[spec.pt]))
            width[n] = ch[spec.pt]
        self.out_channels = self._out(width, cin)

    @staticmethod
    def _first(n: str) -> bool:
        return n in ("branch1x1", "branch3x3", "branch_pool") or n.endswith("_1")

    @staticmethod
    def _prev(n: str) -> str:
        if n.endswith(("_2a", "_2b")):
            return n[:-3] + "_1"
        if n.endswith(("_3a", "_3b")):
            return n[:-3] + "_2"
        stem, i = n.rsplit("_", 1)
        return f"{stem}_{int(i) - 1}"

    def _out(self, w: dict, cin: int) -> int:
        if self.kind == "A":
            return w["branch1x1"] + w["branch5x5_2"] + w["branch3x3dbl_3"] + w["branch_pool"]
        if self.kind == "B":
            return w["branch3x3"] + w["branch3x3dbl_3"] + cin
        if self.kind == "C":
            return w["branch1x1"] + w["branch7x7_3"] + w["branch7x7dbl_5"] + w["branch_pool"]
        if self.kind == "D":
            return w["branch3x3_2"] + w["branch7x7x3_4"] + cin
        return (w["branch1x1"] + w["branch3x3_2a"] + w["branch3x3_2b"] + w["branch3x3dbl_3a"]
                + w["branch3x3dbl_3b"] + w["branch_pool"])

    def forward(self, x):
        if self.kind == "A":
            return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                              self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                              self.branch_pool(_avg_same(x))], 1)
        if self.kind == "B":
            return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                              _max_valid(x)], 1)
        if self.kind == "C":
            t = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
            t1 = self.branch7x7dbl_1(x)
            for i in (2, 3, 4, 5):
                t1 = getattr(self, f"branch7x7dbl_{i}")(t1)
            return torch.cat([self.branch1x1(x), t, t1, self.branch_pool(_avg_same(x))], 1)
        if self.kind == "D":
            t1 = self.branch7x7x3_1(x)
            for i in (2, 3, 4):
                t1 = getattr(self, f"branch7x7x3_{i}")(t1)
            return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), t1, _max_valid(x)], 1)
        t = self.branch3x3_1(x)
        t1 = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = _avg_same(x) if self.tower_pool == "avg" else _max_same(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(t), self.branch3x3_2b(t),
                          self.branch3x3dbl_3a(t1), self.branch3x3dbl_3b(t1), self.branch_pool(pooled)], 1)


class Inception2015(nn.Module):
    """The ADM evaluator's Inception graph. ``forward(images, features)``: uint8 (N, 3, H, W) (or float in
    [0, 255]) -> {name: float32 (N, D)} for the requested :data:`FEATURES` (``2048`` = pool_3,
    ``mixed_6_conv_7ch`` = ADM's sFID features, ``logits_unbiased`` = softmax/logits/MatMul)."""

    def __init__(self, channels: Optional[Dict[str, int]] = None, num_classes: int = NUM_CLASSES):
        super().__init__()
        ch = channels or standard_channels()
        missing = [c.pt for c in CONVS if c.pt not in ch]
        if missing:
            raise ValueError(f"channel counts missing for {missing[:5]}")
        cin = 3
        for spec in CONVS[:5]:
            setattr(self, spec.pt, BasicConv(cin, spec, ch[spec.pt]))
            cin = ch[spec.pt]
        for pt, _tf, kind in BLOCKS:
            block = _Block(pt, kind, cin, ch, tower_pool="max" if pt == "Mixed_7c" else "avg")
            setattr(self, pt, block)
            cin = block.out_channels
        self.pool_dim = cin
        self.fc = nn.Linear(cin, num_classes)       # softmax/weights (transposed) and softmax/biases
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_state_dict(cls, sd: Dict[str, torch.Tensor], source: str = "state dict") -> "Inception2015":
        """Build with the channel counts of ``sd`` (torch-fidelity keys) and load it strictly; errors name
        ``source`` and the keys."""
        missing = [f"{c.pt}.conv.weight" for c in CONVS if f"{c.pt}.conv.weight" not in sd]
        if missing or "fc.weight" not in sd:
            raise ValueError(f"{source} is not the Inception-2015 network: missing {(missing + ['fc.weight'])[:4]} "
                             f"({len(missing)} convolutions missing; keys look like "
                             f"{sorted(sd)[:3] if sd else 'nothing'})")
        ch = {c.pt: int(sd[f"{c.pt}.conv.weight"].shape[0]) for c in CONVS}
        net = cls(ch, num_classes=int(sd["fc.weight"].shape[0]))
        sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
        want = {k: v.shape for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
        bad = [f"{k} {tuple(sd[k].shape)} (expected {tuple(s)})" for k, s in want.items()
               if k in sd and tuple(sd[k].shape) != tuple(s)]
        absent = [k for k in want if k not in sd]
        extra = [k for k in sd if k not in want]
        if bad or absent or extra:
            raise ValueError(f"{source} does not fit the Inception-2015 network: "
                             + "; ".join(p for p in (f"wrong shapes {bad[:3]}" if bad else "",
                                                     f"missing {absent[:4]}" if absent else "",
                                                     f"unexpected {extra[:4]}" if extra else "") if p))
        net.load_state_dict(sd, strict=False)
        return net

    @property
    def is_standard(self) -> bool:
        """True for the real graph's sizes (pool_3 2048-d, 1,008 classes)."""
        return self.pool_dim == 2048 and self.fc.out_features == NUM_CLASSES and all(
            getattr(self._conv(c.pt), "conv").out_channels == c.out for c in CONVS)

    def _conv(self, pt: str) -> BasicConv:
        m = self
        for part in pt.split("."):
            m = getattr(m, part)
        return m

    def feature_dims(self) -> Dict[str, int]:
        return {POOL: self.pool_dim, SPATIAL: 17 * 17 * SPATIAL_CHANNELS, LOGITS: self.fc.out_features}

    def forward(self, images: torch.Tensor, features: Sequence[str] = FEATURES) -> Dict[str, torch.Tensor]:
        bad = [f for f in features if f not in FEATURES]
        if bad:
            raise KeyError(f"Inception2015 provides {FEATURES}, not {bad}")
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images (N, 3, H, W), got {tuple(images.shape)}")
        want = set(features)
        out = {}
        with full_fp32():
            x = resize_bilinear_tf1(images.to(torch.float32))
            x = (x - 128.0) * 0.0078125                       # the graph's Sub and Mul
            x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
            x = _max_valid(x)
            x = _max_valid(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)))
            for pt, _tf, _kind in BLOCKS:
                x = getattr(self, pt)(x)
                if pt == "Mixed_6d" and SPATIAL in want:
                    # mixed_6/conv (BN + ReLU) recomputed from the block input would cost a conv; take the
                    # branch output, the first channels of the concat
                    sp = x[:, :SPATIAL_CHANNELS]
                    out[SPATIAL] = sp.permute(0, 2, 3, 1).reshape(len(sp), -1)
                    if want <= {SPATIAL}:
                        return out
            pool = F.avg_pool2d(x, kernel_size=8).flatten(1)       # pool_3: 8x8 VALID average
            if POOL in want:
                out[POOL] = pool
            if LOGITS in want:
                out[LOGITS] = pool @ self.fc.weight.T                # softmax/logits/MatMul: no bias
        return {k: out[k] for k in features}


def _calibration_images(g: torch.Generator, n: int) -> torch.Tensor:
    """float32 (n, 3, 299, 299) in [0, 255]: a mixture of the inputs the tests feed, already through the graph's
    resize: 8 px blocks of random colours plus noise at 256 and at 64 px, uniform noise at 299, smooth colour
    fields (4 x 4 upsampled) at 128."""
    out = []
    for i in range(n):
        kind = i % 4
        if kind == 2:
            x = torch.randint(0, 256, (1, 3, INPUT_SIZE, INPUT_SIZE), generator=g).float()
        else:
            side, block, noise = ((256, 8, 20.0), (64, 8, 35.0), None, (128, 32, 5.0))[kind]
            cells = -(-side // block)
            x = torch.randint(0, 256, (1, 3, cells, cells), generator=g).float()
            x = x.repeat_interleave(block, 2).repeat_interleave(block, 3)[..., :side, :side]
            x = (x + torch.randn(x.shape, generator=g) * noise).clamp(0, 255).round()
            x = resize_bilinear_tf1(x)
        out.append(x)
    return torch.cat(out)


@torch.no_grad()
def random_inception(seed: int, width: float = 1.0, calibrate_images: int = 8, pool_mean: float = 0.4,
                     logit_std: float = 2.0) -> Inception2015:
    """A seeded random network of the graph's structure (``width`` scales the channels), calibrated on seeded
    random images (a mixture of blocky, noisy and smooth ones, :func:`_calibration_images`) so that it behaves
    like the real one where the metrics look: every BatchNorm's statistics set to its input's (activations of
    unit scale through the 94 layers, for each kind of input), the last block scaled so that pool_3
    averages ``pool_mean`` (real pool_3 features are of that order), and ``softmax/weights`` orthogonal to the
    mean pool_3 direction with logits of spread ``logit_std`` (so that the softmax differs between images and IS
    is not 1). The test network of the TF comparison."""
    g = torch.Generator().manual_seed(int(seed))
    net = Inception2015(standard_channels(width))
    for name, p in net.named_parameters():
        if name.endswith("conv.weight"):
            p.copy_(torch.randn(p.shape, generator=g) * (2.0 / p[0].numel()) ** 0.5)
        elif name.endswith("bn.weight"):
            p.copy_(torch.rand(p.shape, generator=g) * 1.0 + 0.5)
        elif name.endswith("bn.bias"):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    images = _calibration_images(g, max(4, calibrate_images))
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in bns:                                   # one pass in training mode: running stats = the batch's
        m.reset_running_stats()
        m.momentum = None
    net.train()
    net(images, (POOL,))
    net.eval()
    for m in bns:
        m.momentum = 0.1
        m.running_var.clamp_(min=1e-3)
        m.num_batches_tracked.zero_()
    pool = net(images, (POOL,))[POOL].double()
    f = pool_mean / float(pool.mean())              # ReLU(f z) = f ReLU(z): scales pool_3 by f
    for spec, conv in iter_convs(net):
        if spec.pt.startswith("Mixed_7c."):
            conv.bn.weight.mul_(f)
            conv.bn.bias.mul_(f)
    pool = pool * f
    mu = pool.mean(0)
    u = mu / mu.norm()
    w = torch.randn(net.fc.weight.shape, generator=g, dtype=torch.float64)
    w -= (w @ u)[:, None] * u[None, :]              # no logit common to all images
    spread = float((pool @ w.T).std())
    net.fc.weight.copy_((w * (logit_std / max(spread, 1e-12))).float())
    net.fc.bias.copy_(torch.randn(net.fc.bias.shape, generator=g) * 0.1)
    return net.requires_grad_(False)


def iter_convs(net: Inception2015) -> Iterable:
    """(ConvSpec, BasicConv) of every convolution, in graph order."""
    for spec in CONVS:
        yield spec, net._conv(spec.pt)
