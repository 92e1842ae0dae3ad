"""The fast training step (training/step.py, models/fused.py): the same gradients as a textbook step for every
estimator and both architectures, the same random streams as the original per-step loop, and resuming a
training state written by the previous version of the loop."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from models.config import ModelConfig
from models.estimators import get_surrogate
from models.fused import linear_tanh, output_kernel, softplus_sum_sigmoid_eager
from models.networks import IWAE, MLP
from training.checkpoints import load_checkpoint, load_train_state, read_train_state_meta, save_train_state, state_path
from training.datasets import Dataset, binarize
from training.step import EpochBatches, make_optimizer, use_fused_output
from training.train import TrainConfig, train

LOG_2PI = math.log(2 * math.pi)
# The paper's two architectures' structure (one and two stochastic layers, two tanh layers per block), at
# widths that keep float64 fast. D = 32 is a multiple of 16, so float32 runs the pooled compiled kernel.
SMALL = {
    "paper1": ModelConfig(x_dim=32, latent_dims=(5,), hidden_dims=((20, 20),)),
    "paper2": ModelConfig(x_dim=32, latent_dims=(10, 5), hidden_dims=((20, 20), (10, 10))),
}


def synthetic_dataset(n: int = 200, seed: int = 0) -> Dataset:
    """Noisy copies of four prototypes (as in tests/test_training.py)."""
    g = torch.Generator().manual_seed(seed)
    protos = (torch.rand(4, 784, generator=g) < 0.3).float() * 0.9 + 0.05
    x = protos[torch.randint(0, 4, (n,), generator=g)]
    x = (x + 0.05 * torch.rand(x.shape, generator=g)).clamp(0, 1)
    return Dataset("mnist", x[: n - 40], x[n - 40 : n - 20], x[n - 20 :], "dynamic", x[: n - 40].mean(0), "synthetic")


def gaussian(h: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    return (-0.5 * ((h - mean) / torch.exp(log_std)) ** 2 - log_std - 0.5 * LOG_2PI).sum(-1)


def textbook_grads(model: IWAE, x: torch.Tensor, noise: list[torch.Tensor], estimator: str) -> list[torch.Tensor]:
    """Each estimator's gradient written out plainly: x expanded to [k, B, D], BCE with logits, logsumexp.

    iwae: ∇(-L_k); vae: ∇(-ELBO); stl: ∇ of -Σ w~ log w with q's parameters stopped in log q (path
    derivative only); dreg (Tucker et al. 2018): the decoder's gradient as stl's, the encoder's from
    -Σ w~² log w, q's parameters stopped in log q. The weights w~ are constants."""
    below, hs, log_q, log_q_stopped = x, [], 0.0, 0.0
    for layer, eps in zip(model.q, noise, strict=True):
        mean, log_std = layer(below)
        h = mean + torch.exp(log_std) * eps
        stopped = {name: p.detach() for name, p in layer.named_parameters()}
        mean_s, log_std_s = functional_call(layer, stopped, (below,))
        log_q = log_q + gaussian(h, mean, log_std)
        log_q_stopped = log_q_stopped + gaussian(h, mean_s, log_std_s)
        hs.append(h)
        below = h
    log_p = (-0.5 * hs[-1] ** 2 - 0.5 * LOG_2PI).sum(-1)
    for idx in range(1, len(hs)):
        mean, log_std = model.p[idx](hs[idx])
        log_p = log_p + gaussian(hs[idx - 1], mean, log_std)
    logits = model.p[0](hs[0])
    log_p = log_p - F.binary_cross_entropy_with_logits(logits, x.expand(logits.shape), reduction="none").sum(-1)
    params, q_params, p_params = list(model.parameters()), list(model.q.parameters()), list(model.p.parameters())
    if estimator == "vae":
        return list(torch.autograd.grad(-(log_p - log_q).mean(), params))
    if estimator == "iwae":
        loss = -(torch.logsumexp(log_p - log_q, 0) - math.log(len(noise[0]))).mean()
        return list(torch.autograd.grad(loss, params))
    log_w = log_p - log_q_stopped
    w = torch.softmax(log_w.detach(), 0)
    if estimator == "stl":
        return list(torch.autograd.grad(-(w * log_w).sum(0).mean(), params))
    enc = torch.autograd.grad(-(w * w * log_w).sum(0).mean(), q_params, retain_graph=True)
    dec = torch.autograd.grad(-(w * log_w).sum(0).mean(), p_params)
    return [*enc, *dec]


def fused_grads(model: IWAE, x: torch.Tensor, noise: list[torch.Tensor], estimator: str) -> list[torch.Tensor]:
    model.draw_noise = lambda *a, **kw: noise  # type: ignore[method-assign]
    loss, _ = get_surrogate(estimator)(model, x, noise[0].shape[0])
    return list(torch.autograd.grad(loss, list(model.parameters())))


