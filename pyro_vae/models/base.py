"""The contract of a model family: what every family offers the training loop, the
evaluator, the CLI and a user at a notebook.

A family is a ``PyroModule`` built for data of a given shape ((C, H, W) images, or (D,)
vectors) from its config dataclass. It declares:

- the Pyro pair: ``model(x, ...)`` and ``guide(x, ...)``, every site inside one
  ``pyro.plate("data")`` so that bounds are per datapoint. They are written as methods
  and reach users as ``PairFunction`` modules (``pair.py``), so that Pyro's ``SVI``, its
  ``ELBOModule`` and the library's loop all train them; ``pair_arguments(batch)`` says
  what one training step passes them;
- read-outs: ``posterior(x)`` (the guide's distribution over z), ``encode(x)`` (its
  location and scale), ``decode(z)`` (the likelihood p(x | z) as a distribution) and
  ``decode_mean(z)`` (its mean, for pictures), ``sample``, ``reconstruct``, ``device``.
  A family with several latent sites says what its code z is (DRAW's: the concatenation
  of its per-step codes); the evaluator, AIS and the objectives take any number of
  sites inside the data plate and need none of these read-outs;
- capability flags (``has_clusters``, ``has_classes``, ``has_encoder``, ``has_density``)
  that the CLI reads instead of probing for methods;
- ``global_latents(config)``: whether a model of this config has latents outside the data
  plate (False by default: every latent in it). Such sites (the weights of a Bayesian
  network, ``bayesian``) are marked ``infer[keyed.GLOBAL]`` in model and guide and scaled
  by batch / N, so that a step's ELBO estimates the whole training set's (times N /
  batch); only the objectives whose spec says ``trains_global_latents`` (the ELBOs) may
  train them, and the evaluator draws them inside each importance weight, leaving their
  prior / guide ratio out of the per-datapoint weights (``bounds``);
- hooks of the training loop with defaults for an unsupervised model trained on batches
  of images (the semi-supervised families override the batches and the pair's arguments,
  the GMVAE the figures); what is scored after each epoch (``epoch_scores``) and drawn
  from its history (``curves``); the optimizer's Adam betas (``adam_betas``);
- the kind of data it models (``data_kind``, one of ``data.KINDS``): ``check_data``
  refuses a dataset of another kind in one line. Image families take (N, D) batches of
  values in [0, 1]; the text families (``sentence_vae.py``) take (N, W) batches of padded
  token ids, their lengths read off the padding, with the likelihood masked there. A
  family of a new kind overrides ``check_data``, ``init_from_data`` and
  ``training_batches`` for it, and ``add_units`` (what the evaluator reports beside nats
  per item: bits per dimension by default, perplexity for text). ``score_rows`` says how
  many items the loop's per-epoch scores put through the networks at once.

A model without an amortized posterior or a likelihood of its own (the GAN) keeps the
contract: its ``guide`` is its prior (a valid, loose, importance sampler, so every bound
and AIS from the "guide" still apply), ``has_encoder = False`` makes ``encode`` and
``reconstruct`` refuse, ``has_density = False`` says that scoring needs an observation
model, given through ``set_observation`` (``pyro-vae evaluate --observation gaussian
--sigma S``), and its ``training_loss`` and ``epoch_scores`` are its own game's. Every
default keeps the families with a guide and a likelihood as they were.

The networks, the likelihood and the guide come from their registries (``nets.ENCODERS``,
``nets.DECODERS``, ``likelihoods.LIKELIHOODS``, ``guides.GUIDES``) by the names in
``NetsConfig``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule

from ..bounds import estimate_bounds
from ..config import check_fields, option
from ..data import Dataset
from ..errors import ConfigError, Flag
from ..metrics import add_bits_per_dim
from ..guides import GUIDES
from ..likelihoods import LIKELIHOODS, Likelihood, LikelihoodConfig, make_likelihood
from ..nets import DECODERS, ENCODERS, make_decoder
from .. import plots
from ..pair import attach_pair, own_parameters, unique_name

Shape = tuple[int, ...]
#: observation models p(x | z) that ``set_observation`` can give a family without a density
OBSERVATIONS = ("gaussian",)


@torch.no_grad()
def objective_bound(objective: Any, model: Any, x: torch.Tensor, batch_size: int | None = None) -> float:
    """Minus the objective at KL weight 1 on ``x``, in nats per image (``batch_size``
    items at a time, by default the family's ``score_rows``)."""
    total = 0.0
    batch_size = batch_size or model.score_rows
    with pyro.validation_enabled(False), own_parameters():  # the model was checked on its first training step
        for i in range(0, x.shape[0], batch_size):
            total += objective.loss(model.model, model.guide, x[i : i + batch_size])
    return -total / x.shape[0]


def elbo_terms(model: Any, x: torch.Tensor) -> dict[str, float]:
    """The validation ELBO's two terms, KL(q(z|x) || p(z)) and E_q log p(x|z), from one
    draw per image (nats per image), for the curves."""
    est = estimate_bounds(model.model, model.guide, x, 1, batch_size=model.score_rows, max_rows=model.score_rows)
    return {"valid_kl": est.kl.mean().item(), "valid_reconstruction": est.log_lik.mean().item()}


@dataclass
class NetsConfig(LikelihoodConfig):
    """The parts every family is assembled from: networks, the pixel likelihood (whose
    own settings, ``gaussian_scale`` and ``logistic_mixtures``, come from ``LikelihoodConfig``), and the family of q(z | x):
    a diagonal Gaussian, or a flow of it."""

    encoder: str = option("mlp", "encoder network", ENCODERS)
    decoder: str = option("mlp", "decoder network", DECODERS)
    likelihood: str = option("bernoulli", "p(x | z) of each pixel: bernoulli for 0/1 data; continuous-bernoulli, "
                             "gaussian or discretized-logistic (8-bit data) for grey levels and colour", LIKELIHOODS)
    guide: str = option("diagonal", "q(z | x): the encoder's diagonal Gaussian, or that Gaussian through "
                        "--flow-length amortized transforms (planar, radial, iaf, sylvester)", GUIDES)
    flow_length: int = option(10, "transforms of a flow --guide", at_least=1)

    def likelihood_config(self) -> LikelihoodConfig:
        return LikelihoodConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(LikelihoodConfig)})


