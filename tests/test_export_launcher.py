"""launchers/export.py --format official: a DiT run's export becomes the official train.py checkpoint whose "opt" the
official code's optimizer (one AdamW group over model.parameters()) loads, state for state by parameter name."""
import os
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "launchers"))


def _run_export(tmp_path):
    """What the trainer's Exporter writes for a DiT run (our two groups), after two AdamW steps."""
    from usp_scale.checkpoint import save_official
    from usp_scale.config import load_config, to_dict
    from usp_scale.training.optim import build_optimizer
    from usp_scale.training.tasks import build_task

    cfg = load_config(os.path.join(REPO, "configs", "debug", "tiny_dit.yaml"), ["checkpoint.init_from="])
    task = build_task(cfg)
    torch.manual_seed(0)
    model = task.build_model()
    opt = build_optimizer(cfg.optim, task.param_groups(model), torch.device("cpu"))
    assert len(opt.param_groups) == 2
    for _ in range(2):
        for p in model.parameters():
            p.grad = torch.randn_like(p) if p.requires_grad else None
        opt.step()
    sd = model.state_dict()
    path = tmp_path / "run" / "export" / "0000002.pt"
    save_official(str(path), {"model": sd, "ema": sd, "opt": opt.state_dict(), "args": to_dict(cfg)})
    return model, opt, path


def test_official_export_resumes_in_the_official_optimizer(tmp_path):
    import export as E
    from usp_scale.models import create_model

    model, ours, path = _run_export(tmp_path)
    out = tmp_path / "official" / "0000002.pt"
    assert E.main([str(tmp_path / "run"), "--format", "official", "--out", str(out)]) == 0
    ck = torch.load(out, weights_only=True)
    assert list(ck) == ["model", "ema", "opt", "args"]
    # the official train.py: model = DiT_models[...](...); opt = AdamW(model.parameters(), lr=1e-4, weight_decay=0)
    fresh = create_model("DiT-tiny/2-VAE-simple", input_size=8, num_classes=10)
    fresh.load_state_dict(ck["model"], strict=True)
    official = torch.optim.AdamW(fresh.parameters(), lr=1e-4, weight_decay=0)
    with pytest.raises(ValueError, match="parameter group"):   # our own grouping: what the issue saw
        official.load_state_dict(torch.load(path, weights_only=True)["opt"])
    official.load_state_dict(ck["opt"])
    names = [n for n, _ in fresh.named_parameters()]
    by_name = {n: ours.state[p] for n, p in model.named_parameters() if p in ours.state}
    got = {n: official.state[p] for n, p in fresh.named_parameters() if p in official.state}
    assert set(got) == set(by_name) and "pos_embed" not in got and len(got) == len(names) - 1
    for n, s in by_name.items():
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(got[n][k], s[k]), (n, k)
    g = official.param_groups[0]
    assert g["lr"] == ours.param_groups[0]["lr"] and g["betas"] == ours.param_groups[0]["betas"]
    assert g["weight_decay"] == 0.0
    # one more official step runs
    for p in fresh.parameters():
        p.grad = torch.zeros_like(p) if p.requires_grad else None
    official.step()


def test_export_errors_name_the_file(tmp_path, capsys):
    import export as E

    assert E.main([str(tmp_path), "--format", "official", "--out", str(tmp_path / "x.pt")]) == 2
    assert f"{tmp_path}: no official export" in capsys.readouterr().err
    torch.save({"model": {}}, tmp_path / "mae.pth")
    assert E.main([str(tmp_path / "mae.pth"), "--format", "official", "--out", str(tmp_path / "x.pt")]) == 2
    assert "not a DiT/SiT export (no ema, opt, args)" in capsys.readouterr().err
