"""The compiled path: traced objective and evaluator chunk against eager code.

Same generator state in, the same loss and gradients out: bit for bit where the guide
enumerates nothing; within 1e-5 of each gradient's largest entry where it does (Pyro's
TraceEnum_ELBO takes another path for a traced plate size). The fallbacks are taken and
said.
"""

import pyro
import pytest
import torch

from pyro_vae import MODELS, TrainConfig, build_model, estimate_bounds, fit, load_run, make_objective
from pyro_vae.compiled import Compiled, CompiledLoss, traceable_pyro
from pyro_vae.models.vae import VAE

from helpers import FAMILY, NETS, PAIR_FAMILIES, TEXT_FAMILY, TEXT_VOCAB, invoke, toy_images, toy_sentences

CASES = [(family, objective, "mlp", "diagonal") for family in PAIR_FAMILIES
         for objective in MODELS[family].objectives if objective not in ("dreg", "wake-sleep")]
CASES += [("vae", "meanfield", "conv", "diagonal"), ("gmvae", "enum", "conv", "diagonal"),
          ("ssvae", "enum", "conv", "diagonal"), ("vae", "trace", "mlp", "iaf"), ("iwae", "iwae", "mlp", "planar")]


def family(name, net="mlp", guide="diagonal", **extra):
    if MODELS[name].data_kind == "text":
        return build_model(name, TEXT_VOCAB, {**TEXT_FAMILY[name], **extra})
    return build_model(name, (1, 8, 8), {**NETS, **FAMILY.get(name, {}), "encoder": net, "decoder": net,
                                         "guide": guide, "flow_length": 2, **extra})


def batches(model, n=3, size=12, seed=0):
    if model.data_kind == "text":
        return [(x,) for x in toy_sentences(n * size, seed=seed).view(n, size, -1)]
    x, y = toy_images(n * size, seed=seed, binary=True)
    x, y = x.view(n, size, -1), y.view(n, size)
    if model.has_classes:
        return [(x[i], x[i, :4], y[i, :4], 2.5) for i in range(n)]
    return [(x[i],) for i in range(n)]


def loss_and_grads(loss, model):
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return loss.detach(), [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def assert_same(a, b, exact):
    (la, ga), (lb, gb) = a, b
    if exact:
        assert torch.equal(la, lb) and all(torch.equal(x, y) for x, y in zip(ga, gb))
    else:
        torch.testing.assert_close(la, lb, rtol=1e-6, atol=1e-6 * float(la.abs()))
        for x, y in zip(ga, gb):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5 * float(y.abs().max()) + 1e-7)


@pytest.mark.parametrize("name,objective,net,guide", CASES)
def test_compiled_objective_gives_eager_loss_and_gradients(name, objective, net, guide):
    """Three batches, three rounds: the first round traces and verifies, the rest run the
    trace; every step is compared with eager code from the same generator state."""
    model = family(name, net, guide)
    obj = make_objective(objective, 3 if objective in ("iwae", "renyi", "rws") else 1)
    notices = []
    compiled = CompiledLoss(model, obj, 1.0, notices.append)
    with pyro.validation_enabled(False):
        for _ in range(3):
            for batch in batches(model):
                state = torch.get_rng_state()
                with traceable_pyro():
                    eager = loss_and_grads(model.training_loss(obj, batch, 1.0), model)
                torch.set_rng_state(state)
                assert_same(loss_and_grads(compiled(batch, 1.0), model), eager, exact=not model.enumerates_in_guide)
    assert compiled.compiled.enabled, notices
    assert len(compiled.compiled.traces) == 1 and compiled.compiled.graph_calls == 9
    assert any(n.startswith("traced the training objective") for n in notices)


def test_a_new_batch_shape_gets_a_trace_of_its_own():
    model = family("vae")
    obj = make_objective("meanfield")
    compiled = CompiledLoss(model, obj, 1.0)
    full, short = batches(model, n=1, size=12)[0], batches(model, n=1, size=5, seed=1)[0]
    with pyro.validation_enabled(False):
        for batch in (full, short, full, short, full, short):
            state = torch.get_rng_state()
            eager = loss_and_grads(model.training_loss(obj, batch, 1.0), model)
            torch.set_rng_state(state)
            assert_same(loss_and_grads(compiled(batch, 1.0), model), eager, exact=True)
    assert len(compiled.compiled.traces) == 2 and compiled.compiled.graph_calls == 6


