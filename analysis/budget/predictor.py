"""A model of the transfer matrix fitted on observed per-seed runs: a mean and sd for every pair,
and per target each source's probability of being the best.

Why this model: a budgeted grid trains a fraction of the pairs on a few seeds, so it needs (a) a
guess for the pairs it never trained and (b) how sure it is of every pair, to decide what to train
next and to say how reliable each target's ranking is. The structure of transfer matrices gives
both cheaply: a source that helps one target tends to help others (source effect), some targets
gain from most sources (target effect), selector priors (RoE, LLM similarity) explain part of the
rest, and a low-rank residual picks up task clusters.

  z[s, t, k] = m[s, t] + e,            e ~ N(0, sigma_t^2)   one seed's per-seed score
  m[s, t]    = f[s, t] + r[s, t],      r ~ N(0, tau^2)       the pair's true score
  f[s, t]    = mu + a_s + c_t + sum_j w_j prior_j[s, t] + L[s, t]

(a, c, w) have a Gaussian posterior (Bayesian ridge on the pairs' seed means, each weighted by its
variance tau^2 + sigma_t^2 / n); L is a rank-`rank` soft-impute of the residuals (0: none).
sigma_t^2 is pooled from pairs with two or more seeds (shrunk towards all targets' pool), tau^2
from the residuals. A pair's posterior combines N(f, var f + tau^2) with its runs' mean
N(zbar, sigma_t^2 / n), the former's precision scaled by `shrink` (default 0: an observed pair
keeps its own seed mean and sd sigma_t / sqrt(n); on the tuning setup finetune:t5s, pulling observed
pairs towards the model cost 2-3 NDCG points, the pooled model being too coarse for a pair that was
measured). P(best) is Monte Carlo over independent draws of the pairs' posteriors.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Posterior:
    mean: np.ndarray  # (S, T)
    sd: np.ndarray  # (S, T)
    n: np.ndarray  # (S, T) seeds observed
    valid: np.ndarray  # (S, T)

    def p_best(self, draws: int = 256, seed: int = 0, k: int = 1) -> np.ndarray:
        """(S, T) probability that the source is among the target's top k (k=1: the best)."""
        rng = np.random.default_rng(seed)
        sample = self.mean + self.sd * rng.standard_normal((draws, *self.mean.shape))
        sample = np.where(self.valid, sample, -np.inf)
        if k == 1:
            best = sample.argmax(1)  # (draws, T)
            out = np.zeros(self.mean.shape)
            for j in range(self.mean.shape[1]):
                out[:, j] = np.bincount(best[:, j], minlength=self.mean.shape[0]) / draws
            return out
        kth = -np.sort(-sample, axis=1)[:, k - 1: k, :]
        return (sample >= kth).mean(0)


