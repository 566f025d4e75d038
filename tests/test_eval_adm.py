"""The ADM protocol's metric layer (usp_scale.eval.adm) against an implementation of the ADM evaluator's
definitions written here from its formulas (numpy / scipy, whole matrices, no torch): FID and sFID to 1e-3
absolute, IS to 1e-3 relative, precision/recall exactly. Also the Fréchet distance's method against closed forms
for ill-conditioned and singular covariances (where scipy's sqrtm is known to go wrong) and its refusals."""
import numpy as np
import pytest
import scipy.linalg
import torch

from usp_scale.eval import adm as A

# ----------------------------------------------------------------------------- ADM's definitions, from the formulas


def ref_fid(f1: np.ndarray, f2: np.ndarray) -> float:
    """np.mean / np.cov, then ||mu1 - mu2||^2 + tr S1 + tr S2 - 2 tr sqrtm(S1 S2), the 1e-6 retry when sqrtm is not
    finite and the imaginary-part check, as the evaluator does."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1.dot(s2))
    if not np.isfinite(covmean).all():
        off = np.eye(len(s1)) * 1e-6
        covmean = scipy.linalg.sqrtm((s1 + off).dot(s2 + off))
    if np.iscomplexobj(covmean):
        assert np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3)
        covmean = covmean.real
    d = mu1 - mu2
    return float(d.dot(d) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def ref_is(logits: np.ndarray, split: int) -> float:
    """softmax, then ordered chunks of ``split``: exp(mean KL(p || mean p)); the mean over chunks."""
    z = logits - logits.max(1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    scores = []
    for i in range(0, len(p), split):
        part = p[i:i + split]
        kl = part * (np.log(part) - np.log(part.mean(0, keepdims=True)))
        scores.append(np.exp(kl.sum(1).mean()))
    return float(np.mean(scores))


def _f16(x):
    return np.asarray(x, np.float32).astype(np.float16).astype(np.float32)


def ref_dist(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """max(|u|^2 - 2 u.v + |v|^2, 0) on fp16 features, each op's result rounded to fp16 (sums and the product
    accumulated in fp32); the block in fp32 when any fp16 value is not finite."""
    u16, v16 = _f16(u), _f16(v)
    with np.errstate(over="ignore", invalid="ignore"):
        nu = _f16(_f16(u16 * u16).sum(1, dtype=np.float32))[:, None]
        nv = _f16(_f16(v16 * v16).sum(1, dtype=np.float32))[None, :]
        two_uv = _f16(2 * _f16(u16 @ v16.T))
        d = np.maximum(_f16(_f16(nu - two_uv) + nv), 0)
    if np.isfinite(d).all():
        return d
    u32, v32 = np.asarray(u, np.float32), np.asarray(v, np.float32)
    return np.maximum((u32 * u32).sum(1)[:, None] - 2 * (u32 @ v32.T) + (v32 * v32).sum(1)[None, :], 0)


def ref_pr(ref: np.ndarray, sample: np.ndarray, k: int = 3, block: int = 10000):
    """Radii: the (k+1)-th smallest distance of each point within its set (np.partition); precision: samples within
    some reference radius, recall: reference points within some sample radius; distances per (block x block)."""
    def dists(a, b):
        return np.concatenate([np.concatenate([ref_dist(a[i:i + block], b[j:j + block])
                                               for j in range(0, len(b), block)], 1)
                               for i in range(0, len(a), block)], 0)
    r_ref = np.partition(dists(ref, ref), k, axis=1)[:, k]
    r_s = np.partition(dists(sample, sample), k, axis=1)[:, k]
    d = dists(ref, sample)                                           # (n_ref, n_sample)
    precision = (d <= r_ref[:, None]).any(0).mean()
    recall = (d <= r_s[None, :]).any(1).mean()
    return float(precision), float(recall)


# ----------------------------------------------------------------------------- agreement


def _features(seed, n, d, shift=0.0):
    """Non-negative, correlated, pool_3-like features."""
    rng = np.random.RandomState(seed)
    mix = rng.randn(d, d) / np.sqrt(d)
    return np.abs(rng.randn(n, d) @ mix + shift).astype(np.float32)


def test_fid_and_sfid_agree_with_adms_formula():
    for n, d in ((600, 64), (300, 203)):                  # a pool_3-like and a spatial-like size
        a, b = _features(0, n, d), _features(1, n, d, shift=0.3)
        got = A.frechet_distance(**{"mu1": a.mean(0), "sigma1": np.cov(a, rowvar=False),
                                    "mu2": b.mean(0), "sigma2": np.cov(b, rowvar=False)})
        st_a, st_b = A.statistics(torch.from_numpy(a)), A.statistics(torch.from_numpy(b))
        got2 = A.frechet_distance(st_a["mu"], st_a["sigma"], st_b["mu"], st_b["sigma"])
        want = ref_fid(a.astype(np.float64), b.astype(np.float64))
        assert abs(got - want) < 1e-3 and abs(got2 - want) < 1e-3, (got, got2, want)
        np.testing.assert_allclose(st_a["sigma"], np.cov(a.astype(np.float64), rowvar=False), rtol=1e-9, atol=1e-12)


def test_inception_score_ordered_splits_agree_with_adms_formula():
    rng = np.random.RandomState(2)
    logits = (rng.randn(130, 17) * 3).astype(np.float32)
    for split in (50, 130, 7):                           # chunks 50, 50, 30 / one chunk / many, last shorter
        got = A.inception_score(torch.from_numpy(logits), split)
        assert got == pytest.approx(ref_is(logits.astype(np.float64), split), rel=1e-3)
    # in order: the score depends on which samples share a chunk (torch-fidelity's shuffled splits differ)
    sorted_logits = logits[np.argsort(logits.argmax(1), kind="stable")]
    assert A.inception_score(torch.from_numpy(sorted_logits), 50) != pytest.approx(
        A.inception_score(torch.from_numpy(logits), 50), rel=1e-3)
    assert A.inception_score(torch.from_numpy(sorted_logits), 50) == pytest.approx(ref_is(sorted_logits, 50), rel=1e-3)
    with pytest.raises(A.MetricInputError, match="fewer than one split of 5000"):
        A.inception_score(torch.from_numpy(logits))
    # softmax probabilities that underflow to 0 give a finite score (0 log 0 = 0)
    extreme = torch.tensor([[1000.0, 0.0, 0.0], [0.0, 1000.0, 0.0]] * 5)
    assert A.inception_score(extreme, 10) == pytest.approx(2.0, rel=1e-6)


@pytest.mark.parametrize("block", [10000, 17])
def test_precision_recall_agree_with_adms_formula_exactly(block):
    ref, sample = _features(3, 120, 32), _features(4, 90, 32, shift=0.15)
    got = A.precision_recall(torch.from_numpy(sample), torch.from_numpy(ref), block=block)
    p, r = ref_pr(ref, sample, block=block)
    assert (got["precision"], got["recall"]) == (p, r)
    assert 0 < p < 1 and 0 < r < 1
    # the squared fp16 distances of one block, element for element
    d = A.distance_block(torch.from_numpy(ref[:40]), torch.from_numpy(sample[:50])).numpy()
    np.testing.assert_array_equal(d, ref_dist(ref[:40], sample[:50]))


def test_distance_block_falls_back_to_fp32_per_block():
    small = _features(5, 30, 16)
    big = small.copy()
    big[:15] *= 200.0                                     # squared norms beyond fp16's 65504 in the first rows
    d = A.distance_block(torch.from_numpy(big), torch.from_numpy(big)).numpy()
    exact = ((big[:, None, :].astype(np.float64) - big[None].astype(np.float64)) ** 2).sum(-1)
    # the fp32 path (its rounding differs from fp16's: values that are not fp16 numbers)
    np.testing.assert_allclose(d, exact, rtol=1e-5, atol=1e-6 * exact.max())
    np.testing.assert_allclose(d, ref_dist(big, big), rtol=1e-6, atol=1e-6 * exact.max())
    assert not np.array_equal(d.astype(np.float16).astype(np.float32), d)
    # blocks decide separately: a block of small rows stays in fp16
    d16 = A.distance_block(torch.from_numpy(small), torch.from_numpy(small)).numpy()
    assert np.array_equal(d16, ref_dist(small, small)) and np.array_equal(d16.astype(np.float16).astype(np.float32), d16)
    # the whole metric with overflowing blocks (15 rows each): within one sample of the formula (fp32 sums in
    # another order can flip a tie)
    got = A.precision_recall(torch.from_numpy(big), torch.from_numpy(small * 1.1), block=15)
    p, r = ref_pr(small * 1.1, big, block=15)
    assert abs(got["precision"] - p) <= 1 / 30 + 1e-12 and abs(got["recall"] - r) <= 1 / 30 + 1e-12


def test_precision_recall_needs_more_than_k_points():
    a = torch.rand(3, 8)
    with pytest.raises(A.MetricInputError, match="has 3 points; .*k=3 needs at least 4"):
        A.precision_recall(a, torch.rand(10, 8))
    with pytest.raises(A.MetricInputError, match="feature sizes differ"):
        A.precision_recall(torch.rand(10, 8), torch.rand(10, 9))


# ----------------------------------------------------------------------------- the Fréchet distance's method


def _rotation(d, seed):
    q, _ = np.linalg.qr(np.random.RandomState(seed).randn(d, d))
    return q


def test_frechet_distance_on_ill_conditioned_covariances_matches_the_closed_form():
    """Commuting covariances Q diag(l) Q^T: tr sqrt(S1 S2) = sum sqrt(l1 l2) exactly. Eigenvalues over 14 orders
    of magnitude: the regime where scipy's sqrtm has returned complex or wrong results (scipy #19415/#20178)."""
    d = 256
    q = _rotation(d, 0)
    rng = np.random.RandomState(1)
    l1 = np.logspace(-11, 3, d)
    l2 = l1[rng.permutation(d)]
    s1, s2 = (q * l1) @ q.T, (q * l2) @ q.T
    mu1, mu2 = rng.randn(d), rng.randn(d)
    exact = float(((mu1 - mu2) ** 2).sum() + l1.sum() + l2.sum() - 2 * np.sqrt(l1 * l2).sum())
    got = A.frechet_distance(mu1, s1, mu2, s2)
    assert abs(got - exact) < 1e-4                        # FID ~1.6e4: 1e-8 relative (scipy 1.17's sqrtm: 4e-5)
    assert abs(A.trace_sqrt_product(s1, s2) - np.sqrt(l1 * l2).sum()) < 1e-4


