"""Training loop behaviour on tiny data: learning, exact resume, divergence, interruption."""

import json
import math
import os
import signal

import pytest
import torch

from pyro_vae import MODELS, OBJECTIVES, TrainConfig, VAE, VAEConfig, fit, load_run, resume
from pyro_vae.data import Dataset
from pyro_vae.errors import ConfigError, Interrupted, RunError, TrainingDiverged

from helpers import signal_during_batch

SMALL = {"z_dim": 2, "hidden": (16,)}


def config(path, **kw):
    base = dict(dataset=str(path), epochs=4, batch_size=20, lr=3e-3, eval_size=100)
    base.update(kw)
    return TrainConfig(**base)


def test_vae_methods_have_the_right_shapes():
    vae = VAE(64, VAEConfig(z_dim=3, hidden=(10, 6)))
    x = torch.bernoulli(torch.full((5, 64), 0.5))
    assert vae.sample(7).shape == (7, 64)
    assert set(vae.sample(4, draw=True).unique().tolist()) <= {0.0, 1.0}
    loc, scale = vae.encode(x)
    assert loc.shape == scale.shape == (5, 3) and (scale > 0).all()
    r = vae.reconstruct(x)
    assert r.shape == (5, 64) and ((r >= 0) & (r <= 1)).all()


def test_training_improves_the_bound(tiny_npy, tmp_path):
    run = fit("vae", SMALL, config(tiny_npy, epochs=6), tmp_path / "run", device="cpu")
    bounds = [row["valid_bound"] for row in run.history]
    assert len(bounds) == 6 and all(math.isfinite(b) for b in bounds)
    assert bounds[-1] > bounds[0] + 2.0, bounds
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3, 4, 5, 6]
    figures = {p.name for p in (tmp_path / "run" / "figures").iterdir()}
    assert {"curves.png", "samples-epoch0000.png", "samples-epoch0003.png", "samples-epoch0006.png",
            "reconstructions.png", "manifold.png"} <= figures


def test_kl_warmup_and_beta_scale_the_objective(tiny_npy, tmp_path):
    run = fit("vae", SMALL, config(tiny_npy, epochs=2, kl_warmup=2.0, beta=0.5), tmp_path / "r", device="cpu")
    weights = [row["kl_weight"] for row in run.history]
    assert 0 < weights[0] < weights[1] <= 0.5


def test_resume_after_a_finished_stage_matches_an_uninterrupted_run(tiny_npy, tmp_path):
    full = fit("vae", SMALL, config(tiny_npy, epochs=4), tmp_path / "full", device="cpu")
    fit("vae", SMALL, config(tiny_npy, epochs=2), tmp_path / "part", device="cpu")
    resumed = resume(tmp_path / "part", epochs=4, device="cpu")
    strip = lambda rows: [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in rows]
    assert strip(resumed.history) == strip(full.history)
    for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_resume_after_an_interruption_mid_epoch_matches(tiny_npy, tmp_path, monkeypatch, signum):
    """Ctrl-C and SIGTERM alike: the step under way finishes, the state is saved, and the
    resumed run is the uninterrupted one."""
    full = fit("vae", SMALL, config(tiny_npy, epochs=3), tmp_path / "full", device="cpu")
    original = signal_during_batch(monkeypatch, 12, signum)  # the 3rd batch of epoch 2 (9 batches an epoch)
    with pytest.raises(Interrupted, match="resume=True") as stopped:
        fit("vae", SMALL, config(tiny_npy, epochs=3), tmp_path / "cut", device="cpu")
    assert stopped.value.exit_code == 128 + signum
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handlers are put back
    monkeypatch.setattr(Dataset, "train_batches", original)
    state = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert (state["epoch"], state["batch"]) == (1, 3)  # the step under way finished
    resumed = resume(tmp_path / "cut", device="cpu")
    strip = lambda rows: [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in rows]
    assert strip(resumed.history) == strip(full.history)