def _standardise(prior: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Per target: zero mean, unit sd over the valid sources; missing values become 0 (the mean)."""
    p = np.where(valid, prior, np.nan)
    with np.errstate(invalid="ignore"):
        mu = np.nanmean(p, 0)
        sd = np.nanstd(p, 0)
    out = (p - mu) / np.where(sd > 0, sd, 1.0)
    return np.nan_to_num(out)


class TransferPredictor:
    """Fit on (S, T) sums / counts / sums of squares of per-seed scores; predict every valid pair."""

    def __init__(self, valid: np.ndarray, priors: dict[str, np.ndarray] | None = None, rank: int = 1,
                 ridge: float = 1.0, prior_sigma2: float | None = None, shrink: float = 0.0):
        self.valid = valid
        self.S, self.T = valid.shape
        self.features = [_standardise(p, valid) for p in (priors or {}).values()]
        self.rank = rank
        self.ridge = ridge
        self.prior_sigma2 = prior_sigma2
        self.shrink = shrink  # weight of the model's prior on observed pairs (0: their seed mean alone)
        self.X = self._design()

    def _design(self) -> np.ndarray:
        """(S*T, 1 + S + T + F) rows of every pair (row-major over (s, t))."""
        S, T = self.S, self.T
        cols = [np.ones(S * T), *np.eye(S)[np.repeat(np.arange(S), T)].T, *np.eye(T)[np.tile(np.arange(T), S)].T]
        cols += [f.ravel() for f in self.features]
        return np.stack(cols, 1)

    def fit(self, total: np.ndarray, count: np.ndarray, sumsq: np.ndarray) -> Posterior:
        n = np.where(self.valid, count, 0)
        obs = n > 0
        zbar = np.where(obs, total / np.maximum(n, 1), 0.0)
        sigma2 = self._seed_noise(total, n, sumsq, zbar)  # (T,)
        X = self.X
        o = obs.ravel()
        if not o.any():
            mean = np.zeros((self.S, self.T))
            return Posterior(mean, np.full(mean.shape, 0.05), n, self.valid)
        y = zbar.ravel()[o]
        spread = float(np.var(y)) if o.sum() > 1 else 1e-3
        tau2 = 0.5 * spread
        low = np.zeros((self.S, self.T))
        Xo = X[o]
        prior_prec = np.full(X.shape[1], self.ridge / max(spread, 1e-8))
        prior_prec[0] = 1e-6
        noise_o = np.broadcast_to(sigma2, (self.S, self.T)).ravel()[o] / n.ravel()[o]
        for _ in range(8 if self.rank > 0 else 3):  # alternate: effects on y - L, L on y - effects, tau^2
            v = tau2 + noise_o
            A = (Xo / v[:, None]).T @ Xo + np.diag(prior_prec)
            cov = np.linalg.inv(A)
            beta = cov @ (Xo.T @ ((y - low.ravel()[o]) / v))
            f = (X @ beta).reshape(self.S, self.T)
            resid = np.where(obs, zbar - f, 0.0)
            low = self._low_rank(resid, obs, low)
            r = (resid - low)[obs]
            tau2 = max(float(np.mean(r ** 2 - noise_o)), 0.02 * spread, 1e-8)
        f = f + low
        var_f = np.einsum("ij,jk,ik->i", X, cov, X).reshape(self.S, self.T)
        prior_var = var_f + tau2 * (1.0 + 0.5 * (self.rank > 0))
        like_prec = np.where(obs, n / sigma2[None, :], 0.0)
        prior_prec = np.where(obs, self.shrink, 1.0) / prior_var
        post_var = 1.0 / (prior_prec + like_prec)
        mean = post_var * (f * prior_prec + like_prec * zbar)
        self.sigma2, self.tau2 = sigma2, tau2
        return Posterior(np.where(self.valid, mean, np.nan), np.sqrt(post_var), n, self.valid)

    def _seed_noise(self, total: np.ndarray, n: np.ndarray, sumsq: np.ndarray, zbar: np.ndarray) -> np.ndarray:
        """Per-target seed variance, pooled over pairs with >= 2 seeds and shrunk towards the global pool."""
        multi = n >= 2
        ss = np.where(multi, sumsq - n * zbar ** 2, 0.0).clip(min=0)
        dof = np.where(multi, n - 1, 0)
        if dof.sum() > 0:
            glob = ss.sum() / dof.sum()
        elif self.prior_sigma2 is not None:
            glob = self.prior_sigma2
        else:  # no pair seen twice yet: a seed's noise taken as a third of the spread between pairs
            obs = n > 0
            glob = max(float(np.var(zbar[obs])) / 3, 1e-6) if obs.sum() > 1 else 1e-3
        w = 4.0  # the global pool counts as 4 degrees of freedom per target
        return (ss.sum(0) + w * glob) / (dof.sum(0) + w)

    def _low_rank(self, resid: np.ndarray, obs: np.ndarray, start: np.ndarray, iters: int = 20) -> np.ndarray:
        """Rank-`rank` fill of the residuals (hard impute, warm-started; half the first dropped
        singular value shrunk off so noise alone fits little)."""
        if self.rank <= 0 or obs.sum() < (self.S + self.T):
            return np.zeros_like(resid)
        z = start
        for _ in range(iters):
            filled = np.where(obs, resid, z)
            u, s, vt = np.linalg.svd(filled, full_matrices=False)
            lam = 0.5 * s[self.rank] if len(s) > self.rank else 0.0
            s = np.clip(s[: self.rank] - lam, 0, None)
            z = (u[:, : self.rank] * s) @ vt[: self.rank]
        return z
