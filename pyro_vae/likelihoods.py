"""STAND-IN until the likelihoods branch lands (bernoulli only)."""
from __future__ import annotations
from dataclasses import dataclass
import torch
from torch import nn
from .errors import ConfigError, DataError
from .nets import BernoulliImage


@dataclass
class LikelihoodConfig:
    gaussian_scale: str = "pixel"
    logistic_mixtures: int = 5


class Likelihood(nn.Module):
    name = "base"
    discrete = True
    params_per_value = 1

    def __init__(self, x_dim: int, config: LikelihoodConfig):
        super().__init__()
        self.x_dim = x_dim


class Bernoulli(Likelihood):
    name = "bernoulli"

    def distribution(self, params):
        return BernoulliImage(params)

    def mean(self, params):
        return torch.sigmoid(params)

    def check_support(self, x, what):
        if not bool(((x == 0) | (x == 1)).all()):
            raise DataError(f"{what} is not binary; pass --binarize dynamic")

    def init_bias(self, pixel_mean):
        p = pixel_mean.clamp(1e-3, 1 - 1e-3)
        return torch.log(p) - torch.log1p(-p)


LIKELIHOODS = {"bernoulli": Bernoulli}


def make_likelihood(name, x_dim, config):
    try:
        return LIKELIHOODS[name](x_dim, config)
    except KeyError:
        raise ConfigError(f"unknown likelihood {name!r}; choose one of {', '.join(LIKELIHOODS)}") from None
