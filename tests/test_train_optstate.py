"""full_optimizer_state_dict() of every engine on 2 gloo ranks is torch's own AdamW state dict (index-keyed in
param-group order, as in the official DiT checkpoint's "opt"): it loads into torch.optim.AdamW over a plain model
and equals the state of a single-process run on the same global batch (DeepSpeed ZeRO-1/2/3: gathered from the
partitions; FSDP2: renumbered from DCP's name-keyed dict)."""
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _helpers_train as H  # noqa: E402

HYPER = ("lr", "betas", "eps", "weight_decay", "param_names")


def _fresh_adamw():
    from usp_scale.config import OptimConfig
    from usp_scale.training.optim import build_optimizer, param_groups

    model = H.engine_model()
    opt = build_optimizer(OptimConfig(lr=1e-2, weight_decay=0.05, eps=1e-4, fused=False), param_groups(model, 0.05),
                          torch.device("cpu"))
    return model, opt


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _check(path, ref, tol, case):
    osd = torch.load(path, weights_only=False)
    others = json.load(open(str(path).replace(".pt", "_others.json")))
    assert others[0] == "dict", case
    # the file itself is in the official (torch) layout: integer keys, integer params in the groups
    assert sorted(osd["state"]) == list(range(32)), case
    assert [g["params"] for g in osd["param_groups"]] == [list(range(12)), list(range(12, 32))], case
    model, opt = _fresh_adamw()
    opt.load_state_dict(osd)  # torch's own loader: same groups, same parameter counts, index keys
    got = opt.state_dict()
    assert len(got["param_groups"]) == len(ref["param_groups"]) == 2, case
    for g, r in zip(got["param_groups"], ref["param_groups"]):
        assert g["params"] == r["params"] and all(g[k] == r[k] for k in HYPER), case
    assert sorted(got["state"]) == sorted(ref["state"]) == list(range(32)), case
    params = [p for g in opt.param_groups for p in g["params"]]
    for i, r in ref["state"].items():
        s = got["state"][i]
        assert float(s["step"]) == float(r["step"]) == 4.0, case
        for k in ("exp_avg", "exp_avg_sq"):
            assert s[k].shape == r[k].shape == params[i].shape and s[k].dtype == torch.float32, (case, i, k)
            assert _rel(s[k], r[k]) <= tol, (case, i, k, _rel(s[k], r[k]))


@pytest.mark.parametrize("cases", [["ddp", "fsdp2", "ds2"], pytest.param(["ds1", "ds3", "ds2_bf16"],
                                                                          marks=pytest.mark.slow)])
def test_full_optimizer_state_loads_into_torch_adamw_and_matches_one_process(tmp_path, cases):
    p = H.torchrun(["tests/_helpers_train.py", "optstate", "--out", str(tmp_path), "--cases", *cases])
    assert p.stdout.count(H.OK) == 2, f"rc={p.returncode}\n{(p.stdout + p.stderr)[-6000:]}"
    rec = {"optimizer": None}
    H.engine_losses(H.engine_cfg("local"), clip=1.0, record=rec)
    ref = rec["optimizer"]
    for case in cases:
        # fp32: reduction order only; bf16 (ZeRO bf16 weights and gradients) against the fp32 run: loosely
        _check(tmp_path / f"opt_{case}.pt", ref, 0.1 if "bf16" in case else 1e-5, case)
