"""data.format=synthetic: deterministic random latents through build_loader, sharded and exactly resumable."""
import pytest
import torch

from usp_scale.config import DataConfig, VAEConfig
from usp_scale.data import build_loader
from usp_scale.data.sampler import ShardSampler
from usp_scale.data.synthetic_latents import STREAMS, SyntheticLatentLoader, synthetic_sample


def _cfg(**kw):
    base = dict(format="synthetic", synthetic_samples=40, batch_size=4, image_size=64, num_classes=10)
    base.update(kw)
    return DataConfig(**base)


def _loader(rank=0, world=1, seed=3, train=True, **kw):
    return build_loader(_cfg(**kw), VAEConfig(), rank=rank, world_size=world, seed=seed, train=train)


def test_batches_are_the_per_index_samples_on_any_rank_and_epoch():
    seen = set()
    for world in (1, 2):
        for rank in range(world):
            ld = _loader(rank, world)
            for epoch in (0, 1):
                ld.set_epoch(epoch)
                for b in ld:
                    assert b["latents"].shape == (4, 4, 8, 8) and b["latents"].dtype == torch.float32
                    for z, y, i in zip(b["latents"], b["labels"], b["index"].tolist()):
                        ref_z, ref_y = synthetic_sample(3, STREAMS["train"], i, (4, 8, 8), 10)
                        assert torch.equal(z, ref_z) and int(y) == ref_y
                        seen.add(i)
    assert seen == set(range(40))
    labels = torch.tensor([synthetic_sample(3, 0, i, (4, 8, 8), 10)[1] for i in range(40)])
    assert labels.min() >= 0 and labels.max() <= 9 and len(labels.unique()) > 3  # uniform over the classes
    z0 = synthetic_sample(3, 0, 0, (4, 8, 8), 10)[0]
    assert not torch.equal(z0, synthetic_sample(4, 0, 0, (4, 8, 8), 10)[0])  # the seed matters
    assert not torch.equal(z0, synthetic_sample(3, 0, 1, (4, 8, 8), 10)[0])  # so does the index


def test_ranks_get_disjoint_equal_shards_and_epochs_reshuffle():
    a, b = _loader(0, 2), _loader(1, 2)
    assert len(a) == len(b) == 5  # 40 samples / 2 ranks / batch 4
    ia = torch.cat([x["index"] for x in a])
    ib = torch.cat([x["index"] for x in b])
    assert set(ia.tolist()).isdisjoint(ib.tolist()) and len(ia) == len(ib) == 20
    a.set_epoch(1)
    assert not torch.equal(torch.cat([x["index"] for x in a]), ia)


def test_exact_resume_mid_epoch():
    full = _loader()
    full.set_epoch(1)
    ref = [x["latents"] for x in full]
    part = _loader()
    part.set_epoch(1)
    it = iter(part)
    first = [next(it)["latents"] for _ in range(3)]
    sd = part.state_dict()
    resumed = _loader()
    resumed.load_state_dict(sd)
    resumed.set_epoch(1)
    rest = [x["latents"] for x in resumed]
    assert len(first) + len(rest) == len(ref) == 10
    assert all(torch.equal(u, v) for u, v in zip(first + rest, ref))


def test_eval_stream_covers_each_sample_once_in_order():
    ranks = [_loader(r, 3, train=False, synthetic_samples=10) for r in range(3)]
    idx = sorted(i for ld in ranks for b in ld for i in b["index"].tolist())
    assert idx == list(range(10))
    z = next(iter(ranks[0]))["latents"][0]
    assert torch.equal(z, synthetic_sample(3, STREAMS["val"], 0, (4, 8, 8), 10)[0])
    assert not torch.equal(z, synthetic_sample(3, STREAMS["train"], 0, (4, 8, 8), 10)[0])


def test_shape_from_the_model_or_the_vae_and_errors():
    ld = build_loader(_cfg(), VAEConfig(version="d16"), latent_shape=(16, 4, 4), num_classes=3)
    b = next(iter(ld))
    assert b["latents"].shape == (4, 16, 4, 4) and int(b["labels"].max()) < 3
    b = next(iter(build_loader(_cfg(image_size=256), VAEConfig(version="d16"))))
    assert b["latents"].shape == (4, 16, 16, 16)  # 256 px through the x16 VAE
    with pytest.raises(ValueError, match="data.synthetic_samples=6 is smaller than one global batch"):
        _loader(0, 2, synthetic_samples=6)
    with pytest.raises(ValueError, match="synthetic_samples >= 1"):
        _loader(synthetic_samples=0)


def test_the_host_cache_changes_nothing():
    def epochs(cache_bytes):
        ld = SyntheticLatentLoader(ShardSampler(12, seed=5, batch_size=4), shape=(2, 4, 4), num_classes=3,
                                   cache_bytes=cache_bytes)
        out = []
        for e in range(2):
            ld.set_epoch(e)
            out += [b["latents"] for b in ld]
        return out, len(ld._cache)

    cached, n_cached = epochs(1 << 20)
    fresh, n_fresh = epochs(0)
    assert n_cached == 12 and n_fresh == 0
    assert all(torch.equal(a, b) for a, b in zip(cached, fresh)) and len(cached) == 6


def test_keep_images_adds_a_picture_per_index_and_leaves_the_latents():
    """REPA's online teacher on random latents (the golden REPA run): keep_images adds a (3, S, S) picture per sample
    in whole uint8 levels of [-1, 1], the same on any rank and epoch, from its own stream (latents unchanged)."""
    from usp_scale.data.synthetic_latents import synthetic_image
    from usp_scale.models.teacher import raw_from_unit_range

    plain = [b["latents"] for b in _loader()]
    ld = _loader()
    ld.keep_images = True
    for b, z in zip(ld, plain):
        assert torch.equal(b["latents"], z) and b["images"].shape == (4, 3, 64, 64)
        for img, i in zip(b["images"], b["index"].tolist()):
            assert torch.equal(img, synthetic_image(3, STREAMS["train"], i, 64))
        raw = raw_from_unit_range(b["images"])
        assert torch.equal(raw / 127.5 - 1, b["images"]) and raw.min() >= 0 and raw.max() <= 255
    other = _loader(rank=1, world=2)
    other.keep_images = True
    b = next(iter(other))
    assert torch.equal(b["images"][0], synthetic_image(3, STREAMS["train"], int(b["index"][0]), 64))
    assert not torch.equal(synthetic_image(3, 0, 0, 64), synthetic_image(3, 0, 1, 64))
