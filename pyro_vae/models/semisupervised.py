"""What the semi-supervised families (SSVAE, ADGM, M1+M2) share: a class label y that is
observed for a labelled subset of the training split and summed out for the rest.

For a labelled image, y is passed in and observed in the model (the guide does not sample
it). For an unlabelled one, the guide marks y for parallel enumeration, so
``TraceEnum_ELBO`` gives sum_y q(y|x) [ELBO(x, y)] + H(q(y|x)) exactly, with one draw of z
per label. The classifier also gets the auxiliary loss aux_weight * -log q(y | x) on
labelled images (Kingma et al.'s alpha term; without it q(y | x) learns little).

A training step pairs a batch of unlabelled images with a batch of the labelled ones,
which cycle in a fresh order each epoch (under a fresh binarization at each visit when
the data are binarized dynamically). The step estimates M2's objective over the training
set, the sum of labelled ELBOs plus the sum of unlabelled bounds, so the labelled batch's
ELBO is scaled by its share: (labelled images / unlabelled images) x (unlabelled batch /
labelled batch). Without that scale a few labelled images, seen at every step, would
weigh as much in the ELBO as all the unlabelled ones.

The pair takes the whole step: ``model(x, labelled_x=..., labelled_y=..., share=...)``
holds the unlabelled images in the plate "data" and the labelled batch in the plate
"labelled" (its sites named "labelled/z", ...), with the auxiliary term as a factor, so
one ELBO over the pair is the step's loss and Pyro's ``SVI`` trains it as the library's
loop does (``pair_arguments`` turns a batch into those arguments).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.contrib.autoname import scope
from torch.nn import functional as F

from .. import plots
from ..config import option
from ..data import Dataset, balanced_subset, read_rows
from ..errors import ConfigError, DataError, Flag
from ..metrics import calibration
from ..nets import ACTIVATIONS, cat_last
from .base import Family


@dataclass
class SemiSupervisedConfig:
    """M2's latent, networks and label: the sizes of z and of the fully connected layers,
    the number of classes, which training images are labelled, and the weight of the
    classifier's loss on them."""

    z_dim: int = option(64, "latent dimensions", at_least=1)
    hidden: tuple[int, ...] = option((300, 300), "hidden layer sizes of q(z|x,y) and p(x|y,z), comma separated")
    classifier_hidden: tuple[int, ...] = option((300, 300), "hidden layer sizes of the classifier q(y|x), "
                                                "comma separated")
    activation: str = option("elu", "activation function", ACTIVATIONS)
    classes: int = option(10, "number of classes of the label y", at_least=2)
    labels: int = option(100, "labelled training images, the same number per class, drawn by --seed (or the "
                         "number of --labelled-rows); the rest unlabelled")
    aux_weight: float = option(100.0, "weight of the classification loss -log q(y|x) on labelled images",
                               at_least=0)
    labelled_rows: str | None = option(None, "file of the training-split rows to label (integers, or .npy), "
                                       "instead of a class-balanced draw by --seed; --labels must be their number")




