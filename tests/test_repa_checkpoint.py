"""REPA's checkpoint formats (usp_scale/transfer/repa.py): a file written here exactly as REPA's train.py writes it
({"model", "ema", "opt", "args", "steps"} with its argparse.Namespace and an AdamW state), its released bare state
dict and its legacy layout, read through the project's weights_only reader into the registry's REPA SiT,
strictly; the refusals."""
import argparse
import os
import pickle

import pytest
import torch

from usp_scale.checkpoint.safe_load import UnsafeCheckpointError
from usp_scale.models import create_model
from usp_scale.transfer.formats import load_weights, read_state_dict
from usp_scale.transfer.repa import REPACheckpointError, convert_legacy, load_repa_model, read_repa_checkpoint


def repa_train_args(argv):
    """REPA train.py's parse_args (sihyun-yu/REPA): the same arguments, types and defaults."""
    p = argparse.ArgumentParser(description="Training")
    p.add_argument("--output-dir", type=str, default="exps")
    p.add_argument("--exp-name", type=str, required=True)
    p.add_argument("--logging-dir", type=str, default="logs")
    p.add_argument("--report-to", type=str, default="wandb")
    p.add_argument("--sampling-steps", type=int, default=10000)
    p.add_argument("--resume-step", type=int, default=0)
    p.add_argument("--model", type=str)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--encoder-depth", type=int, default=8)
    p.add_argument("--fused-attn", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--qk-norm", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--data-dir", type=str, default="../data/imagenet256")
    p.add_argument("--resolution", type=int, choices=[256, 512], default=256)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--allow-tf32", action="store_true")
    p.add_argument("--mixed-precision", type=str, default="fp16", choices=["no", "fp16", "bf16"])
    p.add_argument("--epochs", type=int, default=1400)
    p.add_argument("--max-train-steps", type=int, default=400000)
    p.add_argument("--checkpointing-steps", type=int, default=50000)
    p.add_argument("--gradient-accumulation-steps", type=int, default=1)
    p.add_argument("--learning-rate", type=float, default=1e-4)
    p.add_argument("--adam-beta1", type=float, default=0.9)
    p.add_argument("--adam-beta2", type=float, default=0.999)
    p.add_argument("--adam-weight-decay", type=float, default=0.)
    p.add_argument("--adam-epsilon", type=float, default=1e-08)
    p.add_argument("--max-grad-norm", default=1.0, type=float)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-workers", type=int, default=4)
    p.add_argument("--path-type", type=str, default="linear", choices=["linear", "cosine"])
    p.add_argument("--prediction", type=str, default="v", choices=["v"])
    p.add_argument("--cfg-prob", type=float, default=0.1)
    p.add_argument("--enc-type", type=str, default="dinov2-vit-b")
    p.add_argument("--proj-coeff", type=float, default=0.5)
    p.add_argument("--weighting", default="uniform", type=str)
    p.add_argument("--legacy", action=argparse.BooleanOptionalAction, default=False)
    return p.parse_args(argv)


def _perturbed(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return model


def write_like_repa(path, args, make):
    """REPA train.py: model / ema (deepcopy, requires_grad False), AdamW over model.parameters(), one step,
    then torch.save({"model": model.module.state_dict(), "ema", "opt", "args", "steps"}, f"{step:07d}.pt")."""
    torch.manual_seed(args.seed)
    model = make()
    ema = _perturbed(make(), 1).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                            weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    _perturbed(model, 2)
    out, zs = model(torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2]))
    (out.square().mean() + zs[0].square().mean()).backward()
    opt.step()
    torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "args": args,
                "steps": 1}, path)
    return model, ema


@pytest.fixture(scope="module")
def repa_file(tmp_path_factory):
    """REPA's format around the project's tiny REPA SiT (SiT-tiny/2-REPA: REPA's SiT at width 128, depth 2, on
    8x8 latents of 64 px images; the XL/L/B sizes differ only in shapes, pinned in test_repa_models.py), tap 1."""
    args = repa_train_args(["--exp-name", "t", "--model", "SiT-tiny/2", "--encoder-depth", "1", "--num-classes", "10"])
    args.resolution = 64        # outside REPA's argparse choices (256, 512): set after parsing, as a user could
    path = str(tmp_path_factory.mktemp("repa") / "0000001.pt")
    model, ema = write_like_repa(path, args, lambda: create_model("SiT-tiny/2-REPA", z_dims=(768,),
                                                                   projector_dim=2048))
    return path, args, model, ema