@pytest.mark.parametrize("arch", sorted(SMALL))
@pytest.mark.parametrize("estimator", ["iwae", "vae", "dreg", "stl"])
def test_fused_step_gradients_equal_the_textbook_step(arch: str, estimator: str) -> None:
    torch.manual_seed(0)
    model = IWAE(SMALL[arch], data_mean=torch.rand(32) * 0.6).double()
    x = (torch.rand(6, 32) < 0.4).double()
    k = 1 if estimator == "vae" else 7
    noise = model.draw_noise(k, 6, dtype=torch.float64)
    want = textbook_grads(model, x, noise, estimator)
    assert "eager" in use_fused_output(model)  # float64: exact eager ops
    assert model.p[0].fused_kernel is not None
    assert model.training and all(m.fused_tanh for m in model.modules() if isinstance(m, MLP))
    got = fused_grads(model, x, noise, estimator)
    for (name, _), g, w in zip(model.named_parameters(), got, want, strict=True):
        assert torch.allclose(g, w, rtol=1e-10, atol=1e-12), (name, float((g - w).abs().max()))
    # The encoder's gradients differ between the estimators: a mix-up of surrogates would show.
    assert any(float(g.abs().max()) > 1e-6 for g in got)


@pytest.mark.parametrize("arch", sorted(SMALL))
def test_float32_compiled_kernel_matches_float64(arch: str) -> None:
    """The compiled (pooled-log) float32 path agrees with float64 to float32 accuracy, values and gradients."""
    torch.manual_seed(1)
    model = IWAE(SMALL[arch], data_mean=torch.rand(32) * 0.6)
    note = use_fused_output(model)
    x = (torch.rand(6, 32) < 0.4).float()
    noise = model.draw_noise(5, 6)
    got = fused_grads(model, x, noise, "iwae")
    ref = IWAE(SMALL[arch]).double()
    ref.load_state_dict(model.state_dict())
    want = fused_grads(ref, x.double(), [n.double() for n in noise], "iwae")
    for g, w in zip(got, want, strict=True):
        assert torch.allclose(g.double(), w, rtol=1e-4, atol=1e-5), note


def test_kernel_values_and_eager_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    z = torch.linspace(-40, 40, 5 * 48, dtype=torch.float64).view(5, 48)
    bias = torch.linspace(-1, 1, 48, dtype=torch.float64)
    softplus, sig = softplus_sum_sigmoid_eager(z, bias)
    assert torch.allclose(softplus, F.softplus(z + bias, threshold=100).sum(-1), rtol=1e-14)
    assert torch.allclose(sig, torch.sigmoid(z + bias), rtol=1e-14)
    monkeypatch.setenv("IWAE_TRAIN_COMPILE", "0")
    _, note = output_kernel(torch.device("cpu"), torch.float32, 48)
    assert note == "eager (IWAE_TRAIN_COMPILE=0)"