def test_draws_continue_as_eager_code_would():
    """The tracing and the verification leave the generator where eager code leaves it."""
    model, obj = family("vae"), make_objective("trace")
    compiled = CompiledLoss(model, obj, 1.0)
    batch = batches(model, n=1)[0]
    with pyro.validation_enabled(False):
        torch.manual_seed(3)
        for _ in range(4):
            compiled(batch, 1.0)
        after = torch.rand(3)
        torch.manual_seed(3)
        for _ in range(4):
            model.training_loss(obj, batch, 1.0)
        assert torch.equal(after, torch.rand(3))


class BranchingVAE(VAE):
    """A VAE whose likelihood weight depends on the data's values: a branch a trace bakes."""

    def model(self, x, kl_weight=1.0):
        with pyro.poutine.scale(scale=2.0 if x.mean() > 0.3 else 1.0):
            super().model(x, kl_weight)


def test_data_dependent_control_flow_falls_back_to_eager_code_and_says_so():
    model = BranchingVAE((1, 8, 8), VAE.Config(**NETS))
    obj = make_objective("meanfield")
    notices = []
    compiled = CompiledLoss(model, obj, 1.0, notices.append)
    dark, bright = torch.zeros(10, 64), torch.ones(10, 64)
    dark[:, :5] = bright[:, :50] = 1  # means 0.08 and 1: one branch each
    bright[:, 50:] = 0
    with pyro.validation_enabled(False):
        for x in (dark, bright, dark, bright):
            state = torch.get_rng_state()
            eager = loss_and_grads(model.training_loss(obj, (x,), 1.0), model)
            torch.set_rng_state(state)
            assert_same(loss_and_grads(compiled((x,), 1.0), model), eager, exact=True)
    assert not compiled.compiled.enabled and compiled.compiled.graph_calls == 1  # the step it was traced on
    assert len(notices) == 2 and "other values than eager code" in notices[1] and "control flow" in notices[1]


def test_what_cannot_be_traced_runs_eagerly_with_one_notice():
    model, obj = family("vae"), make_objective("dreg", 3)
    notices = []
    compiled = CompiledLoss(model, obj, 1.0, notices.append)
    x = batches(model, n=1)[0]
    for _ in range(3):
        compiled(x, 1.0).backward()
    assert notices == ["compiled training objective off, running eagerly: the dreg objective's gradient hooks "
                       "on the draws cannot be traced"]
    assert compiled.compiled.graph_calls == 0 and not compiled.compiled.traces

    # torch.jit.trace refuses outputs that are not tensors: the result still comes, eagerly
    notices.clear()
    generic = Compiled(model, "read-out", notices.append)
    out = generic(lambda x: {"mean": model.encoder(x)[0]}, (x[0],))
    assert set(out) == {"mean"} and len(notices) == 1 and "read-out cannot be traced" in notices[0]
    assert generic(lambda x: {"mean": x}, (x[0],))["mean"] is x[0] and len(notices) == 1


def test_warm_up_steps_run_eagerly_and_the_constant_weight_compiled():
    model, obj = family("vae"), make_objective("meanfield")
    compiled = CompiledLoss(model, obj, 0.5)
    x = batches(model, n=1)[0]
    with pyro.validation_enabled(False):
        for weight in (0.1, 0.2, 0.3, 0.5, 0.5, 0.5):
            state = torch.get_rng_state()
            with traceable_pyro():
                eager = loss_and_grads(model.training_loss(obj, x, weight), model)
            torch.set_rng_state(state)
            assert_same(loss_and_grads(compiled(x, weight), model), eager, exact=True)
    assert len(compiled.compiled.traces) == 1 and compiled.compiled.graph_calls == 3


