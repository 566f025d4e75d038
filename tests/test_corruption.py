"""Every artifact kind, every kind of damage: truncated, overwritten in place (same size), single bits flipped (at
10 %, 50 % and 90 % of the file), deleted, swapped for another run's file. Each case must be refused with a message
naming the file, or reported before training (a start-up message naming the file), or leave the result unchanged
(identical bytes or an identical config); a silent change of what training sees fails the test.

Artifacts: latent cache shard and manifest; checkpoint folder files (meta.json, trainer.pt, the engine's DCP metadata and data; no per-rank
state); exported safetensors (checkpoint.init_from); the resolved config.yaml (loaded as a recipe); the DeepSpeed JSON
(merged and compared with what the checkpoint recorded, at resume). The outcome table is printed at the end
(``pytest -s tests/test_corruption.py``).
"""
import json
import os
import shutil

import numpy as np
import pytest
import torch

import _helpers_safety as S
from _helpers_data import synth_clean  # noqa: F401

pytestmark = pytest.mark.slow

MUTATIONS = ("truncate", "overwrite", "flip@10%", "flip@50%", "flip@90%", "delete", "swap")
OUTCOMES = []  # (artifact, mutation, outcome, message)


def mutate(path: str, how: str, other: str) -> None:
    data = bytearray(open(path, "rb").read())
    if how == "truncate":
        data = data[: len(data) // 2]
    elif how == "overwrite":
        rng = np.random.default_rng(0)
        at = len(data) // 2
        data[at:at + 64] = rng.integers(0, 256, min(64, len(data) - at), dtype=np.uint8).tobytes()
    elif how.startswith("flip@"):
        at = min(len(data) - 1, len(data) * int(how[5:-1]) // 100)
        data[at] ^= 0x10
    elif how == "delete":
        os.remove(path)
        return
    elif how == "swap":
        data = bytearray(open(other, "rb").read())
    open(path, "wb").write(bytes(data))


def record(artifact, how, outcome, msg=""):
    OUTCOMES.append((artifact, how, outcome, " ".join(str(msg).split())[:150]))


def classify(artifact, how, path, consume, unchanged=None, reported=None, allow_swap_load=False):
    """Run ``consume()``; an exception must name ``path`` (or its folder for a deleted file). Without one, the result
    must equal the original (``unchanged(result)``) or a start-up report must name the file (``reported(result)``)."""
    try:
        res = consume()
    except Exception as e:  # noqa: BLE001
        msg = str(e)
        named = path in msg or (how == "delete" and os.path.dirname(path) in msg)
        assert named, f"{artifact}/{how}: the error does not name {path}: {type(e).__name__}: {msg[:500]}"
        record(artifact, how, "refused", f"{type(e).__name__}: {msg}")
        return
    if unchanged is not None and unchanged(res):
        record(artifact, how, "no change", "the consumer saw identical content")
        return
    report = reported(res) if reported is not None else ""
    if report:
        record(artifact, how, "reported", report)
        return
    if allow_swap_load and how == "swap":
        what = allow_swap_load(res)
        assert what, f"{artifact}/{how}: loaded without naming what it loaded"
        record(artifact, how, "loads the other run's file", what)
        return
    pytest.fail(f"{artifact}/{how}: silent change (no error, different content, no report)")


# --------------------------------------------------------------------------- latent cache

ARGS = dict(image_size=32, augment="pretrain", views=2, dtype="fp16", shard_size=8, batch_size=8, progress=False)


@pytest.fixture(scope="module")
def caches(synth_clean, tmp_path_factory):  # noqa: F811
    from usp_scale.data import build_dataset, write_cache, write_manifest
    from usp_scale.vae import FrozenVAE

    out = {}
    for name, seed in (("A", 1), ("B", 2)):
        p = str(tmp_path_factory.mktemp(f"cache{name}"))
        write_cache(build_dataset(synth_clean["root"], "train"), FrozenVAE(), p, seed=seed, **ARGS)
        write_manifest(p)
        out[name] = p
    return out


def _read_all(path):
    from usp_scale.data import LatentCache

    c = LatentCache(path)
    n = len(c)
    idx = np.repeat(np.arange(n), 2 * c.views)
    slot = np.tile(np.arange(2 * c.views), n)
    return c.gather(idx, slot // 2, slot % 2)


@pytest.mark.parametrize("how", MUTATIONS)
@pytest.mark.parametrize("name", ["shard_000001.safetensors", "manifest.json"])
def test_latent_cache(caches, tmp_path, name, how):
    ref = _read_all(caches["A"])
    d = str(tmp_path / "c")
    shutil.copytree(caches["A"], d)
    path = os.path.join(d, name)
    mutate(path, how, os.path.join(caches["B"], name))
    same = lambda res: all(torch.equal(a, b) for a, b in zip(res, ref))  # noqa: E731
    classify(f"cache {name.split('_')[0].split('.')[0]}", how, path, lambda: _read_all(d), unchanged=same)


# --------------------------------------------------------------------------- checkpoints, export, resolved config

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two finished tiny runs (seeds 0 and 1): checkpoints at steps 2 and 4, exports, resolved configs."""
    out = {}
    for name, seed in (("R1", 0), ("R2", 1)):
        p = str(tmp_path_factory.mktemp(name) / "run")
        S.run_tiny(p, seed=seed)
        out[name] = p
    return out


CKPT_FILES = ("meta.json", "trainer.pt", "engine/dcp/.metadata", "engine/dcp/__0_0.distcp")


@pytest.mark.parametrize("how", MUTATIONS)
@pytest.mark.parametrize("rel", CKPT_FILES)
def test_checkpoint_files(runs, tmp_path, capfd, rel, how):
    d = str(tmp_path / "run")
    shutil.copytree(runs["R1"], d)
    path = os.path.join(d, "checkpoints", "step_00000004", rel)
    other = os.path.join(runs["R2"], "checkpoints", "step_00000004", rel)
    identical = how == "swap" and open(path, "rb").read() == open(other, "rb").read()
    mutate(path, how, other)

    def resume():  # resume=auto from the newest folder, two more steps
        return S.run_tiny(d, **{"schedule.max_steps": 6})

    def warned(res):
        err = capfd.readouterr().err
        line = next((ln for ln in err.splitlines() if "ignoring checkpoint folder" in ln), "")
        return line if os.path.dirname(path) in line else ""
    classify(f"checkpoint {rel}", how, path, resume, unchanged=(lambda res: identical), reported=warned)


@pytest.mark.parametrize("how", MUTATIONS)
def test_exported_safetensors(runs, tmp_path, capfd, how):
    from usp_scale.models import create_model
    from usp_scale.training.tasks import load_init

    path = str(tmp_path / "model.safetensors")
    shutil.copy(os.path.join(runs["R1"], "export", "model.safetensors"), path)
    ref = create_model("vit_tiny_patch_vae", img_size=8, in_chans=4)
    load_init(ref, path)
    capfd.readouterr()
    mutate(path, how, os.path.join(runs["R2"], "export", "model.safetensors"))

    def consume():
        m = create_model("vit_tiny_patch_vae", img_size=8, in_chans=4)
        load_init(m, path)  # checkpoint.init_from
        return m
    same = lambda m: all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), ref.state_dict().values()))  # noqa
    provenance = lambda m: next(ln for ln in capfd.readouterr().out.splitlines() if "content sha256" in ln)  # noqa
    classify("exported safetensors", how, path, consume, unchanged=same, allow_swap_load=provenance)


@pytest.mark.parametrize("how", MUTATIONS)
def test_resolved_config(runs, tmp_path, how):
    from usp_scale.config import load_config

    path = str(tmp_path / "config.yaml")
    shutil.copy(os.path.join(runs["R1"], "config.yaml"), path)
    ref = load_config(path)
    mutate(path, how, os.path.join(runs["R2"], "config.yaml"))
    theirs = load_config(os.path.join(runs["R2"], "config.yaml"))
    classify("resolved config.yaml", how, path, lambda: load_config(path), unchanged=lambda c: c == ref,
             allow_swap_load=lambda c: f"loads run R2's own config exactly (seed {c.seed}, output_dir "
                                       f"{c.output_dir})" if c == theirs else "")


# --------------------------------------------------------------------------- DeepSpeed JSON

DS_A = {"zero_optimization": {"reduce_bucket_size": 500000000, "allgather_bucket_size": 500000000},
        "communication_data_type": "fp32", "train_micro_batch_size_per_gpu": "auto"}
DS_B = {"zero_optimization": {"reduce_bucket_size": 200000000, "allgather_bucket_size": 200000000},
        "communication_data_type": "fp32", "train_micro_batch_size_per_gpu": "auto"}


@pytest.mark.parametrize("how", MUTATIONS)
def test_deepspeed_json(runs, tmp_path, how):
    """The JSON is merged as the DeepSpeed engine does; at resume the merged config is compared with the one the
    checkpoint recorded (meta.json), differences named with the file."""
    from usp_scale.checkpoint import CheckpointManager
    from usp_scale.checkpoint.safe_load import write_checked_json
    from usp_scale.engine.deepspeed.config import generate_config, load_user_config, merge_user_config

    def merged(p):
        gen = generate_config(micro_batch=4, accum_iter=2, world_size=1, zero_stage=2, precision="fp32",
                              clip_grad=1.0)
        return merge_user_config(gen, load_user_config(p), p)
    path, other = str(tmp_path / "ds.json"), str(tmp_path / "other_ds.json")
    json.dump(DS_A, open(path, "w"), indent=1)
    json.dump(DS_B, open(other, "w"), indent=1)
    d = str(tmp_path / "run")
    shutil.copytree(runs["R1"], d)
    step = os.path.join(d, "checkpoints", "step_00000004")
    mgr = CheckpointManager(os.path.join(d, "checkpoints"))
    meta = mgr.read_meta(step)
    write_checked_json(os.path.join(step, "meta.json"), {**meta, "deepspeed_config": merged(path)}, key="meta_sha256")
    mutate(path, how, other)

    def resume_check():
        return mgr.check(step, signature=meta["signature"], config=meta["config"], world_size=1,
                         engine_name="local", deepspeed_config=merged(path), deepspeed_source=path)
    classify("DeepSpeed JSON", how, path, resume_check, unchanged=lambda diffs: diffs == [],
             reported=lambda diffs: "; ".join(diffs) if diffs and all(path in x for x in diffs) else "")


def test_zz_outcome_table():
    """Print the table of every case (run the module with -s to see it) and check none was silent."""
    if not OUTCOMES:
        pytest.skip("run with the other tests of this module")
    counts = {}
    for _, _, outcome, _ in OUTCOMES:
        counts[outcome] = counts.get(outcome, 0) + 1
    print(f"\n{len(OUTCOMES)} corruption cases: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    print("| artifact | damage | outcome | message |\n|---|---|---|---|")
    for a, h, o, m in OUTCOMES:
        print(f"| {a} | {h} | {o} | {m} |")
    assert set(counts) <= {"refused", "reported", "no change", "loads the other run's file"}
