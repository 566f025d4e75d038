"""DALI CPU pipeline vs the torchvision/PIL loader on deterministic crops; backend selection; DALI resume.

Measured on the synthetic set (2026-11-26, this CPU machine), mean |difference| in 8-bit grey levels:
eval crop 0.1-0.2 (max 1-6), ADM crop without halving 0.2 (max 8), ADM crop with a BOX halving 1-2 (max
40-90 at hard edges). The eval/no-halving residue is JPEG decoding (libjpeg-turbo in PIL vs DALI's decoder)
plus PIL vs DALI bicubic; the halving case adds BOX (PIL) vs linear 2x (DALI). See docs/data.md.
"""
import pytest
import torch

from _helpers_data import data_cfg, synth, synth_clean  # noqa: F401
from usp_scale.data import build_image_loader, resolve_loader_backend
from usp_scale.data import dali as dali_mod
from usp_scale.data.build import DALI_TOLERANCE

pytestmark = pytest.mark.skipif(not dali_mod.dali_available(), reason="nvidia.dali is not installed")


def _both(root, augment, size, train):
    out = {}
    for backend in ("torchvision", "dali"):
        aug = augment + "_noflip" if augment == "adm" else augment  # compare the deterministic part of the crop
        ld = build_image_loader(data_cfg(root, loader=backend, augment=aug, image_size=size, batch_size=5),
                                train=train, seed=1)
        out[backend] = list(ld)
    return out


@pytest.mark.parametrize("augment,size,train,limit_mean,limit_max", [
    # resize 37 bicubic + center crop 32 (val split): within the stated tolerance that lets data.loader=auto use DALI
    ("eval", 32, False, DALI_TOLERANCE["eval"]["mean"], DALI_TOLERANCE["eval"]["max"]),
    ("adm", 32, True, 1.0, 16.0),       # ADM without halving (min side 40 < 64)
    ("adm", 16, True, 4.0, 128.0),      # ADM with one BOX halving (40 >= 32)
])
def test_dali_cpu_matches_torchvision_on_deterministic_crops(synth_clean, augment, size, train, limit_mean,
                                                             limit_max):
    out = _both(synth_clean["root"], augment, size, train)
    tv = torch.cat([b["images"] for b in out["torchvision"]])
    dl = torch.cat([b["images"] for b in out["dali"]])
    assert tv.shape == dl.shape == (len(tv), 3, size, size)
    # same files, same order, same labels: both loaders use the same global-rank sampler
    assert torch.equal(torch.cat([b["labels"] for b in out["torchvision"]]),
                       torch.cat([b["labels"] for b in out["dali"]]))
    diff = (tv - dl).abs() * 127.5  # in 8-bit grey levels
    print(f"\n[measured] DALI-CPU vs torchvision, {augment} {size}px over {len(tv)} images: "
          f"mean |diff| {diff.mean():.3f} grey levels, max {diff.max():.1f}")
    assert diff.mean() < limit_mean and diff.max() <= limit_max


def test_dali_random_crop_range_labels_and_resume(synth_clean):
    cfg = data_cfg(synth_clean["root"], loader="dali", augment="pretrain", batch_size=4)
    ref = build_image_loader(cfg, rank=0, world_size=2, seed=3)
    ref.set_epoch(2)
    batches = list(ref)
    assert len(batches) == 3
    x = batches[0]["images"]
    assert x.shape == (4, 3, 32, 32) and x.min() >= -1 and x.max() <= 1
    run = build_image_loader(cfg, rank=0, world_size=2, seed=3)
    run.set_epoch(2)
    it = iter(run)
    next(it), next(it)
    sd = run.state_dict()
    fresh = build_image_loader(cfg, rank=0, world_size=2, seed=3)
    fresh.load_state_dict(sd)
    nxt = next(iter(fresh))
    assert torch.equal(nxt["images"], batches[2]["images"]) and torch.equal(nxt["labels"], batches[2]["labels"])


def test_dali_webdataset_reader(synth_clean):
    import os
    cfg = data_cfg(os.path.join(synth_clean["root"], "wds"), format="wds", loader="dali", batch_size=4)
    val = build_image_loader(cfg, train=False)
    labels = torch.cat([b["labels"] for b in val])
    assert sorted(labels.tolist()) == sorted([c for c in range(4) for _ in range(2)])
    got = [sum(len(b["labels"]) for b in build_image_loader(cfg, rank=r, world_size=2, train=False))
           for r in range(2)]
    assert sum(got) == 8


def test_dali_skips_and_reports_truncated_files(synth):
    ld = build_image_loader(data_cfg(synth["root"], loader="dali", batch_size=8), train=True)
    n = sum(len(b["labels"]) for b in ld)
    assert sorted(ld.corrupt) == sorted(synth["corrupt"]) and n <= 46


def test_backend_selection_and_forced_unavailable_dali(monkeypatch):
    # auto keeps the official PIL pixels: DALI only for the augmentations measured within DALI_TOLERANCE (eval)
    for aug in ("pretrain", "pretrain_noflip", "adm", "adm_noflip", "finetune", "linprobe", "none"):
        assert resolve_loader_backend("auto", aug) == "torchvision", aug
    assert set(DALI_TOLERANCE) == {"eval"} and resolve_loader_backend("auto", "eval") == "dali"
    assert resolve_loader_backend("dali", "pretrain") == "dali"     # an explicit opt-in
    with pytest.raises(ValueError, match="RandAugment"):
        resolve_loader_backend("dali", "finetune")
    with pytest.raises(ValueError, match="no DALI pipeline"):
        resolve_loader_backend("dali", "linprobe")
    monkeypatch.setattr(dali_mod, "dali_available", lambda: False)
    assert resolve_loader_backend("auto", "eval") == "torchvision"
    with pytest.raises(RuntimeError, match="data.loader=dali but nvidia.dali is not importable"):
        resolve_loader_backend("dali")
    with pytest.raises(ValueError, match="data.loader='pil' is unknown"):
        resolve_loader_backend("pil")


def test_mixed_decoding_needs_a_gpu(synth_clean):
    with pytest.raises(ValueError, match="dali_device=mixed decodes on the GPU"):
        build_image_loader(data_cfg(synth_clean["root"], loader="dali", dali_device="mixed"), device="cpu")


def test_cls_parsing():
    raw = torch.tensor([list(b"7" + b" " * 11), list(b"123\n" + b" " * 8), list(b" 40" + b" " * 9)], dtype=torch.uint8)
    assert dali_mod._parse_cls(raw).tolist() == [7, 123, 40]
    with pytest.raises(ValueError, match="without a class id"):
        dali_mod._parse_cls(torch.tensor([list(b"x" * 12)], dtype=torch.uint8))
