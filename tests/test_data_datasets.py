"""Datasets: layout errors, corrupt-file reporting, ImageFolder vs WebDataset tar agreement."""
import os
import tarfile
import io
import warnings

import pytest
import torch

from _helpers_data import data_cfg, synth, synth_clean  # noqa: F401
from usp_scale.data import (CorruptImageError, DatasetError, ImageFolderDataset, TarDataset, build_image_loader)


def test_missing_and_empty_folders_name_the_path(tmp_path):
    with pytest.raises(DatasetError, match=str(tmp_path / "nope" / "train")):
        ImageFolderDataset(str(tmp_path / "nope"), "train")
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"no class folders in .*empty/train"):
        ImageFolderDataset(str(tmp_path / "empty"), "train")
    (tmp_path / "noimg" / "train" / "cat").mkdir(parents=True)
    (tmp_path / "noimg" / "train" / "cat" / "notes.txt").write_text("x")
    with pytest.raises(DatasetError, match=r"class folder .*noimg/train/cat holds no images"):
        ImageFolderDataset(str(tmp_path / "noimg"), "train")
    with pytest.raises(DatasetError, match="data.root is empty"):
        ImageFolderDataset("", "train")
    (tmp_path / "notar").mkdir()
    with pytest.raises(DatasetError, match=r"no .tar shards in .*notar"):
        TarDataset(str(tmp_path / "notar"), "")


def test_tar_without_label_is_an_error(tmp_path):
    with tarfile.open(tmp_path / "a.tar", "w") as tf:
        ti = tarfile.TarInfo("k1.jpg")
        ti.size = 3
        tf.addfile(ti, io.BytesIO(b"abc"))
    with pytest.raises(DatasetError, match=r"a.tar: sample 'k1' has an image but no .cls"):
        TarDataset(str(tmp_path), "")


def test_folder_and_tar_index_the_same_samples(synth):
    f = ImageFolderDataset(synth["root"], "train")
    t = TarDataset(os.path.join(synth["root"], "wds"), "train")
    assert len(f) == len(t) == 6 * 8
    assert f.labels == t.labels
    for i in (0, 17, 47):
        assert f.read_bytes(i) == t.read_bytes(i)


@pytest.mark.parametrize("fmt", ["folder", "wds"])
def test_corrupt_images_are_skipped_counted_and_reported(synth, fmt):
    root = synth["root"] if fmt == "folder" else os.path.join(synth["root"], "wds")
    loader = build_image_loader(data_cfg(root, format=fmt, batch_size=8), train=True)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        n = sum(len(b["labels"]) for b in loader)
    assert n == 48 - 2
    assert loader.corrupt and len(loader.corrupt) == 2
    # reported by path: the file itself, or tar::member at the same dataset position
    folder = ImageFolderDataset(synth["root"], "train")
    pos = sorted(i for i, r in enumerate(folder.samples) if r.path in synth["corrupt"])
    assert sorted(loader.corrupt) == sorted(loader.dataset.samples[i].path for i in pos)
    if fmt == "wds":
        assert all(".tar::" in p for p in loader.corrupt)
    assert all("truncated" in m for m in loader.corrupt.values())
    assert sum("skipped corrupt image" in str(x.message) for x in w) == 2


def test_strict_makes_a_corrupt_image_an_error(synth):
    loader = build_image_loader(data_cfg(synth["root"], strict=True, batch_size=8), train=True)
    with pytest.raises(CorruptImageError, match=r"corrupt image .*\.jpg.*strict"):
        for _ in loader:
            pass


def test_image_batches_contract(synth_clean):
    loader = build_image_loader(data_cfg(synth_clean["root"], batch_size=5), train=True)
    assert len(loader) == 24 // 5
    b = next(iter(loader))
    assert b["images"].shape == (5, 3, 32, 32) and b["images"].dtype == torch.float32
    assert b["images"].min() >= -1 and b["images"].max() <= 1 and b["images"].min() < -0.5
    assert b["labels"].dtype == torch.long and b["labels"].shape == (5,)
    val = build_image_loader(data_cfg(synth_clean["root"], batch_size=3), train=False)
    assert sum(len(b["labels"]) for b in val) == 8  # every val image once, last batch short


