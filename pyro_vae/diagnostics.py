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
    k_theta = torch.log1p(-theta.unsqueeze(-1) * x.unsqueeze(-2)).mean(-1)  # (..., m)
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
    tail = top[:M].flip(0) - lmax  # ascending, relative to the largest weight
    exceed = torch.exp(tail) - torch.exp(cutoff)
    # ties at the threshold give zero exceedances; the fit needs them positive
    exceed = exceed.clamp_min(torch.finfo(torch.float64).tiny).T  # (batch, M)
    k, sigma = gpd_fit(exceed)
    p = (torch.arange(M, dtype=lw.dtype, device=lw.device) + 0.5) / M
    smooth = torch.log(_gpd_quantile(p.unsqueeze(-1), k, sigma) + torch.exp(cutoff)).clamp_max(0) + lmax
    out = lw.clone()
    out.scatter_(0, idx[:M].flip(0), smooth)  # ascending order stats to ascending raw ones
    return out, k


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
    top = torch.topk(w, M + 1, dim=0).values
    u = top[M]
    exceed = (top[:M] - u).flip(0).clamp_min(torch.finfo(torch.float64).tiny).T
    k, sigma = gpd_fit(exceed)  # the fit psis makes; k is k-hat
    if k_hat is not None:
        k = k_hat.to(k)
    light = k < 0.5
    kl = torch.where(light, k, torch.zeros_like(k))
    tail_m2 = u**2 + 2 * u * sigma / (1 - kl) + 2 * sigma**2 / ((1 - kl) * (1 - 2 * kl))
    m2 = ((w**2).sum(0) - (top[:M] ** 2).sum(0) + M * tail_m2) / K
    mean = w.mean(0)
    semi = (m2 - mean**2).clamp_min(0).sqrt() / (math.sqrt(K) * mean)
    G = min(groups, K // 2)
    n = K // G
    spread = (torch.logsumexp(lw[: G * n].view(G, n, -1), 1) - math.log(n)).std(0)
    stable = spread * G ** (k - 1)
    out = torch.where(light, semi, torch.where(k < 1, stable, torch.full_like(semi, float("nan"))))
    return out.to(log_w.dtype)


def delta_method_se(log_w: torch.Tensor) -> torch.Tensor:
    """The plain delta-method standard error of log(mean_k w_k), sd(w) / (sqrt(K) mean(w))
    with the raw weights' sample standard deviation: too small under heavy tails."""
    w = torch.exp(log_w - log_w.max(0, keepdim=True).values)
    if w.shape[0] < 2:
        return torch.full_like(w[0], float("nan"))
    return w.std(0) / (math.sqrt(w.shape[0]) * w.mean(0))


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
