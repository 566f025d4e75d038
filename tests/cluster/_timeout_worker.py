"""Worker for test_launch_units.py (run under torchrun, 2 gloo ranks): the two process-group timeouts of
usp_scale.runtime. Rank 0 prints one line per check; rank 1 is the slow peer."""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from usp_scale import runtime as D  # noqa: E402

SHORT = float(sys.argv[1])
info = D.detect()
D.init_process_group(info, "gloo", timeout_min=1)
rank = info.rank
mesh_group = dist.new_group([0, 1])          # a second group (as a DeviceMesh or DeepSpeed would create)


def reduce_after(delay: float, group=None) -> str:
    """Rank 1 waits ``delay`` s, then both all-reduce; rank 0 returns 'ok' or the error, with its wait."""
    if rank == 1:
        time.sleep(delay)
    t = time.time()
    try:
        dist.all_reduce(torch.ones(1), group=group)
        return f"ok {time.time() - t:.1f}"
    except RuntimeError as e:
        return f"error {time.time() - t:.1f} {str(e)[:80]}"


out = {"before": reduce_after(SHORT * 2)}                 # the long (init) timeout still applies
assert D.use_train_timeout(SHORT)
with D.long_timeout():
    out["long_block"] = reduce_after(SHORT * 2, mesh_group)  # checkpoint-like wait inside long_timeout()
out["after_block"] = reduce_after(0.0)
out["train"] = reduce_after(SHORT * 3, mesh_group)           # a peer hung past the train timeout
if rank == 0:
    for k, v in out.items():
        print(f"CHECK {k} {v}", flush=True)
os._exit(0)
