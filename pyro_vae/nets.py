"""Encoder and decoder networks shared by the models."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .errors import ConfigError, Flag
from .likelihoods import BernoulliImage  # noqa: F401  (re-exported: importable from here too)

class LeakyReLU(nn.LeakyReLU):
    """The leaky ReLU with slope 0.2 below zero, the usual choice in GANs (Radford et al. 2016)."""

    def __init__(self) -> None:
        super().__init__(0.2)


ACTIVATIONS: dict[str, type[nn.Module]] = {
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "elu": nn.ELU,
    "softplus": nn.Softplus,
    "gelu": nn.GELU,
    "leaky-relu": LeakyReLU,
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
        if cond is None or len(self) == 0:
            return super().forward(x if cond is None else cat_last(x, cond))
        # the first layer of [x, cond] as W_x x + W_c cond: x's part once, however many
        # enumerated labels cond carries (the same function as the layer on the concatenation)
        first, d = self[0], x.shape[-1]
        h = F.linear(x, first.weight[:, :d]) + F.linear(cond, first.weight[:, d:], first.bias)
        for layer in list(self)[1:]:
            h = layer(h)
        return h


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
        loc, scale, _ = self.with_features(x, cond)
        return loc, scale

    def with_features(self, x: torch.Tensor, cond: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Location, scale and the body's features h (``body.out_dim`` values), from which
        a flow guide computes its transforms."""
        h = self.body(x, cond)
        return self.loc(h), F.softplus(self.scale(h)) + 1e-6, h


CONV_CHANNELS = (32, 64)  # channels of the first two stages; later stages keep the last
CONV_MIN_SIDE = 4  # the two compulsory stages take a side of 4 down to 1


def conv_plan(image_shape: tuple[int, int, int] | None, x_dim: int,
              what: str) -> tuple[list[int], list[tuple[int, int]]]:
    """The channels and spatial sizes of the stride-2 stages for images of ``image_shape``.

    Two stages always, then one more while both sides are still at least 8 (so 28x28 stops
    at 7x7, 32x32 goes on to 4x4, 64x64 to 4x4), which keeps the flattened features, and so
    the fully connected layer, small for larger images. Returns the output channels of each
    stage and the (h, w) after each stage. ``what`` names the network in the errors.
    """
    if image_shape is None:
        raise ConfigError(f"the conv {what} needs images with a (C, H, W) shape; these data are "
                          f"vectors of {x_dim} values: use {{mlp}}", mlp=Flag(what, "mlp"))
    c, h, w = image_shape
    if c * h * w != x_dim:
        raise ConfigError(f"the conv {what} got image shape {tuple(image_shape)} ({c * h * w} values) "
                          f"for data of {x_dim} values per item")
    if h < CONV_MIN_SIDE or w < CONV_MIN_SIDE:
        raise ConfigError(f"the conv {what} needs H and W of at least {CONV_MIN_SIDE}; these images "
                          f"are {h}x{w}: use {{mlp}}", mlp=Flag(what, "mlp"))
    sizes: list[tuple[int, int]] = []
    while len(sizes) < 2 or min(h, w) >= 8:
        h, w = (h + 1) // 2, (w + 1) // 2
        sizes.append((h, w))
    channels = [CONV_CHANNELS[min(i, len(CONV_CHANNELS) - 1)] for i in range(len(sizes))]
    return channels, sizes


def _width(hidden: Sequence[int], index: int, what: str) -> int:
    """The fully connected width taken from ``hidden``; a conv net needs one."""
    if not hidden:
        raise ConfigError(f"the conv {what} needs at least one {{hidden}} width for its fully "
                          "connected layer", hidden=Flag("hidden"))
    return int(hidden[index])


