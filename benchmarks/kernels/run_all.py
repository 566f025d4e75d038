"""Run every kernel micro-benchmark in one GPU call (one process), appending to one CSV.

python benchmarks/kernels/run_all.py [--dtype bf16] [--quick] [--csv PATH]
"""
import sys

import bench_adaln
import bench_masked_loss
import bench_patch_embed
import bench_unshuffle
from _bench import parse_args, require_gpu


def main(argv=None):
    require_gpu(parse_args("all", argv).device)
    for mod in (bench_patch_embed, bench_unshuffle, bench_masked_loss, bench_adaln):
        mod.main(argv)


if __name__ == "__main__":
    main(sys.argv[1:])
