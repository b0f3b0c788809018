"""Matplotlib figures: bound curves, image grids, reconstructions, the 2-D latent manifold.

Figures are drawn on ``matplotlib.figure.Figure`` objects (no pyplot, no global backend),
so plotting works headless and inside other programs' sessions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from .data import as_chw
from .runs import atomic_write


def _save(fig: Figure, path: Path) -> Path:
    """Save atomically (``atomic_write``); the format comes from ``path``'s suffix, given
    explicitly since the temporary's name ends in another."""
    fmt = Path(path).suffix.lstrip(".").lower() or "png"
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, dpi=100, bbox_inches="tight"))


def mosaic(images: torch.Tensor | np.ndarray, image_shape: Sequence[int], ncol: int) -> np.ndarray:
    """Tile flat images (n, C*H*W), channel-first, into one array with 1-pixel light grey gaps:
    (rows, cols) for grey images (C = 1), (rows, cols, 3) RGB for colour ones (C = 3).
    ``image_shape`` is (C, H, W), or (H, W) for grey images."""
    c, h, w = as_chw(image_shape)
    if c not in (1, 3):
        raise ValueError(f"cannot draw images with {c} channels; expected 1 (grey) or 3 (RGB)")
    imgs = np.asarray(images.detach().cpu() if torch.is_tensor(images) else images, dtype=np.float32)
    imgs = imgs.reshape(-1, c, h, w).transpose(0, 2, 3, 1)  # (n, H, W, C)
    if c == 1:
        imgs, gap = imgs[..., 0], 0.25  # drawn with gray_r: 0.25 is light grey
    else:
        gap = 0.75  # drawn as RGB: 0.75 is light grey
    nrow = math.ceil(len(imgs) / ncol)
    out = np.full((nrow * (h + 1) - 1, ncol * (w + 1) - 1, *imgs.shape[3:]), gap, dtype=np.float32)
    for i, img in enumerate(imgs):
        r, col = divmod(i, ncol)
        out[r * (h + 1) : r * (h + 1) + h, col * (w + 1) : col * (w + 1) + w] = img
    return out


def _show(ax: Any, grid: np.ndarray) -> None:
    """Draw a mosaic: grey images dark on light, colour images in their own colours."""
    if grid.ndim == 3:
        ax.imshow(np.clip(grid, 0, 1), interpolation="nearest")
    else:
        ax.imshow(grid, cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")


def image_grid(images: torch.Tensor, image_shape: Sequence[int], path: Path,
               title: str = "", ncol: int | None = None) -> Path:
    """Save images (n, C*H*W) with values in [0, 1] as one grid: grey images dark on light
    (as today's figures), colour images in their own colours."""
    ncol = ncol or math.ceil(math.sqrt(len(images)))
    grid = mosaic(images, image_shape, ncol)
    fig = Figure(figsize=(grid.shape[1] / 40 + 0.5, grid.shape[0] / 40 + 0.7))
    ax = fig.add_subplot()
    _show(ax, grid)
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)
    return _save(fig, path)


