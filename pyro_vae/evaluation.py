"""Scoring a trained run: the bounds on log p(x) of a data split and the family's own
metrics, the files that hold them and the table that shows them. Shared by ``pyro-vae
evaluate``, ``pyro-vae cluster`` and the experiments, so that all write and read the same."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from . import plots
from .ais import AISEstimates, BDMCEstimates, ais, bdmc
from .bounds import BoundEstimates, estimate_bounds
from .data import Dataset, random_rows
from .errors import DataError
from .metrics import add_bits_per_dim  # noqa: F401  (its home before the families' add_units hook)
from .distributed import current as current_world
from .runs import write_json, write_npz
from .train import Run


def split_data(run: Run, split: str = "test", limit: int | None = None, seed: int = 0,
               data_dir: str | Path | None = None, download: bool = True
               ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """A split of the run's dataset as evaluation sees it (binarized once with a fixed
    seed), on the model's device: ``(x, labels or None, row indices)``. ``limit`` takes
    that many rows at random (seeded), since some split files are sorted by class."""
    data = run.load_data(data_dir, download)
    x = nonempty_split(data, split)
    index = torch.arange(x.shape[0])
    if limit is not None and limit < x.shape[0]:
        index = random_rows(x.shape[0], limit, seed)
    labels = data.labels[split][index] if split in data.labels else None
    return x[index].to(next(run.model.parameters()).device), labels, index


def nonempty_split(data: Dataset, split: str) -> torch.Tensor:
    """The split as evaluation sees it, refused if it has no images."""
    if split not in data.splits or len(data.split(split)) == 0:
        raise DataError(f"{data.name} has no {split} images; choose another split")
    return data.eval_data(split)


def evaluate_run(run: Run, x: torch.Tensor, labels: torch.Tensor | None, num_particles: int, *,
                 seed: int = 0, ks: Sequence[int] | None = None, batch_size: int = 100,
                 max_rows: int = 2_000, progress: Callable[[int], None] | None = None,
                 index: torch.Tensor | None = None, compile: bool = True,
                 log: Callable[[str], None] | None = None) -> tuple[dict[str, Any] | None, BoundEstimates | None]:
    """ELBO, IWAE-k sweep and log p(x) with ``num_particles`` importance samples for every
    row of ``x`` (from ``split_data``), plus the family's metrics (e.g. accuracy, when
    ``labels`` are given). Returns the summary (as written to JSON) and the per-image
    estimates.

    The draws of each image are keyed by (``seed``, its row in the split: ``index``, by
    default 0..N-1), so an image's estimates are the same in any batch, chunk, subset or
    process. Under ``torchrun`` each process scores a contiguous block of the images and
    rank 0 gathers them: it returns the results, the other processes (None, None).
    ``compile`` runs each chunk as a trace (``bounds.estimate_bounds``: the same numbers,
    faster); ``log`` hears of its trace times, and of a fallback to eager code."""
    world = current_world()
    if world.size > x.shape[0]:
        raise DataError(f"{x.shape[0]} images cannot be shared among {world.size} processes: start at most "
                        f"{x.shape[0]} (torchrun --nproc-per-node), or score more images")
    index = torch.arange(x.shape[0]) if index is None else index
    mine = world.block(x.shape[0])
    start = time.perf_counter()
    est = estimate_bounds(run.model.model, run.model.guide, x[mine], num_particles, ks=ks,
                          batch_size=batch_size, max_rows=max_rows, progress=progress, seed=seed,
                          index=index[mine], compile=compile, log=log)
    parts = world.gather(est)
    if parts is None:
        return None, None
    est = BoundEstimates.cat(parts)
    torch.manual_seed(seed)  # for the family's metrics, should they draw
    summary = {"run": str(run.dir.path), "model": run.model_name, "seed": seed,
               "seconds": time.perf_counter() - start, "device": str(x.device), "processes": world.size,
               "likelihood": run.model.likelihood.name, **est.summary(), **run.model.metrics(x, labels)}
    run.model.add_units(summary, x)
    return summary, est


def evaluate_ais(run: Run, x: torch.Tensor, steps: int, *, chains: int = 16, leapfrog: int = 10,
                 start: str = "guide", seed: int = 0, index: torch.Tensor | None = None, batch_size: int = 100,
                 max_rows: int = 2_000, progress: Callable[[int], None] | None = None
                 ) -> tuple[dict[str, Any], AISEstimates]:
    """AIS estimates of log p(x) with ``steps`` distributions for every row of ``x``
    (``ais.ais``, keyed by ``index`` as the IWAE numbers are): the summary that goes under
    "ais" in the evaluation's JSON, and the per-image estimates."""
    begin = time.perf_counter()
    est = ais(run.model.model, run.model.guide, x, steps, chains=chains, leapfrog=leapfrog, start=start, seed=seed,
              index=index, batch_size=batch_size, max_rows=max_rows, progress=progress)
    return {**est.summary(), "seconds": time.perf_counter() - begin}, est


