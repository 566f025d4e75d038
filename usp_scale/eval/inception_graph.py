"""The ADM evaluator's Inception graph file (``classify_image_graph_def.pb``) <-> the torch weights we evaluate with.

* :func:`convert_graph` reads the frozen GraphDef directly (:mod:`usp_scale.eval.graphdef`; no TensorFlow) and
  returns torch-fidelity's state-dict layout (``Conv2d_1a_3x3.conv.weight``, ..., ``fc.weight``), checking on
  the way that the file is the Inception-2015 graph: the nodes ADM reads (``ExpandDims``, ``pool_3``,
  ``mixed_6/conv``, ``softmax/logits/MatMul``), the resize to 299 x 299 and the ``(x - 128) / 128``
  normalisation, and for each of the 94 convolutions of :data:`usp_scale.eval.inception.CONVS` its kernel,
  stride, padding and BatchNorm (epsilon 0.001; ``gamma`` used only where ``scale_after_normalization`` is set).
  Any difference is an error naming the file and the node.
* :func:`write_test_graph` writes the other direction for tests: a frozen GraphDef with the graph's node names,
  ops and attributes (``DecodeJpeg`` -> ``Cast`` -> ``ExpandDims`` -> ``ResizeBilinear`` -> ``Sub`` -> ``Mul``
  -> Conv2D / BatchNormWithGlobalNormalization / Relu ... -> ``pool_3`` -> ``softmax``) from a seeded random
  torch network (:func:`usp_scale.eval.inception.random_inception`), so TensorFlow can run it beside our
  evaluator. Nothing of the real weights is in it.

Command line::

    python -m usp_scale.eval.inception_graph convert classify_image_graph_def.pb inception-2015.pth
    python -m usp_scale.eval.inception_graph write-test-graph test_graph.pb --seed 0 [--width 0.25]
    python -m usp_scale.eval.inception_graph info classify_image_graph_def.pb
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, Optional, Tuple

import numpy as np
import torch

from ..fileio import sha256_file, write_with
from . import graphdef as G
from .inception import BLOCKS, BN_EPS, CONVS, INPUT_SIZE, iter_convs, random_inception

# The node names the ADM evaluator reads (evaluations/evaluator.py): the input it maps its images to, the two
# feature tensors and the MatMul whose weights give the IS logits.
ADM_NODES = ("ExpandDims", "pool_3", "mixed_6/conv", "softmax/logits/MatMul")
GRAPH_PRODUCER = 8        # BatchNormWithGlobalNormalization is deprecated from GraphDef version 9 on
_PASS_THROUGH = ("Identity", "CheckNumerics")


class InceptionGraphError(ValueError):
    """A .pb that is not the Inception-2015 graph the ADM evaluator uses."""


class _Reader:
    def __init__(self, graph: G.Graph, source: str):
        self.source = source
        self.nodes = graph.by_name()
        self.consumers: Dict[str, list] = {}
        for n in graph.nodes:
            for i in n.inputs:
                self.consumers.setdefault(self._base(i), []).append(n)

    @staticmethod
    def _base(inp: str) -> str:
        return inp.lstrip("^").split(":")[0]

    def fail(self, what: str):
        raise InceptionGraphError(f"{self.source} is not the Inception-2015 graph of the ADM evaluator "
                                  f"(classify_image_graph_def.pb): {what}")

    def node(self, name: str) -> G.Node:
        if name not in self.nodes:
            self.fail(f"it has no node {name!r}")
        return self.nodes[name]

    def resolve(self, inp: str) -> G.Node:
        """The node behind an input, through Identity / CheckNumerics."""
        n = self.node(self._base(inp))
        while n.op in _PASS_THROUGH and n.inputs:
            n = self.node(self._base(n.inputs[0]))
        return n

    def const(self, inp: str, what: str) -> np.ndarray:
        n = self.resolve(inp)
        if n.op != "Const" or not isinstance(n.attr.get("value"), G.Tensor):
            self.fail(f"{what} ({n.name}) is a {n.op}, not a constant")
        return n.attr["value"].array

    def consumer(self, name: str, op: str) -> G.Node:
        found = [n for n in self.consumers.get(name, []) if n.op == op]
        if len(found) != 1:
            self.fail(f"expected one {op} reading {name!r}, found {len(found)}")
        return found[0]


def _ints(v) -> list:
    return [int(x) for x in v] if isinstance(v, list) else []


def _check_preprocessing(r: _Reader) -> dict:
    """ExpandDims -> ResizeBilinear(299, 299) -> Sub 128 -> Mul 1/128, as the graph does it."""
    resize = r.consumer("ExpandDims", "ResizeBilinear")
    size = r.const(resize.inputs[1], "the resize size").reshape(-1).tolist()
    if size != [INPUT_SIZE, INPUT_SIZE] or resize.attr.get("align_corners", False) \
            or resize.attr.get("half_pixel_centers", False):
        r.fail(f"{resize.name} resizes to {size} (align_corners={resize.attr.get('align_corners')}, "
               f"half_pixel_centers={resize.attr.get('half_pixel_centers')}); expected [299, 299], both false")
    sub = r.consumer(resize.name, "Sub")
    mul = r.consumer(sub.name, "Mul")
    y_sub = float(r.const(sub.inputs[1], "the Sub constant"))
    y_mul = float(r.const(mul.inputs[1], "the Mul constant"))
    if y_sub != 128.0 or y_mul != 0.0078125:
        r.fail(f"the input normalisation is (x - {y_sub}) * {y_mul}; expected (x - 128) * 0.0078125")
    return {"resize": size, "sub": y_sub, "mul": y_mul, "first": mul.name}


def convert_graph(path: str) -> Tuple[Dict[str, torch.Tensor], dict]:
    """(torch-fidelity-layout state dict, info) of the Inception graph at ``path``; no TensorFlow needed.
    Raises :class:`InceptionGraphError` naming the file and what differs."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Inception graph not found: {path}")
    try:
        graph = G.read_graph(path)
    except G.GraphDefError as e:
        raise InceptionGraphError(str(e)) from None
    r = _Reader(graph, path)
    missing = [n for n in ADM_NODES if n not in r.nodes]
    if missing:
        r.fail(f"the node(s) {missing} the ADM evaluator reads are missing (it reads {list(ADM_NODES)})")
    info = {"path": os.path.abspath(path), "sha256": sha256_file(path), "producer": graph.producer,
            "nodes": len(graph.nodes)}
    info["preprocessing"] = _check_preprocessing(r)
    sd: Dict[str, torch.Tensor] = {}
    scale_flags = set()
    for spec in CONVS:
        w_name = f"{spec.tf}/conv2d_params"
        w = r.const(w_name, f"the weights of {spec.tf}")
        kh, kw = spec.kernel
        if w.ndim != 4 or tuple(w.shape[:2]) != (kh, kw):
            r.fail(f"{w_name} has shape {tuple(w.shape)}; expected a {kh}x{kw} kernel (kh, kw, in, out)")
        conv = r.consumer(w_name, "Conv2D")
        strides = _ints(conv.attr.get("strides"))
        padding = conv.attr.get("padding", b"").decode() if isinstance(conv.attr.get("padding"), bytes) else ""
        if strides != [1, spec.stride, spec.stride, 1] or padding != spec.padding:
            r.fail(f"{conv.name} has strides {strides} and padding {padding!r}; expected "
                   f"[1, {spec.stride}, {spec.stride}, 1] and {spec.padding!r}")
        df = conv.attr.get("data_format", b"NHWC")
        if df not in (b"NHWC", None):
            r.fail(f"{conv.name} has data_format {df!r}; expected NHWC")
        if spec.tf == "conv" and r.resolve(conv.inputs[0]).name != info["preprocessing"]["first"]:
            r.fail(f"{conv.name} does not read the normalised input {info['preprocessing']['first']!r}")
        bn = r.node(f"{spec.tf}/batchnorm")
        if bn.op != "BatchNormWithGlobalNormalization" or r.resolve(bn.inputs[0]).name != conv.name:
            r.fail(f"{bn.name} is a {bn.op} reading {bn.inputs[:1]}; expected BatchNormWithGlobalNormalization "
                   f"of {conv.name}")
        eps = float(bn.attr.get("variance_epsilon", float("nan")))
        if not np.isclose(eps, BN_EPS, rtol=1e-6):
            r.fail(f"{bn.name} has variance_epsilon {eps}; expected {BN_EPS}")
        if len(bn.inputs) != 5:
            r.fail(f"{bn.name} has {len(bn.inputs)} inputs; expected (t, mean, variance, beta, gamma)")
        mean, var, beta, gamma = (r.const(bn.inputs[i], f"{bn.name} input {i}").astype(np.float32)
                                  for i in (1, 2, 3, 4))
        scale = bool(bn.attr.get("scale_after_normalization", False))
        scale_flags.add(scale)
        out = w.shape[3]
        if any(a.shape != (out,) for a in (mean, var, beta, gamma)):
            r.fail(f"{bn.name}: its statistics do not have the {out} channels of {w_name}")
        relu = r.node(spec.tf)
        if relu.op != "Relu" or r.resolve(relu.inputs[0]).name != bn.name:
            r.fail(f"{spec.tf} is a {relu.op} of {relu.inputs[:1]}; expected the Relu of {bn.name}")
        sd[f"{spec.pt}.conv.weight"] = torch.from_numpy(np.ascontiguousarray(
            w.astype(np.float32).transpose(3, 2, 0, 1)))
        sd[f"{spec.pt}.bn.weight"] = torch.from_numpy(gamma.copy() if scale else np.ones(out, np.float32))
        sd[f"{spec.pt}.bn.bias"] = torch.from_numpy(beta.copy())
        sd[f"{spec.pt}.bn.running_mean"] = torch.from_numpy(mean.copy())
        sd[f"{spec.pt}.bn.running_var"] = torch.from_numpy(var.copy())
    mm = r.node("softmax/logits/MatMul")
    if mm.op != "MatMul" or mm.attr.get("transpose_b", False) or mm.attr.get("transpose_a", False):
        r.fail(f"softmax/logits/MatMul is a {mm.op} (transpose flags {mm.attr.get('transpose_a')}, "
               f"{mm.attr.get('transpose_b')}); expected a plain MatMul")
    w = r.const(mm.inputs[1], "softmax/logits/MatMul's weights").astype(np.float32)
    pool_dim = sd["Mixed_7c.branch1x1.conv.weight"].shape[1]
    if w.ndim != 2 or w.shape[0] != pool_dim:
        r.fail(f"the softmax weights have shape {tuple(w.shape)}; expected ({pool_dim}, classes)")
    bias = np.zeros(w.shape[1], np.float32)
    adds = [n for n in r.consumers.get("softmax/logits/MatMul", []) if n.op in ("BiasAdd", "Add", "AddV2")]
    if len(adds) == 1:
        bias = r.const(adds[0].inputs[1], "the softmax bias").astype(np.float32).reshape(-1)
    sd["fc.weight"] = torch.from_numpy(np.ascontiguousarray(w.T))
    sd["fc.bias"] = torch.from_numpy(bias.copy())
    info["scale_after_normalization"] = sorted(scale_flags)
    info["pool_dim"] = int(pool_dim)
    info["classes"] = int(w.shape[1])
    return sd, info