def test_train_py_checkpoint_loads_ema_strictly(repa_file):
    path, args, model, ema = repa_file
    ck = read_repa_checkpoint(path)
    assert ck.model_name == "SiT-tiny/2-REPA" and ck.which == "ema" and ck.steps == 1
    assert ck.model_kwargs == dict(input_size=8, num_classes=10, z_dims=[768], projector_dim=2048, qk_norm=False,
                                   encoder_depth=1)
    assert ck.args["enc_type"] == "dinov2-vit-b" and ck.args["proj_coeff"] == 0.5
    loaded = load_repa_model(path)
    for k, v in ema.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    raw = load_repa_model(path, which="model")
    assert all(torch.equal(raw.state_dict()[k], v) for k, v in model.state_dict().items())
    # the project's generic reader takes the same file (EMA first), strictly, into the registry model
    m = create_model("SiT-tiny/2-REPA", z_dims=(768,), projector_dim=2048)
    load_weights(m, path, which="ema")
    assert all(torch.equal(m.state_dict()[k], v) for k, v in ema.state_dict().items())
    # the optimizer state's parameter order is the model's (REPA's module order)
    opt = torch.load(path, weights_only=False)["opt"]
    n = len(list(m.parameters()))
    assert len(opt["param_groups"][0]["params"]) == n and len(opt["state"]) == n - 1    # pos_embed gets no grad
    shapes = [p.shape for p in m.parameters()]
    assert all(opt["state"][i]["exp_avg"].shape == shapes[i] for i in opt["state"])


def test_release_bare_state_dict_and_legacy_layout(repa_file, tmp_path):
    path, args, model, ema = repa_file
    bare = str(tmp_path / "last.pt")
    torch.save(ema.state_dict(), bare)                    # REPA's released checkpoint: a bare EMA state dict
    ck = read_repa_checkpoint(bare)
    assert ck.model_name == "SiT-tiny/2-REPA" and ck.model_kwargs["encoder_depth"] == 8 and ck.steps is None
    with pytest.raises(ValueError, match="encoder_depth=8.*1..2"):
        load_repa_model(bare)                             # the release's default tap does not fit a 2-block model
    got = load_repa_model(bare, encoder_depth=1)
    assert all(torch.equal(got.state_dict()[k], v) for k, v in ema.state_dict().items())
    # --legacy: blocks after the tap stored as decoder_blocks.{i - encoder_depth}
    legacy = {(f"decoder_blocks.{int(k.split('.')[1]) - 1}." + k.split(".", 2)[2]
               if k.startswith("blocks.") and int(k.split(".")[1]) >= 1 else k): v for k, v in ema.state_dict().items()}
    assert any(k.startswith("decoder_blocks.0.") for k in legacy)
    assert convert_legacy(legacy, 1).keys() == ema.state_dict().keys()
    lp = str(tmp_path / "legacy.pt")
    torch.save(legacy, lp)
    with pytest.raises(REPACheckpointError, match="legacy layout .*encoder_depth"):
        read_repa_checkpoint(lp)
    got = load_repa_model(lp, encoder_depth=1)
    assert all(torch.equal(got.state_dict()[k], v) for k, v in ema.state_dict().items())


def test_refusals(repa_file, tmp_path):
    path, args, model, ema = repa_file
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        read_repa_checkpoint(str(tmp_path / "none.pt"))
    with pytest.raises(REPACheckpointError, match="--encoder-depth 1, encoder_depth=2"):
        read_repa_checkpoint(path, encoder_depth=2)

    def saved(**changes):
        obj = torch.load(path, weights_only=False)
        a = argparse.Namespace(**{**vars(obj["args"]), **changes})
        p = str(tmp_path / f"c{len(os.listdir(tmp_path))}.pt")
        torch.save({**obj, "args": a}, p)
        return p

    with pytest.raises(REPACheckpointError, match="path-type cosine"):
        read_repa_checkpoint(saved(path_type="cosine"))
    with pytest.raises(REPACheckpointError, match="args.model is 'SiT-L/2' but the weights are a SiT-tiny/2"):
        read_repa_checkpoint(saved(model="SiT-L/2"))
    with pytest.raises(REPACheckpointError, match="args.resolution 256 needs a 32-latent model"):
        read_repa_checkpoint(saved(resolution=256))
    with pytest.raises(REPACheckpointError, match="args.qk_norm=True"):
        read_repa_checkpoint(saved(qk_norm=True))
    sd = ema.state_dict()
    p = str(tmp_path / "noproj.pt")
    torch.save({k: v for k, v in sd.items() if not k.startswith("projectors.")}, p)
    with pytest.raises(REPACheckpointError, match="no projectors"):
        read_repa_checkpoint(p)
    # a checkpoint of another shape is refused by the strict load, naming the keys
    m = create_model("SiT-tiny/2-REPA", z_dims=(1024,), projector_dim=2048)
    with pytest.raises(ValueError, match="projectors.0.4.weight"):
        load_weights(m, path, which="ema")


class _Payload:
    def __reduce__(self):
        return (os.system, ("true",))


def test_a_file_that_would_run_code_is_refused(repa_file, tmp_path):
    path, *_ = repa_file
    obj = torch.load(path, weights_only=False)
    p = str(tmp_path / "evil.pt")
    with open(p, "wb") as f:
        torch.save({**obj, "extra": _Payload()}, f, pickle_module=pickle)
    with pytest.raises(UnsafeCheckpointError, match="evil.pt"):
        read_repa_checkpoint(p)
    with pytest.raises(UnsafeCheckpointError):
        read_state_dict(p, which="ema")