def test_frechet_distance_of_singular_covariances_without_a_retry():
    """Rank-deficient covariances (fewer samples than dimensions): defined and real, no 1e-6 offset; ADM's sqrtm
    path agrees where it is finite."""
    d = 64
    q = _rotation(d, 2)
    l1 = np.r_[np.linspace(1, 2, 40), np.zeros(24)]
    l2 = np.r_[np.zeros(10), np.linspace(0.5, 3, 54)]
    s1, s2 = (q * l1) @ q.T, (q * l2) @ q.T
    mu = np.zeros(d)
    exact = float(l1.sum() + l2.sum() - 2 * np.sqrt(l1 * l2).sum())
    assert A.frechet_distance(mu, s1, mu, s2) == pytest.approx(exact, rel=1e-7)
    # statistics of 30 samples in 64 dimensions against 1000 samples
    a, b = _features(6, 30, d), _features(7, 1000, d)
    sa, sb = A.statistics(torch.from_numpy(a)), A.statistics(torch.from_numpy(b))
    assert np.linalg.matrix_rank(sa["sigma"]) == 29
    got = A.frechet_distance(sa["mu"], sa["sigma"], sb["mu"], sb["sigma"])
    # the n x n form for few samples: the same number
    low = A.frechet_distance(sa["mu"], sa["sigma"], sb["mu"], sb["sigma"], features1=a)
    assert abs(low - got) < 1e-6                         # (the D x D form carries sqrt(rounding) of the null space)
    covmean = scipy.linalg.sqrtm(sa["sigma"] @ sb["sigma"])
    if np.isfinite(covmean).all():
        want = float(((sa["mu"] - sb["mu"]) ** 2).sum() + np.trace(sa["sigma"]) + np.trace(sb["sigma"])
                     - 2 * np.trace(covmean).real)
        assert abs(got - want) < 1e-3
    assert "singular" in A.singular_warning(30, 64, "FID") and A.singular_warning(65, 64, "FID") is None


