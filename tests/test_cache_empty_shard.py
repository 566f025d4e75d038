"""cache_latents when every image of one shard is unreadable (issue 18 item 9): used to crash with "cannot reshape
array of size 0" on every rerun; now the shard is written empty with its corrupt files recorded and named, a rerun
skips it, and the cache reads."""
import json
import os
import shutil

from _helpers_data import synth_clean  # noqa: F401
from usp_scale.data import LatentCache, build_dataset, write_cache, write_manifest
from usp_scale.vae import FrozenVAE


def test_shard_with_every_image_unreadable(synth_clean, tmp_path, capsys):  # noqa: F811
    root = str(tmp_path / "data")
    shutil.copytree(synth_clean["root"], root)
    ds = build_dataset(root, "train")
    bad = [ds.samples[i].path for i in range(4, 8)]  # shard 1 of shard_size 4
    for p in bad:
        with open(p, "w") as f:
            f.write("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n")
    vae = FrozenVAE()
    out = str(tmp_path / "cache")
    args = dict(image_size=32, augment="adm", views=1, seed=1, shard_size=4, batch_size=4, progress=False)
    res = write_cache(ds, vae, out, **args)
    assert 1 in res["written"] and sorted(res["corrupt"]) == sorted(bad)
    err = capsys.readouterr().err
    assert "cache shard 1: every one of its 4 images is unreadable" in err and bad[0] in err, err
    with open(os.path.join(out, "shard_000001.json")) as f:
        side = json.load(f)
    assert side["count"] == 0 and sorted(p for p, _ in side["corrupt"]) == sorted(bad)
    again = write_cache(ds, vae, out, **args)  # the rerun skips every shard, the empty one too
    assert again["written"] == [] and 1 in again["skipped"]
    m = write_manifest(out)
    assert m["num_images"] == len(ds) - 4 and m["num_corrupt"] == 4
    cache = LatentCache(out)
    assert len(cache) == len(ds) - 4


def test_rerun_after_source_images_changed_in_place_is_refused_naming_them(synth_clean, tmp_path):  # noqa: F811
    """Issue 18 item 2: a rerun after the dataset changed in place kept the old shards and manifest silently."""
    import pytest
    from PIL import Image

    from usp_scale.data import LatentCacheError

    root = str(tmp_path / "data")
    shutil.copytree(synth_clean["root"], root)
    ds = build_dataset(root, "train")
    vae = FrozenVAE()
    out = str(tmp_path / "cache")
    args = dict(image_size=32, augment="adm", views=1, seed=1, shard_size=8, batch_size=8, progress=False)
    write_cache(ds, vae, out, **args)
    assert write_cache(ds, vae, out, **args)["written"] == []  # unchanged sources: every shard is reused
    changed = ds.samples[9].path  # shard 1
    Image.new("RGB", (40, 40), (255, 0, 0)).save(changed, format="JPEG")
    with pytest.raises(LatentCacheError, match=r"source images of shard 1 changed since it was written.*"
                                               + changed.replace(".", r"\.")):
        write_cache(build_dataset(root, "train"), vae, out, **args)
