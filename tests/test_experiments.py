"""The experiments' quick modes run end to end and their outputs say what they should."""

import csv
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time

import click
import pytest
import torch
from click.testing import CliRunner

from pyro_vae import build_model, make_objective

from helpers import REPO


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


def test_benchmark_yardsticks_compute_our_losses():
    """Each plain PyTorch step computes the same loss as our Pyro objective, draw for draw."""
    script = load_script("benchmark")
    x = torch.bernoulli(torch.full((7, 784), 0.3))
    for pair in script.step_pairs(quick=False):
        name, config = pair["model"]
        model = build_model(name, pair.get("shape", 784), config)
        objective = make_objective(*pair["objective"])
        torch.manual_seed(1)
        ours = objective.differentiable_loss(model.model, model.guide, x)
        torch.manual_seed(1)
        plain = pair["plain"](model, x)
        assert torch.allclose(ours, plain, rtol=1e-5), (pair["name"], ours.item(), plain.item())


def test_benchmark_quick(tmp_path):
    script = load_script("benchmark")
    result = CliRunner().invoke(script.main, ["--quick", "--out", str(tmp_path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "benchmark.json").read_text())
    assert [s["name"].split()[0] for s in record["step"]] == ["VAE", "GMVAE", "SSVAE"]
    assert all(s["ours_ms"] > 0 and s["plain_ms"] > 0 for s in record["step"])
    assert record["eval"]["rate"] > 0 and record["eval"]["matmul_rate"] > 0
    assert set(record["eval"]["peak_memory_mb"]) == {"0", "50", "500"}
    assert record["epoch"]["steps"] == 4 and record["epoch"]["steps_seconds"] > 0 and record["epoch"]["epoch_seconds"] > 0
    assert "| step: VAE meanfield" in (tmp_path / "benchmark.md").read_text()
    e = json.loads((tmp_path / "end-to-end.json").read_text())["end_to_end"]
    assert e["steps_per_epoch"] == 4 and len(e["plain"]) == 2
    for r in (e["fit"], e["resume"], *e["plain"]):
        assert r["steps"] > 0 and r["scoring"] > 0 and r["writing"] > 0 and r["wall_over_core"] >= 1
    for r in (e["fit"], e["resume"]):  # the parts add up to the wall time, the rest included
        parts = ("data", "steps", "scoring", "writing", "figures", "report", "other")
        assert r["data"] > 0 and sum(r[k] for k in parts) == pytest.approx(r["wall"]) and r["other"] >= 0
    assert e["fit"]["figures"] > 0  # drawn at the end, by default
    for r in (e["fit"], e["resume"]):  # one epoch each, its parts inside it
        (epoch,) = r["epochs"]
        assert 0 < epoch["core"] <= epoch["seconds"] <= r["wall"]
    assert "| resume, one more epoch |" in (tmp_path / "end-to-end.md").read_text()


def test_benchmark_end_to_end_alone(tmp_path):
    script = load_script("benchmark")
    result = CliRunner().invoke(script.main, ["--quick", "--end-to-end", "--out", str(tmp_path)],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["end-to-end.json", "end-to-end.md"]
    assert "plain PyTorch loop, epoch 2" in (tmp_path / "end-to-end.md").read_text()


def test_ssvae_draws_summarizes_evaluated_runs(tiny_labelled, tmp_path):
    from pyro_vae.cli import main as cli

    runs = []
    for seed in (0, 1):
        run = tmp_path / f"ss{seed}"
        fit_args = ["fit", "ssvae", "--dataset", tiny_labelled, "--labels", 8, "--classes", 4, "--z-dim", 2,
                    "--hidden", 8, "--classifier-hidden", 8, "--epochs", 1, "--batch-size", 50,
                    "--eval-size", 20, "--seed", seed, "--run-dir", run, "-q"]
        for args in (fit_args, ["evaluate", run, "--iw", 4, "--data-dir", tmp_path]):
            result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
            assert result.exit_code == 0, result.output
        runs.append(run)
    script = load_script("ssvae_draws")
    out = tmp_path / "draws.json"
    result = CliRunner().invoke(script.main, [*map(str, runs), "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    record = json.loads(out.read_text())
    accuracies = [json.loads(next(r.glob("eval-test-iw4.json")).read_text())["accuracy"] for r in runs]
    assert [r["accuracy"] for r in record["runs"]] == accuracies and [r["seed"] for r in record["runs"]] == [0, 1]
    # these images are binary already, so the "grey" test images are the evaluated ones
    assert [r["accuracy_grey"] for r in record["runs"]] == pytest.approx(accuracies)
    assert record["accuracy"]["mean"] == sum(accuracies) / 2
    missing = CliRunner().invoke(script.main, [str(tmp_path)])
    assert missing.exit_code != 0 and "pyro-vae evaluate" in missing.output


def test_cs236_split_maps_positions_within_each_class_to_rows():
    script = load_script("cs236_split")
    labels = torch.arange(70_000).remainder(10).flip(0).numpy()  # digit c at rows 9 - c, 19 - c, ...
    rows = script.labelled_rows(labels)
    assert len(rows) == 99 and list(rows) == sorted(set(rows))  # digit 4 names one position twice
    for digit, positions in enumerate(script.CLASS_POSITIONS):
        assert set(rows[labels[rows] == digit]) == {10 * p + 9 - digit for p in positions}


def test_calibration_quick(tmp_path):
    script = load_script("calibration")
    result = CliRunner().invoke(script.main, ["--quick", "--out", str(tmp_path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    records = json.loads((tmp_path / "calibration.json").read_text())
    assert [r["model"] for r in records] == ["vae", "gmvae", "exact"]
    for r in records:
        assert r["repeats"] == 3 and r["num_particles"] == 200 and r["num_images"] == 20
        assert len(r["pareto_k"]["values"]) == 60
        for key in ("delta_method", "tail_aware"):
            for m in ("1", "2"):
                c = r[key]["coverage"][m]
                assert c is None or 0 <= c <= 1
        assert r["delta_method"]["entries"] == 60
        bias = r["bias"]["jackknife"]["iwae"]
        assert list(bias)[0] == "1" and list(bias)[-1] == "200"
        assert bias["1"] < bias["200"] <= 1e-6  # the ELBO is the furthest below
        assert r["bias"]["jackknife"]["jackknife"] == 0
    exact = records[-1]
    assert exact["against"] == "exact log p(x)" and "truth" in exact["bias"] and 0.3 < exact["k_true"] < 0.7
    for name in ("vae", "gmvae", "exact"):
        assert (tmp_path / f"{name}.png").stat().st_size > 0


def test_model_space_quick(tmp_path):
    script = load_script("model_space")
    args = ["--quick", "--epochs", "1", "--iw", "5", "--limit", "0", "--eval-size", "20", "--out", str(tmp_path)]
    result = CliRunner().invoke(script.main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    records = json.loads((tmp_path / "model_space.json").read_text())
    assert [r["group"] for r in records] == ["binary MNIST"] * 2 + ["8-bit MNIST"] * 2 + ["8x8 digits"] * 2
    for r in records:
        assert r["elbo"]["mean"] <= r["log_px"]["mean"] + 1e-4
        assert ("bits_per_dim" in r["log_px"]) == (r["likelihood"] != "continuous-bernoulli")
    assert (tmp_path / "model_space.md").read_text().count("\n") == len(records) + 2
    result = CliRunner().invoke(script.main, ["--quick", "--steps-only", "--out", str(tmp_path)],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert len(json.loads((tmp_path / "steps.json").read_text())) == 6


def test_flows_quick(tmp_path):
    script = load_script("flows")
    result = CliRunner().invoke(script.main, ["--quick", "--out", str(tmp_path), "--configs",
                                              "diagonal,planar-2,sylvester-2"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    records = json.loads((tmp_path / "flows.json").read_text())
    assert [r["name"] for r in records] == ["diagonal", "planar-2", "sylvester-2"]
    for r in records:
        assert r["test_elbo"]["mean"] <= r["test_log_px"]["mean"]
        assert r["gap"]["mean"] == pytest.approx(r["test_log_px"]["mean"] - r["test_elbo"]["mean"], abs=1e-4)
        assert r["step_ms"] > 0 and [h["epoch"] for h in r["history"]] == [1, 2]
        assert r["paper_nll"] is None  # the paper's column is for binarized MNIST only
    assert [r["objective"] for r in records] == ["meanfield", "trace", "trace"]
    assert records[0]["flow_parameters"] == 0 < records[1]["flow_parameters"]
    assert "| planar, K = 2 | trace |" in (tmp_path / "flows.md").read_text()
    assert (tmp_path / "flows.png").stat().st_size > 0


def test_m1_features_probes_a_vae_run(tiny_labelled, tmp_path):
    from pyro_vae.cli import main as cli

    run = tmp_path / "m1"
    args = ["fit", "vae", "--dataset", tiny_labelled, "--z-dim", 3, "--hidden", 16, "--epochs", 3, "--batch-size", 20,
            "--eval-size", 20, "--run-dir", run, "-q"]
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    out = tmp_path / "probe.json"
    result = CliRunner().invoke(load_script("m1_features").main, [str(run), "--labels", "8", "--seeds", "0,1",
                                                                  "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    record = json.loads(out.read_text())
    assert record["features"] == 3 and [r["seed"] for r in record["per_seed"]] == [0, 1]
    # four noisy prototypes, a 3-epoch M1: well above chance (0.25) with every label
    assert record["every_label"]["mlp_300_300"] > 0.6 and record["every_label"]["logistic"] > 0.6
    assert all(0 <= r["logistic"] <= 1 and 0 <= r["nearest_neighbour"] <= 1 for r in record["per_seed"])


def test_adgm_class_draws_scores_each_number_of_draws(tiny_labelled, tmp_path):
    from pyro_vae.cli import main as cli

    run = tmp_path / "ad"
    args = ["fit", "adgm", "--dataset", tiny_labelled, "--labels", 8, "--classes", 4, "--z-dim", 2, "--a-dim", 2,
            "--hidden", 8, "--classifier-hidden", 8, "--epochs", 1, "--batch-size", 50, "--eval-size", 20,
            "--run-dir", run, "-q"]
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    script = load_script("adgm_class_draws")
    out = tmp_path / "draws.json"
    result = CliRunner().invoke(script.main, [str(run), "--draws", "1,3", "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    record = json.loads(out.read_text())["ad"]
    assert set(record) == {"1", "3", "mean"}
    assert all(0 <= r["accuracy"] <= 1 and 0 <= r["ece"] <= 1 for r in record.values())
    for bad in ("0,2", "two"):
        refused = CliRunner().invoke(script.main, [str(run), "--draws", bad])
        assert refused.exit_code == 2 and "--draws" in refused.output
    vae = tmp_path / "vae"
    assert CliRunner().invoke(cli, [str(a) for a in ["fit", "vae", "--dataset", tiny_labelled, "--epochs", 1,
                                                     "--eval-size", 20, "--run-dir", vae, "-q"]]).exit_code == 0
    refused = CliRunner().invoke(script.main, [str(vae)])
    assert refused.exit_code == 2 and "adgm runs" in refused.output
    (tmp_path / "empty").mkdir()  # not a run, and a run whose checkpoint was cut short
    (vae / "checkpoint.pt").write_bytes((vae / "checkpoint.pt").read_bytes()[:100])
    for folder, fragment in ((tmp_path / "empty", "not a run directory"), (vae, "truncated or corrupt")):
        refused = CliRunner().invoke(script.main, [str(folder)])
        assert refused.exit_code == 2 and fragment in refused.output and "Traceback" not in refused.output


def test_compiled_exactness_measures_default_sizes():
    script = load_script("compiled_exactness")
    vae = script.measure("vae", "meanfield")
    assert vae["compiled"] and vae["exact"] and vae["loss_difference"] == 0
    ssvae = script.measure("ssvae", "enum")
    assert ssvae["compiled"] and ssvae["largest_relative_gradient_difference"] < 1e-5


FAKE_PYRO_VAE = r"""#!/usr/bin/env bash
# Stands in for pyro-vae: a fit appends epochs up to $FAKE_UNTIL, then stops as a SIGTERM
# would (143) unless the 3,280 epochs are done; evaluate writes a summary.
echo "$*" >> "$FAKE_LOG"
cmd=$1; shift
if [ "$cmd" = fit ]; then
    while [ $# -gt 0 ]; do [ "$1" = --run-dir ] && run=$2; shift; done
    mkdir -p "$run/figures"
    n=0; [ -f "$run/metrics.jsonl" ] && n=$(wc -l < "$run/metrics.jsonl")
    while [ "$n" -lt "$FAKE_UNTIL" ]; do n=$((n + 1)); echo "{\"epoch\": $n}" >> "$run/metrics.jsonl"; done
    echo "state after $n" > "$run/checkpoint.pt"; echo best > "$run/best.pt"
    echo '{}' > "$run/config.json"; echo png > "$run/figures/curves.png"
    [ "$n" -ge 3280 ] || exit 143
else
    echo '{"log_px": -1}' > "$1/eval-test-iw5000.json"
fi
"""


def fake_pyro_vae(tmp_path):
    """The stand-in on PATH, and the environment, call log, runs and results folders of
    burda_budget.sh run with it."""
    fake = tmp_path / "bin" / "pyro-vae"
    fake.parent.mkdir()
    fake.write_text(FAKE_PYRO_VAE)
    fake.chmod(0o755)
    log, runs, results = tmp_path / "calls.log", tmp_path / "runs", tmp_path / "results"
    env = {**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}", "FAKE_LOG": str(log),
           "RUNS": str(runs), "RESULTS": str(results), "PYTHON": sys.executable}
    return env, log, runs, results


def test_burda_budget_continues_a_stopped_row_then_evaluates_and_copies(tmp_path):
    """A stopped piece (exit 143) is recorded; the same command again continues the run
    with --resume, then evaluates it and copies the outputs to RESULTS/burda-ROW/."""
    env, log, runs, results = fake_pyro_vae(tmp_path)

    def piece(until):
        return subprocess.run(["bash", str(REPO / "experiments" / "burda_budget.sh"), "iwae5"],
                              env={**env, "FAKE_UNTIL": str(until)}, capture_output=True, text=True,
                              cwd=tmp_path)

    first = piece(1000)
    assert first.returncode == 143, first.stderr
    out = results / "burda-iwae5"
    assert not out.exists()
    second = piece(3280)
    assert second.returncode == 0, second.stderr
    calls = log.read_text().splitlines()
    assert calls[0].startswith("fit iwae --particles 5 --dataset binarized-mnist --lr-schedule burda --epochs 3280"
                               " --eval-every 10")
    assert calls[1] == f"fit iwae --run-dir {runs / 'burda-iwae5'} --resume --eval-every 10"
    assert calls[2].startswith("evaluate ") and calls[2].endswith(" --iw 5000") and len(calls) == 3
    pieces = (out / "burda-iwae5.pieces").read_text().splitlines()
    assert [p.split(" in ")[0] for p in pieces] == ["epochs 1-1000", "epochs 1001-3280"]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3280
    assert json.loads((out / "eval-test-iw5000.json").read_text()) == {"log_px": -1}
    assert (out / "evaluate.time").is_file() and (out / "curves.png").is_file()


def test_burda_budget_restores_a_carried_row_on_a_fresh_machine_and_drops_the_carry_when_done(tmp_path):
    """A piece stopped in one session is carried (carry.py save); on a machine without the
    run directory the script restores it, continues with --resume, and once the row is
    evaluated the carry folder is gone."""
    env, log, runs, results = fake_pyro_vae(tmp_path)
    script = REPO / "experiments" / "burda_budget.sh"
    first = subprocess.run(["bash", str(script), "iwae5"], env={**env, "FAKE_UNTIL": "1000"}, cwd=tmp_path)
    assert first.returncode == 143
    carry = load_script("carry")
    carry.save(runs / "burda-iwae5", "burda-iwae5", results)
    shutil.rmtree(runs)  # the next session's machine has no run directory
    second = subprocess.run(["bash", str(script), "iwae5"], env={**env, "FAKE_UNTIL": "3280"}, cwd=tmp_path,
                            capture_output=True, text=True)
    assert second.returncode == 0, second.stderr
    calls = log.read_text().splitlines()
    assert calls[1] == f"fit iwae --run-dir {runs / 'burda-iwae5'} --resume --eval-every 10"
    pieces = (results / "burda-iwae5" / "burda-iwae5.pieces").read_text().splitlines()
    assert [p.split(" in ")[0] for p in pieces] == ["epochs 1-1000", "epochs 1001-3280"]
    assert not (results / "burda-iwae5" / "carry").exists()


def test_a_carried_run_resumes_to_what_one_uninterrupted_run_gives(tiny_npy, tmp_path):
    from pyro_vae import TrainConfig, VAEConfig, fit

    carry = load_script("carry")
    config, quiet = VAEConfig(z_dim=2, hidden=(8,)), dict(log=None, progress=False)
    train = lambda epochs: TrainConfig(dataset=str(tiny_npy), epochs=epochs, batch_size=20, eval_size=40)  # noqa: E731
    whole = fit("vae", config, train(4), tmp_path / "whole", **quiet)
    fit("vae", config, train(2), tmp_path / "piece", **quiet)
    target = carry.save(tmp_path / "piece", "piece", tmp_path / "results")
    manifest = json.loads((target / "MANIFEST.json").read_text())
    assert manifest["epochs"] == 2 and {"config.json", "metrics.jsonl", "checkpoint.pt"} <= set(manifest["files"])
    assert carry.restore("piece", tmp_path / "elsewhere", tmp_path / "results") == 2
    resumed = fit("vae", config, train(4), tmp_path / "elsewhere", resume=True, **quiet)
    timing = {"seconds", "steps_seconds"}
    assert [{k: v for k, v in row.items() if k not in timing} for row in resumed.history] == \
           [{k: v for k, v in row.items() if k not in timing} for row in whole.history]
    assert all(torch.equal(p, q) for p, q in zip(resumed.model.parameters(), whole.model.parameters()))
    # a damaged carry is refused, and so is a run directory that went further
    (target / "checkpoint.pt").write_bytes(b"garbage")
    with pytest.raises(click.ClickException, match="does not match its manifest"):
        carry.restore("piece", tmp_path / "third", tmp_path / "results")
    carry.save(tmp_path / "piece", "piece", tmp_path / "results")
    with pytest.raises(click.ClickException, match="past the carried"):
        carry.restore("piece", tmp_path / "whole", tmp_path / "results")


def test_carry_stop_saves_a_running_fit_and_waits_for_it(tiny_npy, tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    fit = subprocess.Popen([sys.executable, "-m", "pyro_vae", "fit", "vae", "--dataset", str(tiny_npy), "--z-dim", "2",
                            "--hidden", "8", "--epochs", "100000", "--batch-size", "20", "--eval-size", "20",
                            "--run-dir", str(run), "--device", "cpu", "-q"], env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (run / "checkpoint.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    carry = load_script("carry")
    with pytest.raises(click.ClickException, match="being trained"):
        carry.save(run, "run", tmp_path / "results")
    carry.stop(run, timeout=60)
    assert fit.wait(timeout=30) == 143, fit.stderr.read()
    carry.save(run, "run", tmp_path / "results")
    assert (tmp_path / "results" / "run" / "carry" / "checkpoint.pt").is_file()


def _toy_runs(tmp_path):
    """A tiny GAN and a tiny Gaussian-likelihood VAE on the same grey toy images."""
    import numpy as np
    from pyro_vae import TrainConfig, fit
    from helpers import toy_images

    x, y = toy_images(240, seed=4)
    data = tmp_path / "toy.npz"
    np.savez(data, train=x[:200].view(-1, 8, 8).numpy(), train_labels=y[:200].numpy(),
             test=x[200:].view(-1, 8, 8).numpy(), test_labels=y[200:].numpy())
    train = TrainConfig(dataset=str(data), epochs=2, batch_size=40, eval_size=40, figures="none")
    fit("gan", {"z_dim": 2, "hidden": (16,)}, train, tmp_path / "gan", device="cpu")
    fit("vae", {"z_dim": 2, "hidden": (16,), "likelihood": "gaussian", "gaussian_scale": "image"}, train,
        tmp_path / "vae", device="cpu")
    return tmp_path / "gan", tmp_path / "vae"


def test_vae_vs_gan_and_bounds_vs_ais_run_end_to_end(tmp_path, monkeypatch):
    gan, vae = _toy_runs(tmp_path)
    script = load_script("vae_vs_gan")
    monkeypatch.setattr(sys, "argv", ["vae_vs_gan.py", "score", "--gan", str(gan), "--vae", str(vae), "--out",
                                      str(tmp_path / "vg"), "--images", "4", "--steps", "2", "4", "--chains", "2",
                                      "--leapfrog", "2", "--bdmc", "2", "--sigma-images", "3", "--sigma-steps", "2"])
    script.main()
    r = json.loads((tmp_path / "vg" / "results.json").read_text())
    choice = r["sigma_choice"]  # the sigma with the highest AIS estimate on validation images
    assert str(choice["sigma"]) == max(choice["log_px"], key=choice["log_px"].get)
    for model in ("gan", "vae"):
        for t in ("2", "4"):
            b = r["models"][model]["bdmc"][t]
            assert b["upper"]["mean"] - b["lower"]["mean"] == pytest.approx(b["gap"]["mean"])
    assert (tmp_path / "vg" / "samples.png").exists() and "| gan |" in (tmp_path / "vg" / "table.md").read_text()
    script = load_script("bounds_vs_ais")
    monkeypatch.setattr(sys, "argv", ["bounds_vs_ais.py", str(vae), "--out", str(tmp_path / "ba"), "--images", "4",
                                      "--ks", "1", "5", "20", "--steps", "2", "4", "--chains", "2", "--leapfrog", "2",
                                      "--bdmc", "2"])
    script.main()
    r = json.loads((tmp_path / "ba" / "results.json").read_text())
    assert r["iwae"]["1"]["mean"] <= r["iwae"]["20"]["mean"] + 1.0  # tiny K: ordered up to Monte Carlo error
    assert r["ais"]["4"]["evaluations"] == 2 * (1 + 3 * 2)
    assert (tmp_path / "ba" / "bounds-vs-ais.png").exists()


def test_ssvae_ablations_scores_each_arm_against_the_default_on_its_draw(tmp_path):
    """The table's score is the mean validation accuracy over the last epochs, set against
    the baseline curve of the same draw at the same epochs; the arm's changes are named
    from the resolved config (none for the defaults; a retrain on draw-S.txt is draw S)."""
    import dataclasses

    from pyro_vae import resolve

    script = load_script("ssvae_ablations")

    def write_run(path, model_config, train, accuracies):
        path.mkdir(parents=True)
        resolved = resolve("ssvae", model_config, train)
        (path / "config.json").write_text(json.dumps({
            "model": "ssvae", "model_config": dataclasses.asdict(resolved.model_config),
            "train": dataclasses.asdict(resolved.train)}))
        (path / "metrics.jsonl").write_text("".join(
            json.dumps({"epoch": i + 1, "valid_accuracy": a, "valid_bound": -100.0 - i, "seconds": 10.0}) + "\n"
            for i, a in enumerate(accuracies)))

    from pyro_vae import TrainConfig

    base = tmp_path / "baseline"
    for seed, curve in ((0, [0.5, 0.6, 0.7, 0.8, 0.9]), (1, [0.4, 0.4, 0.4, 0.4, 0.4])):
        write_run(base / f"seed{seed}", {}, TrainConfig(seed=seed), curve)
    write_run(tmp_path / "aux", {"aux_weight": 10.0}, TrainConfig(epochs=4), [0.5, 0.7, 0.8, 0.9])
    write_run(tmp_path / "default", {}, TrainConfig(epochs=4, seed=1), [0.4, 0.5, 0.5, 0.5])
    write_run(tmp_path / "retrain", {"labelled_rows": str(tmp_path / "draw-1.txt")},
              TrainConfig(epochs=3, seed=6, lr=3e-3), [0.4, 0.4, 0.1])
    out = tmp_path / "table"
    runs = [str(tmp_path / n) for n in ("aux", "default", "retrain")]
    result = CliRunner().invoke(script.main, [*runs, "--baseline", str(base), "--out", str(out)],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    rows = {r["run"]: r for r in json.loads((out / "table.json").read_text())}
    assert rows["aux"]["changes"] == {"aux_weight": 10.0} and rows["default"]["changes"] == {}
    assert rows["aux"]["score"] == pytest.approx(0.8) and rows["aux"]["default_score"] == pytest.approx(0.7)
    assert rows["default"]["difference"] == pytest.approx(0.1) and rows["default"]["seed"] == 1
    assert rows["retrain"]["changes"] == {"lr": 3e-3, "training seed": 6} and rows["retrain"]["seed"] == 1
    assert rows["retrain"]["score"] == pytest.approx(0.3) and rows["retrain"]["default_score"] == pytest.approx(0.4)
    assert (out / "table.md").read_text().count("\n") == 2 + 3
    too_long = CliRunner().invoke(script.main, [runs[0], "--baseline", str(base), "--last", "5"])
    assert too_long.exit_code != 0 and "need at least --last 5" in too_long.output