def test_frechet_distance_refusals_and_the_zero_clamp():
    d = 8
    rng = np.random.RandomState(3)
    x = rng.randn(50, d)
    mu, s = x.mean(0), np.cov(x, rowvar=False)
    # identical statistics: rounding leaves +-1e-14-ish (its sign depends on the CPU's BLAS kernels); below zero it
    # is reported as 0, never as a negative FID
    same = [A.frechet_distance(c.mean(0), np.cov(c, rowvar=False), c.mean(0), np.cov(c, rowvar=False))
            for c in (np.random.RandomState(k).randn(50, d) for k in range(20))]
    assert all(0.0 <= f < 1e-10 for f in same), same
    assert 0.0 <= A.frechet_distance(mu, s, mu, s) < 1e-10
    bad = s.copy()
    bad[0, 0] = np.nan
    with pytest.raises(A.MetricInputError, match="ref.npz: sigma holds 1 non-finite"):
        A.frechet_distance(mu, s, mu, bad, what=("samples", "ref.npz"))
    with pytest.raises(A.MetricInputError, match="mu holds 1 non-finite"):
        A.frechet_distance(np.r_[np.nan, mu[1:]], s, mu, s)
    neg = s - 2 * np.abs(np.linalg.eigvalsh(s)).max() * np.outer(np.eye(d)[0], np.eye(d)[0])
    with pytest.raises(A.MetricInputError, match="eigenvalue .* < 0"):
        A.frechet_distance(mu, s, mu, neg)
    asym = s.copy()
    asym[0, 1] += 1.0
    with pytest.raises(A.MetricInputError, match="not symmetric"):
        A.frechet_distance(mu, asym, mu, s)
    with pytest.raises(A.MetricInputError, match="feature sizes differ: samples has 8-d statistics, ref 7-d"):
        A.frechet_distance(mu, s, mu[:7], s[:7, :7], what=("samples", "ref"))


def test_frechet_distance_matches_scipy_on_random_covariances():
    rng = np.random.RandomState(4)
    for d in (2, 16, 128):
        a, b = rng.randn(d, 2 * d), rng.randn(d, 2 * d)
        s1, s2 = a @ a.T / d + 0.01 * np.eye(d), b @ b.T / d + 0.01 * np.eye(d)
        mu1, mu2 = rng.randn(d), rng.randn(d)
        want = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2)
                     - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2)).real)
        assert A.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-8, abs=1e-8)