def test_image_folder_reads_what_torchvision_image_folder_reads(tmp_path):
    """torchvision's rules on the same folder: its extensions (any case: .pgm, .tif, .ppm, .webp, .PNG ...), files in
    nested sub-folders of a class, class order by name; what neither reads is warned about, by extension."""
    import numpy as np
    from PIL import Image
    from torchvision.datasets import ImageFolder

    root = tmp_path / "train"
    rng = np.random.default_rng(0)

    def img(path, mode="RGB"):
        path.parent.mkdir(parents=True, exist_ok=True)
        arr = rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)
        im = Image.fromarray(arr)
        (im.convert("L") if mode == "L" else im).save(path)

    img(root / "b_dog" / "a.jpg")
    img(root / "b_dog" / "x.PNG")
    img(root / "b_dog" / "gray.pgm", "L")
    img(root / "b_dog" / "deep" / "er" / "n.tif")
    img(root / "b_dog" / "sub" / "m.ppm")
    img(root / "A_cat" / "w.webp")
    img(root / "A_cat" / "t.tiff")
    img(root / "A_cat" / "s.bmp")
    img(root / "A_cat" / "only.gif")          # PIL reads it, torchvision's ImageFolder does not: warned, not read
    (root / "A_cat" / "notes.txt").write_text("x")
    (root / "A_cat" / ".DS_Store").write_bytes(b"\0")
    img(root / "c_nested_only" / "inner" / "z.jpeg")  # a class whose images are all in a sub-folder
    tv = ImageFolder(str(root))
    with pytest.warns(UserWarning, match=r"1 x \.gif \(e\.g\. .*only\.gif\), 1 x \.txt") as rec:
        ours = ImageFolderDataset(str(tmp_path), "train")
    assert ".DS_Store" not in str(rec[0].message)
    assert ours.classes == tv.classes == ["A_cat", "b_dog", "c_nested_only"]
    assert [(r.path, r.label) for r in ours.samples] == tv.samples and len(tv.samples) == 9
    for i in range(len(tv)):
        mine, label, err = ours.load(i, strict=True)
        theirs, tlabel = tv[i]
        assert err == "" and label == tlabel and np.array_equal(np.asarray(mine), np.asarray(theirs))


def test_compressed_webdataset_shards_are_refused_with_the_command_that_converts_them(tmp_path):
    """Shards written by the webdataset library as .tar.gz: refused (not skipped) with a command; after running
    that command we read exactly what webdataset reads from the compressed shards (keys' order, labels, pixels)."""
    import re
    import subprocess

    import numpy as np
    from PIL import Image

    wds = pytest.importorskip("webdataset")  # in the "test" extra
    split = tmp_path / "train"
    split.mkdir()
    rng = np.random.default_rng(1)
    for s in range(2):
        with wds.TarWriter(str(split / f"shard-{s:06d}.tar.gz"), mtime=0) as w:
            for i in range(3):
                img = Image.fromarray(rng.integers(0, 255, (9, 11, 3), dtype=np.uint8))
                w.write({"__key__": f"s{s}_{i:03d}", "png": img, "cls": (s * 3 + i) % 4})
    urls = [str(split / f"shard-{s:06d}.tar.gz") for s in range(2)]
    theirs = [(d["__key__"], d["cls"], np.asarray(d["png"].convert("RGB")))
              for d in wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("pil")]
    # a mixed folder is refused too: nothing compressed is left out silently
    (split / "plain.tar").write_bytes(b"")
    with pytest.raises(DatasetError, match=r"compressed tar shards \(shard-000000.tar.gz, shard-000001.tar.gz\) "
                                           r"are not read.*gunzip \*\.tar\.gz") as e:
        TarDataset(str(tmp_path), "train")
    (split / "plain.tar").unlink()
    cmd = re.search(r"`(cd .*?)`", str(e.value)).group(1)
    subprocess.run(["bash", "-c", cmd], check=True, timeout=60)
    ours = TarDataset(str(tmp_path), "train")
    assert [r.path.split("::")[1].split(".")[0] for r in ours.samples] == [k for k, _, _ in theirs]
    assert ours.labels == [c for _, c, _ in theirs] and len(theirs) == 6
    for i, (_, _, px) in enumerate(theirs):
        assert np.array_equal(np.asarray(ours.load(i, strict=True)[0]), px)
