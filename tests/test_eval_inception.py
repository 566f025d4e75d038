"""The Inception graph without TensorFlow: the GraphDef reader/writer, the converter from
classify_image_graph_def.pb (round trip with a seeded random network, refusals of other graphs), the network's
TF 1 resize, and reading weight files safely (a malicious pickle at every path the weights come from)."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from usp_scale.eval import graphdef as G
from usp_scale.eval.inception import (CONVS, LOGITS, POOL, SPATIAL, Inception2015, random_inception,
                                      resize_bilinear_tf1, standard_channels)
from usp_scale.eval.inception_graph import InceptionGraphError, convert_graph, main, write_graph, write_test_graph

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WIDTH = 0.125                                    # small test graphs: the real structure, 1/8 of the channels


@pytest.fixture(scope="module")
def small_graph(tmp_path_factory):
    path = tmp_path_factory.mktemp("graph") / "classify_image_graph_def.pb"
    net = write_test_graph(str(path), seed=3, width=WIDTH)
    return str(path), net


def _images(seed, n, h, w):
    return torch.from_numpy(np.random.RandomState(seed).randint(0, 256, (n, 3, h, w)).astype(np.uint8))


def test_layer_table_is_the_real_graph():
    assert len(CONVS) == 94 and len({c.tf for c in CONVS}) == 94
    net = Inception2015()                                        # the real sizes
    assert net.pool_dim == 2048 and net.fc.weight.shape == (1008, 2048) and net.is_standard
    # torch-fidelity's keys and shapes, so its weights file and the converter's output load alike
    import torch_fidelity.feature_extractor_inceptionv3 as TFI
    mp = pytest.MonkeyPatch()
    mp.setattr(TFI.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
    mp.setattr(TFI.torch, "load", lambda *a, **k: {})
    try:
        theirs = TFI.FeatureExtractorInceptionV3("x", ["2048"], feature_extractor_weights_path="unused").state_dict()
    finally:
        mp.undo()
    ours = net.state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}


def test_tf1_resize_equals_torch_fidelitys_port():
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x as tfi

    for h, w in ((256, 256), (32, 32), (300, 300), (200, 320), (1, 7)):
        x = torch.rand(2, 3, h, w) * 255
        ours = resize_bilinear_tf1(x)
        assert ours.shape == (2, 3, 299, 299)
        torch.testing.assert_close(ours, tfi(x, size=(299, 299), align_corners=False), rtol=0, atol=3e-5)
    x = torch.rand(1, 3, 299, 299)
    assert resize_bilinear_tf1(x) is x                              # scale 1: the identity


def test_graph_round_trip_is_exact(small_graph):
    path, net = small_graph
    sd, info = convert_graph(path)
    want = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert sorted(sd) == sorted(want)
    for k in want:
        assert torch.equal(sd[k], want[k]), k
    assert info["pool_dim"] == net.pool_dim and info["classes"] == 1008 and info["scale_after_normalization"] == [True]
    assert info["preprocessing"]["resize"] == [299, 299] and info["producer"] == 8
    back = Inception2015.from_state_dict(sd, path)
    x = _images(0, 2, 64, 48)
    a, b = net(x), back(x)
    for k in (POOL, SPATIAL, LOGITS):
        assert torch.equal(a[k], b[k])
    assert a[SPATIAL].shape == (2, 17 * 17 * 7) and a[POOL].shape == (2, net.pool_dim)
    assert a[POOL].std(0).mean() > 1e-3 * a[POOL].abs().mean()      # calibrated: features are not degenerate


def test_bn_without_scale_uses_no_gamma(tmp_path):
    net = random_inception(5, width=WIDTH, calibrate_images=2)
    path = str(tmp_path / "g.pb")
    write_graph(net, path, scale_after_normalization=False)
    sd, info = convert_graph(path)
    assert info["scale_after_normalization"] == [False]
    assert all(torch.equal(sd[f"{c.pt}.bn.weight"], torch.ones_like(sd[f"{c.pt}.bn.weight"])) for c in CONVS)
    assert torch.equal(sd["Mixed_6d.branch1x1.bn.bias"], net.Mixed_6d.branch1x1.bn.bias)


def test_graphdef_fields_protobuf_writes_differently():
    """Values the way other protobuf writers put them: unpacked repeated floats, short float_val filled with its
    last value, half_val, negative int64, int lists."""
    def fixed32_unpacked(num, vals):
        return b"".join(G._key(num, 5) + np.float32(v).tobytes() for v in vals)

    shape = G._len_field(2, G._len_field(2, G._int_field(1, 4)))
    t_unpacked = G._int_field(1, G.DT_FLOAT) + shape + fixed32_unpacked(5, [1.5, -2.0, 3.0, 4.0])
    t_fill = G._int_field(1, G.DT_FLOAT) + shape + fixed32_unpacked(5, [7.0])
    t_half = G._int_field(1, G.DT_HALF) + shape + G._len_field(
        13, b"".join(G._enc_varint(int(v)) for v in np.array([0.5, 1, 2, -1], np.float16).view(np.uint16)))
    a1 = G._tensor(memoryview(t_unpacked))
    assert a1.array.tolist() == [1.5, -2.0, 3.0, 4.0] and a1.array.dtype == np.float32
    assert G._tensor(memoryview(t_fill)).array.tolist() == [7.0] * 4
    assert G._tensor(memoryview(t_half)).array.tolist() == [0.5, 1.0, 2.0, -1.0]
    node = G.encode_node("n", "Op", ["a", "^b"], {"i": -3, "l": [1, -2, 3], "s": b"SAME", "f": 0.25, "b": True,
                                                   "t": np.arange(6, dtype=np.int32).reshape(2, 3)})
    g = G.parse_graph(G.encode_graph([node], 5))
    n = g.nodes[0]
    assert (n.name, n.op, n.inputs, g.producer) == ("n", "Op", ["a", "^b"], 5)
    assert n.attr["i"] == -3 and n.attr["l"] == [1, -2, 3] and n.attr["s"] == b"SAME" and n.attr["f"] == 0.25
    assert n.attr["b"] is True and n.attr["t"].array.tolist() == [[0, 1, 2], [3, 4, 5]]


def test_graphs_that_are_not_the_inception_graph_are_refused(tmp_path, small_graph):
    path, _ = small_graph
    data = open(path, "rb").read()
    cases = {
        "text.pb": b"not a graph at all\n" * 10,
        "truncated.pb": data[:len(data) // 2],
    }
    nodes = [G.encode_node("ExpandDims", "Placeholder", [], {"dtype": ("type", 1)}),
             G.encode_node("pool_3", "Identity", ["ExpandDims"], {"T": ("type", 1)})]
    cases["other.pb"] = G.encode_graph(nodes, 8)
    for name, blob in cases.items():
        (tmp_path / name).write_bytes(blob)
    with pytest.raises(InceptionGraphError, match=r"text\.pb is not .*GraphDef"):
        convert_graph(str(tmp_path / "text.pb"))
    with pytest.raises(InceptionGraphError, match=r"truncated\.pb is not .*(GraphDef|damaged)"):
        convert_graph(str(tmp_path / "truncated.pb"))
    with pytest.raises(InceptionGraphError, match=r"other\.pb is not the Inception-2015 graph.*\['mixed_6/conv', "
                                                  r"'softmax/logits/MatMul'\]"):
        convert_graph(str(tmp_path / "other.pb"))
    # the right nodes but another preprocessing or BatchNorm epsilon
    g = G.read_graph(path)
    for edit, match in ((("ResizeBilinear/size", np.array([224, 224], np.int32)), r"resizes to \[224, 224\]"),
                        (("Sub/y", np.array(127.5, np.float32)), r"\(x - 127.5\)")):
        blob = _with_const(g, *edit)
        (tmp_path / "edited.pb").write_bytes(blob)
        with pytest.raises(InceptionGraphError, match=match):
            convert_graph(str(tmp_path / "edited.pb"))
    with pytest.raises(FileNotFoundError, match="nowhere.pb"):
        convert_graph(str(tmp_path / "nowhere.pb"))


def _with_const(g, name, value):
    """Re-encode graph ``g`` with Const ``name`` set to ``value`` (other nodes as they were)."""
    out = []
    for n in g.nodes:
        attr = {}
        for k, v in n.attr.items():
            if isinstance(v, G.Tensor):
                v = np.asarray(value) if n.name == name and k == "value" else v.array
            elif isinstance(v, list) and v and isinstance(v[0], tuple):
                continue
            attr[k] = v
        out.append(G.encode_node(n.name, n.op, n.inputs, attr))
    return G.encode_graph(out, g.producer)


def test_command_line_tools(tmp_path, capsys):
    pb, pth, st = (str(tmp_path / f) for f in ("t.pb", "t.pth", "t.safetensors"))
    p = subprocess.run([sys.executable, "-m", "usp_scale.eval.inception_graph", "write-test-graph", pb, "--seed", "1",
                        "--width", str(WIDTH)], env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0 and "pool_3 256-d" in p.stdout, p.stderr
    assert main(["convert", pb, pth]) == 0 and main(["convert", pb, st]) == 0
    from usp_scale.eval.features import load_inception_weights
    a, b, c = load_inception_weights(pth), load_inception_weights(st), convert_graph(pb)[0]
    assert all(torch.equal(a[k], c[k]) and torch.equal(b[k], c[k]) for k in c)
    capsys.readouterr()
    assert main(["convert", str(tmp_path / "missing.pb"), pth]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "missing.pb" in err
    assert main(["info", pb]) == 0
    out = capsys.readouterr().out
    assert "pool_dim: 256" in out and "sha256:" in out
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "write-test-graph" in capsys.readouterr().out


# ----------------------------------------------------------------------------- weight files, safely


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil_file(path, marker):
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(1), "x": _Evil(marker)}, path)
    return str(path)


def test_a_malicious_weights_file_runs_nothing_at_any_path(tmp_path, monkeypatch):
    """The three places the Inception weights come from: --inception-weights, eval.inception_weights and the default
    $TORCH_HOME/hub/checkpoints/weights-inception-2015-12-05-6726825d.pth. torch-fidelity would torch.load them
    with weights_only=False; here nothing from the file runs, and the error names it."""
    from usp_scale.checkpoint.safe_load import CheckpointFileError
    from usp_scale.eval.features import create_extractor, load_inception_weights

    marker = tmp_path / "PWNED"
    # 1. a file given by path (the launcher's --inception-weights), any protocol
    evil = _evil_file(tmp_path / "evil.pth", marker)
    for protocol in ("adm", "torch-fidelity"):
        with pytest.raises(CheckpointFileError, match=r"refusing to load Inception weights .*evil\.pth"):
            create_extractor("inception-v3-compat", ["2048"], "cpu", evil, protocol=protocol)
    sys.path.insert(0, os.path.join(ROOT, "launchers"))
    try:
        import evaluate as ev
    finally:
        sys.path.pop(0)
    ims = np.random.RandomState(0).randint(0, 256, (8, 16, 16, 3)).astype(np.uint8)
    np.savez(tmp_path / "s.npz", arr_0=ims)
    assert ev.cli(["--samples", str(tmp_path / "s.npz"), "--reference", str(tmp_path / "s.npz"), "--metrics",
                   "fid", "--inception-weights", evil, "--no-progress", "--cache-dir", str(tmp_path / "c")]) == 2
    # 2. the default path under $TORCH_HOME, named with torch-fidelity's hash: the hash check refuses it first
    home = tmp_path / "torch_home" / "hub" / "checkpoints"
    home.mkdir(parents=True)
    default = _evil_file(home / "weights-inception-2015-12-05-6726825d.pth", marker)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    with pytest.raises(CheckpointFileError, match=r"weights-inception-2015-12-05-6726825d\.pth: sha256 .* does not "
                                                  r"start with 6726825d"):
        create_extractor("inception-v3-compat", ["2048"], "cpu", None, protocol="torch-fidelity")
    # 3. eval.inception_weights: the in-training FID hook's extractor, built at start-up
    from usp_scale.eval import build_extractor
    with pytest.raises(CheckpointFileError, match=r"evil\.pth"):
        build_extractor({"feature_extractor": "inception-v3-compat", "inception_weights": evil,
                         "protocol": "torch-fidelity"}, "cpu")
    with pytest.raises(CheckpointFileError, match="6726825d"):
        build_extractor({"feature_extractor": "inception-v3-compat", "inception_weights": str(home)}, "cpu")
    assert not marker.exists()
    # NaN in a weights file is refused by name as well
    sd = random_inception(0, width=WIDTH, calibrate_images=2).state_dict()
    sd["Mixed_6d.branch1x1.bn.running_var"][0] = float("nan")
    torch.save(sd, tmp_path / "nan.pth")
    with pytest.raises(CheckpointFileError, match=r"nan\.pth: tensor 'Mixed_6d\.branch1x1\.bn\.running_var' holds "
                                                  "non-finite"):
        load_inception_weights(str(tmp_path / "nan.pth"))
    assert not marker.exists() and os.path.isfile(default)


def test_standard_channels_scale():
    ch = standard_channels(0.125)
    assert min(ch.values()) >= 8 and ch["Mixed_6d.branch1x1"] == 24
    assert standard_channels() == {c.pt: c.out for c in CONVS}