def bound_curves(history: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Train and validation bound per scored epoch, in nats per image, and the training
    objective per epoch; beside them, where the history has them, the validation ELBO's
    two terms: KL and reconstruction."""
    scored = [row for row in history if "valid_bound" in row]
    terms = all("valid_kl" in row for row in scored)
    fig = Figure(figsize=(11 if terms else 6, 4))
    if terms:
        right = fig.add_subplot(1, 2, 2)
        epochs = [row["epoch"] for row in scored]
        right.plot(epochs, [row["valid_kl"] for row in scored], color="tab:red", label="KL(q(z|x) || p(z))")
        right.set_ylabel("KL (nats per image)", color="tab:red")
        other = right.twinx()
        other.plot(epochs, [row["valid_reconstruction"] for row in scored], color="tab:blue",
                   label="E_q log p(x|z)")
        other.set_ylabel("reconstruction (nats per image)", color="tab:blue")
        right.set_xlabel("epoch")
        right.set_title("validation ELBO = reconstruction - KL", fontsize=9)
        right.grid(alpha=0.3)
    ax = fig.add_subplot(1, 2, 1) if terms else fig.add_subplot()
    epochs = [row["epoch"] for row in scored]
    ax.plot(epochs, [row["train_bound"] for row in scored], label="train (fixed subset)")
    ax.plot(epochs, [row["valid_bound"] for row in scored], label="validation")
    ax.plot([row["epoch"] for row in history], [-row["train_loss"] for row in history], ":",
            label="training objective")
    ax.set_xlabel("epoch")
    ax.set_ylabel("bound on log p(x) (nats per image)")
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    return _save(fig, path)


def gan_curves(history: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    """A GAN's training per epoch: both players' losses and the game's value on the fixed
    validation images (on the scored epochs), the training step's loss (every epoch), and
    the mean of D on real images and on G's (per image)."""
    fig = Figure(figsize=(11, 4))
    scored = [row for row in history if "valid_d_loss" in row]
    epochs = [row["epoch"] for row in scored]
    ax = fig.add_subplot(1, 2, 1)
    ax.plot(epochs, [row["valid_d_loss"] for row in scored], label="discriminator loss")
    ax.plot(epochs, [row["valid_g_loss"] for row in scored], label="generator loss")
    ax.plot([row["epoch"] for row in history], [row["train_loss"] for row in history], ":",
            label="training step (D + G)")
    ax.axhline(2 * math.log(2), color="grey", lw=0.8, ls="--", label="D loss at equilibrium (2 log 2)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss (nats per image)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    right = fig.add_subplot(1, 2, 2)
    right.plot(epochs, [row["valid_d_real"] for row in scored], label="mean D(x), validation images")
    right.plot(epochs, [row["valid_d_fake"] for row in scored], label="mean D(G(z))")
    right.set_ylim(0, 1)
    right.set_xlabel("epoch")
    right.grid(alpha=0.3)
    right.legend(fontsize=8)
    return _save(fig, path)


def reconstructions(x: torch.Tensor, recon: torch.Tensor, image_shape: Sequence[int],
                    path: Path, ncol: int = 10) -> Path:
    """Originals and their reconstructions in alternating rows (image_shape as in ``mosaic``)."""
    rows = []
    for i in range(0, len(x), ncol):
        rows += [x[i : i + ncol], recon[i : i + ncol]]
    return image_grid(torch.cat(rows), image_shape, path,
                      title="data (odd rows) and reconstructions (even rows)", ncol=ncol)


@torch.no_grad()
def latent_manifold(model: Any, image_shape: Sequence[int], path: Path, n: int = 20) -> Path:
    """Decode a 2-D latent grid placed at Gaussian quantiles (inverse CDF of evenly spaced
    probabilities), so that each cell covers equal prior mass. ``model.decode_mean`` gives flat
    images in [0, 1]; image_shape as in ``mosaic``."""
    p = torch.linspace(0.5 / n, 1 - 0.5 / n, n)
    q = torch.distributions.Normal(0.0, 1.0).icdf(p)
    zy, zx = torch.meshgrid(q.flip(0), q, indexing="ij")
    z = torch.stack([zx.reshape(-1), zy.reshape(-1)], dim=1)
    images = model.decode_mean(z.to(model.device))
    grid = mosaic(images, image_shape, n)
    fig = Figure(figsize=(grid.shape[1] / 40 + 1.2, grid.shape[0] / 40 + 1.2))
    ax = fig.add_subplot()
    _show(ax, grid)
    _, h, w = as_chw(image_shape)
    every = max(1, n // 5)
    cells = list(range(0, n, every))
    ax.set_xticks([c * (w + 1) + w / 2 for c in cells], [f"{q[c]:.2f}" for c in cells], fontsize=7)
    ax.set_yticks([r * (h + 1) + h / 2 for r in cells], [f"{q.flip(0)[r]:.2f}" for r in cells], fontsize=7)
    ax.set_xlabel("z1")
    ax.set_ylabel("z2")
    ax.set_title("latent manifold (Gaussian quantile grid)", fontsize=9)
    return _save(fig, path)


@torch.no_grad()
def latent_interpolation(model: Any, x: torch.Tensor, image_shape: Sequence[int], path: Path,
                         pairs: int = 8, steps: int = 10) -> Path:
    """Rows that walk in a straight line from the posterior mean of one image to that of
    another (``model.encode``), decoded at each step (``model.decode_mean``); the first
    ``2 pairs`` rows of ``x`` give the pairs."""
    pairs = min(pairs, len(x) // 2)
    loc = model.encode(x[: 2 * pairs])[0]
    t = torch.linspace(0, 1, steps, device=loc.device).view(1, steps, 1)
    z = loc[0::2].unsqueeze(1) * (1 - t) + loc[1::2].unsqueeze(1) * t  # (pairs, steps, z_dim)
    images = model.decode_mean(z.reshape(pairs * steps, -1))
    return image_grid(images, image_shape, path, title="latent interpolation between posterior means (rows)",
                      ncol=steps)


@torch.no_grad()
def latent_scatter(points: torch.Tensor, panels: Sequence[tuple[str, torch.Tensor]], path: Path,
                   centres: torch.Tensor | None = None) -> Path:
    """Latent codes (n, d) in two dimensions, one panel per colouring (title, integer
    classes). Codes of more than two dimensions are drawn on their first two principal
    axes; ``centres`` (e.g. mixture means) are projected onto the same axes."""
    points = points.detach().float().cpu()
    if points.shape[1] == 1:
        points = torch.cat([points, torch.zeros_like(points)], 1)
        centres = None if centres is None else torch.cat([centres, torch.zeros_like(centres)], 1)
    mean = points.mean(0)
    if points.shape[1] > 2:
        axes = torch.linalg.svd(points - mean, full_matrices=False).Vh[:2].T
        label = "principal axis"
    else:
        axes = torch.eye(points.shape[1])
        label = "z"
    xy = ((points - mean) @ axes).numpy()
    fig = Figure(figsize=(4.5 * len(panels), 4.2))
    for i, (title, classes) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        c = np.asarray(classes.cpu()) % 20  # tab20 repeats its colours after 20 classes
        dots = ax.scatter(xy[:, 0], xy[:, 1], c=c, cmap="tab20", vmin=0, vmax=19, s=3, alpha=0.7)
        # which colour is which class (tab20 has 20 colours: beyond them classes share one)
        handles, _ = dots.legend_elements(num=None)
        shown = np.unique(np.asarray(classes.cpu()))[:20]
        key = ax.legend(handles[: len(shown)], [str(v) for v in shown], title=title.split(" ")[-1], loc="lower left",
                        fontsize=6, title_fontsize=6, ncol=2 if len(shown) > 10 else 1, markerscale=0.8)
        ax.add_artist(key)
        if centres is not None:
            cxy = ((centres.detach().float().cpu() - mean) @ axes).numpy()
            ax.scatter(cxy[:, 0], cxy[:, 1], marker="x", c="black", s=20, linewidths=1, label="component means")
            ax.legend(loc="upper right", fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(f"{label} 1")
        ax.set_ylabel(f"{label} 2")
    return _save(fig, path)


def reliability_diagram(bins: dict[str, list[float]], path: Path, title: str = "") -> Path:
    """Accuracy against confidence per confidence bin (equal widths on [0, 1]); a
    calibrated classifier lies on the diagonal. Empty bins are left out."""
    n = len(bins["count"])
    edges = np.linspace(0, 1, n + 1)
    used = np.asarray(bins["count"]) > 0
    fig = Figure(figsize=(4.5, 4.5))
    ax = fig.add_subplot()
    ax.bar(edges[:-1][used], np.asarray(bins["accuracy"])[used], width=1 / n, align="edge",
           edgecolor="black", alpha=0.7, label="accuracy")
    ax.plot(np.asarray(bins["confidence"])[used], np.asarray(bins["accuracy"])[used], "o", ms=3,
            color="black", label="mean confidence")
    ax.plot([0, 1], [0, 1], "--", color="grey", label="calibrated")
    ax.set_xlabel("confidence (max class probability)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left", fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    return _save(fig, path)


@torch.no_grad()
def posterior_grid(model: Any, x: torch.Tensor, grid: int = 120, samples: int = 100_000
                   ) -> list[dict[str, np.ndarray]]:
    """For each row of ``x`` and a 2-D z: the true posterior p(z | x) and the guide's
    q(z | x) as probabilities of the cells of one square grid.

    p(z | x) is proportional to p(z) p(x | z), evaluated at the cell centres and normalised
    over the grid (exact up to the grid's resolution and extent). q(z | x) is the share of
    ``samples`` draws that land in each cell: a flow's density can only be scored at its
    own draws, so it is shown through them. The grid spans the middle 99.8% of the draws
    of q, widened by half, so that a posterior q misses shows up beside it."""
    out = []
    for row in x:
        q = model.posterior(row.unsqueeze(0))
        z = q.sample((samples,)).reshape(samples, 2)
        lo, hi = torch.quantile(z, 0.001, 0), torch.quantile(z, 0.999, 0)
        centre, half = (lo + hi) / 2, (hi - lo).max() * 0.75 + 1e-3
        edges = [torch.linspace(float(c - half), float(c + half), grid + 1) for c in centre]
        mids = [(e[1:] + e[:-1]) / 2 for e in edges]
        zy, zx = torch.meshgrid(mids[1], mids[0], indexing="ij")
        cells = torch.stack([zx.reshape(-1), zy.reshape(-1)], 1).to(row.device)
        log_joint = model.prior(len(cells)).log_prob(cells) + model.decode(cells).log_prob(row)
        true = torch.softmax(log_joint, 0).reshape(grid, grid).cpu().numpy()
        counts, _, _ = np.histogram2d(z[:, 1].cpu().numpy(), z[:, 0].cpu().numpy(),
                                      bins=[edges[1].numpy(), edges[0].numpy()])
        out.append({"true": true, "guide": counts / samples,
                    "extent": np.array([edges[0][0], edges[0][-1], edges[1][0], edges[1][-1]])})
    return out


def posterior_pictures(model: Any, x: torch.Tensor, image_shape: Sequence[int], path: Path,
                       title: str = "") -> Path:
    """The picture of the flows literature, for a 2-D z: per image (rows), the image, the
    true posterior p(z | x) and the guide's q(z | x) on the same grid (``posterior_grid``)."""
    panels = posterior_grid(model, x)
    fig = Figure(figsize=(7.5, 2.5 * len(panels)), layout="constrained")
    for i, (row, panel) in enumerate(zip(x, panels)):
        ax = fig.add_subplot(len(panels), 3, 3 * i + 1)
        ax.imshow(mosaic(row.unsqueeze(0), image_shape, 1), cmap="gray_r", vmin=0, vmax=1)
        ax.set_axis_off()
        for j, (key, name) in enumerate((("true", "p(z | x)"), ("guide", "q(z | x)"))):
            ax = fig.add_subplot(len(panels), 3, 3 * i + 2 + j)
            ax.imshow(panel[key], origin="lower", extent=tuple(panel["extent"]), cmap="viridis", aspect="auto")
            ax.set_title(name, fontsize=9)
            ax.tick_params(labelsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


#: the most canvas steps a row of ``canvas_sequence`` shows (evenly spaced, the last included)
CANVAS_COLUMNS = 16
BOX_COLOURS = {"write": "tab:red", "read": "tab:green"}


def canvas_steps(steps: int, columns: int = CANVAS_COLUMNS) -> list[int]:
    """Which of the steps 0..steps-1 a row shows: all of them, or ``columns`` evenly
    spaced ones ending with the last."""
    if steps <= columns:
        return list(range(steps))
    return sorted({round(i * (steps - 1) / (columns - 1)) for i in range(columns)})


def canvas_sequence(images: torch.Tensor, image_shape: Sequence[int], boxes: dict[str, list[torch.Tensor]] | None,
                    path: Path, title: str = "") -> Path:
    """One row per image, one column per drawing step: ``images`` is (n, T, C*H*W) with
    values in [0, 1] (the canvas after each step). ``boxes`` maps a name (write, read) to
    T tensors (n, 4) of rectangles x0, y0, x1, y1 in pixel coordinates of one image,
    drawn on each step's picture."""
    n, steps = images.shape[:2]
    shown = canvas_steps(steps)
    grid = mosaic(images[:, shown].reshape(n * len(shown), -1), image_shape, len(shown))
    _, h, w = as_chw(image_shape)
    fig = Figure(figsize=(grid.shape[1] / 25 + 0.5, grid.shape[0] / 25 + 0.9))
    ax = fig.add_subplot()
    _show(ax, grid)
    from matplotlib.patches import Rectangle

    for name, per_step in (boxes or {}).items():
        for col, t in enumerate(shown):
            # a window reaching past its image is drawn up to the image's edge
            edges = per_step[t].detach().cpu().clamp(min=-0.5)
            edges = torch.minimum(edges, torch.tensor([w, h, w, h]) - 0.5)
            for row, (x0, y0, x1, y1) in enumerate(edges.tolist()):
                ox, oy = col * (w + 1), row * (h + 1)
                ax.add_patch(Rectangle((ox + x0, oy + y0), x1 - x0, y1 - y0, fill=False, lw=0.8,
                                       edgecolor=BOX_COLOURS.get(name, "tab:blue"), clip_on=True))
    ax.set_xlim(-0.5, grid.shape[1] - 0.5)
    ax.set_ylim(grid.shape[0] - 0.5, -0.5)
    ax.set_xticks([c * (w + 1) + w / 2 for c in range(len(shown))], [str(t + 1) for t in shown], fontsize=6)
    ax.set_yticks([])
    ax.set_xlabel("step t", fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    return _save(fig, path)
