"""The sentence VAE (Bowman et al. 2016, "Generating sentences from a continuous space")
and its language-model baseline, as Pyro model/guide pairs over padded token ids.

    z ~ N(0, I),   w_t | w_<t, z ~ Categorical(softmax(RNN(w_<t, z)))   t = 1..L+1
    q(z | w) = N(mu(w), diag sigma(w)^2),  mu and sigma from an RNN reader of w

A batch is an (N, W) tensor of ids (``text.py``): each sentence's words, ``<eos>``, then
``<pad>``. The decoder reads ``<bos> w_1 .. w_L`` and predicts ``w_1 .. w_L <eos>``; the
tokens are one ``Categorical`` site over the W positions, masked at the padding, inside
the data plate, so log p(w | z) is the sum over the sentence's own tokens.

Word dropout (Bowman et al. section 3.1, ``--word-dropout p``): while training, each
decoder input (``<bos>`` included) is replaced by ``<unk>`` with probability p, a fresh
draw per step; a model in eval mode reads the true words. p = 1 is the inputless
decoder: it reads only ``<unk>``, in training, evaluation and generation alike, so its
bound is that of a model which sees no words.

Free bits (Kingma et al. 2016, ``--free-bits lambda``): in the training loss only, the
KL of each latent dimension, averaged over the batch, counts as no less than lambda
nats, so a dimension below lambda gets no gradient from its KL term. With the meanfield
objective, whose KL is analytic, the term is replaced exactly; with a sampled KL the
correction is exact in expectation. Every reported bound is the true ELBO / IWAE.

``RNNLM`` is the same decoder without z: its bound is its exact log-likelihood.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions import TorchDistribution, constraints
from torch.distributions import kl_divergence

from ..config import option
from ..data import Dataset
from ..errors import ConfigError
from ..nets import CELLS, GaussianEncoder, SequenceDecoder, SequenceEncoder
from ..text import BOS, EOS, PAD, UNK, lengths
from .base import Family, Shape

#: greedy and sampled decoding stop after this many tokens unless told otherwise
MAX_DECODE = 50
#: Burda et al. 2016's threshold on Cov_x E_q[z_j] for an active latent dimension
ACTIVE_THRESHOLD = 0.01


class CategoricalSequence:
    """The likelihood of the sequence families, as the evaluator sees it: a categorical
    over the vocabulary at each position (a log-mass; its units are perplexity, not
    bits per dimension: ``add_units``)."""

    name = "categorical"
    discrete = True


class MaskedTokens(TorchDistribution):
    """p(w | states): at each position where ``mask`` holds, a categorical over the
    vocabulary with logits ``out(states)``; the positions outside the mask (the padding)
    contribute nothing. Batch shape ``states.shape[:-2]``, event shape (T,).

    The output layer runs only at the masked-in positions: a batch of short sentences
    padded to a long one costs what its tokens cost. ``log_prob`` equals the sum over the
    real tokens of ``Categorical(logits=out(states)).log_prob(w)`` (tested)."""

    arg_constraints: dict = {}

    def __init__(self, states: torch.Tensor, out: torch.nn.Linear, mask: torch.Tensor,
                 validate_args: bool | None = None):
        self.states, self.out, self.mask = states, out, mask
        batch_shape = torch.broadcast_shapes(states.shape[:-2], mask.shape[:-1])
        super().__init__(batch_shape, states.shape[-2:-1], validate_args=validate_args)

    @constraints.dependent_property(is_discrete=True, event_dim=1)
    def support(self) -> constraints.Constraint:
        return constraints.independent(constraints.integer_interval(0, self.out.out_features - 1), 1)

    def expand(self, batch_shape: Any, _instance: Any = None) -> MaskedTokens:
        batch_shape = torch.Size(batch_shape)
        states = self.states.expand(*batch_shape, *self.states.shape[-2:])
        return MaskedTokens(states, self.out, self.mask, validate_args=False)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        shape = torch.broadcast_shapes(self.batch_shape + self.event_shape, value.shape, self.mask.shape)
        mask = self.mask.expand(shape)
        states = self.states.expand(*shape, self.states.shape[-1])[mask]
        picked = value.expand(shape)[mask].unsqueeze(-1)
        token_lp = torch.log_softmax(self.out(states), -1).gather(-1, picked).squeeze(-1)
        return torch.zeros(shape, dtype=token_lp.dtype, device=token_lp.device).masked_scatter(mask, token_lp).sum(-1)

    def sample(self, sample_shape: Any = torch.Size()) -> torch.Tensor:
        raise NotImplementedError("sentences are drawn token by token: RNNLM.generate")


@dataclass
class RNNLMConfig:
    """Sizes and decoder options of the language model (shared by the sentence VAE)."""

    embed: int = option(256, "word embedding size", at_least=1)
    hidden: int = option(256, "state size of the recurrent cells", at_least=1)
    cell: str = option("lstm", "recurrent cell", tuple(CELLS))
    word_dropout: float = option(0.0, "share of decoder inputs replaced by <unk> while training (Bowman et al. "
                                 "2016); 1 is the inputless decoder, which never reads a word", at_least=0, at_most=1)
    guide: str = option("diagonal", "the guide: a diagonal Gaussian", ("diagonal",))
    likelihood: str = option("categorical", "p(w | z): a categorical over the vocabulary at each position",
                             ("categorical",))


@dataclass
class SentenceVAEConfig(RNNLMConfig):
    """The sentence VAE's options: the language model's, and the code z."""

    z_dim: int = option(32, "latent dimensions", at_least=1)
    bidirectional: bool = option(False, "the encoder reads each sentence both ways")
    z_every_step: bool = option(False, "feed z to the decoder beside every input word, not only into its "
                                "initial state")
    free_bits: float = option(0.0, "Kingma et al. 2016: in the training loss, each latent dimension's KL "
                              "(batch mean) counts as at least this many nats; 0 is off", at_least=0)


class RNNLM(Family):
    """Recurrent language model over sentences (no latent variable): exact log-likelihood."""

    Config = RNNLMConfig
    default_objective = "meanfield"
    objectives = ("meanfield", "trace")
    data_kind = "text"
    score_rows = 100

    def __init__(self, shape: Shape | int, config: Any = None):
        super().__init__(shape, config or self.Config())
        c = self.config
        self.likelihood = CategoricalSequence()  # type: ignore[assignment]
        self.decoder = SequenceDecoder(self.x_dim, c.embed, c.hidden, c.cell, self.code_dim, self.z_every_step)

    @property
    def code_dim(self) -> int:
        """Dimensions of z (0: none)."""
        return 0

    @property
    def z_every_step(self) -> bool:
        """Whether the decoder reads z beside every word."""
        return False

    # --- data hooks ---------------------------------------------------------------------

    def check_data(self, data: Dataset, seed: int) -> None:
        """Text data whose vocabulary is the model's."""
        self.check_kind(data)
        if data.x_dim != self.x_dim:
            raise ConfigError(f"{data.name} has {data.x_dim} words; this model was built for {self.x_dim}")

    def check_inputs(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Token ids within the vocabulary."""
        for value in (*args, *kwargs.values()):
            if torch.is_tensor(value) and not value.is_floating_point() and value.numel():
                if value.min() < 0 or value.max() >= self.x_dim:
                    raise ConfigError(f"the batch given to the model has token ids outside 0..{self.x_dim - 1}")

    def init_from_data(self, data: Dataset, seed: int) -> None:
        """The output bias from the log frequency of each token in the training split
        (``<eos>`` included), so that the first steps model the unigram distribution."""
        x = data.splits["train"]
        counts = torch.bincount(x[x != PAD].flatten(), minlength=self.x_dim).double() + 0.5
        with torch.no_grad():
            self.decoder.out.bias.copy_((counts / counts.sum()).log().float())

    def training_batches(self, data: Dataset, batch_size: int, epoch: int, seed: int,
                         device: torch.device, start: int = 0) -> Any:
        """The shuffled batches of ``Dataset.train_batches``, each cut to its longest
        sentence rounded up to a multiple of 8 positions (fewer shapes to trace)."""
        for x in data.train_batches(batch_size, epoch, seed, device, start=start):
            width = min(x.shape[1], -(-int(lengths(x).max()) // 8) * 8)
            yield (x[:, :width].contiguous(),)

    def add_units(self, summary: dict[str, Any], x: torch.Tensor) -> None:
        """Perplexities of the bounds: exp(-sum of log p(w) / tokens) with ``<eos>``
        counted as a token (``perplexity``), and over words alone (``perplexity_words``)."""
        n = x.shape[0]
        tokens = int(lengths(x).sum())
        words = tokens - n
        summary.update(tokens=tokens, words=words)
        for key, count in (("perplexity", tokens), ("perplexity_words", words)):
            summary[key] = {name: math.exp(-summary[name]["mean"] * n / count) for name in ("elbo", "log_px")}

    # --- the pair -----------------------------------------------------------------------

    def decoder_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """``<bos> w_1 .. w_L`` (and padding) for targets ``x``, with word dropout applied."""
        inputs = torch.cat([torch.full_like(x[:, :1], BOS), x[:, :-1]], 1)
        p = self.config.word_dropout
        if p >= 1:
            return torch.full_like(inputs, UNK)
        if p > 0 and self.training:
            drop = torch.rand(inputs.shape, device=inputs.device) < p
            inputs = torch.where(drop, torch.full_like(inputs, UNK), inputs)
        return inputs

    def states(self, inputs: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        """(…, N, T, hidden) decoder states for (N, T) inputs and codes z of shape (…, N, z_dim)."""
        if z is None:
            return self.decoder.states(inputs)
        lead = z.shape[:-1]
        flat = inputs.expand(*lead, *inputs.shape[-1:]).reshape(-1, inputs.shape[-1])
        out = self.decoder.states(flat, z.reshape(-1, z.shape[-1]))
        return out.reshape(*lead, *out.shape[-2:])

    def tokens(self, states: torch.Tensor, x: torch.Tensor) -> dist.Distribution:
        """p(w | .): one categorical per position, masked at the padding of ``x``."""
        return MaskedTokens(states, self.decoder.out, x != PAD)

    def model(self, x: torch.Tensor, kl_weight: float = 1.0) -> None:
        """The language model; ``x`` is an (N, W) batch of padded token ids."""
        inputs = self.decoder_inputs(x)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", self.tokens(self.states(inputs, None), x), obs=x)

    def guide(self, x: torch.Tensor, kl_weight: float = 1.0) -> None:
        """Nothing to infer."""
        with pyro.plate("data", x.shape[0]):
            pass

    # --- read-outs ----------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, z: torch.Tensor | None, n: int, draw: bool = False, max_tokens: int = MAX_DECODE,
                 temperature: float = 1.0) -> torch.Tensor:
        """Sentences decoded from codes ``z`` (None: from the language model alone), (n,
        max_tokens) ids ending in ``<eos>`` and ``<pad>`` after it: the most likely token
        at each step (greedy), or a draw from the predicted distribution."""
        device = self.device
        state = self.decoder.initial_state(z, n)
        token = torch.full((n, 1), BOS, dtype=torch.long, device=device)
        out = torch.full((n, max_tokens), PAD, dtype=torch.long, device=device)
        done = torch.zeros(n, dtype=torch.bool, device=device)
        for t in range(max_tokens):
            fed = torch.full_like(token, UNK) if self.config.word_dropout >= 1 else token
            out_t, state = self.decoder.step(fed, z, state)
            logits = self.decoder.out(out_t[:, -1]) / temperature
            token = (dist.Categorical(logits=logits).sample() if draw else logits.argmax(-1)).unsqueeze(1)
            out[:, t] = torch.where(done, torch.full_like(token[:, 0], PAD), token[:, 0])
            done |= token[:, 0] == EOS
            if done.all():
                break
        return out

    @torch.no_grad()
    def sample(self, n: int, draw: bool = False) -> torch.Tensor:
        """``n`` sentences from the model (ids): greedy decoding, or sampled if ``draw``."""
        return self.generate(None, n, draw)

    def reconstruct(self, x: torch.Tensor, draw: bool = False) -> torch.Tensor:
        """A language model has no code to reconstruct from: refused in one line."""
        raise ConfigError("an rnnlm has no code z to reconstruct a sentence from; sample from it instead")

    def homotopy(self, a: torch.Tensor, b: torch.Tensor, steps: int = 5) -> torch.Tensor:
        """Refused, as ``reconstruct`` is."""
        return self.reconstruct(a)


class SentenceVAE(RNNLM):
    """Sentence VAE of Bowman et al. 2016: an RNN language model conditioned on a Gaussian code."""

    Config = SentenceVAEConfig
    objectives = ("meanfield", "trace", "iwae", "renyi")

    def __init__(self, shape: Shape | int, config: SentenceVAEConfig | None = None):
        super().__init__(shape, config or SentenceVAEConfig())
        c = self.config
        self.encoder = GaussianEncoder(_Reader(self.x_dim, c.embed, c.hidden, c.cell, c.bidirectional), c.z_dim)

    @property
    def code_dim(self) -> int:
        return self.config.z_dim

    @property
    def z_every_step(self) -> bool:
        return self.config.z_every_step

    def prior(self, batch: int) -> dist.Distribution:
        zeros = torch.zeros(batch, self.config.z_dim, device=self.device)
        return dist.Normal(zeros, 1.0).to_event(1)

    def posterior(self, x: torch.Tensor) -> dist.Distribution:
        loc, scale = self.encoder(x)
        return dist.Normal(loc, scale).to_event(1)

    def model(self, x: torch.Tensor, kl_weight: float = 1.0) -> None:
        """p(z) p(w | z) for an (N, W) batch of padded token ids."""
        inputs = self.decoder_inputs(x)
        with pyro.plate("data", x.shape[0]):
            with poutine.scale(scale=kl_weight):
                z = pyro.sample("z", self.prior(x.shape[0]))
            pyro.sample("x", self.tokens(self.states(inputs, z), x), obs=x)

    def guide(self, x: torch.Tensor, kl_weight: float = 1.0) -> None:
        """q(z | w) from the RNN reader."""
        with pyro.plate("data", x.shape[0]):
            q = self.posterior(x)
            with poutine.scale(scale=kl_weight):
                pyro.sample("z", q)

    def training_loss(self, objective: Any, batch: tuple[torch.Tensor, ...], kl_weight: float) -> torch.Tensor:
        """The objective's loss, with free bits (see the module docstring) when asked."""
        loss = super().training_loss(objective, batch, kl_weight)
        free = self.config.free_bits
        if free <= 0:
            return loss
        x = batch[0]
        loc, scale = self.encoder(x)
        kl = kl_divergence(dist.Normal(loc, scale), dist.Normal(torch.zeros_like(loc), 1.0)).mean(0)
        return loss + kl_weight * x.shape[0] * torch.relu(free - kl).sum()

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Location and scale of q(z | w)."""
        return self.encoder(x)

    @torch.no_grad()
    def sample(self, n: int, draw: bool = False) -> torch.Tensor:
        """``n`` sentences from codes drawn from the prior: greedy, or sampled if ``draw``."""
        return self.generate(self.prior(n).sample(), n, draw)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, draw: bool = False) -> torch.Tensor:
        """The greedy sentence from each input's posterior mean, or (``draw``) from a
        draw of q(z | w)."""
        z = self.posterior(x).sample() if draw else self.encoder(x)[0]
        return self.generate(z, x.shape[0])

    @torch.no_grad()
    def homotopy(self, a: torch.Tensor, b: torch.Tensor, steps: int = 5) -> torch.Tensor:
        """Greedy sentences along the line between the posterior means of sentences ``a``
        and ``b`` ((1, W) each), ``steps`` codes from one to the other inclusive."""
        za, zb = self.encoder(a)[0], self.encoder(b)[0]
        t = torch.linspace(0, 1, steps, device=za.device).unsqueeze(1)
        return self.generate((1 - t) * za + t * zb, steps)

    @torch.no_grad()
    def metrics(self, x: torch.Tensor, labels: torch.Tensor | None) -> dict[str, Any]:
        """The collapse read-outs: active units (Burda et al. 2016: dimensions whose
        posterior mean varies over the data by more than 0.01) and the mutual information
        I(w; z) under q (Hoffman & Johnson 2016): E log q(z | w) - E log q(z), with the
        aggregate posterior q(z) the mixture of the q(z | w) of ``x``, one draw per sentence."""
        locs, scales = [], []
        for i in range(0, x.shape[0], self.score_rows):
            loc, scale = self.encoder(x[i : i + self.score_rows])
            locs.append(loc)
            scales.append(scale)
        loc, scale = torch.cat(locs), torch.cat(scales)
        active = int((loc.var(0, unbiased=False) > ACTIVE_THRESHOLD).sum()) if x.shape[0] > 1 else 0
        z = loc + scale * torch.randn_like(loc)
        own = dist.Normal(loc, scale).log_prob(z).sum(-1)
        mixture = torch.cat([
            torch.logsumexp(dist.Normal(loc, scale).log_prob(z[i : i + 100, None]).sum(-1), 1)
            for i in range(0, z.shape[0], 100)]) - math.log(z.shape[0])
        return {"active_units": active, "mutual_information": float((own - mixture).mean())}


class _Reader(torch.nn.Module):
    """The encoder's body: padded ids in, the sequence encoder's features out."""

    def __init__(self, vocab: int, embed: int, hidden: int, cell: str, bidirectional: bool):
        super().__init__()
        self.rnn = SequenceEncoder(vocab, embed, hidden, cell, bidirectional)
        self.out_dim = self.rnn.out_dim

    def forward(self, x: torch.Tensor, cond: Any = None) -> torch.Tensor:
        return self.rnn(x, lengths(x))
