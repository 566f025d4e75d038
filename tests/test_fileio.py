"""usp_scale.fileio: the one atomic writer (tmp file in the same folder, fsync, rename; nothing partial on error)."""
import errno
import json
import os

import pytest
import torch

from usp_scale import fileio


def test_write_kinds_round_trip(tmp_path):
    assert fileio.write_bytes(str(tmp_path / "a" / "b.bin"), b"\x00\x01") == str(tmp_path / "a" / "b.bin")
    assert (tmp_path / "a" / "b.bin").read_bytes() == b"\x00\x01"
    fileio.write_text(str(tmp_path / "t.txt"), "héllo")
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "héllo"
    fileio.write_json(str(tmp_path / "j.json"), {"b": 1, "a": [1, 2]}, sort_keys=True)
    assert json.loads((tmp_path / "j.json").read_text()) == {"a": [1, 2], "b": 1}
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]


def test_failure_keeps_the_old_file_and_removes_the_tmp(tmp_path):
    path = str(tmp_path / "x.txt")
    fileio.write_text(path, "old")

    def boom(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise RuntimeError("crash mid-write")
    with pytest.raises(RuntimeError, match="crash mid-write"):
        fileio.write_with(path, boom)
    assert open(path).read() == "old" and os.listdir(tmp_path) == ["x.txt"]


def test_enospc_becomes_disk_full_error_naming_the_path(tmp_path):
    path = str(tmp_path / "big.bin")

    def full(tmp):
        open(tmp, "w").close()
        raise OSError(errno.ENOSPC, "No space left on device", tmp)
    with pytest.raises(fileio.DiskFullError, match=r"big\.bin needs about 2\.0 KiB.*nothing partial"):
        fileio.write_with(path, full, needed=2048)
    assert os.listdir(tmp_path) == []


def test_save_safetensors_is_the_checked_export(tmp_path):
    from usp_scale.checkpoint.safe_load import read_safetensors

    lin = torch.nn.Linear(3, 2)
    path = fileio.save_safetensors(lin, str(tmp_path / "m.safetensors"), metadata={"step": 7})
    sd, meta = read_safetensors(path, with_metadata=True)
    assert meta["step"] == "7" and meta[fileio.CONTENT_KEY] == fileio.tensors_sha256(sd)
    assert torch.equal(sd["weight"], lin.weight.detach())
    tied = {"a": torch.ones(4), "b": torch.ones(4)}
    tied["b"] = tied["a"]  # shared storage: cloned on the way out, so safetensors accepts it
    fileio.save_safetensors(tied, str(tmp_path / "tied.safetensors"))


def test_fileio_is_a_leaf():
    import ast

    tree = ast.parse(open(fileio.__file__).read())
    mods = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)] + \
        [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in mods if m.startswith(("usp_scale", "."))] and all(
        n.level == 0 for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)), mods


def test_remove_stale_temps_removes_only_dead_writers_files(tmp_path):
    """Issue 18 litter: the <name>.tmp<pid> files of writers killed mid-write are removed at the next start; a live
    writer's (this process) and other files stay; ``names`` limits it to given files of one folder."""
    import subprocess

    from usp_scale.fileio import remove_stale_temps

    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / "sub").mkdir()
    stale = [tmp_path / f"a.safetensors.tmp{dead.pid}", tmp_path / "sub" / f"b.png.tmp{dead.pid}"]
    live = tmp_path / f"c.json.tmp{os.getpid()}"
    keep = tmp_path / "notes.tmp"
    for p in stale + [live, keep]:
        p.write_bytes(b"x")
    assert remove_stale_temps(str(tmp_path), names=("other.safetensors",)) == []
    assert sorted(remove_stale_temps(str(tmp_path))) == sorted(map(str, stale))
    assert live.exists() and keep.exists()


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_every_artifact_follows_the_umask(tmp_path, umask):
    """safetensors creates its file -rw------- (unreadable for a colleague on shared storage), torch.save follows the
    umask: through the one writer both get 0o666 & ~umask, as do the official export and plain writes."""
    import stat

    import numpy as np
    from safetensors.torch import save_file

    from usp_scale.checkpoint.export import save_official

    raw = tmp_path / "raw.safetensors"
    old = os.umask(umask)
    try:
        save_file({"w": torch.zeros(2)}, str(raw))                     # the library alone (what the issue saw)
        paths = [fileio.save_safetensors({"w": torch.ones(3)}, str(tmp_path / "model.safetensors")),
                 fileio.torch_save({"w": torch.ones(3)}, str(tmp_path / "x.pt")),
                 save_official(str(tmp_path / "official.pt"), {"model": {"w": torch.ones(3)}}),
                 fileio.write_json(str(tmp_path / "m.json"), {"a": 1}),
                 fileio.write_with(str(tmp_path / "a.npy"), lambda t: np.save(open(t, "wb"), np.zeros(2)))]
        assert fileio.file_mode() == 0o666 & ~umask
    finally:
        os.umask(old)
    if umask != 0o077:
        assert stat.S_IMODE(os.stat(raw).st_mode) == 0o600   # the library's own mode, which we correct
    for p in paths:
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o666 & ~umask, p
