"""Global-rank sharding (disjoint cover), epochs, and exact mid-epoch resume of the image loader."""
import pytest
import torch

from _helpers_data import data_cfg, synth_clean  # noqa: F401
from usp_scale.data import ShardSampler, build_image_loader


@pytest.mark.parametrize("n,world", [(50, 2), (50, 3), (7, 4), (64, 8)])
def test_train_shards_are_disjoint_equal_and_nearly_cover(n, world):
    parts = []
    for r in range(world):
        s = ShardSampler(n, r, world, seed=1, shuffle=True, even=True)
        s.set_epoch(3)
        parts.append(s.indices().tolist())
    flat = [i for p in parts for i in p]
    assert len(flat) == len(set(flat))                     # no sample on two ranks
    assert len({len(p) for p in parts}) == 1               # equal lengths (collectives stay in step)
    assert len(flat) == n // world * world                 # only the n % world tail is dropped this epoch


@pytest.mark.parametrize("n,world", [(50, 3), (7, 4), (5, 8)])
def test_eval_shards_cover_every_sample_exactly_once(n, world):
    flat = []
    for r in range(world):
        flat += ShardSampler(n, r, world, shuffle=False, even=False).indices().tolist()
    assert sorted(flat) == list(range(n))


def test_epochs_reshuffle_and_seed_is_deterministic():
    a = ShardSampler(100, 0, 2, seed=5)
    b = ShardSampler(100, 0, 2, seed=5)
    assert torch.equal(a.indices(), b.indices())
    e0 = a.indices()
    a.set_epoch(1)
    assert not torch.equal(e0, a.indices())
    # over epochs, the dropped tail differs, so every sample is eventually seen
    seen = set()
    for e in range(10):
        for r in range(3):
            s = ShardSampler(10, r, 3, seed=0)
            s.set_epoch(e)
            seen.update(s.indices().tolist())
    assert seen == set(range(10))


def test_rank_out_of_range_is_an_error():
    with pytest.raises(ValueError, match="rank 2 is outside world_size 2"):
        ShardSampler(10, 2, 2)


def test_image_loader_two_ranks_cover_the_epoch(synth_clean):
    cfg = data_cfg(synth_clean["root"], batch_size=3)
    got = []
    for r in range(2):
        ld = build_image_loader(cfg, rank=r, world_size=2, seed=4)
        ld.set_epoch(2)
        got.append([i for b in ld for i in b["index"].tolist()])
    assert len(got[0]) == len(got[1]) == 12 and not set(got[0]) & set(got[1])
    assert sorted(got[0] + got[1]) == list(range(24))


def test_image_loader_resume_gives_the_identical_next_batch(synth_clean):
    cfg = data_cfg(synth_clean["root"], batch_size=4)
    ref = build_image_loader(cfg, rank=1, world_size=2, seed=9)
    ref.set_epoch(1)
    batches = list(ref)
    assert len(batches) == 3
    run = build_image_loader(cfg, rank=1, world_size=2, seed=9)
    run.set_epoch(1)
    it = iter(run)
    next(it)
    sd = run.state_dict()
    assert sd["epoch"] == 1 and sd["position"] == 1
    fresh = build_image_loader(cfg, rank=1, world_size=2, seed=9)
    fresh.load_state_dict(sd)
    fresh.set_epoch(1)  # a trainer calls this again after resuming: it must keep the position
    nxt = next(iter(fresh))
    assert torch.equal(nxt["images"], batches[1]["images"]) and torch.equal(nxt["labels"], batches[1]["labels"])
    rest = list(iter(fresh))  # a new iterator continues from the position ...
    assert len(rest) == 1 and torch.equal(rest[0]["index"], batches[2]["index"])
    assert len(list(iter(fresh))) == 3  # ... and a finished epoch starts over when iterated again
    # a state saved after the last batch resumes as a finished epoch, then the next epoch starts
    done = build_image_loader(cfg, rank=1, world_size=2, seed=9)
    done.load_state_dict({**sd, "position": 3})
    done.set_epoch(1)
    assert list(done) == []
    done.set_epoch(2)
    assert len(list(done)) == 3
    with pytest.raises(ValueError, match="world_size=2"):
        build_image_loader(cfg, rank=0, world_size=1, seed=9).load_state_dict(sd)


def test_workers_give_the_same_batches_as_the_main_process(synth_clean):
    a = list(build_image_loader(data_cfg(synth_clean["root"], batch_size=6, num_workers=0), seed=2))
    b = list(build_image_loader(data_cfg(synth_clean["root"], batch_size=6, num_workers=2), seed=2))
    assert len(a) == len(b) == 4
    for x, y in zip(a, b):
        assert torch.equal(x["images"], y["images"])