def save_weights(sd: Dict[str, torch.Tensor], out: str) -> str:
    """Write the converted weights: ``.safetensors`` by extension, else a plain ``torch.save`` dict (the layout
    of torch-fidelity's weights file, loadable with ``weights_only``). Atomic."""
    sd = {k: v.contiguous() for k, v in sd.items()}
    if out.endswith(".safetensors"):
        from safetensors.torch import save_file
        return write_with(out, lambda tmp: save_file(sd, tmp, metadata={"format": "pt"}))

    def save(tmp: str) -> None:
        with open(tmp, "wb") as f:
            torch.save(sd, f)
    return write_with(out, save)


# --------------------------------------------------------------------------- the test graph
def _f32(a) -> np.ndarray:
    return np.ascontiguousarray(a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else a, dtype=np.float32)


def graph_nodes(net, scale_after_normalization: bool = True) -> list:
    """Encoded NodeDefs of the Inception graph holding ``net``'s weights (an :class:`Inception2015`)."""
    FLOAT, INT32 = ("type", G.DT_FLOAT), ("type", G.DT_INT32)
    nodes = []

    def add(name, op, inputs=(), **attr):
        nodes.append(G.encode_node(name, op, inputs, attr))
        return name

    def const(name, arr, dtype=FLOAT):
        return add(name, "Const", dtype=dtype, value=np.asarray(arr))

    add("DecodeJpeg/contents", "Placeholder", dtype=("type", G.DT_STRING), shape=("shape", ()))
    add("DecodeJpeg", "DecodeJpeg", ["DecodeJpeg/contents"], channels=3, ratio=1, fancy_upscaling=True,
        try_recover_truncated=False, acceptable_fraction=1.0, dct_method=b"")
    add("Cast", "Cast", ["DecodeJpeg"], SrcT=("type", G.DT_UINT8), DstT=FLOAT)
    const("ExpandDims/dim", np.array(0, np.int32), INT32)
    add("ExpandDims", "ExpandDims", ["Cast", "ExpandDims/dim"], T=FLOAT, Tdim=INT32)
    const("ResizeBilinear/size", np.array([INPUT_SIZE, INPUT_SIZE], np.int32), INT32)
    add("ResizeBilinear", "ResizeBilinear", ["ExpandDims", "ResizeBilinear/size"], T=FLOAT, align_corners=False)
    const("Sub/y", np.array(128.0, np.float32))
    add("Sub", "Sub", ["ResizeBilinear", "Sub/y"], T=FLOAT)
    const("Mul/y", np.array(0.0078125, np.float32))
    add("Mul", "Mul", ["Sub", "Mul/y"], T=FLOAT)

    convs = {spec.tf: (spec, m) for spec, m in iter_convs(net)}

    def conv(tf, inp):
        spec, m = convs[tf]
        s = spec.stride
        const(f"{tf}/conv2d_params", _f32(m.conv.weight).transpose(2, 3, 1, 0))
        add(f"{tf}/Conv2D", "Conv2D", [inp, f"{tf}/conv2d_params"], T=FLOAT, strides=[1, s, s, 1],
            padding=spec.padding.encode(), use_cudnn_on_gpu=True)
        gamma = _f32(m.bn.weight) if scale_after_normalization else np.ones(m.bn.weight.shape, np.float32)
        for part, arr in (("beta", m.bn.bias), ("gamma", gamma), ("moving_mean", m.bn.running_mean),
                          ("moving_variance", m.bn.running_var)):
            const(f"{tf}/batchnorm/{part}", _f32(arr))
        add(f"{tf}/batchnorm", "BatchNormWithGlobalNormalization",
            [f"{tf}/Conv2D", f"{tf}/batchnorm/moving_mean", f"{tf}/batchnorm/moving_variance",
             f"{tf}/batchnorm/beta", f"{tf}/batchnorm/gamma"], T=FLOAT, variance_epsilon=float(BN_EPS),
            scale_after_normalization=bool(scale_after_normalization))
        return add(tf, "Relu", [f"{tf}/batchnorm"], T=FLOAT)

    def pool(name, op, inp, k, s, padding):
        return add(name, op, [inp], T=FLOAT, ksize=[1, k, k, 1], strides=[1, s, s, 1], padding=padding.encode(),
                   data_format=b"NHWC")

    def concat(name, inputs):
        const(f"{name}/concat_dim", np.array(3, np.int32), INT32)
        return add(name, "Concat", [f"{name}/concat_dim", *inputs], N=len(inputs), T=FLOAT)

    x = conv("conv_2", conv("conv_1", conv("conv", "Mul")))
    x = pool("pool", "MaxPool", x, 3, 2, "VALID")
    x = pool("pool_1", "MaxPool", conv("conv_4", conv("conv_3", x)), 3, 2, "VALID")
    for _pt, b, kind in BLOCKS:
        if kind == "A":
            parts = [conv(f"{b}/conv", x), conv(f"{b}/tower/conv_1", conv(f"{b}/tower/conv", x)),
                     conv(f"{b}/tower_1/conv_2", conv(f"{b}/tower_1/conv_1", conv(f"{b}/tower_1/conv", x))),
                     conv(f"{b}/tower_2/conv", pool(f"{b}/tower_2/pool", "AvgPool", x, 3, 1, "SAME"))]
        elif kind == "B":
            parts = [conv(f"{b}/conv", x),
                     conv(f"{b}/tower/conv_2", conv(f"{b}/tower/conv_1", conv(f"{b}/tower/conv", x))),
                     pool(f"{b}/pool", "MaxPool", x, 3, 2, "VALID")]
        elif kind == "C":
            t = conv(f"{b}/tower/conv_2", conv(f"{b}/tower/conv_1", conv(f"{b}/tower/conv", x)))
            t1 = conv(f"{b}/tower_1/conv", x)
            for i in (1, 2, 3, 4):
                t1 = conv(f"{b}/tower_1/conv_{i}", t1)
            parts = [conv(f"{b}/conv", x), t, t1,
                     conv(f"{b}/tower_2/conv", pool(f"{b}/tower_2/pool", "AvgPool", x, 3, 1, "SAME"))]
        elif kind == "D":
            t = conv(f"{b}/tower/conv_1", conv(f"{b}/tower/conv", x))
            t1 = conv(f"{b}/tower_1/conv", x)
            for i in range(1, 4):
                t1 = conv(f"{b}/tower_1/conv_{i}", t1)
            parts = [t, t1, pool(f"{b}/pool", "MaxPool", x, 3, 2, "VALID")]
        else:
            t = conv(f"{b}/tower/conv", x)
            t = concat(f"{b}/tower/mixed", [conv(f"{b}/tower/mixed/conv", t), conv(f"{b}/tower/mixed/conv_1", t)])
            t1 = conv(f"{b}/tower_1/conv_1", conv(f"{b}/tower_1/conv", x))
            t1 = concat(f"{b}/tower_1/mixed", [conv(f"{b}/tower_1/mixed/conv", t1),
                                               conv(f"{b}/tower_1/mixed/conv_1", t1)])
            op = "MaxPool" if b == "mixed_10" else "AvgPool"
            parts = [conv(f"{b}/conv", x), t, t1,
                     conv(f"{b}/tower_2/conv", pool(f"{b}/tower_2/pool", op, x, 3, 1, "SAME"))]
        x = concat(f"{b}/join", parts)
    x = pool("pool_3", "AvgPool", x, 8, 1, "VALID")
    const("pool_3/_reshape/shape", np.array([1, net.pool_dim], np.int32), INT32)
    add("pool_3/_reshape", "Reshape", ["pool_3", "pool_3/_reshape/shape"], T=FLOAT, Tshape=INT32)
    const("softmax/weights", _f32(net.fc.weight).T.copy())
    const("softmax/biases", _f32(net.fc.bias))
    add("softmax/logits/MatMul", "MatMul", ["pool_3/_reshape", "softmax/weights"], T=FLOAT, transpose_a=False,
        transpose_b=False)
    add("softmax/logits", "BiasAdd", ["softmax/logits/MatMul", "softmax/biases"], T=FLOAT)
    add("softmax", "Softmax", ["softmax/logits"], T=FLOAT)
    return nodes