class ConvEncoder(nn.Module):
    """Convolutional encoder body: stride-2 convolutions, flatten, then one fully connected
    layer of ``hidden[-1]`` units (the width the MLP body would hand to the heads).

    ``cond`` (a one-hot label, say) is joined to the flattened conv features before the fully
    connected layer, so the image goes through the convolutions once however many labels are
    enumerated: the conv features are computed on ``x``'s own leading dims and broadcast
    against ``cond``'s.
    """

    def __init__(self, image_shape: tuple[int, int, int] | None, x_dim: int, hidden: tuple[int, ...],
                 act: str, cond_dim: int = 0):
        super().__init__()
        channels, sizes = conv_plan(image_shape, x_dim, "encoder")
        self.image_shape = tuple(int(s) for s in image_shape)
        self.cond_dim = cond_dim
        self.out_dim = _width(hidden, -1, "encoder")
        layers: list[nn.Module] = []
        c_in = self.image_shape[0]
        for c_out in channels:
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), activation(act)]
            c_in = c_out
        self.conv = nn.Sequential(*layers)
        h, w = sizes[-1]
        self.features = c_in * h * w
        self.fc = nn.Sequential(nn.Linear(self.features + cond_dim, self.out_dim), activation(act))

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """x (..., C*H*W) flat channel-first, cond (..., cond_dim) -> (..., out_dim)."""
        if (cond is None) != (self.cond_dim == 0):
            raise ValueError(f"this encoder takes a condition of {self.cond_dim} values; got "
                             f"{None if cond is None else tuple(cond.shape)}")
        lead = x.shape[:-1]
        h = self.conv(x.reshape(-1, *self.image_shape)).reshape(*lead, self.features)
        return self.fc(h if cond is None else cat_last(h, cond))

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device


class ConvDecoder(nn.Module):
    """Convolutional decoder in the DCGAN style, the encoder's mirror: a fully connected layer
    of ``hidden[0]`` units (the MLP decoder's first width), a linear map to the encoder's
    smallest feature map, then 4x4 stride-2 transposed convolutions up to at least H x W, the
    last of which gives the C * P output channels, and a top-left crop to exactly H x W.

    The output is parameter-major: ``out.view(..., P, C*H*W)[..., p, :]`` is parameter p of
    every value in channel-first order. A convolution's bias is one number per channel, so
    the per-value output bias that a likelihood's ``init_bias`` sets is a separate parameter
    ``out_bias`` of shape (P*D,), and the last convolution has no bias of its own.
    """

    def __init__(self, in_dim: int, image_shape: tuple[int, int, int] | None, x_dim: int,
                 params_per_value: int, hidden: tuple[int, ...], act: str):
        super().__init__()
        channels, sizes = conv_plan(image_shape, x_dim, "decoder")
        self.image_shape = tuple(int(s) for s in image_shape)
        self.params_per_value = params_per_value
        width = _width(hidden, 0, "decoder")
        self.start = (channels[-1], *sizes[-1])
        self.fc = nn.Sequential(nn.Linear(in_dim, width), activation(act),
                                nn.Linear(width, math.prod(self.start)), activation(act))
        # Encoder stage i maps channels[i-1] to channels[i]; undo the stages in reverse.
        layers: list[nn.Module] = []
        for c_in, c_out in zip(channels[:0:-1], channels[-2::-1]):
            layers += [nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1), activation(act)]
        self.deconv = nn.Sequential(*layers)
        # Output channel p*C + c is parameter p of image channel c, so flattening the
        # (P*C, H, W) output is already the parameter-major (P, C, H, W) order.
        self.out = nn.ConvTranspose2d(channels[0], self.image_shape[0] * params_per_value, 4,
                                      stride=2, padding=1, bias=False)
        self.out_bias = nn.Parameter(torch.zeros(params_per_value * x_dim))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z (..., in_dim) -> (..., P*C*H*W), parameter-major."""
        lead = z.shape[:-1]
        _, h, w = self.image_shape
        y = self.out(self.deconv(self.fc(z).reshape(-1, *self.start)))[..., :h, :w]
        return y.reshape(*lead, -1) + self.out_bias

    @torch.no_grad()
    def init_output_bias(self, bias: torch.Tensor) -> None:
        """Set the per-value output bias, shape (P*D,) in the output's parameter-major order."""
        self.out_bias.copy_(bias.reshape(self.out_bias.shape))

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device


ENCODERS: dict[str, type[nn.Module]] = {"mlp": MLPEncoder, "conv": ConvEncoder}
DECODERS: dict[str, type[nn.Module]] = {"mlp": MLPDecoder, "conv": ConvDecoder}


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


