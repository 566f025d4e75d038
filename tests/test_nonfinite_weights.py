"""Weights holding NaN/inf are refused once at load, naming the file and the first bad key, at every entry point that
reads model weights: sample.py --ckpt, transfer.py --src, checkpoint.init_from, the single-file VAE, a teacher (issue 18
item 3: a NaN .safetensors from another tool sampled black images that scored a finite FID; as init_from it trained
NaN steps and blamed optim.lr)."""
import pytest
import torch
from safetensors.torch import save_file

import _helpers_safety as S
from usp_scale.checkpoint.safe_load import NonFiniteWeightsError, check_finite


def _nan_safetensors(path):
    # no project metadata (another tool's file); the bad key is not the first key of the file
    save_file({"a.weight": torch.ones(3), "b.weight": torch.tensor([1.0, float("nan"), float("nan")]),
               "c.weight": torch.tensor([float("inf")])}, path)
    return path


def test_check_finite_names_first_bad_key_and_ignores_integers():
    check_finite({"idx": torch.tensor([1, 2]), "w": torch.zeros(2, dtype=torch.bfloat16)}, "f.pt")
    with pytest.raises(NonFiniteWeightsError, match=r"f\.pt: tensor 'w' holds 1 non-finite value\(s\) \(inf\)"):
        check_finite({"ok": torch.ones(2), "w": torch.tensor([0.0, float("-inf")], dtype=torch.float16)}, "f.pt")


def test_sample_launcher_refuses_nan_safetensors(tmp_path):
    bad = _nan_safetensors(str(tmp_path / "dit.safetensors"))
    r = S.launcher("sample.py", "--model", "DiT-tiny/2", "--ckpt", bad, "--vae", "tiny-random", "--image-size", "64",
                   "--num-samples", "2", "--out-dir", str(tmp_path / "s"), "--no-progress")
    assert r.returncode == 2, r.stderr[-2000:]
    assert bad in r.stderr and "'b.weight' holds 2 non-finite value(s) (NaN)" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr


def test_transfer_launcher_refuses_nan_pth(tmp_path):
    bad = str(tmp_path / "mae.pth")
    torch.save({"model": {"pos_embed": torch.zeros(2), "blocks.0.w": torch.full((2,), float("nan"))}}, bad)
    r = S.launcher("transfer.py", "--src", bad, "--model", "DiT-tiny/2", "--out", str(tmp_path / "o.safetensors"))
    assert r.returncode == 2 and bad in r.stderr and "'blocks.0.w'" in r.stderr, r.stderr[-2000:]


def test_init_from_refuses_nan_before_training(tmp_path):
    bad = _nan_safetensors(str(tmp_path / "init.safetensors"))
    with pytest.raises(NonFiniteWeightsError, match=r"init\.safetensors: tensor 'b\.weight'"):
        S.run_tiny(str(tmp_path / "run"), **{"checkpoint.init_from": bad})


def test_single_file_vae_refuses_nan(tmp_path):
    from usp_scale.vae import FrozenVAE

    bad = str(tmp_path / "vae.ckpt")
    torch.save({"state_dict": {"encoder.conv_in.weight": torch.full((1,), float("nan"))}}, bad)
    with pytest.raises(NonFiniteWeightsError, match=r"vae\.ckpt: tensor 'state_dict\.encoder\.conv_in\.weight'"):
        FrozenVAE(path=bad)
