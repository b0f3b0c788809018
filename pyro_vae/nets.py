"""Encoder and decoder networks shared by the models."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .errors import ConfigError
from .likelihoods import BernoulliImage  # noqa: F401  (its home before the likelihood registry)

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "elu": nn.ELU,
    "softplus": nn.Softplus,
    "gelu": nn.GELU,
}


def activation(name: str) -> nn.Module:
    """Return a fresh activation module by name."""
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ConfigError(
            f"unknown activation {name!r}; choose one of {', '.join(ACTIVATIONS)}"
        ) from None


def mlp_layers(sizes: Sequence[int], act: str, final_activation: bool = False) -> list[nn.Module]:
    """Linear layers of the given sizes with ``act`` between them (and after the last if asked)."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if final_activation or i < len(sizes) - 2:
            layers.append(activation(act))
    return layers


def mlp(sizes: Sequence[int], act: str, final_activation: bool = False) -> nn.Sequential:
    """A stack of linear layers with ``act`` between them (and after the last if asked)."""
    return nn.Sequential(*mlp_layers(sizes, act, final_activation))


def cat_last(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Concatenate the last dimensions of ``a`` and ``b`` after broadcasting the others
    (an enumerated label has shape (classes, 1, ...) against a batch of inputs)."""
    shape = torch.broadcast_shapes(a.shape[:-1], b.shape[:-1])
    return torch.cat([a.expand(*shape, a.shape[-1]), b.expand(*shape, b.shape[-1])], -1)


ImageShape = tuple[int, int, int]


class MLPEncoder(nn.Sequential):
    """Fully connected encoder body: the flat input (with any conditioning vector appended,
    e.g. a one-hot label) through ``hidden`` layers, each followed by the activation."""

    def __init__(self, image_shape: ImageShape | None, x_dim: int, hidden: Sequence[int], act: str,
                 cond_dim: int = 0):
        super().__init__(*mlp_layers([x_dim + cond_dim, *hidden], act, final_activation=True))
        self.out_dim = hidden[-1] if hidden else x_dim + cond_dim

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(x if cond is None else cat_last(x, cond))


class MLPDecoder(nn.Module):
    """Fully connected decoder: ``in_dim`` latent (and conditioning) values to the
    likelihood's ``params_per_value`` numbers for each of the ``x_dim`` values, laid out
    parameter-major (``out.view(..., P, x_dim)``)."""

    def __init__(self, in_dim: int, image_shape: ImageShape | None, x_dim: int, params_per_value: int,
                 hidden: Sequence[int], act: str):
        super().__init__()
        self.net = mlp([in_dim, *hidden, params_per_value * x_dim], act)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)

    @torch.no_grad()
    def init_output_bias(self, bias: torch.Tensor) -> None:
        """Set the output layer's bias (the likelihood's choice from the data's mean pixel)."""
        self.net[-1].bias.copy_(bias)


class GaussianEncoder(nn.Module):
    """An encoder body followed by the location and scale of a diagonal Gaussian.

    The scale goes through softplus (not exp) so that a large pre-activation early in
    training cannot overflow into an infinite variance.
    """

    def __init__(self, body: nn.Module, out_dim: int):
        super().__init__()
        self.body = body
        self.loc = nn.Linear(body.out_dim, out_dim)
        self.scale = nn.Linear(body.out_dim, out_dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(x, cond)
        return self.loc(h), F.softplus(self.scale(h)) + 1e-6


ENCODERS: dict[str, type[nn.Module]] = {"mlp": MLPEncoder}
DECODERS: dict[str, type[nn.Module]] = {"mlp": MLPDecoder}


def _lookup(registry: dict[str, type], name: str, what: str) -> type:
    try:
        return registry[name]
    except KeyError:
        raise ConfigError(f"unknown {what} {name!r}; choose one of {', '.join(registry)}") from None


def make_encoder(name: str, image_shape: ImageShape | None, x_dim: int, hidden: Sequence[int], act: str,
                 cond_dim: int = 0) -> nn.Module:
    """An encoder body from the registry (``--encoder``)."""
    return _lookup(ENCODERS, name, "encoder")(image_shape, x_dim, tuple(hidden), act, cond_dim)


def make_decoder(name: str, in_dim: int, image_shape: ImageShape | None, x_dim: int,
                 params_per_value: int, hidden: Sequence[int], act: str) -> nn.Module:
    """A decoder from the registry (``--decoder``)."""
    return _lookup(DECODERS, name, "decoder")(in_dim, image_shape, x_dim, params_per_value, tuple(hidden), act)


def make_classifier(name: str, image_shape: ImageShape | None, x_dim: int, hidden: Sequence[int], act: str,
                    classes: int) -> nn.Sequential:
    """An encoder body of the registry followed by a linear layer to class logits. The
    layers of a fully connected body are spliced in, so that the classifier's parameter
    names are those of one plain MLP (as in checkpoints of earlier versions)."""
    body = make_encoder(name, image_shape, x_dim, hidden, act)
    layers = list(body) if isinstance(body, nn.Sequential) else [body]
    return nn.Sequential(*layers, nn.Linear(body.out_dim, classes))
