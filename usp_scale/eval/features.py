"""Feature extractors for the metrics.

* The Inception network (``inception-v3-compat``): the TF graph ``classify_image_graph_def.pb`` of the ADM
  evaluator, in two implementations, one per protocol (:mod:`usp_scale.eval.metrics`):
  ``protocol="adm"`` runs :class:`usp_scale.eval.inception.Inception2015` (the graph's ops in torch, checked against
  TensorFlow running the graph); ``protocol="torch-fidelity"`` runs torch-fidelity's port of the same network
  (``FeatureExtractorInceptionV3``), extended here with ADM's sFID features (:data:`INCEPTION_SPATIAL`: the first 7
  channels of ``mixed_6/conv``, the 1x1 branch of Mixed_6d, in TF's (h, w, c) order, 2,023 values).
  Weights are never downloaded: give the graph itself (``classify_image_graph_def.pb``, converted on load by
  :mod:`usp_scale.eval.inception_graph`), its conversion, or torch-fidelity's
  ``weights-inception-2015-12-05-6726825d.pth`` (a file or a folder holding one). A weights file is read with
  ``weights_only`` (:func:`usp_scale.checkpoint.safe_load.torch_load`), never by torch-fidelity's own
  ``torch.load(weights_only=False)``; a file whose name carries a hash prefix (``-6726825d.pth``) must match it.
* ``usp-synthetic``: a small CNN classifier trained by the project on the train split of the bundled synthetic
  dataset (``launchers/train_extractor.py``; weights, hash and val accuracy in
  ``usp_scale/assets/extractor/synthetic-cnn/``). FID / IS / KID / precision-recall of the small runs use it;
  its numbers mean something for that dataset only (IS tops out at its 10 classes). Real data uses Inception.
* ``usp-shapes``: the same network with a wider view (``extra=2``), trained on the shapes task of
  ``usp_scale/data/shapes.py`` (``usp_scale/assets/extractor/shapes-cnn/``); the effect benchmark's FID.
* ``usp-tiny``: a small fixed random conv net registered by this module for fast tests; its numbers are only
  comparable with other ``usp-tiny`` numbers and say nothing about image quality.
"""
from __future__ import annotations

import io
import os
import re
from typing import Dict, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor
from torch_fidelity.utils import create_feature_extractor

from ..fileio import sha256_file

INCEPTION_NAME = "inception-v3-compat"
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_FILE)
TINY_NAME = "usp-tiny"
SYNTHETIC_NAME = "usp-synthetic"
SYNTHETIC_ASSET = "synthetic-cnn"       # usp_scale/assets/extractor/<this>/
SHAPES_NAME = "usp-shapes"
SHAPES_ASSET = "shapes-cnn"
# sFID features: ADM's mixed_6/conv, channels 0..6, (h, w, c) order
INCEPTION_SPATIAL = "mixed_6_conv_7ch"
TINY_SPATIAL = "spatial"

# torch-fidelity's metric keys for default feature layers
_METRIC_KEY = {"fid": "fid", "kid": "kid", "pr": "prc", "is": "isc"}


GRAPH_FILE = "classify_image_graph_def.pb"
_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.(pth|pt)$")


def _default_weights_path() -> str:
    torch_home = os.environ.get("TORCH_HOME", os.path.join(os.path.expanduser("~"), ".cache", "torch"))
    return os.path.join(torch_home, "hub", "checkpoints", INCEPTION_FILE)


def resolve_inception_weights(path: Optional[str]) -> str:
    """The local Inception weights: ``path`` (the graph ``.pb``, a converted or torch-fidelity weights file, or a
    folder holding torch-fidelity's file or the graph), then ``$TORCH_HOME/hub/checkpoints/`` + torch-fidelity's
    file name. Raises FileNotFoundError saying what to download and where."""
    candidates = []
    if path:
        if os.path.isdir(path):
            candidates += [os.path.join(path, INCEPTION_FILE), os.path.join(path, GRAPH_FILE)]
        else:
            candidates.append(path)
    candidates.append(_default_weights_path())
    for c in candidates:
        if os.path.isfile(c):
            return c
    raise FileNotFoundError(
        f"Inception weights not found (looked at: {', '.join(candidates)}). Nothing is downloaded at run time: "
        f"give the ADM evaluator's graph {GRAPH_FILE} (--inception-graph; converted on load) or torch-fidelity's "
        f"{INCEPTION_FILE} (91 MB, {INCEPTION_URL}) as eval.inception_weights / --inception-weights, or put the "
        f"latter in {os.path.dirname(candidates[-1])}/. For a quick check without them use the test extractor "
        f"'{TINY_NAME}'.")