def evaluate_bdmc(run: Run, like: torch.Tensor, num: int, steps: int, *, chains: int = 16, leapfrog: int = 10,
                  start: str = "guide", seed: int = 0, batch_size: int = 100, max_rows: int = 2_000,
                  progress: Callable[[int], None] | None = None) -> tuple[dict[str, Any], BDMCEstimates]:
    """BDMC on ``num`` images simulated from the run's model (``ais.bdmc``; ``like`` is any
    of its images): the summary that goes under "bdmc" in the JSON, and the per-image bounds."""
    begin = time.perf_counter()
    est = bdmc(run.model.model, run.model.guide, like, num, steps, chains=chains, leapfrog=leapfrog, start=start,
               seed=seed, batch_size=batch_size, max_rows=max_rows, progress=progress)
    return {**est.summary(), "seconds": time.perf_counter() - begin}, est


def ais_arrays(est: AISEstimates | None = None, bdmc_est: BDMCEstimates | None = None) -> dict[str, Any]:
    """The per-image AIS and BDMC numbers for the evaluation's .npz (``write_evaluation``)."""
    out: dict[str, Any] = {}
    if est is not None:
        out.update(ais_log_px=est.log_px.numpy(), ais_log_px_se=est.log_px_se.numpy(),
                   ais_log_w_sd=est.log_w_sd.numpy(), ais_acceptance=est.acceptance.numpy())
    if bdmc_est is not None:
        out.update(bdmc_lower=bdmc_est.lower.numpy(), bdmc_upper=bdmc_est.upper.numpy())
    return out


def evaluation_path(run: Run, split: str, num_particles: int, limit: int | None = None,
                    checkpoint: str = "last", ais: int | None = None, bdmc: int | None = None,
                    sigma: float | None = None) -> Path:
    """Where ``pyro-vae evaluate`` writes its summary by default:
    RUN/eval-SPLIT-iwK[-nN][-aisT][-bdmcN][-sigmaS][-best].json (the best checkpoint's
    results, those with AIS or BDMC and those under another observation sigma have their
    own names, so that none overwrites another)."""
    name = (f"eval-{split}-iw{num_particles}" + (f"-n{limit}" if limit else "")
            + (f"-ais{ais}" if ais else "") + (f"-bdmc{bdmc}" if bdmc else "")
            + (f"-sigma{sigma:g}" if sigma else "")
            + ("-best" if checkpoint == "best" else ""))
    return run.dir.path / f"{name}.json"


def write_evaluation(summary: dict[str, Any], est: BoundEstimates, out: Path, checkpoint: str, split: str,
                     index: torch.Tensor, arrays: dict[str, Any] | None = None) -> list[Path]:
    """Write the results of ``evaluate_run``: the summary (with the checkpoint and split it
    scored) as JSON at ``out``, the per-image estimates beside it as .npz (with ``arrays``,
    e.g. ``ais_arrays``, among them) and, for a classifier, its reliability diagram as PNG,
    each atomically. Returns the files written."""
    summary.update(checkpoint=checkpoint, split=split)
    out.parent.mkdir(parents=True, exist_ok=True)
    written = []
    if "calibration" in summary:
        written.append(plots.reliability_diagram(
            summary["calibration"], out.with_name(out.stem + "-reliability.png"),
            title=f"{split}: accuracy {summary['accuracy']:.4f}, ECE {summary['ece']:.4f}"))
    write_json(out, summary)
    # per image; the Monte Carlo errors are NaN where they cannot be trusted (k_hat > 0.7)
    trusted = lambda se: torch.where(est.unreliable, torch.nan, se).numpy()  # noqa: E731
    write_npz(out.with_suffix(".npz"), index=index.numpy(), elbo=est.elbo.numpy(),
              log_px=est.log_px.numpy(), log_px_se=trusted(est.log_px_se),
              log_px_se_delta=est.log_px_se_delta.numpy(), k_hat=est.k_hat.numpy(),
              jackknife=est.jackknife.numpy(), jackknife_se=trusted(est.jackknife_se),
              reconstruction=est.log_lik.numpy(), **(arrays or {}))
    return [out, out.with_suffix(".npz"), *written]


