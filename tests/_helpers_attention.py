"""Worker for tests/test_attention.py (run by torchrun, 2 gloo ranks): the attention backend agreed at start-up,
and no collective in any forward after it.  python tests/_helpers_attention.py OUT_DIR"""
import importlib
import os
import sys
import types

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _helpers_train as H  # noqa: E402


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    A = importlib.import_module("usp_scale.layers.attention")
    R = importlib.import_module("usp_scale.runtime.attention")
    res = {}
    cuda = torch.device("cuda", 0)   # never touched: availability is replaced below
    if rank == 0:                    # FlashAttention-2 "installed" on rank 0 only
        sys.modules["flash_attn"] = types.ModuleType("flash_attn")
    R.backend_unavailable = lambda name, device: (None if name == "flash2" and rank == 0 else f"no {name} here")
    res["local_flash2"] = R.resolve_attention("auto", cuda, agree=False) if rank == 0 else None
    res["auto"] = [None] * 2
    dist.all_gather_object(res["auto"], R.resolve_attention("auto", cuda))
    try:
        R.resolve_attention("flash2", cuda)
        err = "no error"
    except RuntimeError as e:
        err = str(e)
    res["forced"] = [None] * 2
    dist.all_gather_object(res["forced"], err)
    # After the choice (here: the CPU's kernels), forwards on rank 0 alone at new shapes and dtypes.
    spec = R.attention_spec("auto", R.resolve_attention("auto", "cpu"))
    calls = []
    saved = {n: getattr(dist, n) for n in ("all_reduce", "all_gather", "all_gather_object", "broadcast",
                                           "broadcast_object_list", "barrier", "reduce", "all_to_all")}
    for n, f in saved.items():
        setattr(dist, n, lambda *a, _n=n, **k: calls.append(_n))
    ok = True
    if rank == 0:
        for tokens, dtype in ((17, torch.float32), (50, torch.bfloat16), (197, torch.float32)):
            m = A.Attention(144, 2, backend=spec).to(dtype)
            ok &= bool(torch.isfinite(m(torch.randn(2, tokens, 144, dtype=dtype))).all())
    for n, f in saved.items():
        setattr(dist, n, f)
    res["forward_collectives"] = len(calls)
    res["forward_ok"] = ok
    H.finish(out, "attention.json", res, rank)


if __name__ == "__main__":
    main(sys.argv[1])