def load_inception_weights(path: str) -> Dict[str, torch.Tensor]:
    """The Inception state dict (torch-fidelity's keys) from ``path``: the TF graph (``.pb``, converted without
    TensorFlow), a ``.safetensors`` file, or a ``torch.save`` file read with ``weights_only`` (never unpickling
    code); a hash prefix in the file name (``-6726825d.pth``) must match the file's sha256. Every tensor must be
    finite. Errors name the file."""
    from ..checkpoint.safe_load import CheckpointFileError, read_safetensors, torch_load

    if not os.path.isfile(path):
        raise FileNotFoundError(f"Inception weights not found: {path}")
    if path.endswith(".pb"):
        from .inception_graph import convert_graph
        sd, _info = convert_graph(path)
        return sd
    if path.endswith(".safetensors"):
        sd = read_safetensors(path, what="Inception weights")
    else:
        m = _HASH_IN_NAME.search(os.path.basename(path))
        if m:
            digest = sha256_file(path)
            if not digest.startswith(m.group(1)):
                raise CheckpointFileError(
                    f"Inception weights {path}: sha256 {digest[:16]}... does not start with {m.group(1)}, the hash in "
                    "its name; the file is damaged or not the file it is named after. Nothing from it was loaded.")
        sd = torch_load(path, what="Inception weights")
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointFileError(f"Inception weights {path}: expected a dict of tensors (torch-fidelity's layout), "
                                  f"got {type(sd).__name__}")
    for k, v in sd.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise CheckpointFileError(f"Inception weights {path}: tensor {k!r} holds non-finite values (NaN/inf)")
    return sd


class _SmallExtractor(FeatureExtractorBase):
    """What torch-fidelity asks of the two small extractors: their features, the metric layers, no compilation,
    and a uint8 (N, 3, H, W) input check."""

    FEATURES = ("pool", "logits_unbiased", TINY_SPATIAL)
    DUMMY_SIDE = 32

    @classmethod
    def get_provided_features_list(cls):
        return cls.FEATURES

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return "logits_unbiased" if metric == "isc" else "pool"

    @staticmethod
    def can_be_compiled():
        return False

    @classmethod
    def get_dummy_input_for_compile(cls):
        return torch.zeros(1, 3, cls.DUMMY_SIDE, cls.DUMMY_SIDE, dtype=torch.uint8)

    @staticmethod
    def check_input(x: torch.Tensor) -> None:
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected uint8 (N, 3, H, W), got {x.dtype} {tuple(x.shape)}")


class TinyFeatureExtractor(_SmallExtractor):
    """uint8 (N, 3, H, W) -> 'pool' (N, 64) features and 'logits_unbiased' (N, 10); fixed seed-0 weights."""

    def __init__(self, name: str, features_list: Sequence[str], **kwargs):
        super().__init__(name, list(features_list))
        g = torch.Generator().manual_seed(0)
        self.conv1 = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(16, 64, 3, stride=2, padding=1)
        self.fc = nn.Linear(64, 10)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 / max(1, p[0].numel()) ** 0.5))
        self.requires_grad_(False)
        self.eval()

    def forward(self, x: torch.Tensor):
        self.check_input(x)
        h = (x.float() - 128.0) / 128.0
        h = F.interpolate(h, size=(32, 32), mode="bilinear", align_corners=False)
        h = F.relu(self.conv1(h))
        h = F.relu(self.conv2(h))                   # (N, 64, 8, 8)
        pool = h.mean(dim=(2, 3))                   # (N, 64)
        out = {"pool": pool, "logits_unbiased": self.fc(pool),
               TINY_SPATIAL: h[:, :7].permute(0, 2, 3, 1).reshape(len(h), -1)}   # (N, 8*8*7), like the sFID features
        return tuple(out[k] for k in self.features_list)