class Family(PyroModule):
    """Base class of the model families; see the module docstring."""

    Config: ClassVar[type]
    default_objective: ClassVar[str]
    default_particles: ClassVar[int] = 1  # samples per datapoint in the default objective
    objectives: ClassVar[tuple[str, ...]]  # the ELBO flavours that are correct for this pair
    has_clusters: ClassVar[bool] = False  # assign(x): mixture components (pyro-vae cluster)
    has_classes: ClassVar[bool] = False  # a class label y: sample_by_class, classifier metrics
    enumerates_in_guide: ClassVar[bool] = False  # a discrete site summed out in the guide
    pair_methods: ClassVar[tuple[str, ...]] = ("model", "guide")  # run as PairFunctions (pair.py)
    has_encoder: ClassVar[bool] = True  # an amortized q(z | x): encode, reconstruct, interpolations
    has_density: ClassVar[bool] = True  # p(x | z) of its own; else scoring needs set_observation
    score_name: ClassVar[str] = "bound"  # what train_bound / valid_bound hold, in words
    evaluate_hint: ClassVar[str] = "--iw 5000"  # the options of the evaluate command to suggest
    adam_betas: ClassVar[tuple[float, float]] = (0.9, 0.999)  # torch's defaults
    figure_samples: ClassVar[int] = 64  # images in the grids of samples drawn during training
    data_kind: ClassVar[str] = "image"  # the kind of dataset it models (data.KINDS)
    score_rows: ClassVar[int] = 1000  # items per pass of the loop's per-epoch scores

    likelihood: Likelihood
    decoder: torch.nn.Module

    def __init__(self, shape: Shape | int, config: Any):
        super().__init__(unique_name(type(self)))
        attach_pair(self)
        shape = (shape,) if isinstance(shape, int) else tuple(int(n) for n in shape)
        if len(shape) not in (1, 3) or min(shape) < 1:
            raise ConfigError(f"data shape must be (C, H, W) or (D,), got {shape}")
        self.check_config(config)
        self.config = config
        self.shape = shape
        self.image_shape = shape if len(shape) == 3 else None
        self.x_dim = math.prod(shape)

    def _likelihood_and_decoder(self, in_dim: int, hidden: Sequence[int]) -> None:
        """Build ``self.likelihood`` and a decoder from ``in_dim`` inputs to its parameters."""
        c = self.config
        self.likelihood = make_likelihood(c.likelihood, self.x_dim, c.likelihood_config())
        self.decoder = make_decoder(c.decoder, in_dim, self.image_shape, self.x_dim,
                                    self.likelihood.params_per_value, hidden, c.activation)

    @classmethod
    def global_latents(cls, config: Any) -> bool:
        """Whether a model of ``config`` has global latents (see the module docstring)."""
        return False

    @classmethod
    def check_config(cls, config: Any) -> None:
        """Refuse impossible options before anything is built or trained (``fit`` calls it
        first, the constructor again): what the fields declare (``config.check_fields``);
        families add the rules that relate fields to each other."""
        check_fields(config)

    def __setstate__(self, state: dict[str, Any]) -> None:
        # a copy (copy.deepcopy, pickle) is another model: its parameters get a name of their own
        super().__setstate__(state)
        self._pyro_name = unique_name(type(self))

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # --- the Pyro pair and its read-outs ------------------------------------------------

    def model(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        """The generative story; ``x`` is a (batch, D) tensor."""
        raise NotImplementedError

    def guide(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        """The amortized posterior."""
        raise NotImplementedError

    def posterior(self, x: torch.Tensor) -> dist.Distribution:
        """q(z | x): batch shape (batch,), event shape (z_dim,)."""
        raise NotImplementedError

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Location and scale of the guide's Gaussian over z, each (batch, z_dim)."""
        raise NotImplementedError

    def decode(self, z: torch.Tensor, *args: Any) -> dist.Distribution:
        """p(x | z): batch shape z.shape[:-1], event shape (D,)."""
        return self.likelihood.distribution(self.decoder(z))

    @torch.no_grad()
    def decode_mean(self, z: torch.Tensor, *args: Any) -> torch.Tensor:
        """The mean of p(x | z) with values in [0, 1]: what pictures show."""
        return self.likelihood.mean(self.decoder(z))

    @torch.no_grad()
    def sample(self, n: int, draw: bool = False) -> torch.Tensor:
        """``n`` images from the model, (n, D): the likelihood's means, or draws from it."""
        raise NotImplementedError

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """The mean of p(x | z) at the posterior's location for each input."""
        raise NotImplementedError

    # --- hooks of the training loop ------------------------------------------------------

    def check_kind(self, data: Dataset) -> None:
        """Refuse, in one line, a dataset of another kind than the family's."""
        if data.kind != self.data_kind:
            raise ConfigError(f"{data.name} is {data.kind} data, but {type(self).__name__} models {self.data_kind} "
                              "data; choose a family for it (pyro-vae fit --help lists them) or another {dataset}",
                              dataset=Flag("dataset"))

    def check_data(self, data: Dataset, seed: int) -> None:
        """Refuse data this family cannot train on, before the run directory is made: the
        data's kind and shape must be the model's, and what the decoder sees must lie in
        the likelihood's support."""
        self.check_kind(data)
        if data.x_dim != self.x_dim:
            raise ConfigError(f"{data.name} has {data.x_dim} values per item; this model was built for {self.x_dim}")
        if data.binarize == "none":
            for name in data.splits:
                for x in data.split_chunks(name):
                    self.likelihood.check_support(x, f"the {name} split of {data.name}")

    def check_inputs(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Refuse, in one line, images given to ``model`` off the likelihood's support (grey
        levels for a Bernoulli, say): called by the pair outside the library's loop, with
        Pyro's validation on, where Pyro would raise a traceback from inside the trace."""
        for value in (*args, *kwargs.values()):
            if torch.is_tensor(value) and value.is_floating_point() and value.shape[-1:] == (self.x_dim,):
                self.likelihood.check_support(value, "the batch given to the model")

    def init_from_data(self, data: Dataset, seed: int) -> None:
        """Data-dependent initialisation before training: the decoder's output bias from
        the mean training pixel (the logit of it, for a Bernoulli likelihood)."""
        mean = data.pixel_mean("train").to(self.device)
        self.decoder.init_output_bias(self.likelihood.init_bias(mean))

    def steps_per_epoch(self, data: Dataset, batch_size: int) -> int:
        """Optimizer steps in one epoch."""
        return data.num_batches(batch_size)

    def training_batches(self, data: Dataset, batch_size: int, epoch: int, seed: int,
                         device: torch.device, start: int = 0) -> Iterator[tuple[torch.Tensor, ...]]:
        """The arguments of ``training_loss`` for each step of one epoch, from step ``start``
        on; they must depend only on (seed, epoch) so that a resumed run is exact."""
        for x in data.train_batches(batch_size, epoch, seed, device, start=start):
            yield (x,)

    def pair_arguments(self, batch: tuple[Any, ...]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The positional and keyword arguments of ``model`` and ``guide`` for one step's
        ``batch``: what ``svi.step(*args, **kwargs)`` takes to train as the library's loop
        does. By default the batch itself."""
        return tuple(batch), {}

    def training_loss(self, objective: Any, batch: tuple[torch.Tensor, ...], kl_weight: float) -> torch.Tensor:
        """The differentiable loss of one step, summed over the batch."""
        args, kwargs = self.pair_arguments(batch)
        return objective.differentiable_loss(self.model, self.guide, *args, kl_weight=kl_weight, **kwargs)

    def epoch_scores(self, objective: Any, train_x: torch.Tensor, valid_x: torch.Tensor) -> dict[str, float]:
        """What is scored on the fixed training and validation images after each epoch:
        ``train_bound`` and ``valid_bound`` (the best checkpoint has the highest
        ``valid_bound``), and any ``valid_*`` numbers for the curves. By default minus the
        objective, and the validation ELBO's two terms."""
        return {"train_bound": objective_bound(objective, self, train_x),
                "valid_bound": objective_bound(objective, self, valid_x), **elbo_terms(self, valid_x)}

    def curves(self, history: list[dict[str, Any]], path: Path, title: str = "") -> Path:
        """The figure of the per-epoch history (curves.png): the bounds by default."""
        return plots.bound_curves(history, path, title=title)

    def set_observation(self, observation: str | None, sigma: float | None) -> None:
        """Give a family without a density (``has_density = False``) the observation model
        p(x | z) that scoring needs: ``gaussian``, N(mean image, sigma^2 I) (Wu et al.
        2017). A family with its own likelihood takes none, and refuses one."""
        if observation is not None or sigma is not None:
            raise ConfigError(f"{{observation}} and {{sigma}} give a model without a density one to score by; "
                              f"this {type(self).__name__} has its own likelihood p(x | z) ({self.likelihood.name})",
                              observation=Flag("observation"), sigma=Flag("sigma"))
    def add_units(self, summary: dict[str, Any], x: torch.Tensor) -> None:
        """Add to the evaluator's ``summary`` of ``x`` its bounds in the units of this
        family's data: bits per dimension for likelihoods of discrete values."""
        if self.likelihood.discrete:
            add_bits_per_dim(summary, x.shape[1])

    def metrics(self, x: torch.Tensor, labels: torch.Tensor | None) -> dict[str, Any]:
        """Scores beyond the bounds (e.g. a classifier's accuracy), logged per epoch on
        validation data and reported by ``pyro-vae evaluate``."""
        return {}

    def figures(self, x: torch.Tensor, labels: torch.Tensor | None, image_shape: Any,
                directory: Path) -> list[Path]:
        """Figures particular to this family, drawn at the end of training and by
        ``pyro-vae plot``; ``x`` and ``labels`` are validation images and their classes
        (None when unknown)."""
        return []
