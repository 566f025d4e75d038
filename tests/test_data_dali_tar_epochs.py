"""DALI WebDataset reader: the tar shards a rank reads change per epoch (seeded by seed and epoch), the ranks'
parts stay disjoint and cover the data. DALI CPU pipeline on small synthetic tar shards."""
import hashlib
import os

import pytest
import torch

from _helpers_data import data_cfg
from usp_scale.data import build_image_loader
from usp_scale.data import dali as dali_mod

pytestmark = pytest.mark.skipif(not dali_mod.dali_available(), reason="nvidia.dali is not installed")


@pytest.fixture(scope="module")
def tars(tmp_path_factory):
    from usp_scale.data.synthetic import make_synthetic
    root = str(tmp_path_factory.mktemp("tar_epochs"))
    make_synthetic(root, classes=4, per_class=6, size=16, val_per_class=1, seed=11, tar_shards=6)
    return os.path.join(root, "wds")


def _keys(loader):
    """Identify each sample by its (deterministic, augment=none) image: a hash of the 8-bit pixels."""
    out = []
    for b in loader:
        px = ((b["images"] + 1) * 127.5).round().to(torch.uint8)
        out += [hashlib.sha1(p.numpy().tobytes()).hexdigest() for p in px]
    return out


def test_tar_shards_move_between_ranks_per_epoch(tars):
    cfg = data_cfg(tars, format="wds", loader="dali", augment="none", image_size=16, batch_size=4)
    everything = _keys(build_image_loader(cfg, rank=0, world_size=1, seed=2))
    assert len(everything) == len(set(everything)) == 24                 # 24 distinct samples
    loaders = [build_image_loader(cfg, rank=r, world_size=2, seed=2) for r in range(2)]
    per_epoch = []
    for epoch in range(2):
        sets = []
        for ld in loaders:
            ld.set_epoch(epoch)
            keys = _keys(ld)
            assert len(keys) == len(set(keys)) == 12
            sets.append(set(keys))
        assert not sets[0] & sets[1]                                      # disjoint
        assert sets[0] | sets[1] == set(everything)                       # together: the whole dataset
        per_epoch.append(sets)
        # the order is a seeded permutation of the shard list, the same on both ranks
        assert loaders[0].epoch_tars() == loaders[1].epoch_tars()
        assert sorted(loaders[0].epoch_tars()) == sorted(loaders[0].dataset.tars)
    assert per_epoch[0][0] != per_epoch[1][0]                             # rank 0 reads other data in epoch 1
    # deterministic: a fresh loader at epoch 1 reads the same set
    again = build_image_loader(cfg, rank=0, world_size=2, seed=2)
    again.set_epoch(1)
    assert set(_keys(again)) == per_epoch[1][0]
