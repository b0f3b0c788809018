"""Pyro's own tools on our pairs: ``SVI`` with a ``pyro.optim`` optimizer, Pyro's
``ELBOModule`` with a torch optimizer and the library's own step train every family alike;
importing and using the package leaves a user's other Pyro code as it was; two models
never share a weight; a parameter store that would make ``SVI`` train nothing is refused
in one line."""

import copy
import json
import os
import subprocess
import sys

import pyro
import pytest
import torch
from pyro.infer import SVI, Predictive, Trace_ELBO

from pyro_vae import MODELS, VAE, CompiledLoss, build_model, load_dataset, make_objective
from pyro_vae.models.base import Family
from pyro_vae.pair import ParameterStoreClash, PairFunction
from pyro_vae.objectives import objective_spec
from pyro_vae.train import make_optimizer

from helpers import FAMILY, NET_FAMILIES, NETS, PAIR_FAMILIES, REPO, SHAPE, TEXT_FAMILY, labelled_npz

LR = 1e-2
STEPS = 4
CASES = [(name, objective) for name in PAIR_FAMILIES for objective in MODELS[name].objectives]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return load_dataset(str(labelled_npz(tmp_path_factory.mktemp("data"))), valid_fraction=0.1)


@pytest.fixture(scope="module")
def text_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    words = "the cat dog sat on a mat ran".split()
    rng = torch.Generator().manual_seed(0)
    path.write_text("\n".join(" ".join(words[i] for i in torch.randint(0, 8, (int(n),), generator=rng))
                              for n in torch.randint(1, 7, (100,), generator=rng)))
    return load_dataset(str(path))


def initialised(name: str, data) -> Family:
    torch.manual_seed(0)
    if MODELS[name].data_kind == "text":
        model = build_model(name, data.x_dim, TEXT_FAMILY[name])
        model.init_from_data(data, seed=0)
        return model
    model = build_model(name, SHAPE, {**NETS, **FAMILY.get(name, {})})
    model.init_from_data(data, seed=0)
    return model


def objective_for(name: str, objective: str):
    return make_objective(objective, objective_spec(objective).fixed_particles or max(2, MODELS[name].default_particles),
                          alpha=0.5)


def train_ours(model: Family, objective, batches) -> None:
    """The library loop's step: ``CompiledLoss`` (compiled where it can be) and its Adam."""
    step, optimizer = CompiledLoss(model, objective), make_optimizer(model.parameters(), LR)
    for batch in batches:
        optimizer.zero_grad()
        step(batch, 1.0).backward()
        optimizer.step()


def train_svi(model: Family, objective, batches) -> None:
    svi = SVI(model.model, model.guide, pyro.optim.Adam({"lr": LR}), objective)
    for batch in batches:
        args, kwargs = model.pair_arguments(batch)
        svi.step(*args, **kwargs)


def train_elbo_module(model: Family, objective, batches) -> None:
    loss = objective(model.model, model.guide)  # Pyro's ELBOModule
    optimizer = torch.optim.Adam(loss.parameters(), lr=LR)
    for batch in batches:
        args, kwargs = model.pair_arguments(batch)
        optimizer.zero_grad()
        loss(*args, **kwargs).backward()
        optimizer.step()


@pytest.mark.parametrize("name,objective", CASES)
def test_svi_elbo_module_and_our_loop_give_the_same_training(name, objective, data, text_data):
    data = text_data if MODELS[name].data_kind == "text" else data
    start = initialised(name, data)
    batches = list(start.training_batches(data, 20, epoch=0, seed=0, device="cpu"))[:STEPS]
    trained = []
    for train in (train_ours, train_svi, train_elbo_module):
        model = copy.deepcopy(start)
        torch.manual_seed(1)
        train(model, objective_for(name, objective), batches)
        trained.append(dict(model.named_parameters()))
    ours, *others = trained
    moved = [n for n, p in start.named_parameters() if p.requires_grad and not torch.equal(p, ours[n])]
    assert len(moved) >= len([p for p in start.parameters() if p.requires_grad]) // 2, moved
    for other in others:
        for n, p in ours.items():
            torch.testing.assert_close(other[n], p, rtol=1e-4, atol=1e-5, msg=n)


def test_our_loop_leaves_pyros_parameter_store_empty(data):
    pyro.clear_param_store()
    model = initialised("ssvae", data)
    batches = list(model.training_batches(data, 20, epoch=0, seed=0, device="cpu"))[:2]
    train_ours(model, objective_for("ssvae", "enum"), batches)
    assert list(pyro.get_param_store().keys()) == []


