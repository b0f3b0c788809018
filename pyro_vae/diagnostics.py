"""Diagnostics and error bars for importance-sampled estimates of log p(x).

Everything here takes the log importance weights of one batch of datapoints, shape
(K, batch) (the draws along dim 0, as ``bounds.log_weights`` returns them), and works on
all datapoints at once. Computations are in float64.

- ``pareto_k`` / ``psis``: Pareto smoothed importance sampling (Vehtari, Simpson, Gelman,
  Yao & Gabry, 2024, JMLR 25(72)). A generalized Pareto distribution is fitted to the
  M = ceil(min(K/5, 3 sqrt(K))) largest weights (minus the threshold, the (M+1)-th largest),
  by the empirical-Bayes estimate of Zhang & Stephens (2009, Technometrics 51(3)), with
  the weakly informative prior on the shape that PSIS uses. The shape k-hat says how
  heavy the tail of the weights is: their variance is finite only for k < 1/2, and above
  k = 0.7 the estimate of p(x) is not to be trusted at any practical K.
- ``log_mean_exp_se``: the Monte Carlo standard error of log(mean_k w_k), the IWAE-K
  estimate, with the tail of the weights modelled by that fit (see its docstring).
- ``jackknife``: the jackknife variational inference estimator of log p(x) (Nowozin,
  2018, ICLR), orders 1 and 2, from the same K draws, with O(K) leave-one-out
  logsumexps per datapoint.
"""

from __future__ import annotations

import math

import torch

#: k-hat above which PSIS deems an importance-sampling estimate unreliable
K_HAT_UNRELIABLE = 0.7
#: k-hat above which the variance of the weights is (estimated to be) infinite
K_HAT_INFINITE_VARIANCE = 0.5