# ----------------------------------------------------------------- networks over sentences

#: the recurrent cells of the sequence networks, by name (``--cell``)
CELLS: dict[str, type[nn.RNNBase]] = {"lstm": nn.LSTM, "gru": nn.GRU}


def reverse_padded(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Each row of (N, T, ...) ``x`` with its first ``lengths[i]`` entries in reverse order
    and the padding after them left in place: the input of a backward reader that starts
    at the last real token (plain tensor indexing, so it traces)."""
    t = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
    index = torch.where(t < lengths[:, None], lengths[:, None] - 1 - t, t)
    return x.gather(1, index.view(*index.shape, *([1] * (x.dim() - 2))).expand_as(x))


class SequenceEncoder(nn.Module):
    """Word embeddings read by a recurrent cell; the features of a sentence are the
    cell's output at its last token (``<eos>``), and with ``bidirectional`` beside them a
    second cell's output after reading the sentence backwards. ``out_dim`` features."""

    def __init__(self, vocab: int, embed: int, hidden: int, cell: str, bidirectional: bool = False):
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.forward_rnn = CELLS[cell](embed, hidden, batch_first=True)
        self.backward_rnn = CELLS[cell](embed, hidden, batch_first=True) if bidirectional else None
        self.out_dim = hidden * (2 if bidirectional else 1)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(N, T) padded ids and their (N,) lengths -> (N, out_dim)."""
        e = self.embed(x)
        last = (lengths - 1).clamp(min=0).view(-1, 1, 1)
        out, _ = self.forward_rnn(e)
        features = [out.gather(1, last.expand(-1, 1, out.shape[-1])).squeeze(1)]
        if self.backward_rnn is not None:
            back, _ = self.backward_rnn(reverse_padded(e, lengths))
            features.append(back.gather(1, last.expand(-1, 1, back.shape[-1])).squeeze(1))
        return torch.cat(features, -1)


class SequenceDecoder(nn.Module):
    """A recurrent language model over word embeddings, conditioned on a code z of
    ``z_dim`` values (none when 0) through its initial state (a linear map of z; for an
    LSTM, the hidden and the cell state) and, with ``every_step``, beside every input
    word. Returns the logits of each next token."""

    def __init__(self, vocab: int, embed: int, hidden: int, cell: str, z_dim: int = 0, every_step: bool = False):
        super().__init__()
        self.cell, self.hidden, self.z_dim = cell, hidden, z_dim
        self.every_step = every_step and z_dim > 0
        self.embed = nn.Embedding(vocab, embed)
        self.rnn = CELLS[cell](embed + (z_dim if self.every_step else 0), hidden, batch_first=True)
        states = 2 if cell == "lstm" else 1
        self.init = nn.Linear(z_dim, states * hidden) if z_dim else None
        self.out = nn.Linear(hidden, vocab)

    def initial_state(self, z: torch.Tensor | None, n: int) -> Any:
        """The cell's state before the first token for ``n`` sentences (zero without z)."""
        if self.init is None:
            h = self.out.weight.new_zeros(1, n, self.hidden)
            return (h, h) if self.cell == "lstm" else h
        h = self.init(z).unsqueeze(0)
        return tuple(h.chunk(2, -1)) if self.cell == "lstm" else h

    def step(self, inputs: torch.Tensor, z: torch.Tensor | None, state: Any) -> tuple[torch.Tensor, Any]:
        """The cell's outputs (N, T, hidden) after (N, T) ``inputs``, and its state after them."""
        e = self.embed(inputs)
        if self.every_step:
            e = torch.cat([e, z.unsqueeze(1).expand(-1, e.shape[1], -1)], -1)
        return self.rnn(e, state)

    def states(self, inputs: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        """(N, T) input ids and (N, z_dim) codes -> (N, T, hidden) outputs, whose ``out``
        gives the logits of each next token."""
        return self.step(inputs, z, self.initial_state(z, inputs.shape[0]))[0]

    def forward(self, inputs: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        """(N, T) input ids and (N, z_dim) codes -> (N, T, vocab) logits."""
        return self.out(self.states(inputs, z))