def test_two_models_never_share_a_weight_and_clearing_the_store_keeps_training():
    pyro.clear_param_store()
    torch.manual_seed(0)
    a, b = VAE(16, VAE.Config(z_dim=2, hidden=(8,))), VAE(16, VAE.Config(z_dim=2, hidden=(8,)))
    assert a._pyro_name != b._pyro_name
    b_before = copy.deepcopy(b.state_dict())
    x = torch.bernoulli(torch.full((10, 16), 0.3))
    svi = SVI(a.model, a.guide, pyro.optim.Adam({"lr": LR}), Trace_ELBO())
    svi.step(x)
    store = pyro.get_param_store()
    assert {id(store[k]) for k in store.keys()} == {id(p) for p in a.parameters()}
    pyro.clear_param_store()  # forgets the names; the model keeps its weights and trains on
    kept = copy.deepcopy(a.state_dict())
    assert all(torch.equal(v, a.state_dict()[k]) for k, v in kept.items())
    svi.step(x)
    assert all(not torch.equal(v, a.state_dict()[k]) for k, v in kept.items() if k.endswith("weight"))
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in b_before.items())
    SVI(b.model, b.guide, pyro.optim.Adam({"lr": LR}), Trace_ELBO()).step(x)
    names = list(pyro.get_param_store().keys())
    assert any(n.startswith(a._pyro_name + ".") for n in names) and any(n.startswith(b._pyro_name + ".") for n in names)


def test_a_copy_is_a_model_of_its_own():
    model = VAE(16, VAE.Config(z_dim=2, hidden=(8,)))
    twin = copy.deepcopy(model)
    assert twin._pyro_name != model._pyro_name
    assert isinstance(twin.model, PairFunction) and twin.model.family is twin and twin.guide.family is twin


@pytest.mark.parametrize("foreign", ["loaded", "other model"])
def test_a_store_holding_other_tensors_under_the_models_name_is_refused_in_one_line(foreign):
    pyro.clear_param_store()
    model = VAE(16, VAE.Config(z_dim=2, hidden=(8,)))
    x = torch.bernoulli(torch.full((10, 16), 0.3))
    svi = SVI(model.model, model.guide, pyro.optim.Adam({"lr": LR}), Trace_ELBO())
    svi.step(x)
    store = pyro.get_param_store()
    if foreign == "loaded":  # what a store saved by another process and loaded here holds
        state = {k: v.detach().clone() for k, v in store.items()}
        pyro.clear_param_store()
        for k, v in state.items():
            pyro.param(k, v)
    else:
        other = VAE(16, VAE.Config(z_dim=2, hidden=(8,)))
        name = next(iter(store.keys()))
        store._params[name] = next(other.parameters())
    with pytest.raises(ParameterStoreClash) as error:
        svi.step(x)
    assert "\n" not in str(error.value) and model._pyro_name in str(error.value)
    assert "pyro.clear_param_store()" in str(error.value)
    pyro.clear_param_store()
    svi.step(x)  # and then it trains


def test_module_local_parameters_set_by_the_user_train_through_elbo_module():
    pyro.clear_param_store()
    was = pyro.settings.get("module_local_params")
    try:
        model = VAE(16, VAE.Config(z_dim=2, hidden=(8,)))  # built before the setting too
        pyro.settings.set(module_local_params=True)
        x = torch.bernoulli(torch.full((10, 16), 0.3))
        before = copy.deepcopy(model.state_dict())
        train_elbo_module(model, make_objective("trace"), [(x,)] * 3)
        assert all(not torch.equal(v, model.state_dict()[k]) for k, v in before.items() if k.endswith("weight"))
        assert list(pyro.get_param_store().keys()) == []
    finally:
        pyro.settings.set(module_local_params=was)


def test_predictive_and_poutine_trace_run_on_the_pair():
    model = VAE(16, VAE.Config(z_dim=2, hidden=(8,)))
    x = torch.bernoulli(torch.full((5, 16), 0.3))
    draws = Predictive(model.model, guide=model.guide, num_samples=3)(x)
    assert draws["z"].shape == (3, 5, 2) and draws["x"].shape == (3, 5, 16)
    trace = pyro.poutine.trace(model.guide).get_trace(x)
    assert trace.nodes["z"]["value"].shape == (5, 2)


