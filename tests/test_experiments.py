"""The experiments' quick modes run end to end and their outputs say what they should."""

import csv
import importlib.util
import json

from click.testing import CliRunner

from conftest import REPO


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_compare_bounds_quick(tmp_path):
    script = load_script("compare_bounds")
    result = CliRunner().invoke(script.main, ["--quick", "--out", str(tmp_path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    records = json.loads((tmp_path / "bounds.json").read_text())
    assert [r["model"] for r in records] == ["vae", "gmvae"]
    for r in records:
        ks = [int(k) for k in r["iwae"]]
        assert ks[0] == 1 and ks[-1] == 200
        means = [st["mean"] for st in r["iwae"].values()]
        slack = [3 * (st["mc_se"] or 0) for st in r["iwae"].values()]
        # ELBO <= IWAE-k <= IWAE-K, up to Monte Carlo error
        assert all(a <= b + s for a, b, s in zip(means, means[1:], slack[1:])), means
        assert r["iwae"]["1"]["mean"] == r["elbo"]["mean"]
        closed = r["gap"]["closed_by_k"]
        assert closed["1"] == 0 and abs(closed["200"] - 1) < 1e-5 and r["gap"]["log_px_minus_elbo"]["mean"] > 0
    rows = list(csv.DictReader(open(tmp_path / "bounds.csv")))
    assert len(rows) == sum(len(r["iwae"]) for r in records)
    assert (tmp_path / "bounds-vs-k.png").stat().st_size > 0


def test_compare_elbos_quick(tmp_path):
    script = load_script("compare_elbos")
    result = CliRunner().invoke(script.main, ["--quick", "--out", str(tmp_path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    records = json.loads((tmp_path / "elbos.json").read_text())
    assert [r["flavour"] for r in records] == ["meanfield", "trace", "iwae", "dreg", "renyi"]
    for r in records:
        assert r["test_elbo"]["mean"] <= r["test_log_px"]["mean"]
        assert 0 <= r["active_units"] <= r["z_dim"] == 2
        assert r["snr_encoder"] > 0 and r["snr_decoder"] > 0
        assert r["decoder_evaluations"] == 3 * 180 * r["particles"]
        assert [h["epoch"] for h in r["history"]] == [1, 2, 3]
    assert {r["particles"] for r in records} == {1, 5}
    assert len(list(csv.DictReader(open(tmp_path / "elbos.csv")))) == 5
    assert (tmp_path / "elbos.png").stat().st_size > 0


def test_step_times_runs():
    script = load_script("step_times")
    result = CliRunner().invoke(script.main, ["--batch", "4", "--rounds", "1", "--steps", "1"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert len(lines) == len(script.PAIRS) and all(line.rstrip().endswith("x the first") for line in lines)


def test_profile_evaluation_runs(tiny_labelled, tmp_path):
    from pyro_vae import TrainConfig, fit

    train = TrainConfig(dataset=str(tiny_labelled), epochs=1, batch_size=20, eval_size=50)
    fit("gmvae", {"z_dim": 2, "hidden": (8,), "components": 3}, train, tmp_path / "gm", device="cpu")
    script = load_script("profile_evaluation")
    result = CliRunner().invoke(script.main, [str(tmp_path / "gm"), "--particles", "4", "--batch", "10"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "log_weights, 4 particles x 10 images" in result.output and "aten::" in result.output
