"""launchers/evaluate.py under the ADM protocol: ADM's printout and order, the protocol in every record, the
protocol chosen for ADM reference batches; every bad input of issue 22 (and issues 18/24) refused with one line
naming the file, exit code 2 and nothing printed or written."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from usp_scale.eval import compute_metrics, create_extractor, extract_features, save_statistics
from usp_scale.eval import adm as A
from usp_scale.eval.inception import POOL, SPATIAL, LOGITS
from usp_scale.eval.inception_graph import write_test_graph

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "launchers"))
import evaluate as ev  # noqa: E402

sys.path.pop(0)


def _ims(seed, n, side=32):
    return np.random.RandomState(seed).randint(0, 256, (n, side, side, 3)).astype(np.uint8)


@pytest.fixture(scope="module")
def adm_setup(tmp_path_factory):
    """A small Inception test graph, an ADM-format reference batch (arr_0 + statistics from that network) and
    samples."""
    d = tmp_path_factory.mktemp("adm")
    graph = str(d / "classify_image_graph_def.pb")
    write_test_graph(graph, seed=2, width=0.0625)
    ref_ims, sample_ims = _ims(0, 24), np.clip(_ims(1, 20).astype(int) // 2 + 40, 0, 255).astype(np.uint8)
    ext = create_extractor("inception-v3-compat", [POOL, SPATIAL], "cpu", graph, protocol="adm")
    f = extract_features(ref_ims, ext, progress=False)
    ref = str(d / "VIRTUAL_ref.npz")
    st, sp = A.statistics(f[POOL]), A.statistics(f[SPATIAL])
    np.savez(ref, arr_0=ref_ims, mu=st["mu"], sigma=st["sigma"], mu_s=sp["mu"], sigma_s=sp["sigma"])
    samples = str(d / "samples" / "samples_20x32x32x3.npz")
    os.makedirs(os.path.dirname(samples))
    np.savez(samples, arr_0=sample_ims)
    with open(os.path.join(os.path.dirname(samples), "sampling.json"), "w") as fh:
        json.dump({"sampler": "ddpm", "steps": 250, "cfg_scale": 1.5, "sampling_precision": "fp32"}, fh)
    return {"graph": graph, "ref": ref, "samples": samples, "dir": str(d), "ref_ims": ref_ims,
            "sample_ims": sample_ims}


def test_the_papers_table_in_adms_order_and_format(adm_setup, tmp_path, capsys):
    s = adm_setup
    out = str(tmp_path / "m.jsonl")
    recs = ev.main(["--samples", s["samples"], "--reference", s["ref"], "--inception-graph", s["graph"],
                    "--is-split-size", "10", "--no-progress", "--cache-dir", str(tmp_path / "c"), "--out", out])
    printed = capsys.readouterr()
    lines = printed.out.splitlines()
    assert lines[0].startswith("protocol: adm (20 samples")
    labels = [ln.split(":")[0] for ln in lines[1:6]]
    assert labels == ["Inception Score", "FID", "sFID", "Precision", "Recall"]
    got = {r["metric"]: r for r in recs}
    assert float(lines[2].split(": ")[1]) == got["fid"]["value"]            # ADM prints the full repr
    for r in recs:
        assert r["protocol"] == "adm" and r["sampler"] == "ddpm" and r["cfg_scale"] == 1.5 and r["num_samples"] == 20
        assert r["inception_weights"] == s["graph"]
    with open(out) as f:
        assert [json.loads(x)["protocol"] for x in f] == ["adm"] * 5
    assert "protocol=adm" in open(str(tmp_path / "m.txt")).read()
    # FID/sFID from 20 images in 128/2023 dimensions: reported, with a warning
    assert "warning: FID from 20 images in 128 dimensions" in printed.err
    # the same numbers from the metric layer on the network's features
    ext = create_extractor("inception-v3-compat", [POOL, SPATIAL, LOGITS], "cpu", s["graph"], protocol="adm")
    fs, fr = extract_features(s["sample_ims"], ext, progress=False), extract_features(s["ref_ims"], ext, progress=False)
    with np.load(s["ref"]) as d:
        fid = A.frechet_distance(*A.statistics(fs[POOL]).values(), d["mu"], d["sigma"],
                                 features1=fs[POOL].double().numpy())      # n <= D: the n x n form, as evaluate.py
        sfid = A.frechet_distance(*A.statistics(fs[SPATIAL]).values(), d["mu_s"], d["sigma_s"],
                                  features1=fs[SPATIAL].double().numpy())
    pr = A.precision_recall(fs[POOL], fr[POOL])
    assert got["fid"]["value"] == pytest.approx(fid, rel=1e-9) and got["sfid"]["value"] == pytest.approx(sfid, rel=1e-9)
    assert got["is_mean"]["value"] == pytest.approx(A.inception_score(fs[LOGITS], 10), rel=1e-9)
    assert (got["precision"]["value"], got["recall"]["value"]) == (pr["precision"], pr["recall"])


def test_protocol_choice(adm_setup, tmp_path):
    s = adm_setup
    from usp_scale.eval import resolve_protocol
    assert resolve_protocol("auto", "inception-v3-compat", s["ref"]) == "adm"
    assert resolve_protocol("auto", "inception-v3-compat", s["samples"]) == "torch-fidelity"   # images only
    assert resolve_protocol("auto", "usp-tiny", s["ref"]) == "torch-fidelity"
    assert resolve_protocol("torch-fidelity", "inception-v3-compat", s["ref"]) == "torch-fidelity"
    # ADM's metric definitions on another extractor's features, labelled as such
    r = compute_metrics(s["sample_ims"], s["ref_ims"], ["is", "pr"], "usp-tiny", protocol="adm", is_split_size=10,
                        progress=False)
    assert r["protocol"] == "adm" and "is_std" not in r and 0 <= r["precision"] <= 1
    t = compute_metrics(s["sample_ims"], s["ref_ims"], ["is", "pr"], "usp-tiny", protocol="torch-fidelity",
                        is_splits=4, progress=False)
    assert t["protocol"] == "torch-fidelity" and "is_std" in t


def test_identical_sets_have_fid_zero():
    ims = _ims(3, 40)
    for protocol in ("adm", "torch-fidelity"):
        r = compute_metrics(ims, ims, ["fid"], "usp-tiny", protocol=protocol, progress=False)
        assert r["fid"] == 0.0                       # rounding below zero (about -1e-8) is reported as 0


def _bad(argv, capsys, *must):
    """cli() refuses: exit 2, one line on stderr naming what is wrong, no metric printed."""
    code = ev.cli(argv + ["--no-progress"])
    out = capsys.readouterr()
    assert code == 2, (out.out, out.err)
    err = [ln for ln in out.err.splitlines() if ln.startswith("error: ")]
    assert len(err) == 1 and "Traceback" not in out.err, out.err
    for m in must:
        assert m in err[0], err[0]
    assert not any(ln.startswith(("FID", "Inception Score", "fid=", "is_mean=")) for ln in out.out.splitlines())
    return err[0]


def test_bad_inputs_are_refused_by_name(adm_setup, tmp_path, capsys):
    s = adm_setup
    d = tmp_path
    tiny = ["--feature-extractor", "usp-tiny", "--cache-dir", str(d / "c")]
    samples = str(d / "s.npz")
    np.savez(samples, arr_0=_ims(4, 12, 16))
    # a reference without arr_0 when precision/recall is asked
    feats = extract_features(_ims(5, 12, 16), create_extractor("usp-tiny", ["pool"]), progress=False)["pool"]
    stats_only = save_statistics(str(d / "stats_only.npz"), feats)
    _bad(["--samples", samples, "--reference", stats_only, "--metrics", "pr", *tiny], capsys, "stats_only.npz",
         "arr_0")
    # statistics from another network: an ADM reference batch (Inception, 128-d here) with usp-tiny (64-d)
    _bad(["--samples", samples, "--reference", s["ref"], "--metrics", "fid", "--protocol", "adm", *tiny], capsys,
         "VIRTUAL_ref.npz", "128-d", "64-d")
    # a .pb that is not the Inception graph
    from usp_scale.eval import graphdef as G
    other = str(d / "other.pb")
    with open(other, "wb") as f:
        f.write(G.encode_graph([G.encode_node("ExpandDims", "Placeholder", [], {"dtype": ("type", 1)})], 8))
    _bad(["--samples", samples, "--reference", s["ref"], "--inception-graph", other, "--metrics", "fid"], capsys,
         "other.pb", "pool_3")
    # samples that are not uint8 NHWC
    np.savez(d / "float.npz", arr_0=_ims(6, 12, 16).astype(np.float32))
    np.savez(d / "nchw.npz", arr_0=_ims(6, 12, 16).transpose(0, 3, 1, 2).copy())
    for bad in ("float.npz", "nchw.npz"):
        _bad(["--samples", str(d / bad), "--reference", samples, "--metrics", "fid", *tiny], capsys, bad,
             "uint8 NHWC")
    # fewer samples than the IS split size (ADM: 5,000), and than torch-fidelity's splits
    _bad(["--samples", samples, "--metrics", "is", "--protocol", "adm", *tiny], capsys, "s.npz", "12 images",
         "5000")
    np.savez(d / "five.npz", arr_0=_ims(7, 5, 16))
    _bad(["--samples", str(d / "five.npz"), "--metrics", "is", "--protocol", "torch-fidelity", *tiny], capsys,
         "five.npz", "10 IS splits")
    # NaN in the statistics
    with np.load(s["ref"]) as z:
        arrays = dict(z)
    arrays["sigma"][3, 3] = np.nan
    np.savez(d / "nan_ref.npz", **arrays)
    _bad(["--samples", s["samples"], "--reference", str(d / "nan_ref.npz"), "--inception-graph", s["graph"],
          "--metrics", "fid"], capsys, "nan_ref.npz", "sigma", "non-finite")
    # a truncated .npz
    blob = open(s["samples"], "rb").read()
    (d / "cut.npz").write_bytes(blob[:len(blob) // 2])
    _bad(["--samples", str(d / "cut.npz"), "--reference", samples, "--metrics", "fid", *tiny], capsys, "cut.npz",
         "truncated")
    # precision/recall with <= k samples
    np.savez(d / "three.npz", arr_0=_ims(8, 3, 16))
    _bad(["--samples", str(d / "three.npz"), "--reference", samples, "--metrics", "pr", *tiny], capsys,
         "3 images", "k=3")
    # KID is not ADM's; both weights flags at once
    _bad(["--samples", samples, "--reference", samples, "--metrics", "kid", "--protocol", "adm", *tiny], capsys,
         "kid is not part of the ADM evaluator")
    _bad(["--samples", samples, "--inception-graph", s["graph"], "--inception-weights", s["graph"]], capsys,
         "not both")
    # the small test graph does not fit torch-fidelity's network (the real sizes)
    _bad(["--samples", samples, "--reference", s["ref"], "--inception-graph", s["graph"], "--metrics", "fid",
          "--protocol", "torch-fidelity"], capsys, "classify_image_graph_def.pb", "torch-fidelity")
    assert not any(f.endswith(".jsonl") for f in os.listdir(d))            # nothing written


def test_one_line_and_exit_code_from_the_command_line(tmp_path):
    np.savez(tmp_path / "s.npz", arr_0=_ims(9, 6, 16).astype(np.float32))
    p = subprocess.run([sys.executable, os.path.join(ROOT, "launchers", "evaluate.py"), "--samples",
                        str(tmp_path / "s.npz"), "--metrics", "is", "--feature-extractor", "usp-tiny"],
                       capture_output=True, text=True, timeout=600, env=dict(os.environ, PYTHONPATH=ROOT))
    assert p.returncode == 2 and p.stderr.strip().startswith("error: ") and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "s.npz" in p.stderr and p.stdout == ""


def test_records_never_hold_nan(tmp_path):
    from usp_scale.eval import make_records, write_records
    ctx = {"protocol": "adm", "sampler": "x", "steps": 1, "cfg_scale": 1.0, "sampling_precision": "fp32",
           "reference": "r", "feature_extractor": "f"}
    with pytest.raises(A.MetricInputError, match="non-finite"):
        make_records({"fid": float("nan"), "num_samples": 3}, ctx)
    with pytest.raises(ValueError):
        write_records(str(tmp_path / "m.jsonl"), [dict(ctx, metric="fid", value=float("nan"))])
    assert not (tmp_path / "m.jsonl").exists() or (tmp_path / "m.jsonl").read_text() == ""
    with pytest.raises(A.MetricInputError, match="fill 10 splits"):
        from usp_scale.eval import inception_score
        inception_score(torch.zeros(5, 10))


def test_in_training_fid_refuses_an_adm_reference_for_another_extractor_at_start_up(adm_setup, tmp_path):
    """Issue 24: an ADM reference batch (Inception statistics) with eval.feature_extractor=usp-tiny was a
    "feature sizes differ" traceback at the first evaluation; now a ConfigError when the hook is built."""
    from usp_scale.config import ConfigError, load_config
    from usp_scale.eval.hook import FIDHook

    cfg = load_config(os.path.join(ROOT, "configs", "debug", "tiny_dit.yaml"), [
        f"output_dir={tmp_path}", "eval.fid_every=2", f"eval.fid_reference={adm_setup['ref']}",
        "eval.feature_extractor=usp-tiny", "eval.protocol=adm"])
    with pytest.raises(ConfigError, match=r"eval\.feature_extractor='usp-tiny'.*VIRTUAL_ref\.npz: mu/sigma are "
                                          r"128-d but feature extractor 'usp-tiny' gives 64-d"):
        FIDHook(cfg, None, torch.nn.Linear(1, 1), None, "cpu")
    # the ImageNet recipes' protocol, and auto for the Inception network against this reference
    assert load_config(os.path.join(ROOT, "configs", "finetune", "dit_xl_256.yaml")).eval.protocol == "adm"
    from usp_scale.eval import build_extractor
    ext, layer = build_extractor({"feature_extractor": "inception-v3-compat", "inception_weights": adm_setup["graph"],
                                  "fid_reference": adm_setup["ref"]}, "cpu")
    assert layer == POOL and type(ext).__name__ == "AdmInceptionExtractor"