def test_curves_are_redrawn_at_most_every_so_often_and_at_the_end(tiny_npy, tmp_path, monkeypatch):
    """Drawing curves.png costs a tenth of an MNIST epoch: with a long interval it is drawn
    after the first epoch and the last only, with none every epoch, and at a stop."""
    from pyro_vae import plots, train

    drawn = []
    monkeypatch.setattr(plots, "bound_curves", lambda history, path, title: drawn.append(len(history)))
    monkeypatch.setattr(train, "CURVES_SECONDS", 1e9)
    fit("vae", SMALL, config(tiny_npy, epochs=4, figures="every"), tmp_path / "long", device="cpu")
    assert drawn == [1, 4]
    drawn.clear()
    resume(tmp_path / "long", epochs=6, device="cpu")  # a new session draws its first epoch too
    assert drawn == [5, 6]
    drawn.clear()
    monkeypatch.setattr(train, "CURVES_SECONDS", 0.0)
    fit("vae", SMALL, config(tiny_npy, epochs=3, figures="every"), tmp_path / "every", device="cpu")
    assert drawn == [1, 2, 3]

    drawn.clear()
    monkeypatch.setattr(train, "CURVES_SECONDS", 1e9)
    signal_during_batch(monkeypatch, 21, signal.SIGINT)  # during epoch 3 (9 batches an epoch)
    with pytest.raises(Interrupted):
        fit("vae", SMALL, config(tiny_npy, epochs=5, figures="every"), tmp_path / "cut", device="cpu")
    assert drawn == [1, 2]  # after epoch 1, and at the stop with the two finished epochs


def _figure_files(run):
    return {p.name: p.read_bytes() for p in (run / "figures").iterdir()} if (run / "figures").is_dir() else {}


def test_figures_at_the_end_are_the_ones_drawn_along_the_way(tiny_npy, tmp_path, monkeypatch):
    """--figures end draws nothing while the epochs run, and leaves the same files, byte for
    byte, as --figures every; --figures none draws nothing and trains the same weights."""
    from pyro_vae import plots

    events = []
    for name in ("bound_curves", "image_grid", "reconstructions"):
        def spy(*args, _name=name, _draw=getattr(plots, name), **kwargs):
            events.append(_name)
            return _draw(*args, **kwargs)
        monkeypatch.setattr(plots, name, spy)
    runs = {}
    for when in ("every", "end", "none"):
        events.append(when)
        # the same folder name in each: it is the curves' title
        runs[when] = fit("vae", SMALL, config(tiny_npy, epochs=4, figures=when), tmp_path / when / "run", device="cpu",
                         log=lambda line: events.append("epoch") if line.startswith("epoch ") else None)
    every, end, none = (events[events.index(w) + 1 : events.index(n) if n else None]
                        for w, n in (("every", "end"), ("end", "none"), ("none", None)))
    assert every[0] == "image_grid" and every.count("epoch") == 4 and every[-1] != "epoch"
    assert "bound_curves" in every[: every.index("epoch", 2)]  # drawn during the run, after epoch 1
    assert end[:4] == ["epoch"] * 4 and set(end[4:]) == {"image_grid", "bound_curves", "reconstructions"}
    assert none == ["epoch"] * 4
    assert end.count("image_grid") == every.count("image_grid") >= 3
    assert _figure_files(tmp_path / "end" / "run") == _figure_files(tmp_path / "every" / "run")
    assert {"curves.png", "samples-epoch0000.png", "samples-epoch0002.png", "samples-epoch0004.png",
            "reconstructions.png", "manifold.png"} <= set(_figure_files(tmp_path / "end" / "run"))
    assert _figure_files(tmp_path / "none" / "run") == {}
    strip = lambda rows: [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in rows]  # noqa: E731
    assert strip(runs["none"].history) == strip(runs["every"].history) == strip(runs["end"].history)
    for a, b in zip(runs["none"].model.state_dict().values(), runs["every"].model.state_dict().values()):
        assert torch.equal(a, b)


def test_figures_kept_for_the_end_are_drawn_at_a_stop(tiny_npy, tmp_path, monkeypatch):
    """A run stopped with --figures end still leaves its samples before training and the
    curves of its finished epochs; the resumed run, the rest. A config.json written before
    the option existed resumes with the default."""
    signal_during_batch(monkeypatch, 12, signal.SIGINT)  # during epoch 2 (9 batches an epoch)
    with pytest.raises(Interrupted):
        fit("vae", SMALL, config(tiny_npy, epochs=4, figures="end"), tmp_path / "cut", device="cpu")
    assert set(_figure_files(tmp_path / "cut")) == {"samples-epoch0000.png", "curves.png"}
    written = json.loads((tmp_path / "cut" / "config.json").read_text())
    assert written["train"]["figures"] == "end"
    del written["train"]["figures"]
    (tmp_path / "cut" / "config.json").write_text(json.dumps(written))
    monkeypatch.undo()
    resumed = resume(tmp_path / "cut", device="cpu")
    assert resumed.train.figures == TrainConfig().figures
    assert {"samples-epoch0002.png", "samples-epoch0004.png", "reconstructions.png"} <= set(_figure_files(tmp_path / "cut"))