def rounding(log_w_max: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """How far apart log weights of this size, computed in ``dtype``, can lie and still be
    the same number but for rounding: an exact guide's weights, all equal to p(x), differ
    by this much. Weights closer than that are one weight: a tail without spread (k-hat
    -inf, no alarm) and an estimate without Monte Carlo error."""
    return 64 * torch.finfo(dtype).eps * log_w_max.abs().clamp_min(1.0)


def tail_length(num_draws: int) -> int:
    """M, the number of largest weights that PSIS fits a generalized Pareto tail to."""
    return int(math.ceil(min(0.2 * num_draws, 3 * math.sqrt(num_draws))))


def gpd_fit(exceedances: torch.Tensor, prior: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Shape k and scale sigma of a generalized Pareto fit to each row of ``exceedances``.

    ``exceedances``: shape (..., n), positive, sorted ascending along the last dimension.
    Zhang & Stephens (2009): the profile likelihood of theta = -k / sigma is averaged over
    a grid of m = 30 + floor(sqrt(n)) values of theta placed by the quantiles of a prior,
    weighted by their likelihood (the posterior mean of theta); k and sigma follow from
    theta. With ``prior``, k is shrunk towards 1/2 as if by 10 extra observations, as PSIS
    does (Vehtari et al. 2024, appendix C). Returns tensors of the leading shape.
    """
    x = exceedances.double()
    n = x.shape[-1]
    m = 30 + int(math.sqrt(n))
    j = torch.arange(1, m + 1, dtype=x.dtype, device=x.device)
    quartile = x[..., max(int(n / 4 + 0.5) - 1, 0)].unsqueeze(-1)  # first quartile
    theta = 1 / x[..., -1:] + (1 - torch.sqrt(m / (j - 0.5))) / (3 * quartile)  # (..., m)
    # the shape given theta is k(theta) = mean log(1 - theta x) (Zhang & Stephens' k is
    # its negative); the profile log-likelihood is n (log(-theta / k) - k - 1)
    # one grid value at a time: (..., n) at once instead of (..., m, n), which at n = 3 sqrt(K)
    # would make the fit the largest allocation of an evaluation at large K
    k_theta = torch.stack([torch.log1p(-theta[..., j : j + 1] * x).mean(-1) for j in range(m)], -1)
    log_lik = n * (torch.log(-theta / k_theta) - k_theta - 1)
    weights = torch.softmax(log_lik, dim=-1)
    theta_post = (weights * theta).sum(-1, keepdim=True)
    k = torch.log1p(-theta_post * x).mean(-1)
    sigma = -k / theta_post.squeeze(-1)
    if prior:
        k = (n * k + 10 * 0.5) / (n + 10)
    return k, sigma


def _gpd_quantile(p: torch.Tensor, k: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Quantile function of the generalized Pareto distribution (location 0)."""
    small = k.abs() < 1e-8
    safe_k = torch.where(small, torch.ones_like(k), k)
    q = sigma * torch.expm1(-safe_k * torch.log1p(-p)) / safe_k
    return torch.where(small, -sigma * torch.log1p(-p), q)


def psis(log_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pareto smoothed log weights and k-hat per datapoint.

    ``log_w``: (K, batch). Returns ``(smoothed, k_hat)``: the log weights, unnormalized
    and on their original scale, with the M largest of each column replaced by the
    expected order statistics of the fitted tail (and none above the largest raw weight),
    shape (K, batch) in float64; and k-hat, shape (batch,). With fewer than 5 draws in the
    tail (K < 25) k-hat is NaN and nothing is smoothed.
    """
    lw = log_w.double()
    K = lw.shape[0]
    M = tail_length(K)
    if M < 5 or M + 1 > K:
        return lw.clone(), torch.full_like(lw[0], float("nan"))
    top, idx = torch.topk(lw, M + 1, dim=0)  # descending
    lmax = top[0]
    cutoff = top[M] - lmax  # log of the threshold, relative to the largest weight
    k, sigma = _tail_fit(top, rounding(lmax, log_w.dtype))
    p = (torch.arange(M, dtype=lw.dtype, device=lw.device) + 0.5) / M
    smooth = torch.log(_gpd_quantile(p.unsqueeze(-1), k, sigma) + torch.exp(cutoff)).clamp_max(0) + lmax
    out = lw.clone()
    out.scatter_(0, idx[:M].flip(0), smooth)  # ascending order stats to ascending raw ones
    return out, k


def _tail_fit(top: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The generalized Pareto fit of PSIS from the M + 1 largest log weights of each
    column, descending (float64): the M largest minus the threshold (the (M+1)-th), on the
    scale where the largest weight is 1. Returns (k-hat, sigma) per column. A tail whose
    weights all lie within ``noise`` (``rounding``) of each other has no shape to fit: its
    weights are bounded, k-hat is -inf and sigma 0 (a fit to the rounding errors alone
    would return any shape at all)."""
    M = top.shape[0] - 1
    w = torch.exp(top - top[0])
    # ties at the threshold give zero exceedances; the fit needs them positive
    exceed = (w[:M] - w[M]).flip(0).clamp_min(torch.finfo(torch.float64).tiny).T  # (batch, M), ascending
    k, sigma = gpd_fit(exceed)
    flat = top[0] - top[M] <= noise
    return torch.where(flat, -math.inf, k), torch.where(flat, 0.0, sigma)


def pareto_k(log_w: torch.Tensor) -> torch.Tensor:
    """k-hat of the upper tail of each column of ``log_w`` (K, batch): see ``psis``."""
    return psis(log_w)[1]


def log_mean_exp_se(log_w: torch.Tensor, k_hat: torch.Tensor | None = None,
                    groups: int = 20) -> torch.Tensor:
    """Monte Carlo standard error of log(mean_k w_k), the IWAE-K estimate, per datapoint,
    made to hold up when the weights are heavy-tailed. ``log_w``: (K, batch).

    The plain delta method, sd(w) / (sqrt(K) mean(w)) with the sample standard deviation of
    the weights (``delta_method_se``), undercovers under heavy tails: the variance of w is
    carried by rare large draws that most samples of K miss, and the samples that miss
    them underestimate p(x) and its error together. Here the tail is modelled instead of
    read off the sample, with the generalized Pareto fit of PSIS (``psis``), by its
    shape k-hat:

    - k-hat < 1/2 (finite variance): the delta method with a semi-parametric variance,
      the empirical second moment of the K - M smaller weights plus M times the second
      moment of the fitted tail, u + Y with Y ~ GPD(sigma, k): E(u + Y)^2 = u^2 +
      2 u sigma / (1 - k) + 2 sigma^2 / ((1 - k)(1 - 2k)). It counts the tail beyond the
      largest draw seen, which the sample variance cannot.
    - k-hat >= 1/2 (infinite variance; the mean of K weights then converges at the rate
      K^(k - 1) of an alpha-stable law with alpha = 1/k, not K^(-1/2)): the spread of
      the estimate over ``groups`` disjoint groups of K / G draws, sd_g(log mean of group
      g), scaled down to K draws by that rate, G^(k - 1). NaN for k-hat >= 1, where the
      draws look as if the weights had no mean and there is no rate to scale by.

    Why this one (``experiments/se_simulation.py``: Gaussian weights of a proposal narrower
    than the target, k = 0.28-0.64, K = 1000 and 5000): it covers +-2 s.e. at 95-97% for
    k <= 0.51 and 90-93% at k = 0.58, where the delta method gives 91-95% and 84-88%; the
    sd of the PSIS-smoothed weights and the plain spread over groups of draws (the sample
    variance in another form) both cover worse than the delta method. It is conservative
    at +-1 s.e. (69-78% for k <= 0.51). ``tests/test_bounds.py`` checks the coverage on
    the linear-Gaussian model.

    The number is a guide only for k-hat < 0.7 (``K_HAT_UNRELIABLE``): ``BoundEstimates``
    withholds it above. ``k_hat``: from ``psis(log_w)``, if already computed.
    """
    K = log_w.shape[0]
    M = tail_length(K)
    if K < 2 or M < 5 or M + 1 > K:
        return delta_method_se(log_w)  # too few draws to fit a tail
    lw = log_w.double()
    w = torch.exp(lw - lw.max(0).values)  # the largest is 1
    top = torch.topk(lw, M + 1, dim=0).values
    rest_sq = (w**2).sum(0) - (torch.exp(top[:M] - top[0]) ** 2).sum(0)
    G = min(groups, K // 2)
    n = K // G
    group_means = torch.logsumexp(lw[: G * n].view(G, n, -1), 1) - math.log(n)
    out = _tail_aware_se(top, rest_sq, w.sum(0), K, group_means, k_hat, lw.min(0).values,
                         rounding(top[0], log_w.dtype))
    return out.to(log_w.dtype)


def _tail_aware_se(top: torch.Tensor, rest_sq: torch.Tensor, total: torch.Tensor, K: int,
                   group_means: torch.Tensor, k_hat: torch.Tensor | None, smallest: torch.Tensor,
                   noise: torch.Tensor) -> torch.Tensor:
    """``log_mean_exp_se`` from what it needs of the K weights, on the scale where the
    largest is 1: the M + 1 largest log weights (descending), the sum of the squares of
    all but the M largest weights, the sum of all weights, the log mean weight of each of
    the G groups of draws, and the smallest log weight. Zero where all K weights are one
    weight but for rounding (``noise``): the estimate is exact."""
    M = top.shape[0] - 1
    k, sigma = _tail_fit(top, noise)  # the fit psis makes; k is k-hat
    if k_hat is not None:
        k = k_hat.to(k)
    u = torch.exp(top[M] - top[0])
    light = k < 0.5
    kl = torch.where(light, k, torch.zeros_like(k))
    tail_m2 = u**2 + 2 * u * sigma / (1 - kl) + 2 * sigma**2 / ((1 - kl) * (1 - 2 * kl))
    m2 = (rest_sq + M * tail_m2) / K
    mean = total / K
    semi = (m2 - mean**2).clamp_min(0).sqrt() / (math.sqrt(K) * mean)
    stable = group_means.std(0) * group_means.shape[0] ** (k - 1)
    out = torch.where(light, semi, torch.where(k < 1, stable, torch.full_like(semi, float("nan"))))
    return torch.where(top[0] - smallest <= noise, 0.0, out)


def delta_method_se(log_w: torch.Tensor) -> torch.Tensor:
    """The plain delta-method standard error of log(mean_k w_k), sd(w) / (sqrt(K) mean(w))
    with the raw weights' sample standard deviation: too small under heavy tails. Zero
    where the weights are equal but for rounding."""
    w = torch.exp(log_w - log_w.max(0, keepdim=True).values)
    if w.shape[0] < 2:
        return torch.full_like(w[0], float("nan"))
    top, bottom = log_w.max(0).values, log_w.min(0).values
    return torch.where(top - bottom <= rounding(top, log_w.dtype), 0.0, w.std(0) / (math.sqrt(w.shape[0]) * w.mean(0)))


def leave_one_out_logsumexp(log_w: torch.Tensor) -> torch.Tensor:
    """logsumexp of each column of ``log_w`` (K, batch) without row i, for every i, in O(K).

    lse_{-i} = lse + log1p(-exp(lw_i - lse)). The subtraction is exact to rounding as long
    as w_i is at most half the total, which holds for every draw but the largest; the
    largest one's is computed directly, as the logsumexp of the others. float64.
    """
    lw = log_w.double()
    if lw.shape[0] < 2:
        raise ValueError("leave-one-out needs at least two draws")
    lse = torch.logsumexp(lw, 0)
    rel = (lw - lse).clamp_max(0)
    out = lse + torch.log1p(-torch.exp(rel))
    imax = lw.argmax(0, keepdim=True)
    without_max = lw.scatter(0, imax, float("-inf"))
    out.scatter_(0, imax, torch.logsumexp(without_max, 0, keepdim=True))
    return out


def jackknife(log_w: torch.Tensor, order: int = 1) -> torch.Tensor:
    """The jackknife variational inference estimate of log p(x) (Nowozin 2018), per column.

    With L_n the mean over subsets of n draws of log(mean of their weights) (for n = K: the
    IWAE-K estimate; n = K - 1: the mean of the K leave-one-out estimates; n = K - 2: of
    the leave-two-out ones), JVI of order 1 is K L_K - (K - 1) L_{K-1}, which removes the
    O(1/K) term of the IWAE-K bias and leaves O(1/K^2); order 2 also removes that one,
    with the coefficients of Nowozin's eq. (9) (Sharot 1976):
    K^2/2 L_K - (K - 1)^2 L_{K-1} + (K - 2)^2/2 L_{K-2}.

    Order 2's leave-two-out mean is not computed from all K(K-1)/2 pairs: the K draws are
    split into G = 100 disjoint groups (fewer for small K) and the second differences are
    taken by leaving out groups, the grouped jackknife, which has the same bias expansion
    in n = G groups of K/G draws. The estimate is not a bound: it can lie above log p(x).
    Its Monte Carlo error equals that of IWAE-K to first order (the correction is
    O(1/K)): report ``log_mean_exp_se``.
    """
    lw = log_w.double()
    K = lw.shape[0]
    if order not in (1, 2):
        raise ValueError(f"jackknife order must be 1 or 2, got {order}")
    if K < order + 1:
        return torch.full_like(lw[0], float("nan"))
    if order == 1:
        L_K = torch.logsumexp(lw, 0) - math.log(K)
        L_K1 = (leave_one_out_logsumexp(lw) - math.log(K - 1)).mean(0)
        return K * L_K - (K - 1) * L_K1
    return _grouped_jackknife2(lw)


def _grouped_jackknife2(lw: torch.Tensor, groups: int = 100) -> torch.Tensor:
    """Second-order jackknife over G disjoint groups of draws: with L_g the estimate from
    all but g groups, G^2/2 L_0 - (G-1)^2 L_1 + (G-2)^2/2 L_2 (each L_g averaged over the
    ways of leaving g groups out; equal groups of K/G draws, any remainder dropped)."""
    K = lw.shape[0]
    G = min(groups, K)
    n = K // G
    # per-group logsumexp, then the whole/leave-one-group-out/leave-two-groups-out sums
    g = torch.logsumexp(lw[: G * n].view(G, n, -1), 1)  # (G, batch)
    total = torch.logsumexp(g, 0)
    loo = leave_one_out_logsumexp(g)  # (G, batch)
    # leave two out: log(S - s_i - s_j) for i < j; O(G^2) per column, G is small
    s = torch.exp(g - total)  # shares, sum to 1
    pair = 1 - s.unsqueeze(0) - s.unsqueeze(1)  # (G, G, batch)
    iu = torch.triu_indices(G, G, 1)
    l2 = torch.log(pair[iu[0], iu[1]].clamp_min(torch.finfo(torch.float64).tiny)) + total
    L0 = total - math.log(G * n)
    L1 = (loo - math.log((G - 1) * n)).mean(0)
    L2 = (l2 - math.log((G - 2) * n)).mean(0)
    return G**2 / 2 * L0 - (G - 1) ** 2 * L1 + (G - 2) ** 2 / 2 * L2


class _Moments:
    """Count, mean and sum of squared deviations of each column, merged chunk by chunk
    (Chan et al.'s pairwise update: no cancellation, unlike sums of squares)."""

    def __init__(self, like: torch.Tensor):
        self.n = 0
        self.mean = torch.zeros_like(like)
        self.m2 = torch.zeros_like(like)

    def update(self, values: torch.Tensor) -> None:
        n_b = values.shape[0]
        mean_b = values.mean(0)
        m2_b = ((values - mean_b) ** 2).sum(0)
        n = self.n + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + m2_b + delta**2 * (self.n * n_b / n)
        self.n = n

    def rescale(self, factor: torch.Tensor) -> None:
        """The moments of the values times ``factor`` (per column)."""
        self.mean = self.mean * factor
        self.m2 = self.m2 * factor**2

    def std(self) -> torch.Tensor:
        """The sample standard deviation (n - 1 in the denominator); NaN for one value."""
        if self.n < 2:
            return torch.full_like(self.mean, float("nan"))
        return (self.m2 / (self.n - 1)).clamp_min(0).sqrt()


class WeightStream:
    """The diagnostics of this module for the K log weights of a batch of datapoints fed
    in chunks of draws, ``update(log_w_chunk)`` with chunks of shape (n, batch), in memory
    that does not grow with K; the numbers equal those of the functions above on all K
    draws at once, to rounding.

    What is kept per datapoint: the largest log weight and the ``T`` largest log weights
    (T = max(M + 1, 64), at most K; M = 3 sqrt(K) at most: PSIS's tail), the first
    ``POWERS`` power sums of the other weights (relative to the largest), the moments of
    the log weights and of the weights, and the logsumexp of each of the groups of draws
    of ``log_mean_exp_se``. The jackknife's leave-one-out sum needs every draw's share
    x_i = w_i / sum w: for the T largest it is computed exactly, and for the others, each
    at most 1/T, from sum_i log(1 - x_i) = -sum_n (sum_i x_i^n) / n, whose terms shrink by
    T at least: ``POWERS`` terms reach float64's precision.
    """

    POWERS = 10

    def __init__(self, num_draws: int, batch: int, device: torch.device | str = "cpu", groups: int = 20):
        self.K = num_draws
        self.M = tail_length(num_draws)
        self.keep = min(num_draws, max(self.M + 1, 64))
        self.seen = 0
        like = torch.zeros(batch, dtype=torch.float64, device=device)
        self.max = torch.full_like(like, -math.inf)
        self.min = torch.full_like(like, math.inf)
        self.dtype = torch.float64  # of the log weights fed in: their rounding
        self.top = like.new_empty((0, batch))
        self.rest_powers = like.new_zeros((self.POWERS, batch))
        self.log_w = _Moments(like)
        self.w = _Moments(like)  # relative to the running maximum
        self.G = min(groups, num_draws // 2)
        self.group_size = num_draws // self.G if self.G else 0
        self.group_lse = like.new_full((self.G, batch), -math.inf)

    def update(self, log_w: torch.Tensor) -> None:
        """Take the next chunk of draws, shape (n, batch)."""
        lw = log_w.double()
        self.dtype = log_w.dtype if self.seen == 0 else self.dtype
        self.min = torch.minimum(self.min, lw.min(0).values)
        new_max = torch.maximum(self.max, lw.max(0).values)
        factor = torch.exp(self.max - new_max).nan_to_num(0.0)  # 0 on the first chunk
        powers = torch.arange(1, self.POWERS + 1, dtype=lw.dtype, device=lw.device).unsqueeze(-1)
        self.rest_powers = self.rest_powers * factor**powers
        self.w.rescale(factor)
        self.max = new_max
        self.w.update(torch.exp(lw - new_max))
        self.log_w.update(lw)
        ranked = torch.sort(torch.cat([self.top, lw]), dim=0, descending=True).values
        self.top, dropped = ranked[: self.keep], ranked[self.keep :]
        if dropped.numel():
            rel = dropped - new_max
            self.rest_powers = self.rest_powers + torch.exp(powers.unsqueeze(-1) * rel).sum(1)
        first, last = self.seen, self.seen + lw.shape[0]
        for g in range(first // self.group_size if self.G else 0, self.G):
            lo, hi = max(g * self.group_size, first), min((g + 1) * self.group_size, last)
            if lo >= hi:
                break
            self.group_lse[g] = torch.logaddexp(self.group_lse[g], torch.logsumexp(lw[lo - first : hi - first], 0))
        self.seen = last

    def _check_done(self) -> None:
        if self.seen != self.K:
            raise ValueError(f"{self.seen} draws of {self.K} seen")

    @property
    def total(self) -> torch.Tensor:
        """sum_k w_k, relative to the largest weight."""
        return self.rest_powers[0] + torch.exp(self.top - self.max).sum(0)

    def log_mean_exp(self) -> torch.Tensor:
        """log(mean_k w_k): the IWAE-K estimate."""
        self._check_done()
        return self.max + torch.log(self.total) - math.log(self.K)

    def pareto_k(self) -> torch.Tensor:
        """As ``pareto_k`` of the K draws."""
        self._check_done()
        if self.M < 5 or self.M + 1 > self.K:
            return torch.full_like(self.max, float("nan"))
        return _tail_fit(self.top[: self.M + 1], rounding(self.max, self.dtype))[0]

    def delta_method_se(self) -> torch.Tensor:
        """As ``delta_method_se`` of the K draws."""
        self._check_done()
        se = self.w.std() / (math.sqrt(self.K) * self.w.mean)
        return torch.where(self.max - self.min <= rounding(self.max, self.dtype), 0.0, se)

    def log_mean_exp_se(self, k_hat: torch.Tensor | None = None) -> torch.Tensor:
        """As ``log_mean_exp_se`` of the K draws."""
        self._check_done()
        if self.K < 2 or self.M < 5 or self.M + 1 > self.K:
            return self.delta_method_se()
        top_sq = torch.exp(2 * (self.top[self.M :] - self.max)).sum(0)
        group_means = self.group_lse - math.log(self.group_size)
        return _tail_aware_se(self.top[: self.M + 1], self.rest_powers[1] + top_sq, self.total, self.K,
                              group_means, k_hat, self.min, rounding(self.max, self.dtype))

    def jackknife(self) -> torch.Tensor:
        """As ``jackknife(log_w, 1)`` of the K draws: K L_K - (K - 1) L_{K-1}, written as
        lse - (K - 1)/K T + (K - 1) log(K - 1) - K log K with T = sum_i (lse_{-i} - lse),
        which avoids the cancellation of K L_K against (K - 1) L_{K-1}."""
        self._check_done()
        K = self.K
        if K < 2:
            return torch.full_like(self.max, float("nan"))
        total = self.total
        lse = self.max + torch.log(total)
        # the largest draw: the log share of the others, summed without a subtraction
        others = self.rest_powers[0] + torch.exp(self.top[1:] - self.max).sum(0)
        T = torch.log(others) - torch.log(total)
        T = T + torch.log1p(-torch.exp((self.top[1:] - lse).clamp_max(0))).sum(0)
        n = torch.arange(1, self.POWERS + 1, dtype=total.dtype, device=total.device).unsqueeze(-1)
        T = T - (self.rest_powers / (n * total**n)).sum(0)
        return lse - (K - 1) / K * T + (K - 1) * math.log(K - 1) - K * math.log(K)
