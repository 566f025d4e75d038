"""Run by torchrun (2 ranks, gloo) from test_latent_cache.py: each rank reads its shard of a latent cache for
two epochs; rank 0 checks that no sample is duplicated or lost across ranks and prints READER_OK."""
import sys

import torch
import torch.distributed as dist

from usp_scale.config import DataConfig, VAEConfig
from usp_scale.data import build_loader


def main():
    cache, n = sys.argv[1], int(sys.argv[2])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = DataConfig(format="latents", latent_cache=cache, image_size=32, batch_size=3, drop_last=False)
    ld = build_loader(cfg, VAEConfig(path="tiny-random"), rank=rank, world_size=world, seed=5)
    per_epoch = []
    for epoch in range(2):
        ld.set_epoch(epoch)
        per_epoch.append([i for b in ld for i in b["index"].tolist()])
    gathered = [None] * world
    dist.all_gather_object(gathered, (len(ld), per_epoch))
    if rank == 0:
        assert len({g[0] for g in gathered}) == 1, "ranks disagree on the number of batches"
        for e in range(2):
            parts = [g[1][e] for g in gathered]
            flat = [i for p in parts for i in p]
            assert len(flat) == len(set(flat)), f"epoch {e}: a sample is read by two ranks"
            assert len(flat) == n // world * world, f"epoch {e}: {len(flat)} samples read, expected {n}"
        assert gathered[0][1][0] != gathered[0][1][1], "epochs must reshuffle"
        print("READER_OK", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