USER_CODE = r"""
import json, sys
import pyro, torch
import pyro.distributions as dist
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal
from pyro.nn import PyroModule, PyroSample


def regression():
    # a user's own Bayesian regression, as in Pyro's tutorials
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    x = torch.randn(200, 1)
    y = 3 * x[:, 0] + 1 + 0.1 * torch.randn(200)
    linear = PyroModule[torch.nn.Linear](1, 1)
    linear.weight = PyroSample(dist.Normal(0.0, 10.0).expand([1, 1]).to_event(2))
    linear.bias = PyroSample(dist.Normal(0.0, 10.0).expand([1]).to_event(1))

    def model(x, y=None):
        sigma = pyro.sample("sigma", dist.Uniform(0.0, 1.0))
        mean = linear(x).squeeze(-1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("obs", dist.Normal(mean, sigma), obs=y)

    guide = AutoNormal(model)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    for _ in range(300):
        svi.step(x, y)
    return {k: v.detach().flatten().tolist() for k, v in guide.median().items()}


def state():
    from pyro.poutine.util import is_validation_enabled
    return {"settings": {k: repr(v) for k, v in pyro.settings.get().items()},
            "validation": is_validation_enabled(), "store": sorted(pyro.get_param_store().keys())}


before = regression()
state_before = state()
import numpy as np
import pyro_vae
from pyro_vae import TrainConfig, VAEConfig, estimate_bounds, fit
after_import = state()
np.save(sys.argv[1] + "/x.npy", (np.random.default_rng(0).random((120, 16)) < 0.3).astype(np.float32))
run = fit("vae", VAEConfig(z_dim=2, hidden=(8,)), TrainConfig(dataset=sys.argv[1] + "/x.npy", epochs=1, batch_size=20,
          eval_size=20), run_dir=sys.argv[1] + "/run", progress=False, log=lambda m: None)
estimate_bounds(run.model.model, run.model.guide, torch.bernoulli(torch.full((4, 16), 0.3)), 8, compile=True)
after_use = state()
print(json.dumps({"before": before, "again": regression(), "states": [state_before, after_import, after_use]}))
"""


def test_importing_and_using_the_package_leaves_a_users_pyro_code_as_it_was(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    out = subprocess.run([sys.executable, "-c", USER_CODE, str(tmp_path)], capture_output=True, text=True,
                         env=env, cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["again"] == result["before"]  # the same training, to the bit
    assert result["before"]["weight"][0] == pytest.approx(3.0, abs=0.1)
    assert result["before"]["bias"][0] == pytest.approx(1.0, abs=0.1)
    first, *later = result["states"]
    assert all(state == first for state in later)


@pytest.mark.parametrize("name", NET_FAMILIES)
def test_images_off_the_likelihoods_support_are_refused_in_one_line_from_svi(name, data):
    from pyro_vae.errors import DataError

    model = initialised(name, data)
    grey = torch.rand(10, model.x_dim)
    svi = SVI(model.model, model.guide, pyro.optim.Adam({"lr": LR}), objective_for(name, model.default_objective))
    with pytest.raises(DataError) as error:
        svi.step(grey)
    assert "\n" not in str(error.value) and "not binary" in str(error.value)
    svi.step(torch.bernoulli(grey))  # binary images train


def test_the_gmvaes_marginal_model_trains_with_svi_too():
    from pyro_vae import GMVAE

    pyro.clear_param_store()
    model = GMVAE(16, GMVAE.Config(z_dim=2, hidden=(8,), components=3))
    x = torch.bernoulli(torch.full((10, 16), 0.3))
    before = copy.deepcopy(model.state_dict())
    svi = SVI(model.marginal_model, model.guide, pyro.optim.Adam({"lr": LR}), Trace_ELBO())
    svi.step(x)
    assert isinstance(model.marginal_model, PairFunction)
    assert not torch.equal(before["decoder.net.0.weight"], model.state_dict()["decoder.net.0.weight"])


def test_a_whole_model_pickles_and_its_copy_trains_on_its_own(tmp_path):
    model = VAE(16, VAE.Config(z_dim=2, hidden=(8,)))
    torch.save(model, tmp_path / "vae.pt")
    copy_ = torch.load(tmp_path / "vae.pt", weights_only=False)
    assert copy_._pyro_name != model._pyro_name and copy_.model.family is copy_
    x = torch.bernoulli(torch.full((10, 16), 0.3))
    before = copy.deepcopy(model.state_dict())
    SVI(copy_.model, copy_.guide, pyro.optim.Adam({"lr": LR}), Trace_ELBO()).step(x)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert not all(torch.equal(v, copy_.state_dict()[k]) for k, v in before.items())


def test_svi_under_module_local_parameters_is_refused_in_one_line():
    from pyro_vae.pair import ModuleLocalSVI

    was = pyro.settings.get("module_local_params")
    try:
        pyro.settings.set(module_local_params=True)
        model = VAE(16, VAE.Config(z_dim=2, hidden=(8,)))
        x = torch.bernoulli(torch.full((10, 16), 0.3))
        with pytest.raises(ModuleLocalSVI) as error:
            SVI(model.model, model.guide, pyro.optim.Adam({"lr": LR}), Trace_ELBO()).step(x)
        assert "\n" not in str(error.value) and "torch.optim.Adam(loss.parameters())" in str(error.value)
        Predictive(model.model, guide=model.guide, num_samples=2)(x)  # what needs no optimizer still runs
    finally:
        pyro.settings.set(module_local_params=was)
