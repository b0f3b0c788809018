"""The command line: a fit -> evaluate -> sample round trip, and bad input handled cleanly."""

import json

import numpy as np
import pytest
import torch
from pyro_vae.data import Dataset
from pyro_vae.runs import removable_entries

from helpers import FAST, assert_clean_error, invoke, make_binary_images, signal_during_batch

@pytest.fixture
def trained(tiny_npy, tmp_path):
    run = tmp_path / "run"
    result = invoke("fit", "vae", "--dataset", tiny_npy, "--run-dir", run, *FAST)
    assert result.exit_code == 0, result.output
    return run


def test_fit_evaluate_sample_reconstruct_plot(trained, tmp_path):
    result = invoke("evaluate", trained, "--iw", 20, "--split", "valid", "--device", "cpu")
    assert result.exit_code == 0, result.output
    summary = json.loads((trained / "eval-valid-iw20.json").read_text())
    assert summary["num_images"] == 20 and summary["num_particles"] == 20
    assert summary["elbo"]["mean"] <= summary["iwae"]["10"]["mean"] <= summary["log_px"]["mean"] + 1e-4
    per_image = np.load(trained / "eval-valid-iw20.npz")
    assert per_image["log_px"].shape == (20,)
    assert np.isclose(per_image["log_px"].mean(), summary["log_px"]["mean"], atol=1e-4)
    assert "log p(x), IWAE-20" in result.output and "IWAE-10" in result.output and "jackknife" in result.output
    assert per_image["k_hat"].shape == per_image["jackknife"].shape == (20,)

    result = invoke("sample", trained, "-n", 9, "--output", tmp_path / "new" / "s.png", "--device", "cpu")
    assert result.exit_code == 0, result.output  # a missing folder is made
    assert (tmp_path / "new" / "s.png").stat().st_size > 0 and np.load(tmp_path / "new" / "s.npy").shape == (9, 64)
    assert invoke("sample", trained, "-n", 4, "--device", "cpu").exit_code == 0
    assert (trained / "figures" / "samples.png").is_file()

    result = invoke("reconstruct", trained, "--split", "valid", "-n", 5, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert (trained / "figures" / "reconstructions.png").is_file()

    result = invoke("encode", trained, "--split", "valid", "--device", "cpu")
    assert result.exit_code == 0, result.output
    codes = np.load(trained / "codes-valid.npz")
    assert codes["loc"].shape == codes["scale"].shape == (20, 2) and (codes["scale"] > 0).all()
    assert codes["index"].tolist() == list(range(20))
    csv_rows = (trained / "metrics.csv").read_text().splitlines()
    assert len(csv_rows) == 3 and "valid_kl" in csv_rows[0] and "valid_reconstruction" in csv_rows[0]
    assert {"interpolation.png", "manifold.png"} <= {p.name for p in (trained / "figures").iterdir()}

    for figure in (trained / "figures").iterdir():
        figure.unlink()  # so that what follows checks that plot draws them again
    result = invoke("plot", trained)
    assert result.exit_code == 0 and (trained / "figures" / "manifold.png").is_file()
    assert (trained / "figures" / "curves.png").is_file()


def test_evaluate_limit_draws_a_random_subset(trained):
    result = invoke("evaluate", trained, "--iw", 4, "--split", "train", "--limit", 7, "--device", "cpu")
    assert result.exit_code == 0, result.output
    index = np.load(trained / "eval-train-iw4-n7.npz")["index"]
    assert len(set(index.tolist())) == 7 and index.max() < 180
    assert sorted(index.tolist()) != list(range(7))


def test_resume_continues_a_run(trained):
    result = invoke("fit", "vae", "--run-dir", trained, "--resume", "--epochs", 3, "--device", "cpu", "-q")
    assert result.exit_code == 0, result.output
    lines = (trained / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]
    result = invoke("fit", "vae", "--run-dir", trained, "--resume", "--epochs", 6, "--eval-every", 2,
                    "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "not scored (every 2 epochs)" in result.output  # epoch 5
    rows = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert [("valid_bound" in row) for row in rows] == [True, True, True, True, False, True]


def test_unknown_model_and_option(tiny_npy):
    result = invoke("fit", "nosuchmodel")
    assert result.exit_code == 2 and "nosuchmodel" in result.output
    result = invoke("fit", "vae", "--no-such-option", 1)
    assert result.exit_code == 2 and "--no-such-option" in result.output
    result = invoke("fit", "vae", "--dataset", tiny_npy, "--activation", "swish", *FAST[:-3])
    assert_clean_error(result, "activation", "tanh")
    result = invoke("fit", "vae", "--dataset", tiny_npy, "--lr", "-1")
    assert_clean_error(result, "--lr")
    result = invoke("fit", "vae", "--dataset", tiny_npy, "--hidden", "20,x")
    assert result.exit_code == 2 and "comma-separated" in result.output


def test_grey_level_data_is_refused_with_the_binarize_hint(tmp_path):
    path = tmp_path / "grey.npy"
    np.save(path, np.random.default_rng(0).random((50, 4, 4)).astype(np.float32))
    result = invoke("fit", "vae", "--dataset", path, "--run-dir", tmp_path / "r", *FAST)
    assert_clean_error(result, "not binary", "--binarize")
    assert not (tmp_path / "r").exists()  # nothing half-made
    result = invoke("fit", "vae", "--dataset", path, "--binarize", "dynamic", "--run-dir", tmp_path / "r", *FAST)
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("array, fragment", [
    (np.full((10, 4, 4), 2.0, dtype=np.float32), "[0, 1]"),
    (np.zeros((10, 2, 4, 4), dtype=np.float32), "shape"),
    (np.array([[np.nan, 0.0]] * 10, dtype=np.float32), "NaN"),
])
def test_malformed_arrays(tmp_path, array, fragment):
    path = tmp_path / "bad.npy"
    np.save(path, array)
    assert_clean_error(invoke("fit", "vae", "--dataset", path, *FAST), fragment)


def test_unreadable_and_missing_data_files(tmp_path):
    bad = tmp_path / "bad.npy"
    bad.write_bytes(b"not numpy at all")
    assert_clean_error(invoke("fit", "vae", "--dataset", bad, *FAST), "cannot read")
    assert_clean_error(invoke("fit", "vae", "--dataset", tmp_path / "nope.npy", *FAST), "no such data file")
    assert_clean_error(invoke("fit", "vae", "--dataset", "cifar", *FAST), "unknown dataset")


def test_offline_without_data_says_where_to_put_it(tmp_path):
    result = invoke("fit", "vae", "--dataset", "mnist", "--data-dir", tmp_path / "empty", "--no-download", *FAST)
    assert_clean_error(result, "MNIST", "--data-dir")
    result = invoke("fit", "vae", "--dataset", "binarized-mnist", "--data-dir", tmp_path / "empty",
                    "--no-download", *FAST)
    assert_clean_error(result, "binarized", ".amat")


def test_iw_must_be_positive(trained):
    result = invoke("evaluate", trained, "--iw", 0)
    assert result.exit_code == 2 and "--iw" in result.output


def test_existing_run_dir_is_never_overwritten(trained, tiny_npy):
    before = (trained / "checkpoint.pt").read_bytes()
    assert_clean_error(invoke("fit", "vae", "--dataset", tiny_npy, "--run-dir", trained, *FAST),
                       "already exists", "--resume")
    assert (trained / "checkpoint.pt").read_bytes() == before


def test_missing_truncated_and_incompatible_checkpoints(trained, tmp_path):
    assert_clean_error(invoke("evaluate", tmp_path / "nowhere"), "not a run directory")

    data = (trained / "checkpoint.pt").read_bytes()
    (trained / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    assert_clean_error(invoke("evaluate", trained, "--iw", 2), "truncated or corrupt")
    assert_clean_error(invoke("fit", "vae", "--run-dir", trained, "--resume", "-q"), "truncated or corrupt")

    (trained / "checkpoint.pt").unlink()
    assert_clean_error(invoke("sample", trained), "no checkpoint")

    config = json.loads((trained / "config.json").read_text())
    config["model_config"]["z_dim"] = 5
    (trained / "config.json").write_text(json.dumps(config))
    assert_clean_error(invoke("evaluate", trained, "--checkpoint", "best", "--iw", 2), "does not match")


def test_checkpoints_load_without_running_code(trained):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"format": 1, "model": Evil()}, trained / "checkpoint.pt")
    result = invoke("evaluate", trained, "--iw", 2)
    assert_clean_error(result, "cannot be read")
    assert "pwned" not in result.output


def test_resume_refuses_changed_options(trained):
    result = invoke("fit", "vae", "--run-dir", trained, "--resume", "--lr", "0.1", "-q")
    assert_clean_error(result, "--lr")
    assert "--epochs" in result.output and "--eval-every" in result.output  # what may change
    assert_clean_error(invoke("fit", "vae", "--run-dir", trained, "--resume", "--epochs", 9,
                              "--eval-every", 0, "-q"), "--eval-every")
    assert_clean_error(invoke("fit", "vae", "--resume", "-q"), "--run-dir")


def test_gmvae_fit_evaluate_cluster_plot(tiny_labelled, tmp_path):
    data = tiny_labelled
    run = tmp_path / "gm"
    result = invoke("fit", "gmvae", "--dataset", data, "--run-dir", run, "--components", 3,
                    "--learn-weights", *FAST)
    assert result.exit_code == 0, result.output
    config = json.loads((run / "config.json").read_text())
    assert config["model_config"]["learn_weights"] is True and config["train"]["objective"] == "enum"
    figures = {p.name for p in (run / "figures").iterdir()}
    assert {"component-samples.png", "latent-components.png", "manifold.png"} <= figures

    result = invoke("evaluate", run, "--iw", 10, "--device", "cpu")
    assert result.exit_code == 0, result.output
    summary = json.loads((run / "eval-test-iw10.json").read_text())
    assert summary["num_images"] == 40 and summary["elbo"]["mean"] <= summary["log_px"]["mean"]

    result = invoke("cluster", run, "--samples", 20, "--device", "cpu")
    assert result.exit_code == 0, result.output
    clusters = json.loads((run / "clusters-test.json").read_text())
    assignment = np.load(run / "clusters-test.npz")["assignment"]
    assert clusters["components"] == 3 and sum(clusters["sizes"]) == 40 == len(assignment)
    assert 0.5 <= clusters["accuracy"] <= 1 and "clustering accuracy" in result.output
    assert removable_entries(run)[1] == []

    for figure in (run / "figures").iterdir():
        figure.unlink()
    result = invoke("plot", run, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert (run / "figures" / "latent-components.png").is_file()

    result = invoke("fit", "gmvae", "--dataset", data, "--objective", "meanfield", *FAST)
    assert_clean_error(result, "gmvae cannot be trained with --objective meanfield", "enum")


def test_cluster_needs_a_mixture_model(trained):
    assert_clean_error(invoke("cluster", trained, "--device", "cpu"), "vae run", "gmvae")


def test_ssvae_fit_evaluate_sample_by_class(tiny_labelled, tmp_path):
    run = tmp_path / "ss"
    result = invoke("fit", "ssvae", "--dataset", tiny_labelled, "--run-dir", run, "--classes", 4,
                    "--labels", 8, "--classifier-hidden", 16, *FAST)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"valid_accuracy", "valid_error", "valid_ece"} <= set(rows[-1])
    assert {"samples-by-class.png", "style-transfer.png", "reliability.png"} <= {p.name for p in (run / "figures").iterdir()}

    result = invoke("evaluate", run, "--iw", 10, "--device", "cpu")
    assert result.exit_code == 0, result.output
    summary = json.loads((run / "eval-test-iw10.json").read_text())
    assert summary["accuracy"] + summary["error"] == pytest.approx(1.0)
    assert sum(summary["calibration"]["count"]) == 40
    assert "classifier accuracy" in result.output and (run / "eval-test-iw10-reliability.png").is_file()
    assert removable_entries(run)[1] == []

    result = invoke("sample", run, "--by-class", "-n", 3, "--output", tmp_path / "c.png", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert np.load(tmp_path / "c.npy").shape == (12, 64)

    assert_clean_error(invoke("fit", "ssvae", "--dataset", tiny_labelled, "--classes", 4, "--labels", 6, *FAST),
                       "--labels 6", "4 classes")


def test_ssvae_needs_labels_and_sample_by_class_needs_a_label(tiny_npy, trained):
    assert_clean_error(invoke("fit", "ssvae", "--dataset", tiny_npy, "--classes", 4, "--labels", 8, *FAST),
                       "no class labels")
    assert_clean_error(invoke("sample", trained, "--by-class", "--device", "cpu"), "no label")


def test_fit_iwae_is_the_vae_pair_on_the_importance_weighted_bound(tiny_npy, tmp_path):
    result = invoke("fit", "iwae", "--dataset", tiny_npy, "--run-dir", tmp_path / "iw", *FAST)
    assert result.exit_code == 0, result.output
    train = json.loads((tmp_path / "iw" / "config.json").read_text())["train"]
    assert (train["objective"], train["particles"]) == ("iwae", 5)
    assert_clean_error(invoke("fit", "iwae", "--dataset", tiny_npy, "--kl-warmup", 3, "--run-dir", tmp_path / "no",
                              *FAST), "--kl-warmup")
    assert not (tmp_path / "no").exists()
    assert "iwae objective and 5 particles" in invoke("fit", "iwae", "--help").output


def snapshot(folder):
    """Every file under ``folder`` with its bytes: to check that nothing existing changed."""
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


def _best_over_last(run):
    (run / "checkpoint.pt").write_bytes((run / "best.pt").read_bytes())


def _set_config(run, edit):
    config = json.loads((run / "config.json").read_text())
    edit(config)
    (run / "config.json").write_text(json.dumps(config))


def _other_shape(run):
    np.save(run.parent / "tiny.npy", np.zeros((200, 6, 6), dtype=np.float32))


# (what is done to the trained run, the command that meets it, a fragment of the one-line message)
DAMAGE = {
    "zero-byte checkpoint": (lambda r: (r / "checkpoint.pt").write_bytes(b""), ["evaluate", "--iw", 2], "truncated"),
    "best.pt over checkpoint.pt, then --resume": (_best_over_last, ["fit", "vae", "--resume", "--epochs", 3], "lacks optimizer"),
    "checkpoint of another type": (lambda r: torch.save({"format": 1, "model": [1, 2]}, r / "checkpoint.pt"),
                                   ["evaluate", "--iw", 2], "lacks model"),
    "config.json entry missing": (lambda r: _set_config(r, lambda c: c.pop("data")), ["evaluate", "--iw", 2], "damaged"),
    "config.json wrongly typed": (lambda r: _set_config(r, lambda c: c["train"].update(epochs="ten")),
                                  ["fit", "vae", "--resume", "--epochs", 3], "--epochs must be of type int"),
    "model config wrongly typed": (lambda r: _set_config(r, lambda c: c["model_config"].update(z_dim=[2])),
                                   ["sample"], "--z-dim must be of type int"),
    "config.json not JSON": (lambda r: (r / "config.json").write_text("{"), ["plot"], "cannot read"),
    "metrics.jsonl damaged": (lambda r: (r / "metrics.jsonl").write_text("{oops\n"), ["plot"], "metrics.jsonl"),
    "dataset of another shape": (_other_shape, ["evaluate", "--iw", 2], "changed since"),
    "dataset of another shape, resume": (_other_shape, ["fit", "vae", "--resume", "--epochs", 3], "values per item"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_runs_end_in_one_line_and_nothing_changes(trained, damage):
    spoil, command, fragment = DAMAGE[damage]
    spoil(trained)
    before = snapshot(trained)
    args = [*command[:2], "--run-dir", trained, *command[2:]] if command[0] == "fit" else [command[0], trained, *command[1:]]
    assert_clean_error(invoke(*args, "--device", "cpu"), fragment)
    assert snapshot(trained) == before


@pytest.mark.parametrize("args, fragment", [
    (["--z-dim", 0], "--z-dim must be at least 1"),
    (["--z-dim", -3], "--z-dim must be at least 1"),
    (["--seed", -1], "--seed must be"),
    (["--seed", 2**64], "--seed must be"),
])
def test_degenerate_sizes_and_seeds(tiny_npy, tmp_path, args, fragment):
    result = invoke("fit", "vae", "--dataset", tiny_npy, "--run-dir", tmp_path / "r", *FAST, *args)
    assert_clean_error(result, fragment)
    assert not (tmp_path / "r").exists()


def test_evaluate_and_sample_seeds_outside_the_range(trained):
    result = invoke("evaluate", trained, "--iw", 2, "--seed", -5)
    assert result.exit_code == 2 and "--seed" in result.output


def test_empty_splits_and_an_ssvae_with_every_image_labelled(tmp_path):
    x, y = make_binary_images(60, seed=1, with_labels=True)
    np.savez(tmp_path / "empty.npz", train=x, valid=x[:0], test=x[:10])
    assert_clean_error(invoke("fit", "vae", "--dataset", tmp_path / "empty.npz", "--run-dir", tmp_path / "r", *FAST),
                       "no items")
    rows = np.concatenate([np.where(y == c)[0][:5] for c in range(4)])
    np.savez(tmp_path / "all.npz", train=x[rows], train_labels=y[rows], valid=x[:10], valid_labels=y[:10])
    result = invoke("fit", "ssvae", "--dataset", tmp_path / "all.npz", "--classes", 4, "--labels", 20,
                    "--run-dir", tmp_path / "s", *FAST)
    assert_clean_error(result, "all 20 training images")
    assert not (tmp_path / "r").exists() and not (tmp_path / "s").exists()


def test_unwritable_outputs_are_refused_before_the_work(trained, tiny_npy, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert_clean_error(invoke("fit", "vae", "--dataset", tiny_npy, "--run-dir", blocker / "run", *FAST), "cannot write")
    before = snapshot(trained)
    assert_clean_error(invoke("evaluate", trained, "--iw", 2, "--output", blocker / "e.json"), "cannot write")
    assert_clean_error(invoke("sample", trained, "--output", blocker / "s.png"), "cannot write")
    assert snapshot(trained) == before


def test_evaluating_the_best_checkpoint_keeps_the_last_ones_file(trained):
    assert invoke("evaluate", trained, "--iw", 4, "--split", "valid", "--device", "cpu").exit_code == 0
    last = (trained / "eval-valid-iw4.json").read_bytes()
    assert invoke("evaluate", trained, "--iw", 4, "--split", "valid", "--checkpoint", "best").exit_code == 0
    assert (trained / "eval-valid-iw4.json").read_bytes() == last
    assert json.loads((trained / "eval-valid-iw4-best.json").read_text())["checkpoint"] == "best"
    assert_clean_error(invoke("evaluate", trained, "--iw", 4), "no test images")
    assert removable_entries(trained)[1] == []  # every name written here is one --overwrite knows


@pytest.mark.parametrize("signum, code", [(2, 130), (15, 143)])
def test_a_signal_saves_and_exits_with_the_shells_status(tiny_npy, tmp_path, monkeypatch, signum, code):
    original = signal_during_batch(monkeypatch, 3, signum)
    result = invoke("fit", "vae", "--dataset", tiny_npy, "--run-dir", tmp_path / "r", *FAST)
    assert result.exit_code == code, result.output
    assert "Error" not in result.output and "Traceback" not in result.output
    assert "state is saved" in result.output and "--resume" in result.output
    monkeypatch.setattr(Dataset, "train_batches", original)
    result = invoke("fit", "vae", "--run-dir", tmp_path / "r", "--resume", "--device", "cpu", "-q")
    assert result.exit_code == 0, result.output


def test_a_run_without_checkpoint_is_offered_a_restart(trained, tiny_npy):
    (trained / "checkpoint.pt").unlink()
    assert_clean_error(invoke("fit", "vae", "--dataset", tiny_npy, "--run-dir", trained, *FAST), "--overwrite")
    result = invoke("fit", "vae", "--dataset", tiny_npy, "--run-dir", trained, "--overwrite", *FAST)
    assert result.exit_code == 0, result.output
