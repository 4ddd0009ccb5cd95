"""The transfer-matrix predictor: recovers a planted low-rank matrix from a part of its entries,
with calibrated sds, and P(best) follows the posterior."""

from __future__ import annotations

import numpy as np

from analysis.budget.predictor import Posterior, TransferPredictor


def _planted(seed: int = 0, S: int = 22, T: int = 21):
    rng = np.random.default_rng(seed)
    a, c = rng.normal(0, 1, S), rng.normal(0, 1, T)
    u, v = rng.normal(0, 1, S), rng.normal(0, 1, T)
    M = 0.5 + a[:, None] + c[None, :] + 1.2 * np.outer(u, v)  # additive effects + a rank-1 interaction
    return rng, M


def _observe(rng, M, frac: float, seeds: int, noise: float):
    obs = rng.random(M.shape) < frac
    z = M[..., None] + noise * rng.standard_normal((*M.shape, seeds))
    n = np.where(obs, seeds, 0)
    z = np.where(obs[..., None], z, 0.0)
    return obs, z.sum(2), n, (z ** 2).sum(2)


def test_recovers_a_planted_low_rank_matrix():
    rng, M = _planted()
    valid = np.ones(M.shape, bool)
    obs, total, n, sumsq = _observe(rng, M, 0.5, 2, 0.05)
    hidden = valid & ~obs
    low = TransferPredictor(valid, rank=1).fit(total, n, sumsq)
    add = TransferPredictor(valid, rank=0).fit(total, n, sumsq)
    rmse_low = np.sqrt(np.mean((low.mean - M)[hidden] ** 2))
    rmse_add = np.sqrt(np.mean((add.mean - M)[hidden] ** 2))
    spread = M[hidden].std()
    assert rmse_low < 0.25 * spread  # the unseen half, from the seen half
    assert rmse_low < 0.5 * rmse_add  # the low-rank part is what recovers the interaction
    z = np.abs(low.mean - M)[hidden] / low.sd[hidden]
    assert 0.85 <= np.mean(z < 2) <= 1.0  # sds cover the errors (about 95% within 2 sd)
    # observed pairs: close to their seed means, tighter than the predicted ones
    assert np.abs(low.mean - M)[obs].mean() < 0.1 and low.sd[obs].mean() < low.sd[hidden].mean()


def test_priors_explain_unobserved_pairs():
    rng = np.random.default_rng(3)
    S, T = 12, 10
    prior = rng.normal(0, 1, (S, T))
    M = 0.3 * prior + 0.02 * rng.normal(0, 1, (S, T))
    valid = np.ones((S, T), bool)
    obs, total, n, sumsq = _observe(rng, M, 0.4, 1, 0.01)
    with_prior = TransferPredictor(valid, {"roe": prior}, rank=0).fit(total, n, sumsq)
    without = TransferPredictor(valid, rank=0).fit(total, n, sumsq)
    hid = ~obs
    corr = np.corrcoef(with_prior.mean[hid], M[hid])[0, 1]
    assert corr > 0.9 and np.abs(without.mean - M)[hid].mean() > 2 * np.abs(with_prior.mean - M)[hid].mean()


def test_p_best_follows_the_posterior():
    mean = np.array([[1.0, 0.0], [0.0, 0.0], [0.9, 0.0]])
    sd = np.array([[0.01, 1.0], [0.01, 1.0], [0.01, 1.0]])
    post = Posterior(mean, sd, np.ones((3, 2)), np.ones((3, 2), bool))
    pb = post.p_best(draws=4000)
    assert pb[0, 0] == 1.0 and pb[:, 0].sum() == 1.0
    assert np.allclose(pb[:, 1], 1 / 3, atol=0.04)  # equal means and sds: each a third
    top2 = post.p_best(draws=2000, k=2)
    assert np.allclose(top2[:, 0], [1, 0, 1]) and np.allclose(top2.sum(0), 2)