def format_summary(s: dict[str, Any]) -> str:
    """The evaluation summary as a readable table (nats per image, higher is better): each
    row says whether it is a bound on log p(x) or an estimate of it, and images whose
    Pareto k-hat exceeds 0.7 are flagged, their Monte Carlo error withheld."""
    def fmt(v: float | None, width: int = 10, digits: int = 3) -> str:
        return f"{'-':>{width}}" if v is None else f"{v:>{width}.{digits}f}"

    K = s["num_particles"]
    lines = [f"{s['run']} ({s['model']}, {s['checkpoint']} checkpoint): {s['split']} split, "
             f"{s['num_images']} images, K={K}, {s['seconds']:.1f} s",
             f"{'nats per image':<22}{'mean':>10}{'MC s.e.':>10}{'data s.e.':>10}  what"]
    rows = [("ELBO", s["elbo"], "bound (in expectation)"), ("  reconstruction", s["reconstruction"], ""),
            ("  KL", s["kl"], "")]
    rows += [(f"IWAE-{k}", v, "bound (in expectation)") for k, v in s["iwae"].items()]
    rows += [(f"log p(x), IWAE-{K}", s["log_px"], "bound (in expectation)")]
    if "jackknife" in s:
        rows += [("log p(x), jackknife", s["jackknife"], "estimate, bias-corrected; not a bound")]
    withheld = False
    for label, st, what in rows:
        mark = ""
        if st.get("mc_se_withheld"):
            mark, withheld = " *", True
        lines.append(f"{label:<22}{fmt(st['mean'], digits=2)}{fmt(st['mc_se'])}{fmt(st['data_se'])}"
                     f"  {what}{mark}")
    lines.append(f"{'NLL (= -IWAE-' + str(K) + ')':<22}{fmt(-s['log_px']['mean'], digits=2)}"
                 + (f"  nats per image, {s['log_px']['bits_per_dim']:.4f} bits/dim"
                    if "bits_per_dim" in s["log_px"] else ""))
    pk = s.get("pareto_k")
    if pk and pk.get("median") is not None:
        lines.append(f"Pareto k-hat of the weights: median {pk['median']:.2f}, max {pk['max']:.2f}; "
                     f"{100 * pk['share_above_0.5']:.0f}% of images above 0.5 (infinite variance), "
                     f"{100 * pk['share_above_0.7']:.0f}% above 0.7")
        if pk["images_above_0.7"]:
            worst = ", ".join(f"{i} ({k:.2f})" for i, k in pk["worst"] if k is not None and k > 0.7)
            lines.append(f"FLAGGED: {pk['images_above_0.7']} images with k-hat > 0.7, whose estimates are not "
                         f"to be trusted at K={K}; worst (position in the .npz, k-hat): {worst}")
    if withheld:
        lo = s["log_px"]
        alt = "" if lo.get("mc_se_trusted_images") is None else \
            f"; over the other images it is {lo['mc_se_trusted_images']:.3f}"
        lines.append(f"* MC s.e. withheld: {lo['mc_se_withheld']} images have no trustworthy error{alt}; "
                     f"the delta method would say {fmt(lo.get('mc_se_delta'), 0)}, too small under heavy "
                     f"tails. Repeat with other --seed values, or a larger K, for an honest spread.")
    for key in ("accuracy", "error", "ece"):
        if key in s:
            lines.append(f"{'classifier ' + key:<22}{fmt(s[key], digits=4)}")
    for key, what in (("perplexity", ""), ("perplexity_words", ""),
                      ("active_units", "  latent dimensions with Cov_x E_q[z] > 0.01"),
                      ("mutual_information", "  nats, I(x; z) under q (Hoffman & Johnson 2016)")):
        if key in s:
            value = s[key]["log_px"] if isinstance(s[key], dict) else s[key]
            lines.append(f"{key.replace('_', ' '):<22}{fmt(value, digits=2)}{what}")
    if "perplexity" in s:
        lines.append(f"  perplexity = exp(-log p(x) summed / tokens): {s['tokens']} predicted tokens with <eos>; "
                     f"perplexity words: {s['words']} words without <eos>; both from the IWAE-{K} bound")
    if "ais" in s:
        a = s["ais"]
        lines.append(f"{'log p(x), AIS-' + str(a['steps']):<22}{fmt(a['log_px']['mean'], digits=2)}"
                     f"{fmt(a['log_px']['mc_se'])}{fmt(a['log_px']['data_se'])}  bound (stochastic lower), "
                     f"{a['chains']} chains from the {a['start']}")
        lines.append(f"  AIS: {a['leapfrog']} leapfrog steps, acceptance {a['acceptance']:.2f}, spread of the chains' "
                     f"log weights {a['log_w_sd']:.3f}, {a['gradient_evaluations_per_image']} gradient evaluations "
                     f"per image, {a['seconds']:.1f} s")
    if "bdmc" in s:
        b = s["bdmc"]
        lines.append(f"BDMC on {b['images']} images simulated from the model, T={b['steps']}: lower "
                     f"{b['lower']['mean']:.2f}, upper {b['upper']['mean']:.2f}, gap {b['gap']['mean']:.3f} "
                     f"(max {b['gap']['max']:.3f}) nats per image: AIS at this T is about that far from log p(x) "
                     f"on data like the model's samples")
    return "\n".join(lines)