@pytest.mark.filterwarnings("ignore:Encountered NaN")
def test_a_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(tiny_npy, tmp_path):
    def poison(line):
        if line.startswith("epoch 2/"):
            with torch.no_grad():
                for p in run_model["model"].parameters():
                    p.fill_(float("nan"))

    run_model = {}
    original_init = VAE.init_from_data

    def remember(self, data, seed):
        run_model["model"] = self
        original_init(self, data, seed)

    VAE.init_from_data = remember
    try:
        with pytest.raises(TrainingDiverged, match="epoch 3.*end of epoch 2"):
            fit("vae", SMALL, config(tiny_npy, epochs=4), tmp_path / "nan", device="cpu", log=poison)
    finally:
        VAE.init_from_data = original_init
    good = load_run(tmp_path / "nan")
    assert all(torch.isfinite(p).all() for p in good.model.parameters())
    assert len(good.history) == 2
    state = torch.load(tmp_path / "nan" / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 2


def test_resume_of_a_finished_run_says_how_to_extend(tiny_npy, tmp_path):
    fit("vae", SMALL, config(tiny_npy, epochs=1), tmp_path / "done", device="cpu")
    with pytest.raises(RunError, match="epochs='N'") as refused:
        resume(tmp_path / "done", device="cpu")
    assert "--" not in str(refused.value) and "--epochs N" in refused.value.cli_message()


# the families with a density: the GAN's valid_bound is its game's value, not a bound (tests/test_gan.py)
PAIRS = [(name, objective) for name, cls in sorted(MODELS.items()) if cls.has_density for objective in cls.objectives]


# small networks for the tiny 8x8 data; the SSVAE, ADGM and M1+M2 with four classes and two labels each
# (M1+M2 trains its small M1 for two epochs first)
SMALL_CONFIGS = {"ssvae": {**SMALL, "classifier_hidden": (16,), "classes": 4, "labels": 8},
                 "adgm": {**SMALL, "classifier_hidden": (16,), "classes": 4, "labels": 8, "a_dim": 2},
                 "m1m2": {**SMALL, "classifier_hidden": (16,), "classes": 4, "labels": 8, "m1_z_dim": 4,
                          "m1_hidden": (16,), "m1_epochs": 2},
                 "sbn": {"layers": (16,)},
                 "draw": {"steps": 2, "hidden": 16, "z_dim": 2, "read_size": 2, "write_size": 3},
                 # the text families, on a corpus of short sentences
                 "sentence-vae": {"z_dim": 2, "embed": 8, "hidden": 16}, "rnnlm": {"embed": 8, "hidden": 16}}


@pytest.fixture
def tiny_data(request, tiny_labelled):
    """The tiny data of the kind the test's family models: labelled images, or text."""
    if MODELS[request.getfixturevalue("model_name")].data_kind == "text":
        return request.getfixturevalue("tiny_text")
    return tiny_labelled


@pytest.mark.parametrize("model_name,objective", PAIRS)
def test_every_model_trains_with_each_of_its_objectives(model_name, objective, tiny_data, tmp_path):
    train = config(tiny_data, epochs=3, objective=objective, particles=OBJECTIVES[objective].fixed_particles or 2)
    run = fit(model_name, SMALL_CONFIGS.get(model_name, SMALL), train, tmp_path / "run", device="cpu")
    bounds = [row["valid_bound"] for row in run.history]
    assert bounds[-1] > bounds[0], bounds


@pytest.mark.parametrize("model_name,objective",
                         [(n, o) for n, cls in sorted(MODELS.items()) for o in sorted(OBJECTIVES)
                          if o not in cls.objectives])
def test_an_objective_a_model_cannot_use_is_refused_before_training(model_name, objective, tiny_data, tmp_path):
    with pytest.raises(ConfigError, match=f"{model_name} cannot be trained with objective='{objective}'"):
        fit(model_name, SMALL_CONFIGS.get(model_name, SMALL), config(tiny_data, objective=objective),
            tmp_path / "run", device="cpu")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("objective", ["iwae", "renyi"])
@pytest.mark.parametrize("extra", [{"beta": 0.5}, {"kl_warmup": 2.0}])
def test_importance_weighted_objectives_refuse_a_kl_weight(objective, extra, tiny_npy, tmp_path):
    with pytest.raises(ConfigError, match="importance-weighted bound.*beta and kl_warmup"):
        fit("vae", SMALL, config(tiny_npy, objective=objective, particles=5, **extra), tmp_path / "r", device="cpu")


def test_fit_twice_from_python_with_overwrite(tiny_npy, tmp_path):
    """A notebook cell run again: refused with the Python wording, then replaced."""
    first = fit("vae", SMALL, config(tiny_npy, epochs=1), tmp_path / "nb", device="cpu")
    with pytest.raises(RunError, match="overwrite=True") as refused:
        fit("vae", SMALL, config(tiny_npy, epochs=1), tmp_path / "nb", device="cpu")
    assert "--" not in str(refused.value)
    second = fit("vae", SMALL, config(tiny_npy, epochs=2), tmp_path / "nb", device="cpu", overwrite=True)
    assert len(first.history) == 1 and len(second.history) == 2
    assert len(load_run(tmp_path / "nb").history) == 2


def test_fit_with_resume_continues_or_starts(tiny_npy, tmp_path):
    a = fit("vae", SMALL, config(tiny_npy, epochs=1), tmp_path / "r", device="cpu", resume=True)  # starts
    b = fit("vae", SMALL, config(tiny_npy, epochs=2), tmp_path / "r", device="cpu", resume=True)  # continues
    assert [row["epoch"] for row in b.history] == [1, 2] and b.history[0] == a.history[0]


def test_overwrite_never_removes_a_folder_that_is_not_a_run(tiny_npy, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(RunError, match="not a run directory"):
        fit("vae", SMALL, config(tiny_npy, epochs=1), tmp_path / "mine", device="cpu", overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_a_run_that_failed_before_its_first_checkpoint_can_be_restarted(tiny_npy, tmp_path, monkeypatch):
    def fail(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(Dataset, "train_batches", fail)
    with pytest.raises(OSError):
        fit("vae", SMALL, config(tiny_npy, epochs=1), tmp_path / "f", device="cpu")
    monkeypatch.undo()
    (tmp_path / "f" / ".checkpoint.pt.abc.tmp").write_bytes(b"half")  # what a kill leaves
    with pytest.raises(RunError, match="no checkpoint.*overwrite=True"):
        resume(tmp_path / "f", device="cpu")
    with pytest.raises(RunError, match="before its first checkpoint.*overwrite=True"):
        fit("vae", SMALL, config(tiny_npy, epochs=1), tmp_path / "f", device="cpu")
    run = fit("vae", SMALL, config(tiny_npy, epochs=1), tmp_path / "f", device="cpu", overwrite=True)
    assert len(run.history) == 1 and not list((tmp_path / "f").glob("*.tmp"))


def test_stale_temporary_files_are_removed_at_the_next_start(tiny_npy, tmp_path):
    fit("vae", SMALL, config(tiny_npy, epochs=1), tmp_path / "t", device="cpu")
    stale = tmp_path / "t" / ".checkpoint.pt.x1y2.tmp"
    stale.write_bytes(b"left by kill -9")
    resume(tmp_path / "t", epochs=2, device="cpu")
    assert not stale.exists()


LOCK_HOLDER = """
import sys, time
from pyro_vae.runs import RunDir
run = RunDir(sys.argv[1])
run.lock()
print("locked", flush=True)
time.sleep(60)
"""


def test_a_lock_stops_a_second_process_and_a_dead_one_holds_nothing(tiny_npy, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    fit("vae", SMALL, config(tiny_npy, epochs=1), tmp_path / "l", device="cpu")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(tmp_path / "l")], stdout=subprocess.PIPE,
                              text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = (tmp_path / "l" / "checkpoint.pt").read_bytes()
        with pytest.raises(RunError, match=f"another process.*pid {holder.pid}"):
            resume(tmp_path / "l", epochs=2, device="cpu")
        assert (tmp_path / "l" / "checkpoint.pt").read_bytes() == before
    finally:
        holder.kill()  # as a crash would: the lock goes with the process
        holder.wait()
    assert len(resume(tmp_path / "l", epochs=2, device="cpu").history) == 2


def test_burda_schedule_stages_rates_eps_and_exact_resume(tiny_npy, tmp_path):
    """3^i epochs at lr x 10^(-i/7): epoch 1 at lr, epochs 2-4 one stage down, 5-13 two;
    Adam's eps 1e-4; a run stopped inside a stage continues on the same rates."""
    from pyro_vae.train import burda_stage

    stages = [burda_stage(e) for e in range(3281)]
    assert [stages.count(i) for i in range(8)] == [1, 3, 9, 27, 81, 243, 729, 2187 + 1]
    assert stages[:14] == [0, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2, 3] and burda_stage(10**6) == 7
    train = config(tiny_npy, epochs=6, lr=1e-3, lr_schedule="burda")
    straight = fit("vae", SMALL, train, tmp_path / "a", device="cpu")
    expected = [1e-3 * 10 ** (-i / 7) for i in (0, 1, 1, 1, 2, 2)]
    assert [row["lr"] for row in straight.history] == pytest.approx(expected, rel=1e-12)
    state = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    assert state["optimizer"]["param_groups"][0]["eps"] == 1e-4
    fit("vae", SMALL, TrainConfig(**{**train.__dict__, "epochs": 3}), tmp_path / "b", device="cpu")
    resumed = resume(tmp_path / "b", epochs=6, device="cpu")
    for k, v in straight.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    assert [row["lr"] for row in resumed.history] == [row["lr"] for row in straight.history]


@pytest.mark.parametrize("kw,fragment", [({"lr_schedule": "burda", "lr_decay": 0.9}, "lr_decay must be 1 with"),
                                         ({"lr_schedule": "cosine"}, "unknown lr_schedule 'cosine'")])
def test_a_schedule_that_cannot_apply_is_refused(tiny_npy, tmp_path, kw, fragment):
    with pytest.raises(ConfigError, match=fragment):
        fit("vae", SMALL, config(tiny_npy, **kw), tmp_path / "run", device="cpu")
    assert not (tmp_path / "run").exists()


def test_cli_refuses_a_decay_beside_the_burda_schedule(tiny_npy, tmp_path):
    from test_cli import FAST, assert_clean_error, invoke

    assert_clean_error(invoke("fit", "vae", "--dataset", tiny_npy, "--run-dir", tmp_path / "r", "--lr-schedule",
                              "burda", "--lr-decay", 0.9, *FAST), "--lr-decay must be 1 with --lr-schedule burda")
    assert not (tmp_path / "r").exists()


def test_resolve_fills_the_family_defaults_and_touches_nothing(tmp_path, monkeypatch):
    from pyro_vae import resolve

    monkeypatch.chdir(tmp_path)
    iwae = resolve("iwae", None, TrainConfig(dataset="tiny.npy"))
    assert (iwae.train.objective, iwae.train.particles) == (MODELS["iwae"].default_objective, 5)
    assert iwae.train.binarize is None and iwae.train.dataset == str(tmp_path / "tiny.npy")
    assert resolve("vae", {"guide": "planar"}).train.objective == "trace"
    grey = resolve("vae", VAEConfig(likelihood="gaussian"), TrainConfig(binarize=None))
    assert grey.train.binarize == "none" and grey.model_config.likelihood == "gaussian" and grey.data is None
    asked = TrainConfig(objective="trace", particles=3, binarize="threshold")
    assert resolve("vae", {}, asked).train == asked  # what is asked for stays
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ConfigError, match="must be at least 1"):
        resolve("vae", {}, TrainConfig(epochs=0))


def test_config_json_is_the_run_config_and_reads_back(tiny_npy, tmp_path):
    from pyro_vae import RunConfig
    from pyro_vae.runs import RunDir

    run = fit("gmvae", {"z_dim": 2, "hidden": (8,), "components": 3}, TrainConfig(dataset=str(tiny_npy), epochs=1,
              eval_size=20), tmp_path / "run", device="cpu")
    on_disk = json.loads((tmp_path / "run" / "config.json").read_text())
    assert on_disk == json.loads(json.dumps(run.config.to_json())) and set(on_disk) == {"model", "model_config", "train", "data"}
    assert RunConfig.read(RunDir(tmp_path / "run")) == run.config == load_run(tmp_path / "run").config
    assert run.data_info == {"name": run.config.data.name, "x_dim": 64, "binarize": "none", "image_shape": [1, 8, 8]}


def test_eval_every_scores_some_epochs_and_trains_the_same_weights(tiny_npy, tmp_path):
    """--eval-every N scores epochs N, 2N, ... and the last; the others hold the training
    objective only. The weights, the training objective and the scored rows are those of a
    run scored every epoch, and best.pt is the best of the scored epochs."""
    every = fit("vae", SMALL, config(tiny_npy, epochs=5), tmp_path / "every", device="cpu")
    sparse = fit("vae", SMALL, config(tiny_npy, epochs=5, eval_every=2), tmp_path / "sparse", device="cpu")
    assert [("valid_bound" in row) for row in sparse.history] == [False, True, False, True, True]
    timeless = lambda row: {k: v for k, v in row.items() if not k.endswith("seconds")}  # noqa: E731
    for a, b in zip(every.history, sparse.history):
        assert timeless(b) == {k: v for k, v in timeless(a).items() if k in b}
        assert b["train_loss"] == a["train_loss"]
    for a, b in zip(every.model.state_dict().values(), sparse.model.state_dict().values()):
        assert torch.equal(a, b)
    scored = [row for row in sparse.history if "valid_bound" in row]
    best = max(scored, key=lambda row: row["valid_bound"])["epoch"]
    assert torch.load(tmp_path / "sparse" / "best.pt", weights_only=True)["epoch"] == best
    assert (tmp_path / "sparse" / "figures" / "curves.png").is_file()
    header = (tmp_path / "sparse" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "valid_bound" in header


def test_eval_every_may_change_on_resume_and_nothing_else_does(tiny_npy, tmp_path):
    """A resumed run may score more or less often: the weights are those of the same run
    left alone; the refusal of other changes names both options that may change."""
    full = fit("vae", SMALL, config(tiny_npy, epochs=5), tmp_path / "full", device="cpu")
    fit("vae", SMALL, config(tiny_npy, epochs=2), tmp_path / "cut", device="cpu")
    resumed = resume(tmp_path / "cut", epochs=5, eval_every=2, device="cpu")
    assert [("valid_bound" in row) for row in resumed.history] == [True, True, False, True, True]
    assert [row["train_loss"] for row in resumed.history] == [row["train_loss"] for row in full.history]
    for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    assert json.loads((tmp_path / "cut" / "config.json").read_text())["train"]["eval_every"] == 2
    with pytest.raises(ConfigError, match="eval_every"):
        resume(tmp_path / "cut", epochs=9, eval_every=0, device="cpu")


def test_adam_beta1_reaches_the_optimizer_and_resume_keeps_it(tiny_npy, tmp_path):
    """--adam-beta1 sets Adam's first beta (the default is torch's 0.9), saved with the
    optimizer, so a resumed run goes on with it; another beta1 trains to other weights."""
    def betas(run):
        state = torch.load(run / "checkpoint.pt", weights_only=True)
        return tuple(state["optimizer"]["param_groups"][0]["betas"])

    plain = fit("vae", SMALL, config(tiny_npy, epochs=1), tmp_path / "plain", device="cpu")
    fit("vae", SMALL, config(tiny_npy, epochs=1, adam_beta1=0.5), tmp_path / "half", device="cpu")
    assert betas(tmp_path / "plain") == (0.9, 0.999) and betas(tmp_path / "half") == (0.5, 0.999)
    resumed = resume(tmp_path / "half", epochs=2, device="cpu")
    assert betas(tmp_path / "half") == (0.5, 0.999) and len(resumed.history) == 2
    assert plain.history[0]["valid_bound"] != resumed.history[0]["valid_bound"]


@pytest.mark.parametrize("value", ["1", "1.5", "-0.1", "nan"])
def test_cli_refuses_a_beta1_outside_0_1(tiny_npy, tmp_path, value):
    from helpers import FAST, assert_clean_error, invoke

    assert_clean_error(invoke("fit", "vae", "--dataset", tiny_npy, "--run-dir", tmp_path / "r", "--adam-beta1",
                              value, *FAST), "--adam-beta1")
    assert not (tmp_path / "r").exists()
