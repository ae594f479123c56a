"""Shapley-value estimation for cooperative games over the contributors.

Composed, not monolithic (after pyDVL): a ``Game`` gives coalition values in batches; a
``Valuation`` estimates Shapley values from it with an injected ``numpy.random.Generator``;
Monte Carlo estimates carry standard errors and stop on composable criteria
(``MaxPermutations(5000) | StandardErrorBelow(0.01)``).

* ``exact``: enumeration of all 2^n coalitions, vectorised (small n only).
* ``permutation``: Monte Carlo over permutations, with antithetic sampling and optional
  truncation; a game that can value permutation prefixes in bulk (the centroid game) is
  evaluated in a vectorised way.
* ``kernelshap``: the KernelSHAP estimator that the paper used (weighted least squares on
  sampled coalitions under the efficiency constraint), for faithful reproduction.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from math import comb

import numpy as np

from .evaluation import Evaluation
from .hookspecs import Register, hookimpl

# -- games --------------------------------------------------------------------------------


class Game(ABC):
    """A cooperative game over ``n`` players.

    ``bulk_prefixes``: True for games whose ``prefix_values`` is cheap for many permutations
    at once (vectorised); truncated Monte Carlo then computes every prefix and only zeroes
    the truncated marginals. Otherwise (a game whose every value costs a fine-tune) it
    values a permutation's prefixes one at a time and stops at the truncation point, which
    is where TMC-Shapley saves its evaluations.
    """

    n: int
    bulk_prefixes: bool = False

    @abstractmethod
    def values(self, masks: np.ndarray) -> np.ndarray:
        """Values of coalitions given as boolean masks ``(m, n)``: shape ``(m,)``."""

    def prefix_values(self, perms: np.ndarray) -> np.ndarray:
        """Values of every prefix of each permutation ``(p, n)``: shape ``(p, n + 1)``,
        column 0 being the empty coalition. Games that can do better override this."""
        p, n = perms.shape
        masks = np.zeros((p, n + 1, n), dtype=bool)
        rows = np.arange(p)[:, None]
        for k in range(n):
            masks[:, k + 1 :, :][rows, :, perms[:, k : k + 1]] = True
        return self.values(masks.reshape(-1, n)).reshape(p, n + 1)


class CentroidGame(Game):
    """The paper's game: ``v(S) = f(mean of the members' vectors, e)``, ``v(∅) = f(0, e)``."""

    bulk_prefixes = True

    def __init__(self, vectors: np.ndarray, target: np.ndarray, evaluation: Evaluation) -> None:
        self.x = np.asarray(vectors, dtype=float)
        self.target = np.asarray(target, dtype=float)
        self.f = evaluation
        self.n = len(self.x)

    def values(self, masks):
        masks = np.asarray(masks, dtype=float)
        counts = masks.sum(axis=1)
        sums = masks @ self.x
        means = np.divide(sums, counts[:, None], out=np.zeros_like(sums), where=counts[:, None] > 0)
        return self.f(means, self.target)

    def prefix_values(self, perms):
        p, n = perms.shape
        sums = np.cumsum(self.x[perms], axis=1)  # (p, n, d)
        means = sums / np.arange(1, n + 1)[None, :, None]
        out = np.empty((p, n + 1))
        out[:, 0] = self.f(np.zeros((1, self.x.shape[1])), self.target)[0]
        out[:, 1:] = self.f(means, self.target)
        return out

    def size_marginals(self, perm: np.ndarray) -> np.ndarray:
        """One marginal contribution of every player to a uniform random coalition of every
        size, from one permutation ``perm``: ``(n, n)``, row k for coalitions of size k,
        column j for player j. With ``P_k`` the first k players of ``perm``: a player outside
        ``P_k`` joins it, ``v(P_k + j) - v(P_k)``; a player inside it leaves ``P_(k+1)``,
        ``v(P_(k+1)) - v(P_(k+1) - j)``. Either way the coalition is a uniform random one of
        size k without j, so each entry is unbiased for the mean marginal at its size."""
        n, d = self.x.shape
        csum = np.zeros((n + 1, d))
        np.cumsum(self.x[perm], axis=0, out=csum[1:])
        sizes = np.arange(n + 1, dtype=float)
        prefix = np.empty(n + 1)
        prefix[0] = self.f(np.zeros((1, d)), self.target)[0]
        prefix[1:] = self.f(csum[1:] / sizes[1:, None], self.target)
        position = np.empty(n, dtype=np.int64)
        position[perm] = np.arange(n)
        k = np.arange(n)[:, None]
        outside = (position[None, :] >= k)[:, :, None]  # (n, n, 1): j not in P_k
        # the other coalition of each entry: P_k + j for outsiders, P_(k+1) - j for insiders
        other_sum = np.where(
            outside, csum[:-1, None, :] + self.x[None], csum[1:, None, :] - self.x[None]
        )
        # both kinds of coalition hold at least one player: j itself, or P_(k+1) minus j
        # where j is in P_k (so k >= 1)
        other_size = np.where(outside[..., 0], k + 1, k).astype(float)  # (n, n), all >= 1
        other = self.f(other_sum / other_size[..., None], self.target)  # (n, n)
        return np.where(outside[..., 0], other - prefix[:-1, None], prefix[1:, None] - other)


class FunctionGame(Game):
    """A game from a function of one boolean mask (for tests and small custom games)."""

    def __init__(self, n: int, value: Callable[[np.ndarray], float]) -> None:
        self.n = n
        self._value = value

    def values(self, masks):
        return np.array([self._value(m) for m in np.asarray(masks, dtype=bool)], dtype=float)


# -- results and stopping -----------------------------------------------------------------


@dataclass(frozen=True)
class ValuationResult:
    values: np.ndarray
    stderr: np.ndarray  # zeros for exact values; NaN where the method gives no error estimate
    evaluations: int  # coalition values computed
    samples: int = 0  # permutations (or coalitions) drawn
    converged: bool = True
    method: str = ""
    # The estimates' covariance (n, n), where the method knows it (Monte Carlo over
    # permutations: the players' estimates share permutations, so they are correlated, and
    # the error of a difference of two values is not that of independent ones); zeros for
    # exact values, None where unknown.
    covariance: np.ndarray | None = None

    @property
    def spread(self) -> float:
        return float(self.values.max() - self.values.min()) if len(self.values) else 0.0


@dataclass
class Progress:
    """What a stopping criterion sees after each batch of permutations."""

    samples: int
    values: np.ndarray
    stderr: np.ndarray
    history: list[np.ndarray]
    covariance: np.ndarray | None = None


class Stopping(ABC):
    """A stopping criterion; combine with ``&`` (both) and ``|`` (either)."""

    @abstractmethod
    def done(self, progress: Progress) -> bool: ...

    def __and__(self, other: Stopping) -> Stopping:
        return _Both(self, other)

    def __or__(self, other: Stopping) -> Stopping:
        return _Either(self, other)


@dataclass
class _Both(Stopping):
    a: Stopping
    b: Stopping

    def done(self, progress):
        return self.a.done(progress) and self.b.done(progress)


@dataclass
class _Either(Stopping):
    a: Stopping
    b: Stopping

    def done(self, progress):
        return self.a.done(progress) or self.b.done(progress)


@dataclass
class MaxPermutations(Stopping):
    """Stop after ``n`` samples: permutations, or with antithetic sampling pairs of a
    permutation and its reverse (2n permutations)."""

    n: int

    def done(self, progress):
        return progress.samples >= self.n


@dataclass
class StandardErrorBelow(Stopping):
    """Stop when every standard error is below ``relative`` times the spread of the values
    (max - min), after at least ``min_samples`` permutations."""

    relative: float = 0.01
    min_samples: int = 64

    def done(self, progress):
        if progress.samples < self.min_samples:
            return False
        spread = progress.values.max() - progress.values.min()
        return bool(np.all(progress.stderr <= self.relative * max(spread, 1e-300)))


@dataclass
class RankStability(Stopping):
    """Stop when the ranking of the players has not changed over the last ``checks``
    batches."""

    checks: int = 5

    def done(self, progress):
        if len(progress.history) <= self.checks:
            return False
        ranks = [np.argsort(np.argsort(v)) for v in progress.history[-self.checks - 1 :]]
        return all(np.array_equal(ranks[0], r) for r in ranks[1:])


# -- estimators ---------------------------------------------------------------------------


class Valuation(ABC):
    @abstractmethod
    def __call__(self, game: Game, rng: np.random.Generator) -> ValuationResult: ...


class ExactShapley(Valuation):
    """Exact Shapley values by enumerating all 2^n coalitions (vectorised)."""

    def __init__(self, max_players: int = 20) -> None:
        self.max_players = max_players

    def __call__(self, game, rng=None):
        n = game.n
        if n > self.max_players:
            raise ValueError(
                f"exact Shapley values for {n} players need 2^{n} coalitions; the limit is "
                f"{self.max_players} players (use 'permutation')"
            )
        idx = np.arange(2**n, dtype=np.int64)
        bits = ((idx[:, None] >> np.arange(n)) & 1).astype(bool)
        v = game.values(bits)
        size = bits.sum(axis=1)
        # weight of a coalition S not holding i: |S|! (n - |S| - 1)! / n!
        w = np.array([1.0 / (n * comb(n - 1, s)) for s in range(n)])
        phi = np.empty(n)
        for i in range(n):
            without = idx[~bits[:, i]]
            phi[i] = np.sum(w[size[without]] * (v[without | (1 << i)] - v[without]))
        return ValuationResult(
            phi, np.zeros(n), evaluations=len(idx), method="exact", covariance=np.zeros((n, n))
        )


class PermutationShapley(Valuation):
    """Monte Carlo Shapley values over random permutations.

    Two estimators share the stopping rules and the standard errors:

    * plain (any game): each permutation gives every player one marginal contribution, at
      its position. ``antithetic`` pairs each permutation with its reverse (the pair's mean
      is one sample, which cuts the variance for games close to additive). ``truncation``:
      once a prefix's value is within ``truncation * |v(N) - v(∅)|`` of ``v(N)``, the rest of
      that permutation's marginals count as zero and, for a game without cheap bulk prefixes
      (``Game.bulk_prefixes``), are never valued (TMC-Shapley, Ghorbani and Zou 2019); 0
      turns it off.
    * stratified (games with ``size_marginals``, such as the centroid game): one
      permutation yields a marginal contribution of *every* player at *every* coalition
      size (see ``CentroidGame.size_marginals``); a player's estimate is the mean over
      sizes (each size weighted 1/n, as in the Shapley value), which removes the variance
      between sizes that dominates the plain estimator (the size-stratified idea of Maleki
      et al. 2013, balanced: every size and player gets one sample per permutation). Each
      permutation's estimates are shifted equally to sum to ``v(N) - v(∅)`` (efficiency),
      and the standard error is computed over whole permutations. ``stratified=None``
      picks it where the game supports it.
    """

    def __init__(
        self,
        stopping: Stopping | None = None,
        batch: int = 64,
        antithetic: bool = True,
        truncation: float = 0.0,
        stratified: bool | None = None,
    ) -> None:
        self.stopping = stopping or (MaxPermutations(20_000) | StandardErrorBelow(0.01))
        self.batch = batch
        self.antithetic = antithetic
        self.truncation = truncation
        self.stratified = stratified

    def __call__(self, game, rng):
        stratified = self.stratified
        if stratified is None:
            stratified = hasattr(game, "size_marginals")
        if stratified:
            return self._stratified(game, rng)
        return self._plain(game, rng)

    def _finish(self, progress: Progress, evaluations: int, method: str) -> ValuationResult:
        converged = StandardErrorBelow(0.01, min_samples=0).done(progress)
        return ValuationResult(
            progress.values,
            progress.stderr,
            evaluations,
            progress.samples,
            converged,
            method,
            progress.covariance,
        )

    def _plain(self, game: Game, rng: np.random.Generator) -> ValuationResult:
        n = game.n
        total = np.zeros(n)
        outer = np.zeros((n, n))
        samples = 0
        evaluations = 0
        history: list[np.ndarray] = []
        while True:
            half = max(self.batch // 2, 1) if self.antithetic else self.batch
            perms = rng.permuted(np.tile(np.arange(n), (half, 1)), axis=1)
            if self.antithetic:
                perms = np.concatenate([perms, perms[:, ::-1]])
            if self.truncation > 0 and not game.bulk_prefixes:
                marg, used = self._truncated(game, perms)
                evaluations += used
            else:
                pv = game.prefix_values(perms)
                evaluations += pv.size
                marg = np.diff(pv, axis=1)
                if self.truncation > 0:
                    full, empty = pv[0, -1], pv[0, 0]
                    near = np.abs(pv[:, 1:] - full) <= self.truncation * abs(full - empty)
                    after = (np.cumsum(near, axis=1) - near) > 0  # past the first close prefix
                    marg = np.where(after, 0.0, marg)
            phi = np.empty_like(marg)
            phi[np.arange(len(perms))[:, None], perms] = marg
            if self.antithetic:
                phi = 0.5 * (phi[: len(phi) // 2] + phi[len(phi) // 2 :])
            total += phi.sum(axis=0)
            outer += phi.T @ phi
            samples += len(phi)
            progress = _progress(total, outer, samples, history)
            if self.stopping.done(progress):
                return self._finish(progress, evaluations, "permutation")

    def _truncated(self, game: Game, perms: np.ndarray) -> tuple[np.ndarray, int]:
        """Marginals along each permutation (by position), valuing its prefixes one by one
        and stopping once a prefix is within the tolerance of ``v(N)``: the marginals after
        that count zero and their coalitions are never valued. Returns them and the number
        of values asked of the game."""
        p, n = perms.shape
        ends = game.values(np.array([[False] * n, [True] * n]))
        empty, full = float(ends[0]), float(ends[1])
        tol = self.truncation * abs(full - empty)
        marg = np.zeros((p, n))
        asked = 2
        for r, perm in enumerate(perms):
            mask = np.zeros(n, dtype=bool)
            prev = empty
            for k, j in enumerate(perm):
                mask[j] = True
                value = full if k == n - 1 else float(game.values(mask[None, :])[0])
                asked += k < n - 1
                marg[r, k] = value - prev
                prev = value
                if abs(value - full) <= tol:
                    break
        return marg, asked

    def _stratified(self, game: Game, rng: np.random.Generator) -> ValuationResult:
        n = game.n
        ends = game.values(np.array([[False] * n, [True] * n]))
        grand = float(ends[1] - ends[0])  # v(N) - v(empty): what the values must sum to
        # Per permutation, y_j = mean over sizes of player j's marginal at that size: an
        # unbiased estimate of its Shapley value. Each y is made efficient by sharing its
        # shortfall equally, y + (grand - sum(y)) / n (still unbiased: the shortfall has mean
        # zero), and permutations are independent, so the standard error is that of a mean
        # of independent draws. (The sizes within one permutation share prefixes, so their
        # errors are correlated; adding per-size variances as if they were independent, as
        # this estimator once did, understated the error 1.5-2.6 times.)
        total = np.zeros(n)
        outer = np.zeros((n, n))
        samples = 0
        evaluations = 2
        history: list[np.ndarray] = []
        while True:
            ys = np.empty((self.batch, n))
            for b in range(self.batch):
                perm = rng.permutation(n)
                y = game.size_marginals(perm).mean(axis=0)  # type: ignore[attr-defined]
                ys[b] = y + (grand - y.sum()) / n
                evaluations += n + n * n
            total += ys.sum(axis=0)
            outer += ys.T @ ys
            samples += self.batch
            progress = _progress(total, outer, samples, history)
            if self.stopping.done(progress):
                return self._finish(progress, evaluations, "permutation-stratified")


def _progress(
    total: np.ndarray, outer: np.ndarray, samples: int, history: list[np.ndarray]
) -> Progress:
    """Mean, standard errors and covariance of the mean of ``samples`` independent vectors,
    from their sum and the sum of their outer products."""
    mean = total / samples
    cov = (outer / samples - np.outer(mean, mean)) * samples / max(samples - 1, 1)
    cov_mean = cov / samples
    history.append(mean)
    stderr = np.sqrt(np.maximum(np.diag(cov_mean), 0.0))
    return Progress(samples, mean, stderr, history, cov_mean)


class KernelSHAP(Valuation):
    """KernelSHAP (Lundberg and Lee, 2017) as the paper ran it: ``samples`` coalitions chosen
    from the Shapley kernel the way the ``shap`` library chooses them (see ``_coalitions``),
    then weighted least squares with the efficiency constraint. With
    ``l1_reg = num_features(N)`` selecting all N players, no regularisation applies, which
    is what this does."""

    def __init__(self, samples: int = 10_000) -> None:
        self.samples = samples

    def __call__(self, game, rng):
        n = game.n
        if n < 2:
            v = game.values(np.array([[False] * n, [True] * n]))
            return ValuationResult(
                np.array([v[1] - v[0]])[:n],
                np.zeros(n),
                2,
                method="kernelshap",
                covariance=np.zeros((n, n)),
            )
        masks, weights = self._coalitions(n, rng)
        v = game.values(np.vstack([np.zeros((1, n), bool), np.ones((1, n), bool), masks]))
        v0, v1, vs = v[0], v[1], v[2:]
        # Efficiency constraint: eliminate the last player (phi_last = total - sum(others)).
        z = masks.astype(float)
        y = vs - v0 - z[:, -1] * (v1 - v0)
        x = z[:, :-1] - z[:, -1:]
        sw = np.sqrt(weights)
        coef = np.linalg.lstsq(x * sw[:, None], y * sw, rcond=None)[0]
        phi = np.append(coef, (v1 - v0) - coef.sum())
        exact = len(masks) == 2**n - 2  # every coalition: no sampling error
        return ValuationResult(
            phi,
            np.zeros(n) if exact else np.full(n, np.nan),  # no error estimate when sampled
            evaluations=len(v),
            samples=len(masks),
            converged=exact,
            method="kernelshap",
            covariance=np.zeros((n, n)) if exact else None,
        )

    def _coalitions(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Coalitions and their Shapley-kernel weights, chosen the way the ``shap`` library's
        KernelExplainer chooses them. Sizes are taken from the smallest, each paired with
        its complement size (n - s; the middle size of an even n has no pair). A size is
        enumerated completely when its share of the kernel mass, times the budget left, is
        at least its number of coalitions (shares renormalised over the sizes not yet
        enumerated); the first size that fails stops the enumeration. The rest of the
        budget samples the remaining sizes: a paired size with half its mass as probability,
        drawing a coalition and its complement, the middle size with its full mass, drawing
        one; a coalition drawn again adds to its count instead; the drawn coalitions'
        weights are their counts, scaled to the kernel mass of the sampled sizes. (The mass
        per size thus matches the kernel in expectation; before, the middle size of an even
        n got half of it.)"""
        budget = self.samples if n >= 31 else min(self.samples, 2**n - 2)
        n_sizes = n // 2  # sizes 1 .. ceil((n - 1) / 2)
        n_paired = (n - 1) // 2  # sizes with a distinct complement size
        mass = np.array([(n - 1) / (s * (n - s)) for s in range(1, n_sizes + 1)])
        mass[:n_paired] *= 2
        mass /= mass.sum()
        masks: list[np.ndarray] = []
        weights: list[float] = []
        left = budget
        share = mass.copy()
        full = 0
        for i in range(n_sizes):
            s = i + 1
            paired = s <= n_paired
            count = comb(n, s) * (2 if paired else 1)
            if left * share[i] / count < 1.0 - 1e-8:
                break
            for subset in _subsets(n, s):
                m = np.zeros(n, bool)
                m[list(subset)] = True
                masks.append(m)
                weights.append(mass[i] / count)
                if paired:
                    masks.append(~m)
                    weights.append(mass[i] / count)
            left -= count
            full += 1
            if share[i] < 1.0:
                share /= 1.0 - share[i]
        if full < n_sizes and left > 0:
            p = mass[full:].copy()
            p[: max(n_paired - full, 0)] /= 2  # a paired draw yields two coalitions
            p /= p.sum()
            seen: dict[bytes, int] = {}
            start = len(masks)
            for pick in rng.choice(len(p), size=4 * left, p=p):
                if left <= 0:
                    break
                s = full + int(pick) + 1
                m = np.zeros(n, bool)
                m[rng.choice(n, size=s, replace=False)] = True
                for mm in (m, ~m) if s <= n_paired else (m,):
                    if left <= 0:
                        break
                    key = np.packbits(mm).tobytes()
                    if key in seen:
                        weights[seen[key]] += 1.0
                    else:
                        seen[key] = len(masks)
                        masks.append(mm)
                        weights.append(1.0)
                        left -= 1
            drawn = np.asarray(weights[start:])
            weights[start:] = list(drawn * (mass[full:].sum() / drawn.sum()))
        return np.array(masks), np.array(weights, dtype=float)


def _subsets(n: int, s: int):
    from itertools import combinations

    return combinations(range(n), s)


@hookimpl
def crowdsft_register_valuation(register: Register) -> None:
    register("exact", ExactShapley)
    register("permutation", PermutationShapley)
    register("kernelshap", KernelSHAP)