class SemiSupervised(Family):
    """What the semi-supervised families share: a class label y, known for a labelled
    subset of the training split (drawn class-balanced by the seed, or listed in a file)
    and enumerated for the rest; the batches that pair unlabelled with labelled images;
    the loss with the classifier's auxiliary term; the classifier's scores and figures.
    A subclass supplies the networks, the Pyro pair, ``class_logits(x)`` (q(y | x) before
    the softmax); the read-outs default to M2's over the image: ``decode``, ``decode_mean``
    and ``sample`` from p(x | y, z) with z ~ N(0, I), ``posterior``, ``encode`` and
    ``reconstruct`` from ``encoder`` and ``flow``, q(z | x, y) (M1+M2 has its own)."""

    default_objective = "enum"
    objectives = ("enum",)
    has_classes = True
    enumerates_in_guide = True

    @classmethod
    def check_config(cls, config: SemiSupervisedConfig) -> None:
        """The fields' own ranges, then at least one labelled image per class."""
        super().check_config(config)
        if config.labels < config.classes:
            raise ConfigError(f"{{labels}} must be at least {{classes}} ({config.classes}), got {config.labels}",
                              labels=Flag("labels"), classes=Flag("classes"))

    def _sample_z_and_y(self, batch: int, y: torch.Tensor | None,
                        kl_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's z ~ N(0, I) (scaled by ``kl_weight``) and y ~ uniform (observed where
        given), inside the caller's data plate."""
        zeros = torch.zeros(batch, self.config.z_dim, device=self.device)
        with poutine.scale(scale=kl_weight):
            z = pyro.sample("z", dist.Normal(zeros, 1.0).to_event(1))
        return z, pyro.sample("y", dist.Categorical(logits=zeros.new_zeros(batch, self.config.classes)), obs=y)

    def _register_labelled(self) -> None:
        # which training images are labelled: chosen by init_from_data, saved with the weights
        self.register_buffer("labelled", torch.zeros(self.config.labels, dtype=torch.long))

    def _onehot(self, y: torch.Tensor) -> torch.Tensor:
        return F.one_hot(y, self.config.classes).float()

    def class_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The logits of q(y | x), (batch, classes)."""
        raise NotImplementedError

    # --- training: labelled and unlabelled batches side by side --------------------------

    def check_data(self, data: Dataset, seed: int) -> None:
        """The data must suit the networks and the likelihood (``Family.check_data``); labels
        must exist, fit in ``classes``, and allow a balanced labelled subset."""
        super().check_data(data, seed)
        if "train" not in data.labels:
            raise DataError(f"{data.name} has no class labels; the SSVAE needs them (use mnist, or an "
                            ".npz with train_labels)")
        if int(data.labels["train"].max()) >= self.config.classes:
            raise ConfigError(f"the labels go up to {int(data.labels['train'].max())} but {{classes}} is "
                              f"{self.config.classes}", classes=Flag("classes"))
        n = len(data.split("train"))
        if self.config.labels >= n:
            raise ConfigError(f"{{labels}} would label all {n} training images of {data.name}; "
                              "the SSVAE also learns from unlabelled ones: label fewer",
                              labels=Flag("labels", self.config.labels))
        self._labelled_subset(data, seed)

    def _labelled_subset(self, data: Dataset, seed: int) -> torch.Tensor:
        """The rows of the training split that keep their labels (sorted): those listed in
        ``labelled_rows`` (to train on a published split), else a class-balanced draw."""
        if self.config.labelled_rows is None:
            return balanced_subset(data.labels["train"], self.config.labels, self.config.classes, seed)
        rows = read_rows(self.config.labelled_rows)
        what = Flag("labelled_rows", self.config.labelled_rows)
        if len(rows.unique()) < len(rows):
            raise DataError("{what} lists some rows more than once; each labelled image counts once", what=what)
        if len(rows) and (rows.min() < 0 or rows.max() >= len(data.split("train"))):
            raise DataError(f"{{what}} has rows outside 0..{len(data.split('train')) - 1}, the training split of "
                            f"{data.name}", what=what)
        if len(rows) != self.config.labels:
            raise ConfigError(f"{{what}} lists {len(rows)} rows; pass {{labels}}", what=what,
                              labels=Flag("labels", len(rows)))
        return rows.sort().values

    def init_from_data(self, data: Dataset, seed: int) -> None:
        """Output bias, and the labelled subset of the training split."""
        super().init_from_data(data, seed)
        self.labelled.copy_(self._labelled_subset(data, seed))

    def _unlabelled_rows(self, data: Dataset) -> torch.Tensor:
        keep = torch.ones(data.split("train").shape[0], dtype=torch.bool)
        keep[self.labelled.cpu()] = False
        return keep.nonzero().flatten()

    def steps_per_epoch(self, data: Dataset, batch_size: int) -> int:
        return data.num_batches(batch_size, rows=self._unlabelled_rows(data))

    def training_batches(self, data: Dataset, batch_size: int, epoch: int, seed: int,
                         device: torch.device, start: int = 0) -> Iterator[tuple[torch.Tensor, ...]]:
        """(unlabelled x, labelled x, their labels, the labelled ELBO's scale) per step."""
        labelled = self.labelled.cpu()
        unlabelled_count = len(self._unlabelled_rows(data))
        steps = self.steps_per_epoch(data, batch_size)
        size = min(batch_size, len(labelled))
        stream = seed * 1_000_003 + epoch * 100_003 + 777_767  # streams of their own
        gen = torch.Generator().manual_seed(stream)
        x_l = data.split("train")[labelled]
        y_l = data.labels["train"][labelled].to(device)
        passes = -(-steps * size // len(labelled))
        order = torch.cat([torch.randperm(len(labelled), generator=gen) for _ in range(passes)])
        unlabelled = data.train_batches(batch_size, epoch, seed, device, start, rows=self._unlabelled_rows(data))
        for step, x_u in enumerate(unlabelled, start):
            rows = order[step * size : (step + 1) * size]
            # a fresh binarization at every visit, as an unlabelled image gets once an epoch
            x = data.binarized(x_l[rows], torch.Generator().manual_seed(stream + 1 + step)).to(device)
            yield x_u, x, y_l[rows.to(device)], len(labelled) * len(x_u) / (unlabelled_count * len(rows))

    def pair_arguments(self, batch: tuple[Any, ...]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """A step's batch ``(unlabelled x, labelled x, their labels, their share)`` as the
        pair takes it: ``model(x, labelled_x=..., labelled_y=..., share=...)``."""
        x_u, x_l, y_l, share = batch
        return (x_u,), {"labelled_x": x_l, "labelled_y": y_l, "share": share}

    # --- the Pyro pair: one step's objective --------------------------------------------

    def model(self, x: torch.Tensor, y: torch.Tensor | None = None, labelled_x: torch.Tensor | None = None,
              labelled_y: torch.Tensor | None = None, share: float = 1.0, kl_weight: float = 1.0) -> None:
        """The generative story of ``x`` (``y`` its labels, None where unknown) and, when
        given, of a labelled batch ``labelled_x`` with labels ``labelled_y``, its ELBO
        weighted by ``share``, beside the classifier's term ``aux_weight * log q(y | x)``
        on it: the whole of M2's objective for one step, so that Pyro's ``SVI`` trains it
        as the library's loop does."""
        with pyro.plate("data", x.shape[0]):
            self.model_sites(x, y, kl_weight)
        if labelled_x is not None:
            with scope(prefix="labelled"), pyro.plate("labelled", labelled_x.shape[0]):
                with poutine.scale(scale=share):
                    self.model_sites(labelled_x, labelled_y, kl_weight)
                log_q = -F.cross_entropy(self.class_logits(labelled_x), labelled_y, reduction="none")
                pyro.factor("classification", self.config.aux_weight * log_q)

    def guide(self, x: torch.Tensor, y: torch.Tensor | None = None, labelled_x: torch.Tensor | None = None,
              labelled_y: torch.Tensor | None = None, share: float = 1.0, kl_weight: float = 1.0) -> None:
        """q(y | x) (enumerated where ``y`` is not given) and q(z | x, y) for ``x`` and, when
        given, for the labelled batch (its labels observed), as ``model`` takes them."""
        with pyro.plate("data", x.shape[0]):
            self.guide_sites(x, y, kl_weight)
        if labelled_x is not None:
            with scope(prefix="labelled"), pyro.plate("labelled", labelled_x.shape[0]), poutine.scale(scale=share):
                self.guide_sites(labelled_x, labelled_y, kl_weight)

    def model_sites(self, x: torch.Tensor, y: torch.Tensor | None, kl_weight: float) -> None:
        """The model's sites for the images ``x``, inside the caller's data plate."""
        raise NotImplementedError

    def guide_sites(self, x: torch.Tensor, y: torch.Tensor | None, kl_weight: float) -> None:
        """The guide's sites for the images ``x`` (y enumerated when None), inside the
        caller's data plate."""
        raise NotImplementedError

    # --- read-outs ------------------------------------------------------------------------

    def decode(self, z: torch.Tensor, y: torch.Tensor) -> dist.Distribution:
        """p(x | y, z): the decoder sees z beside the one-hot label (M1+M2 decodes through both of its stages)."""
        return self.likelihood.distribution(self.decoder(cat_last(z, self._onehot(y))))

    @torch.no_grad()
    def decode_mean(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The mean of p(x | y, z), for pictures."""
        return self.likelihood.mean(self.decoder(cat_last(z, self._onehot(y))))

    @torch.no_grad()
    def sample(self, n: int, draw: bool = False) -> torch.Tensor:
        """``n`` images from the model (uniform label): the likelihood's means, or draws."""
        y = torch.randint(self.config.classes, (n,), device=self.device)
        z = torch.randn(n, self.config.z_dim, device=self.device)
        return self.decode(z, y).sample() if draw else self.decode_mean(z, y)

    def _readout_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The logits of q(y | .) that ``posterior`` weighs its components with."""
        return self.class_logits(x)

    def _condition(self, x: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        """What q(z | x, .) is conditioned on beside the image in the read-outs: the one-hot
        label (the ADGM adds the mean of its auxiliary latent)."""
        return onehot

    def _posterior_components(self, x: torch.Tensor) -> dist.Distribution:
        """q(z | x, y) for every label y at once: batch shape (batch, classes)."""
        labels = torch.arange(self.config.classes, device=x.device).unsqueeze(-1)  # (classes, 1)
        cond = self._condition(x, self._onehot(labels))
        loc, scale, h = (t.transpose(0, 1) for t in self.encoder.with_features(x, cond))
        return self.flow.distribution(dist.Normal(loc, scale).to_event(1), h)  # (batch, classes)

    def posterior(self, x: torch.Tensor) -> dist.Distribution:
        """q(z | x) = sum_y q(y | x) q(z | x, y): the guide's marginal over z, a mixture
        (whose log-density needs the components' inverses: none for a planar, radial or
        Sylvester flow, so with those it can be sampled but not scored)."""
        return dist.MixtureSameFamily(dist.Categorical(logits=self._readout_logits(x)),
                                      self._posterior_components(x))

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Location and scale of q(z | x, y) at the classifier's label."""
        return self.encoder(x, self._condition(x, self._onehot(self.classify(x).argmax(-1))))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Decode the mean of q(z | x, y) at the classifier's label."""
        y = self.classify(x).argmax(-1)
        loc, _, h = self.encoder.with_features(x, self._condition(x, self._onehot(y)))
        return self.decode_mean(self.flow.push(loc, h), y)

    @torch.no_grad()
    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """q(y | x): class probabilities, shape (batch, classes)."""
        return torch.softmax(self.class_logits(x), -1)

    def metrics(self, x: torch.Tensor, labels: torch.Tensor | None) -> dict[str, Any]:
        """Accuracy, error and expected calibration error of q(y | x), with the reliability bins."""
        if labels is None:
            return {}
        probs = torch.cat([self.classify(x[i : i + 1000]) for i in range(0, len(x), 1000)])
        return calibration(probs, labels.to(probs.device))

    @torch.no_grad()
    def sample_by_class(self, n: int, draw: bool = False) -> torch.Tensor:
        """``n`` samples of each class, rows = classes, the same n draws of z in every row
        (so a column shows one style across the classes): shape (classes * n, D); the
        likelihood's means, or draws from it if ``draw``."""
        z = torch.randn(n, self.config.z_dim, device=self.device).repeat(self.config.classes, 1)
        y = torch.arange(self.config.classes, device=self.device).repeat_interleave(n)
        return self.decode(z, y).sample() if draw else self.decode_mean(z, y)

    @torch.no_grad()
    def style_transfer(self, x: torch.Tensor) -> torch.Tensor:
        """Each input beside its style decoded with every label: z is the mean of
        q(z | x, y) at the classifier's label. Shape (batch * (1 + classes), D)."""
        z = self.encode(x)[0]
        classes = torch.arange(self.config.classes, device=x.device)
        decoded = self.decode_mean(z.repeat_interleave(self.config.classes, 0), classes.repeat(len(x)))
        return torch.cat([x.unsqueeze(1), decoded.view(len(x), self.config.classes, -1)], 1).flatten(0, 1)

    def figures(self, x: torch.Tensor, labels: torch.Tensor | None, image_shape: Any,
                directory: Path) -> list[Path]:
        """Samples by class, style transfer and (with labels) the reliability diagram."""
        written = [
            plots.image_grid(self.sample_by_class(10), image_shape, directory / "samples-by-class.png",
                             title="samples by class (rows), one z per column", ncol=10),
            plots.image_grid(self.style_transfer(x[:10]), image_shape, directory / "style-transfer.png",
                             title="input, then its z decoded with each label", ncol=1 + self.config.classes),
        ]
        if labels is not None:
            scores = self.metrics(x, labels)
            written.append(plots.reliability_diagram(scores["calibration"], directory / "reliability.png",
                                                     title=f"validation: accuracy {scores['accuracy']:.4f}, "
                                                           f"ECE {scores['ece']:.4f}"))
        return written