def write_graph(net, path: str, scale_after_normalization: bool = True) -> str:
    """Write ``net`` (an :class:`Inception2015`) as a frozen Inception GraphDef at ``path`` (atomic)."""
    data = G.encode_graph(graph_nodes(net, scale_after_normalization), GRAPH_PRODUCER)

    def save(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
    return write_with(path, save, needed=len(data))


def write_test_graph(path: str, seed: int, width: float = 1.0, scale_after_normalization: bool = True):
    """A seeded random Inception network (:func:`random_inception`) written as the graph; returns the network."""
    net = random_inception(seed, width)
    write_graph(net, path, scale_after_normalization)
    return net


# --------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m usp_scale.eval.inception_graph", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert", help="classify_image_graph_def.pb -> torch weights (torch-fidelity's layout)")
    c.add_argument("graph", help="the Inception graph (.pb) the ADM evaluator downloads")
    c.add_argument("out", help="output file: .safetensors, or anything else for a torch.save dict (.pth)")
    w = sub.add_parser("write-test-graph", help="a frozen Inception GraphDef with seeded random weights (tests)")
    w.add_argument("out", help="output .pb")
    w.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    w.add_argument("--width", type=float, default=1.0, help="channel scale: 1 = the real graph's sizes (2048-d "
                   "pool_3, 94 MB), smaller for quick tests")
    w.add_argument("--no-bn-scale", action="store_true", help="write scale_after_normalization=false (gamma unused)")
    i = sub.add_parser("info", help="check a graph and print what the converter reads from it")
    i.add_argument("graph", help="a .pb file")
    return p


def main(argv: Optional[list] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.cmd == "write-test-graph":
            net = write_test_graph(args.out, args.seed, args.width, not args.no_bn_scale)
            print(f"wrote {args.out}: Inception-2015 graph with random weights (seed {args.seed}, width "
                  f"{args.width}, pool_3 {net.pool_dim}-d, {sum(p.numel() for p in net.parameters()):,} parameters)")
            return 0
        sd, info = convert_graph(args.graph)
        if args.cmd == "info":
            for k, v in info.items():
                print(f"{k}: {v}")
            return 0
        save_weights(sd, args.out)
        print(f"wrote {args.out}: {len(sd)} tensors from {args.graph} (sha256 {info['sha256'][:16]}..., pool_3 "
              f"{info['pool_dim']}-d, {info['classes']} classes)")
        return 0
    except (InceptionGraphError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
