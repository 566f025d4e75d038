"""A full disk is reported as a full disk (path, space needed, space free) and leaves no partial file or folder:
on a real small tmpfs (needs root to mount; skipped otherwise) and with a simulated ENOSPC (always runs)."""
import errno
import os
import subprocess

import numpy as np
import pytest
import torch

import _helpers_safety as S
from usp_scale.fileio import DiskFullError


@pytest.fixture
def small_fs(tmp_path):
    """A 1 MiB tmpfs mounted for the test."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()}); the simulated-ENOSPC tests cover the code path")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)  # lazy: a failed write may still hold a descriptor


def _leftovers(root):
    return [os.path.join(r, f) for r, ds, fs in os.walk(root) for f in fs + ds if ".tmp" in f]


def test_checkpoint_on_a_full_disk(small_fs):
    out = str(small_fs / "run")
    with pytest.raises(DiskFullError) as e:
        S.run_tiny(out, **{"data.synthetic_samples": 32})
    msg = str(e.value)
    assert f"{out}/checkpoints/step_00000002 needs about" in msg and "free when the write failed" in msg, msg
    assert "nothing partial was left behind" in msg
    assert not _leftovers(out) and not os.path.exists(os.path.join(out, "checkpoints", "step_00000002"))


def test_export_on_a_full_disk(small_fs):
    from usp_scale.fileio import save_safetensors

    path = str(small_fs / "model.safetensors")
    with pytest.raises(DiskFullError, match=r"model\.safetensors needs about 4\.0 MiB"):
        save_safetensors({"w": torch.zeros(1 << 20)}, path)
    assert os.listdir(small_fs) == []


def test_latent_cache_on_a_full_disk(small_fs):
    from usp_scale.data.cache_format import write_shard

    settings = {"latent_shape": [4, 28, 28], "views": 4, "dtype": "fp16"}
    mean = torch.zeros(100, 4, 2, 4, 28, 28, dtype=torch.float16)
    with pytest.raises(DiskFullError, match=r"shard_000000\.safetensors needs about"):
        write_shard(str(small_fs), 0, [mean], [mean], [torch.zeros(100, dtype=torch.long)],
                     [torch.arange(100)], [], settings)
    assert os.listdir(small_fs) == []


def test_simulated_enospc_in_a_checkpoint(tmp_path, monkeypatch):
    """Where no small file system can be made: torch.save failing with ENOSPC inside a checkpoint save."""
    import usp_scale.checkpoint.safe_load as SL

    real = torch.save

    def full(obj, f, *a, **k):
        if str(f).endswith(".pt.tmp" + str(os.getpid())) and "trainer.pt" in str(f):
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real(obj, f, *a, **k)
    monkeypatch.setattr(SL.torch, "save", full)
    out = str(tmp_path / "run")
    with pytest.raises(DiskFullError, match=r"checkpoints/step_00000002 needs about .* free when the write failed"):
        S.run_tiny(out)
    assert not _leftovers(out)
    monkeypatch.setattr(SL.torch, "save", real)
    assert np.isfinite(S.run_tiny(out)["grad_norm"])  # space back: the run completes
