"""LightningDiT on every engine (issue 21): the engine-level run of LightningDiT-tiny/1 with LightningDiT's loss
(rectified flow, logit-normal t, cosine term) on fixed global data, for the local reference (in the test's process)
and for the distributed engines (this file as a torchrun worker).

Run as a worker:  python tests/_helpers_lightning_train.py --out DIR --cases ddp fsdp2
Rank 0 writes DIR/lightning_equiv.json; every rank prints TRAIN_HELPER_OK when all finished.
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("DS_BUILD_OPS", "0")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _helpers_train as H  # noqa: E402

CASES = {"ddp": dict(name="ddp"), "fsdp2": dict(name="fsdp2"), "ds2": dict(name="deepspeed", zero_stage=2)}
# the trainer-level overrides that make the debug recipe a LightningDiT flow run (the resume helper's --set)
SIT_SET = ["task=sit", "model.img_size=4", "model.in_chans=32", "model.learn_sigma=false",
           "dit.time_sampling=logit_normal", "dit.cosine_loss=true", "optim.weight_decay=0", "optim.beta2=0.95",
           "schedule.name=constant", "schedule.warmup_steps=0"]


def lightning_data(steps: int, accum: int, global_batch: int):
    """Global latents, labels, label-drop flags, times and noise of every micro-step (one fixed generator)."""
    from usp_scale.transport import sample_time

    g = torch.Generator().manual_seed(7)
    m = steps * accum
    x = torch.randn(m, global_batch, 32, 4, 4, generator=g)
    y = torch.randint(0, 10, (m, global_batch), generator=g)
    drop = (torch.rand(m, global_batch, generator=g) < 0.1).long()
    t = sample_time(m * global_batch, generator=g, kind="logit_normal").view(m, global_batch)
    noise = torch.randn(x.shape, generator=g)
    return x, y, drop, t, noise


def lightning_losses(engine_cfg, *, steps=3, accum=2, global_batch=8, rank=0, world=1):
    """LightningDiT-tiny/1 trained with LightningDiT's transport loss; per-step global-mean losses and the final
    full weights."""
    import torch.distributed as dist

    from usp_scale.config import OptimConfig
    from usp_scale.engine import build_engine
    from usp_scale.models import create_model
    from usp_scale.training.optim import build_optimizer, param_groups
    from usp_scale.transport import create_transport

    torch.manual_seed(0)
    model = create_model("LightningDiT-tiny/1", input_size=4, in_channels=32, num_classes=10)
    ocfg = OptimConfig(lr=1e-3, weight_decay=0.0, beta2=0.95, eps=1e-4, fused=False)
    per = global_batch // world
    eng = build_engine(engine_cfg, model, lambda m: build_optimizer(ocfg, param_groups(m, 0.0), torch.device("cpu")),
                       accum_iter=accum, clip_grad=1.0, micro_batch=per)
    transport = create_transport(time_sampling="logit_normal", cosine_loss=True)
    x, y, drop, t, noise = lightning_data(steps, accum, global_batch)
    sl = slice(rank * per, (rank + 1) * per)
    losses, acc = [], 0.0
    for i in range(steps * accum):
        with eng.sync_context(), eng.autocast():
            loss = transport.training_losses(eng, x[i, sl], dict(y=y[i, sl], force_drop_ids=drop[i, sl]),
                                             t=t[i, sl], noise=noise[i, sl])["loss"].mean()
        eng.backward(loss)
        acc += float(loss.detach()) / accum
        if eng.step() is None:
            continue
        tt = torch.tensor([acc], dtype=torch.float64)
        if world > 1:
            dist.all_reduce(tt)
        losses.append(float(tt) / world)
        acc = 0.0
    sd = eng.weights.full_model_state_dict()
    return losses, {k: v.tolist() for k, v in sd.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--cases", nargs="*", default=["ddp", "fsdp2"])
    ap.add_argument("--local_rank", type=int, default=-1)
    a = ap.parse_args()
    sys.path.insert(0, H.REPO)
    info = H.init_group()
    results = {}
    for case in a.cases:
        kw = dict(CASES[case])
        cfg = H.engine_cfg(kw.pop("name"), **kw)
        losses, sd = lightning_losses(cfg, rank=info.rank, world=info.world_size)
        results[case] = {"losses": losses, "state": sd}
    H.finish(a.out, "lightning_equiv.json", results, info.rank)


if __name__ == "__main__":
    main()
