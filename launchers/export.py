#!/usr/bin/env python3
"""Write a run's export in an official format, for the official code to load and to resume training from.

  --format official   DiT/SiT: the official train.py's checkpoint {"model", "ema", "opt", "args"} with "opt" in the
                      official grouping: one param group over model.parameters(), as the official code builds its
                      AdamW (torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)), so its
                      opt.load_state_dict(ckpt["opt"]) accepts it. (The trainer's own export keeps our decay /
                      no-decay groups, the layout our optimizer loads.) "args" stays our resolved config, a plain
                      dict, so the file loads with torch.load(weights_only=True).

Examples:
  python launchers/export.py runs/dit --format official --out runs/dit/official/0002000.pt
  python launchers/export.py runs/dit/export/0002000.pt --format official --out dit_official.pt

SRC is a run folder (its newest export/NNNNNNN.pt, written with checkpoint.export_official=true) or such a file.
"""
from __future__ import annotations

import argparse
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout first

from usp_scale.checkpoint import save_official  # noqa: E402
from usp_scale.checkpoint.export import OfficialFormatError, official_optimizer_state  # noqa: E402
from usp_scale.checkpoint.safe_load import torch_load  # noqa: E402
from usp_scale.config.load import config_from_dict  # noqa: E402
from usp_scale.training.tasks import build_task  # noqa: E402

FORMATS = ("official",)
KEYS = ("model", "ema", "opt", "args")


def find_export(src: str) -> str:
    """``src`` itself, or the newest official DiT/SiT export (``export/NNNNNNN.pt``) of the run folder ``src``."""
    if os.path.isfile(src):
        return src
    folder = os.path.join(src, "export")
    found = sorted(f for f in os.listdir(folder) if re.fullmatch(r"\d{7}\.pt", f)) if os.path.isdir(folder) else []
    if not found:
        raise FileNotFoundError(f"{src}: no official export (export/NNNNNNN.pt) in this run folder; a DiT/SiT run "
                                "writes one at its end with checkpoint.export_official=true (the default)")
    return os.path.join(folder, found[-1])


def to_official(path: str, weight_decay: float = 0.0) -> dict:
    ck = torch_load(path, what="official export")
    missing = [k for k in KEYS if k not in ck] if isinstance(ck, dict) else list(KEYS)
    if missing:
        raise OfficialFormatError(f"{path}: not a DiT/SiT export (no {', '.join(missing)}); the MAE's official format "
                                  "is its {'model'} file itself (export/checkpoint-N.pth), nothing to convert")
    cfg = config_from_dict(ck["args"], source=f"{path} ['args']")
    model = build_task(cfg).build_model(device="meta")  # the parameter order only: nothing allocated or loaded
    order = [n for n, _ in model.named_parameters()]
    opt = official_optimizer_state(ck["opt"], order, weight_decay, source=path)
    return {"model": ck["model"], "ema": ck["ema"], "opt": opt, "args": ck["args"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", help="a run folder (its newest export/NNNNNNN.pt) or an export file")
    ap.add_argument("--format", choices=FORMATS, required=True,
                    help="official: the official DiT/SiT train.py checkpoint, its optimizer state in one group")
    ap.add_argument("--out", required=True, help="the file to write (its folder is created)")
    ap.add_argument("--weight-decay", type=float, default=0.0,
                    help="the one group's weight decay (default 0.0, the official DiT/SiT AdamW's)")
    a = ap.parse_args(argv)
    try:
        src = find_export(a.src)
        obj = to_official(src, a.weight_decay)
    except (FileNotFoundError, OfficialFormatError) as e:
        print(f"export.py: {e}", file=sys.stderr)
        return 2
    save_official(a.out, obj)
    print(f"[usp_scale] wrote {a.out} (official {{model, ema, opt, args}} from {src}; optimizer: one group over "
          f"{len(obj['opt']['param_groups'][0]['params'])} parameters, {len(obj['opt']['state'])} with state)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