def test_linear_tanh_values_and_gradients() -> None:
    """The fused linear + tanh node (tanh as 2σ(2z) - 1): torch.tanh's values to float32 rounding, and the
    gradients of x, W and b (checked numerically in float64, and against autograd's addmm + tanh)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 7, generator=g, dtype=torch.float64) * 3
    w = torch.randn(5, 7, generator=g, dtype=torch.float64)
    b = torch.randn(5, generator=g, dtype=torch.float64)
    want = torch.tanh(F.linear(x, w, b))
    assert torch.allclose(linear_tanh(x, w, b), want, rtol=0, atol=1e-15)
    # In float32, against the float64 answer for the same float32-rounded inputs: the rounding of x, w and b
    # alone moves tanh by up to 6e-7 here (torch's own float32 tanh(linear) was 5.9e-7 from `want` on an Intel
    # Xeon, where this check used to fail), which says nothing about the kernel.
    x32, w32, b32 = x.float(), w.float(), b.float()
    want32 = torch.tanh(F.linear(x32.double(), w32.double(), b32.double()))
    got32 = linear_tanh(x32, w32, b32).double()
    assert float((got32 - want32).abs().max()) < 5e-7
    z = torch.linspace(-30, 30, 2001, dtype=torch.float32).view(-1, 1)  # tiny |z| (cancellation) to saturation
    one = torch.ones(1, 1)
    assert float((linear_tanh(z, one, torch.zeros(1)) - torch.tanh(z)).abs().max()) < 2.5e-7
    inputs = [t.clone().requires_grad_() for t in (x, w, b)]
    assert torch.autograd.gradcheck(linear_tanh, inputs)
    upstream = torch.randn(3, 4, 5, generator=g, dtype=torch.float64)
    got = torch.autograd.grad(linear_tanh(*inputs), inputs, upstream)
    ref = torch.autograd.grad(torch.tanh(F.linear(*inputs)), inputs, upstream)
    for a, r in zip(got, ref, strict=True):
        assert torch.allclose(a, r, rtol=1e-12, atol=1e-13)


def test_fused_tanh_only_in_training_mode() -> None:
    """Validation and serving (eval mode) keep torch.tanh to the bit; detached parameters get no gradient."""
    torch.manual_seed(2)
    mlp = MLP(6, (5, 4))
    x = torch.randn(3, 6)
    plain = mlp(x)
    mlp.fused_tanh = True
    assert mlp(x).grad_fn is not None and "LinearTanh" in type(mlp(x).grad_fn).__name__
    mlp.eval()
    assert torch.equal(mlp(x), plain)
    mlp.train()
    xg = x.clone().requires_grad_()
    mlp(xg, detach=True).sum().backward()
    assert xg.grad is not None and all(p.grad is None for p in mlp.parameters())


def test_fused_layer_refuses_a_gradient_for_x() -> None:
    model = IWAE(SMALL["paper1"]).double()
    use_fused_output(model)
    x = torch.rand(3, 32, dtype=torch.float64, requires_grad=True)
    with pytest.raises(NotImplementedError, match="respect to x"):
        model.log_weights(x, 2).sum().backward()


def test_epoch_batches_draw_what_the_per_step_loop_drew() -> None:
    """Blocks of steps give the per-step loop's batches bit for bit, and the generator's state before any step."""
    data = synthetic_dataset(n=520).train  # 480 images: 24 steps of 20
    perm = torch.randperm(480, generator=torch.Generator().manual_seed(5))
    old_gen, new_gen = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    batches = EpochBatches(data, perm, 20, new_gen, torch.device("cpu"), block=7)
    for step in range(24):
        state_before = old_gen.get_state()
        want = binarize(data[perm[step * 20 : (step + 1) * 20]], old_gen)
        assert torch.equal(batches.batch(step), want), step
        assert torch.equal(batches.generator_state(step), state_before), step
    assert torch.equal(batches.generator_state(24), old_gen.get_state())
    with pytest.raises(ValueError, match="in order"):
        batches.batch(3)


def test_a_state_written_by_the_previous_loop_resumes(tmp_path: Path) -> None:
    """The previous loop built a plain Adam (foreach=None, fused=None) and saved it with save_train_state;
    such a state loads, its moments carry over, and the optimizer goes back to the fused implementation."""
    data = synthetic_dataset()
    out = tmp_path / "m.safetensors"
    common = dict(k=3, epochs=2, batch_size=20, seed=3, val_k=5, progress=False, device="cpu")
    train(TrainConfig(out=out, **{**common, "epochs": 1}), data)
    model_opt = make_optimizer(IWAE(ModelConfig.paper(1)), 1e-3)
    rng, meta = load_train_state(state_path(out), model_opt)
    # Rewrite the state as the previous version did: moments of a default torch.optim.Adam, mid-epoch.
    model, _, _ = load_checkpoint(out)
    old_opt = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-4)
    old_opt.load_state_dict(model_opt.state_dict())
    for group in old_opt.param_groups:
        group["fused"], group["foreach"] = None, None
    save_train_state(state_path(out), old_opt, rng, {**meta, "epoch": 1, "step": 3})
    raw = state_path(out).read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])["__metadata__"]
    assert [g["fused"] for g in json.loads(header["param_groups"])] == [None]

    card = train(TrainConfig(out=out, resume=True, **common), data)
    assert card["epochs"] == 2 and read_train_state_meta(state_path(out))["epoch"] == 2
    resumed = make_optimizer(IWAE(ModelConfig.paper(1)), 1e-3)
    load_train_state(state_path(out), resumed)
    assert all(g["fused"] for g in resumed.param_groups)


def test_an_interrupt_while_a_block_is_drawn_keeps_the_state_before_its_first_step(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = synthetic_dataset(n=240).train  # 200 images: 10 steps of 20
    perm = torch.randperm(200, generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(2)
    batches = EpochBatches(data, perm, 20, gen, torch.device("cpu"), block=4)
    for step in range(4):
        batches.batch(step)
    before = gen.get_state()

    def interrupted(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        torch.bernoulli(x[:7], generator=generator)  # part of the block drawn, then Ctrl-C
        raise KeyboardInterrupt

    monkeypatch.setattr("training.step.binarize", interrupted)
    with pytest.raises(KeyboardInterrupt):
        batches.batch(4)
    monkeypatch.undo()
    assert not torch.equal(gen.get_state(), before)
    assert torch.equal(batches.generator_state(4), before)