@pytest.mark.parametrize("name,net", [(name, "mlp") for name in PAIR_FAMILIES] + [("gmvae", "conv")])
def test_compiled_evaluator_equals_eager_per_image(name, net):
    """Keyed draws, 31 images in batches of 10 (a short last one), 40 particles in chunks
    of 10 or fewer: every per-image number is eager code's to the bit."""
    model = family(name, net).eval()
    x = toy_sentences(31, seed=2) if model.data_kind == "text" else toy_images(31, seed=2, binary=True)[0]
    notices = []
    common = dict(seed=4, batch_size=10, max_rows=100)
    eager = estimate_bounds(model.model, model.guide, x, 40, **common)
    compiled = estimate_bounds(model.model, model.guide, x, 40, compile=True, log=notices.append, **common)
    for field in ("elbo", "elbo_se", "log_lik", "log_px", "log_px_se", "k_hat", "jackknife"):
        assert torch.equal(getattr(eager, field).nan_to_num(), getattr(compiled, field).nan_to_num()), field
    assert all(torch.equal(eager.iwae[k], compiled.iwae[k]) for k in eager.iwae)
    width = x.shape[1]
    assert [n.split(" in ")[0] for n in notices] == [f"traced the evaluator chunk for inputs (10x{width}, 10, scalar)",
                                                      f"traced the evaluator chunk for inputs (1x{width}, 1, scalar)"]


def test_the_evaluator_without_a_module_method_says_it_runs_eagerly():
    model = family("vae").eval()
    x, _ = toy_images(5, binary=True)
    notices = []
    eager = estimate_bounds(model.model, model.guide, x, 4, seed=0)
    plain = estimate_bounds(lambda x: model.model(x), model.guide, x, 4, seed=0, compile=True, log=notices.append)
    assert torch.equal(eager.log_px, plain.log_px) and len(notices) == 1 and "running eagerly" in notices[0]


def test_fit_compiled_and_eager_train_the_same_run(tiny_npy, tmp_path):
    """The loop's steps through the trace: the same history as --no-compile, with the
    trace times said; a KL warm-up's steps and the last, short batch included."""
    common = dict(dataset=str(tiny_npy), epochs=2, batch_size=32, eval_size=40, kl_warmup=0.5, seed=3)
    logs = []
    a = fit("vae", NETS, TrainConfig(**common), tmp_path / "a", device="cpu", log=logs.append)
    b = fit("vae", NETS, TrainConfig(**common, compile=False), tmp_path / "b", device="cpu")
    timeless = lambda history: [{k: v for k, v in row.items() if "seconds" not in k} for row in history]  # noqa: E731
    assert timeless(a.history) == timeless(b.history)
    traced = [m for m in logs if m.startswith("traced the training objective")]
    assert [m.split(" in ")[0] for m in traced] == ["traced the training objective for inputs (32x64)",
                                                    "traced the training objective for inputs (20x64)"]
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_no_compile_on_the_command_line(tiny_npy, tmp_path):
    run = tmp_path / "run"
    result = invoke("fit", "vae", "--dataset", tiny_npy, "--run-dir", run, "--epochs", 1, "--z-dim", 2,
                    "--hidden", 16, "--eval-size", 20, "--no-compile", "--device", "cpu")
    assert result.exit_code == 0 and "traced" not in result.output
    assert load_run(run).train.compile is False
    outs = []
    for flag in ("--compile", "--no-compile"):
        out = tmp_path / f"{flag}.json"
        result = invoke("evaluate", run, "--iw", 20, "--split", "valid", "--device", "cpu", flag, "--output", out)
        assert result.exit_code == 0
        outs.append(out.read_text())
    strip = lambda text: [line for line in text.splitlines() if '"seconds"' not in line]  # noqa: E731
    assert strip(outs[0]) == strip(outs[1])


def test_a_diverged_step_is_compared_without_error():
    """nan and inf gradients (a loss that diverged) agree with themselves; the loop then
    reports the divergence as it does eagerly."""
    model, obj = family("vae"), make_objective("meanfield")
    compiled = CompiledLoss(model, obj, 1.0)
    x = batches(model, n=1)[0]
    with pyro.validation_enabled(False):
        compiled(x, 1.0)
        with torch.no_grad():
            next(model.decoder.parameters()).fill_(float("nan"))
        loss = compiled(x, 1.0)  # the verification step
    assert torch.isnan(loss) and compiled.compiled.enabled


def test_unhashable_extra_arguments_run_eagerly_with_one_notice():
    model = family("vae")
    notices = []
    generic = Compiled(model, "read-out", notices.append)
    x = batches(model, n=1)[0][0]
    for _ in range(2):
        out = generic(lambda x: model.encoder(x)[0], (x,), ([1, 2],))
        assert torch.equal(out, model.encoder(x)[0])
    assert len(notices) == 1 and "cannot key a cache" in notices[0]