class SyntheticCNN(nn.Module):
    """The classifier behind ``usp-synthetic`` and ``usp-shapes``: images (N, 3, 64, 64) in [-1, 1] -> {"pool":
    (N, dim) after ReLU and global average pooling, "logits": (N, classes), "spatial": (N, 8*8*7) = the first 7
    channels of the 8x8 map in (h, w, c) order, like the sFID features}. Conv-BN-ReLU, strides 1, 2, 2, 2, then
    ``extra`` more stride-2 layers (8x8 -> 4x4 -> ...) before the pooling: without them a unit sees 17 px, too
    little to tell which of two objects is on top (``usp-shapes`` uses 2: 113 px, the whole image)."""

    SIZE = 64

    def __init__(self, num_classes: int = 10, width: int = 32, dim: int = 64, extra: int = 0):
        super().__init__()
        chans = [(3, width, 1), (width, 2 * width, 2), (2 * width, 4 * width, 2), (4 * width, 4 * width, 2)]
        layers = []
        for cin, cout, s in chans:
            layers += [nn.Conv2d(cin, cout, 3, stride=s, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
        self.features = nn.Sequential(*layers)                     # (N, 4w, 8, 8)
        more = []
        for _ in range(extra):
            more += [nn.Conv2d(4 * width, 4 * width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(4 * width),
                     nn.ReLU()]
        self.extra = nn.Sequential(*more)                          # (N, 4w, 8/2^extra, 8/2^extra)
        self.proj = nn.Sequential(nn.Conv2d(4 * width, dim, 1), nn.ReLU())
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> dict:
        if x.shape[-2:] != (self.SIZE, self.SIZE):
            x = F.interpolate(x, size=(self.SIZE, self.SIZE), mode="bilinear", align_corners=False, antialias=True)
        h = self.features(x)
        pool = self.proj(self.extra(h)).mean(dim=(2, 3))
        return {"pool": pool, "logits": self.fc(pool),
                TINY_SPATIAL: h[:, :7].permute(0, 2, 3, 1).reshape(len(h), -1)}


def load_synthetic_cnn(path: Optional[str] = None, asset: str = SYNTHETIC_ASSET) -> SyntheticCNN:
    """The shipped network ``asset`` (hash-checked; default ``usp-synthetic``'s), or the weights folder/file
    ``path`` written by launchers/train_extractor.py; in eval mode."""
    import json

    from safetensors.torch import load_file

    from .. import assets

    folder = path if path and os.path.isdir(path) else None
    if not path:
        folder = assets.verified_dir("extractor", asset)
    wfile = os.path.join(folder, "model.safetensors") if folder else path
    cfg = {}
    if folder and os.path.isfile(os.path.join(folder, "config.json")):
        with open(os.path.join(folder, "config.json")) as f:
            cfg = json.load(f)
    if not os.path.isfile(wfile):
        raise FileNotFoundError(f"feature extractor weights not found: {wfile} (train them with "
                                "`python launchers/train_extractor.py --out DIR`)")
    net = SyntheticCNN(**cfg)
    net.load_state_dict(load_file(wfile))
    return net.eval()


def _weights_tag(net: nn.Module) -> str:
    import hashlib

    h = hashlib.sha256()
    for k, v in sorted(net.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


class SyntheticFeatureExtractor(_SmallExtractor):
    """torch-fidelity wrapper of :class:`SyntheticCNN`: uint8 (N, 3, H, W) -> 'pool' (N, 64),
    'logits_unbiased' (N, classes) and :data:`TINY_SPATIAL` (N, 448). ``feature_extractor_weights_path``: other
    weights than the shipped ones (a folder or a .safetensors file from launchers/train_extractor.py)."""

    DUMMY_SIDE = 64
    ASSET = SYNTHETIC_ASSET

    def __init__(self, name: str, features_list: Sequence[str], feature_extractor_weights_path: Optional[str] = None,
                 **kwargs):
        super().__init__(name, list(features_list))
        self.net = load_synthetic_cnn(feature_extractor_weights_path, self.ASSET)
        # cached reference features are keyed by this too, so retrained weights never reuse stale features
        self.cache_tag = _weights_tag(self.net)
        self.requires_grad_(False)
        self.eval()

    def forward(self, x: torch.Tensor):
        self.check_input(x)
        out = self.net(x.float() / 127.5 - 1.0)
        out["logits_unbiased"] = out.pop("logits")
        return tuple(out[k] for k in self.features_list)


class ShapesFeatureExtractor(SyntheticFeatureExtractor):
    """``usp-shapes``: the same wrapper around the network trained on the shapes task (``data/shapes.py``: classes
    are two shapes in an arrangement, colour and texture random), so its features see shape and arrangement."""

    ASSET = SHAPES_ASSET


class InceptionV3WithSpatial(FeatureExtractorInceptionV3):
    """torch-fidelity's TF-compatible Inception with one more feature, :data:`INCEPTION_SPATIAL` (N, 2023) for
    sFID; every other feature is computed by the unchanged parent forward."""

    _LATE = ("768", "2048", "logits_unbiased", "logits")   # features computed after Mixed_6d

    def __init__(self, name, features_list, **kwargs):
        super().__init__(name, features_list, **kwargs)
        self._spatial: Optional[torch.Tensor] = None
        self.Mixed_6d.branch1x1.register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, module, inputs, output):
        self._spatial = output                      # (N, 192, 17, 17), after BN + ReLU like TF's mixed_6/conv

    @staticmethod
    def get_provided_features_list():
        return tuple(FeatureExtractorInceptionV3.get_provided_features_list()) + (INCEPTION_SPATIAL,)

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return FeatureExtractorInceptionV3.get_default_feature_layer_for_metric(metric)

    @staticmethod
    def can_be_compiled():
        return False

    def forward(self, x):
        want = list(self.features_list)
        base = [f for f in want if f != INCEPTION_SPATIAL]
        if INCEPTION_SPATIAL in want and not any(f in self._LATE for f in base):
            base.append("768")                      # run the parent at least through Mixed_6d
        saved, self.features_list = self.features_list, base
        try:
            feats = dict(zip(base, super().forward(x)))
        finally:
            self.features_list = saved
        if INCEPTION_SPATIAL in want:
            sp = self._spatial[:, :7]               # (N, 7, 17, 17)
            feats[INCEPTION_SPATIAL] = sp.permute(0, 2, 3, 1).reshape(len(sp), -1).to(torch.float32)
        self._spatial = None
        return tuple(feats[f] for f in want)


class AdmInceptionExtractor(FeatureExtractorBase):
    """The ADM protocol's Inception: :class:`usp_scale.eval.inception.Inception2015` behind torch-fidelity's
    extractor interface. Features ``2048`` (pool_3), :data:`INCEPTION_SPATIAL` (mixed_6/conv[..., :7]) and
    ``logits_unbiased`` (pool_3 x softmax/weights). ``state_dict``: torch-fidelity's layout
    (:func:`load_inception_weights`); ``cache_tag`` keys cached reference features by these weights."""

    def __init__(self, name: str, features_list: Sequence[str], state_dict: Dict[str, torch.Tensor],
                 source: str = "Inception weights", **kwargs):
        from .inception import FEATURES, Inception2015

        super().__init__(name, list(features_list))
        bad = [f for f in features_list if f not in FEATURES]
        if bad:
            raise KeyError(f"the ADM Inception provides {FEATURES}, not {bad}")
        self.net = Inception2015.from_state_dict(state_dict, source)
        self.cache_tag = _weights_tag(self.net)
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def get_provided_features_list():
        from .inception import FEATURES
        return FEATURES

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits_unbiased", "fid": "2048", "kid": "2048", "prc": "2048"}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 299, 299, dtype=torch.uint8)

    def forward(self, x: torch.Tensor):
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected uint8 (N, 3, H, W), got {x.dtype} {tuple(x.shape)}")
        out = self.net(x, self.features_list)
        return tuple(out[k] for k in self.features_list)


def register_extractor(name: str, cls) -> None:
    """Register ``cls`` (a torch-fidelity FeatureExtractorBase subclass) under ``name`` once."""
    if name in FEATURE_EXTRACTORS_REGISTRY:
        if FEATURE_EXTRACTORS_REGISTRY[name] is not cls:
            raise ValueError(f"a different feature extractor is already registered as {name!r}")
        return
    register_feature_extractor(name, cls)


register_extractor(TINY_NAME, TinyFeatureExtractor)
register_extractor(SYNTHETIC_NAME, SyntheticFeatureExtractor)
register_extractor(SHAPES_NAME, ShapesFeatureExtractor)
# Registered under its own name: torch-fidelity keeps its plain extractor as INCEPTION_NAME.
INCEPTION_SFID_NAME = INCEPTION_NAME + "+spatial"
register_extractor(INCEPTION_SFID_NAME, InceptionV3WithSpatial)
_SPATIAL_LAYER = {INCEPTION_NAME: INCEPTION_SPATIAL, INCEPTION_SFID_NAME: INCEPTION_SPATIAL, TINY_NAME: TINY_SPATIAL,
                  SYNTHETIC_NAME: TINY_SPATIAL, SHAPES_NAME: TINY_SPATIAL}


def default_layer(name: str, metric: str) -> str:
    """torch-fidelity's default feature layer of extractor ``name`` for ``metric`` (fid, kid, pr, is), or the
    spatial layer for ``sfid``."""
    if metric == "sfid":
        if name not in _SPATIAL_LAYER:
            raise KeyError(f"sFID needs spatial features, which feature extractor {name!r} does not provide; use "
                           f"{INCEPTION_NAME} (or {TINY_NAME} for tests)")
        return _SPATIAL_LAYER[name]
    if name not in FEATURE_EXTRACTORS_REGISTRY:
        raise KeyError(f"feature extractor {name!r} is not registered; known: {sorted(FEATURE_EXTRACTORS_REGISTRY)}")
    return FEATURE_EXTRACTORS_REGISTRY[name].get_default_feature_layer_for_metric(_METRIC_KEY[metric])


PROTOCOLS = ("adm", "torch-fidelity")


def is_inception(name: str) -> bool:
    return name in (INCEPTION_NAME, INCEPTION_SFID_NAME)


def create_extractor(name: str, layers: Sequence[str], device: torch.device | str = "cpu",
                     inception_weights: Optional[str] = None, protocol: str = "torch-fidelity") -> FeatureExtractorBase:
    """Extractor ``name`` producing ``layers``, on ``device``. For the Inception network ``protocol`` picks the
    implementation (module docstring) and ``inception_weights`` the weights (:func:`resolve_inception_weights`),
    which are read safely here in both cases."""
    device = torch.device(device)
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol {protocol!r}: choose from {PROTOCOLS}")
    layers = list(dict.fromkeys(layers))
    if is_inception(name):
        path = resolve_inception_weights(inception_weights)
        sd = load_inception_weights(path)
        if protocol == "adm":
            ext = AdmInceptionExtractor(f"{INCEPTION_NAME}@adm", layers, sd, source=path)
        else:
            # torch-fidelity's class reads its weights with torch.load(weights_only=False): hand it the tensors
            # loaded safely above, re-serialised by us in memory, never the user's file
            buf = io.BytesIO()
            torch.save({k: v for k, v in sd.items()}, buf)
            buf.seek(0)
            try:
                ext = create_feature_extractor(INCEPTION_SFID_NAME, layers, cuda=False, verbose=False,
                                               feature_extractor_weights_path=buf)
            except RuntimeError as e:
                raise ValueError(f"Inception weights {path} do not fit torch-fidelity's network (the real graph's "
                                 f"sizes): {str(e).splitlines()[0]}") from None
        return ext.requires_grad_(False).eval().to(device)
    if name not in FEATURE_EXTRACTORS_REGISTRY:
        raise KeyError(f"feature extractor {name!r} is not registered; known: {sorted(FEATURE_EXTRACTORS_REGISTRY)}")
    ext = create_feature_extractor(name, layers, cuda=False, verbose=False)
    return ext.to(device)
