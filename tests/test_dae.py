"""The diffusion autoencoder (`cohortlens.models.dae`) and its DDIM (`cohortlens.models.diffusion`).

Real components throughout: the schedule is checked against MONAI's, DDIM against the closed-form
probability-flow map of Gaussian data (whose exact ε-model is known), and the model is trained for a few
hundred steps on 32-px phantom slices rendered by the demo cohort's own generator. Everything runs on one
CPU thread (two cores are shared with other jobs; oversubscribed OpenMP threads are ~10x slower).
"""

from __future__ import annotations

import copy
import time

import numpy as np
import pytest
import torch

from cohortlens.demo.phantom import REGIONS, affine
from cohortlens.demo.population import render_subject, sample_subjects
from cohortlens.models.dae import (
    DEFAULT_CONFIG,
    DEMO_TINY_CONFIG,
    DiffusionAutoencoder,
    grid_tile,
    parameter_count,
    resolve_config,
)
from cohortlens.models.dae_networks import ResBlock
from cohortlens.models.diffusion import DiffusionSchedule
from cohortlens.preprocess.slices import slice_stack

SIZE = 32
TINY = dict(image_size=SIZE, base_channels=16, channel_mult=[1, 2, 2], num_res_blocks=1,
            attention_resolutions=[8], attention_head_channels=16, norm_groups=8, dropout=0.0, z_dim=16,
            ddim_steps=20, qa_images=6)
TRAIN_STEPS = 300
BATCH = 8
LR = 3e-3


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread(one_torch_thread):
    """Every test here on one torch thread (conftest.one_torch_thread)."""


def phantom_slices(n_subjects: int = 4, size: int = SIZE) -> tuple[torch.Tensor, list[str]]:
    """The center sagittal slice of every region of the first demo subjects, [0, max] → [-1, 1] per
    volume as the preprocess stage does, in display orientation: (n_subjects·3, 1, size, size)."""
    images, regions = [], []
    for subject in sample_subjects(n_subjects, seed=0):
        for region in REGIONS:
            vol = render_subject(subject, region, size, 16, seed=0).astype(np.float32)
            stack = slice_stack(vol, affine(size, 16))
            stack = stack / stack.max() * 2.0 - 1.0
            images.append(stack[stack.shape[0] // 2])
            regions.append(region)
    return torch.from_numpy(np.ascontiguousarray(np.stack(images)))[:, None].float(), regions


@pytest.fixture(scope="module")
def slices():
    return phantom_slices()


@pytest.fixture(scope="module")
def trained(slices):
    """A tiny DAE trained end to end (Adam, lr 3e-3, batch 8, 300 steps) on the 12 phantom slices, plus its
    initial copy. Across seeds 0-6, z_sem starts to matter between steps ~150 and ~300 at lr 2e-3 (two of
    seven seeds too late for these tests) and well before step 300 at lr 3e-3."""
    x, _ = slices
    torch.manual_seed(0)
    model = DiffusionAutoencoder(TINY)
    initial = copy.deepcopy(model)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    gen = torch.Generator().manual_seed(0)
    losses, z_std = [], []
    start = time.perf_counter()
    for _ in range(TRAIN_STEPS):
        batch = x[torch.randint(0, len(x), (BATCH,), generator=gen)]
        loss, logs = model.training_loss(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(logs["mse"]))
        z_std.append(float(logs["z_sem_std"]))
    print(f"\ntrained {TRAIN_STEPS} steps in {time.perf_counter() - start:.1f} s; "
          f"loss {losses[0]:.3f} -> {np.mean(losses[-50:]):.4f}")
    model.eval()
    initial.eval()
    return model, initial, losses, z_std


# --------------------------------------------------------------------------- schedule and DDIM


def test_schedule_is_monais_linear_beta_schedule():
    from monai.networks.schedulers import DDPMScheduler

    ours = DiffusionSchedule(1000, 1e-4, 2e-2)
    monai = DDPMScheduler(num_train_timesteps=1000, schedule="linear_beta", beta_start=1e-4, beta_end=2e-2)
    torch.testing.assert_close(ours.alphas_cumprod, monai.alphas_cumprod.float(), rtol=1e-5, atol=1e-7)
    assert ours.alphas_cumprod[0].item() == pytest.approx(1 - 1e-4)
    assert ours.alphas_cumprod[-1].item() == pytest.approx(4.04e-5, rel=0.01)  # x_T is ~pure noise
    # checkpoints carry weights only: the schedule is rebuilt from the config
    assert ours.state_dict() == {}

    x0, noise = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    t = torch.tensor([0, 10, 500, 999])
    a = ours.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(ours.add_noise(x0, noise, t), a.sqrt() * x0 + (1 - a).sqrt() * noise)


def test_ddim_grid_is_uniform_and_spans_the_schedule():
    sched = DiffusionSchedule(1000)
    for steps in (2, 10, 50, 1000):
        grid = sched.ddim_timesteps(steps)
        assert len(grid) == steps and grid[0] == 0 and grid[-1] == 999
        gaps = np.diff(grid)
        assert gaps.min() >= 1 and gaps.max() - gaps.min() <= 1
    for bad in (1, 1001):
        with pytest.raises(ValueError):
            sched.ddim_timesteps(bad)


def gaussian_eps(sched: DiffusionSchedule, mu: torch.Tensor, sigma: float):
    """The exact ε-predictor E[ε | x_t] for data x_0 ~ N(mu, sigma² I)."""
    def eps_fn(x_t, t):
        a = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
        return (1 - a).sqrt() * (x_t - a.sqrt() * mu) / (a * sigma ** 2 + 1 - a)
    return eps_fn


def test_ddim_follows_the_exact_probability_flow_of_gaussian_data():
    """For Gaussian data the DDIM ODE has a closed form: (x_t - sqrt(ᾱ)μ) / sqrt(ᾱσ² + 1 - ᾱ) is constant
    along it. With the exact ε, decode must converge to that map as steps grow, and encode must invert it."""
    sched = DiffusionSchedule(1000)
    gen = torch.Generator().manual_seed(0)
    mu = torch.rand(1, 1, 16, 16, generator=gen) - 0.5
    sigma = 0.3
    eps_fn = gaussian_eps(sched, mu, sigma)
    x_T = torch.randn(64, 1, 16, 16, generator=gen)
    a_T = sched.alphas_cumprod[-1]
    exact_x0 = mu + sigma * (x_T - a_T.sqrt() * mu) / (a_T * sigma ** 2 + 1 - a_T).sqrt()

    errors = {}
    for steps in (10, 50, 200):
        x0 = sched.ddim_decode(eps_fn, x_T, steps, clip_x0=False)
        errors[steps] = (x0 - exact_x0).abs().mean().item()
    # DDIM is a first-order solver of this ODE: 4x the steps, ~1/4 of the error
    assert errors[10] > 3 * errors[50] > 9 * errors[200] and errors[200] < 0.01, errors
    # decoded samples have the data distribution
    assert (x0 - mu).std().item() == pytest.approx(sigma, rel=0.05)

    # encode is decode's inverse on the same grid: the round trip error also shrinks ~1/steps
    data = mu + sigma * torch.randn(16, 1, 16, 16, generator=gen)
    round_trip = {s: (sched.ddim_decode(eps_fn, sched.ddim_encode(eps_fn, data, s, False), s, False) - data)
                  .abs().max().item() for s in (10, 100, 1000)}
    assert round_trip[10] > 3 * round_trip[100] > 9 * round_trip[1000] and round_trip[1000] < 0.02, round_trip
    # x̂_0 clipping changes the ε-model, not the inversion, for data inside [-1, 1]
    inside = data.clamp(-1, 1)
    clipped = (sched.ddim_decode(eps_fn, sched.ddim_encode(eps_fn, inside, 1000, True), 1000, True) - inside)
    assert clipped.abs().max().item() < 0.02
    # and encoding lands on the latent the flow assigns to the data
    latent = sched.ddim_encode(eps_fn, data, 200, clip_x0=False)
    exact_latent = a_T.sqrt() * mu + (a_T * sigma ** 2 + 1 - a_T).sqrt() * (data - mu) / sigma
    assert (latent - exact_latent).abs().mean().item() < 0.03


# --------------------------------------------------------------------------- model and protocol


def test_config_rejects_typos_and_impossible_shapes():
    with pytest.raises(ValueError, match="unknown config keys"):
        resolve_config({**TINY, "zdim": 8})
    with pytest.raises(ValueError, match="divisible by 2"):
        resolve_config({**TINY, "image_size": 36})
    with pytest.raises(ValueError, match="norm_groups"):
        resolve_config({**TINY, "norm_groups": 7})
    with pytest.raises(ValueError, match="one more level"):
        resolve_config({**TINY, "encoder_channel_mult": [1, 2, 2]})
    cfg = resolve_config(TINY)
    assert cfg["encoder_channel_mult"] == [1, 2, 2, 2]  # the encoder has one more downsampling level


def test_training_timesteps_follow_the_timestep_power():
    """power 1: uniform t over the schedule; below 1 noisier steps more often, E[t] = T / (1 + power) (up to the
    floor), always inside [0, T - 1]."""
    gen = torch.Generator().manual_seed(0)
    model = DiffusionAutoencoder({**TINY, "timestep_power": 0.5})
    schedule, T = model.schedule, model.schedule.timesteps
    for power in (1.0, 0.5, 0.3):
        t = schedule.sample_timesteps(20000, torch.device("cpu"), gen, power=power)
        assert t.dtype == torch.long and int(t.min()) >= 0 and int(t.max()) <= T - 1
        # 20000 draws: the mean's standard error is below 0.003 T
        assert abs(t.float().mean().item() / T - 1 / (1 + power)) < 0.01, power
        assert float((t >= T // 2).float().mean()) == pytest.approx(1 - 0.5 ** (1 / power), abs=0.015)
    # the training loss draws its timesteps with the configured power (the real draw, recorded on the way)
    seen = []
    real = schedule.sample_timesteps
    schedule.sample_timesteps = lambda *a, **kw: seen.append(kw.get("power")) or real(*a, **kw)
    model.training_loss(torch.zeros(2, 1, TINY["image_size"], TINY["image_size"]))
    assert seen == [0.5]


def test_presets_build_with_the_documented_sizes():
    full = DiffusionAutoencoder(DEFAULT_CONFIG)
    assert full.embedding_dim == 512 and full.config["image_size"] == 256
    assert len(full.encoder.levels) == len(full.config["channel_mult"]) + 1
    assert 40e6 < parameter_count(full) < 50e6  # 13.1 M encoder + 32.3 M UNet
    tiny = DiffusionAutoencoder(DEMO_TINY_CONFIG)
    x = torch.rand(2, 1, 64, 64) * 2 - 1
    loss, _ = tiny.training_loss(x)
    assert torch.isfinite(loss)
    assert tiny.embed(x).shape == (2, DEMO_TINY_CONFIG["z_dim"])


def test_training_loss_and_embed_follow_the_trainer_protocol(slices):
    x, _ = slices
    torch.manual_seed(0)
    model = DiffusionAutoencoder(TINY)
    assert model.name == "dae" and model.embedding_dim == TINY["z_dim"]
    loss, logs = model.training_loss(x[:4])
    assert loss.ndim == 0 and loss.requires_grad and 0.5 < loss.item() < 2.0  # ε ~ N(0, 1) at init
    assert set(logs) == {"mse", "z_sem_std"}
    assert all(isinstance(v, torch.Tensor) and v.ndim == 0 and not v.requires_grad for v in logs.values())
    assert float(logs["mse"]) == pytest.approx(loss.item())

    z = model.embed(x)
    assert z.shape == (len(x), TINY["z_dim"]) and z.dtype == torch.float32 and not z.requires_grad
    # deterministic, independent of the batch it is in, and of train/eval mode
    torch.testing.assert_close(model.embed(x), z, rtol=0, atol=0)
    torch.testing.assert_close(model.embed(x[3:4]), z[3:4], rtol=1e-5, atol=1e-6)
    model.eval()
    torch.testing.assert_close(model.embed(x), z, rtol=0, atol=0)

    eps = model(torch.randn_like(x[:2]), torch.tensor([0, 999]), z[:2])
    assert eps.shape == x[:2].shape


def test_one_backward_pass_reaches_every_encoder_parameter(slices):
    """The reference implementation's failure mode: z_sem (and so the encoder) getting no gradient."""
    x, _ = slices
    torch.manual_seed(0)
    model = DiffusionAutoencoder(TINY)
    loss, _ = model.training_loss(x[:BATCH])
    loss.backward()
    dead = [name for name, p in model.encoder.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, f"encoder parameters without gradient: {dead}"
    z_paths = [name for name, p in model.unet.named_parameters() if ".z_proj." in name]
    blocks = [m for m in model.unet.modules() if isinstance(m, ResBlock)]
    assert len(z_paths) == 2 * len(blocks)  # weight + bias: every residual block of the UNet sees z_sem
    dead = [name for name in z_paths if not model.unet.get_parameter(name).grad.abs().sum() > 0]
    assert not dead, f"z_sem projections without gradient: {dead}"

    # the check can fail: with the reference's zero-initialised output convolutions nothing reaches the encoder
    reference_init = DiffusionAutoencoder(TINY)
    with torch.no_grad():
        for block in [m for m in reference_init.unet.modules() if isinstance(m, ResBlock)]:
            block.conv_out.conv.weight.zero_()
        reference_init.unet.conv_out.conv.weight.zero_()
    reference_init.training_loss(x[:BATCH])[0].backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in reference_init.encoder.parameters())


@pytest.mark.slow
def test_training_loss_runs_under_bf16_autocast_channels_last_and_traces_as_one_graph(slices):
    """What the trainer does on a GPU (bf16 autocast, channels_last, torch.compile), exercised on the CPU:
    the loss and embeddings stay float32, every parameter gets a gradient, and dynamo captures
    training_loss as a single graph (no graph breaks, so nothing in it forces a host sync)."""
    import torch._dynamo

    x, _ = slices
    torch.manual_seed(0)
    model = DiffusionAutoencoder(TINY).to(memory_format=torch.channels_last)
    batch = x[:4].contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, logs = model.training_loss(batch)
        z = model.embed(batch)
    loss.backward()
    assert loss.dtype == torch.float32 and z.dtype == torch.float32 and torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    explained = torch._dynamo.explain(model.training_loss)(batch)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons


# --------------------------------------------------------------------------- after a short training


@pytest.mark.slow
def test_training_reduces_the_diffusion_loss(trained):
    _, _, losses, _ = trained
    first, last = losses[0], np.mean(losses[-50:])
    assert first > 0.7 and last < 0.1, (first, last)  # ε-MSE starts near Var(ε) = 1


@pytest.mark.slow
def test_embeddings_of_different_images_stay_distinct(trained, slices):
    model, initial, _, z_std = trained
    x, regions = slices
    z = model.embed(x)
    spread = z.std(dim=0).mean().item()
    dist = torch.cdist(z, z)
    off_diagonal = dist[~torch.eye(len(z), dtype=torch.bool)]
    print(f"\nz_sem: mean per-dim std {spread:.3f}, pairwise distance min {off_diagonal.min():.3f} "
          f"mean {off_diagonal.mean():.3f}, |z| {z.norm(dim=1).mean():.3f}; "
          f"at init std {initial.embed(x).std(dim=0).mean():.3f}")
    # a collapsing encoder drives the across-image spread to 0: training must not shrink it much
    assert spread > 0.2 and spread > 0.5 * initial.embed(x).std(dim=0).mean().item()
    assert off_diagonal.min() > 0.01 * off_diagonal.mean()  # every image has its own z_sem
    assert np.mean(z_std[-20:]) > 0.1  # the logged collapse monitor agrees
    # z_sem carries the image's content: each slice's nearest neighbour is a slice of the same region
    dist.fill_diagonal_(float("inf"))
    nearest = dist.argmin(dim=1).tolist()
    assert all(regions[i] == regions[j] for i, j in enumerate(nearest))


@pytest.mark.slow
def test_decoder_uses_z_sem(trained, slices):
    """One x_T decoded under the z_sem of different images must give different images, and the denoising
    loss must get clearly worse when each image is given another image's z_sem.

    The decode difference alone does not prove anything was learned (the untrained decoder already reacts
    to z_sem, by design of the init), the loss ratio does: it is 1.00 at init and for a decoder that
    ignores z_sem, and measured 1.26-1.80 over t in [200, 1000) for seeds 0-6 after 300 steps."""
    model, initial, _, _ = trained
    x, regions = slices
    x_T = torch.randn(1, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(0)).expand(len(x), -1, -1, -1)
    decodes = model.ddim_decode(x_T.contiguous(), model.embed(x), steps=20)
    pair_diff = (decodes[:, None] - decodes[None]).abs().mean(dim=(2, 3, 4))
    other_region = torch.tensor([[a != b for b in regions] for a in regions])
    decode_difference = pair_diff[other_region].mean().item()

    gen = torch.Generator().manual_seed(1)
    xx = x.repeat(8, 1, 1, 1)
    t = torch.randint(200, 1000, (len(xx),), generator=gen)
    noise = torch.randn(xx.shape, generator=gen)

    def loss_ratio(m):
        with torch.no_grad():
            z, x_t = m.embed(xx), m.schedule.add_noise(xx, noise, t)
            own = (m(x_t, t, z) - noise).pow(2).mean()
            other = (m(x_t, t, z.roll(1, dims=0)) - noise).pow(2).mean()  # roll by one: another region
        return (other / own).item()

    ratio, ratio_at_init = loss_ratio(model), loss_ratio(initial)
    print(f"\nshared-x_T decodes, mean |difference| between regions' z_sem: {decode_difference:.3f}; "
          f"loss with swapped / own z_sem: {ratio:.3f} (at init {ratio_at_init:.3f})")
    assert decode_difference > 0.03  # 1.5 % of the [-1, 1] range per pixel
    assert abs(ratio_at_init - 1) < 0.02 and ratio > 1.1


@pytest.mark.slow
def test_ddim_round_trip_reconstructs_the_input(trained, slices):
    """decode(encode(x)) with the model's own z_sem. Inversion error shrinks with the number of DDIM steps
    (each step assumes ε barely changes over one step); with 50 steps it must be far below the distance
    between two different slices and below the error of a 10-step round trip."""
    model, _, _, _ = trained
    x, _ = slices
    x = x[:6]
    z = model.embed(x)
    rmse = {}
    for steps in (10, 50):
        rec = model.ddim_decode(model.ddim_encode(x, z, steps), z, steps)
        rmse[steps] = (rec - x).pow(2).mean().sqrt().item()
    between_images = (x - x.roll(1, dims=0)).pow(2).mean().sqrt().item()
    print(f"\nround trip RMSE: 10 steps {rmse[10]:.3f}, 50 steps {rmse[50]:.3f}; "
          f"between different slices {between_images:.3f}")
    assert rmse[50] < rmse[10]
    assert rmse[50] < 0.1 * between_images


@pytest.mark.slow
def test_qa_images_show_round_trip_and_z_sem_swaps(trained, slices):
    model, _, _, _ = trained
    x, _ = slices
    model.train()
    decodes = model.qa_decodes(x)
    assert model.training  # QA runs in eval mode and restores the caller's mode
    n = TINY["qa_images"]
    assert set(decodes) == {"input", "roundtrip", "other_z", "shared_noise"}
    assert all(d.shape == (n, 1, SIZE, SIZE) for d in decodes.values())
    # one x_T under different z_sem: the columns differ
    shared = decodes["shared_noise"]
    assert (shared[:, None] - shared[None]).abs().mean().item() > 0.02
    # the swapped-z decode keeps x_T but not the image
    assert (decodes["other_z"] - decodes["roundtrip"]).abs().mean().item() > 0.02

    grids = model.qa_images(x)
    model.eval()
    assert set(grids) == {"reconstruction", "shared_noise_z_sem"}
    assert grids["reconstruction"].shape == (1, 3 * (SIZE + 2) + 2, n * (SIZE + 2) + 2)
    assert grids["shared_noise_z_sem"].shape == (1, 2 * (SIZE + 2) + 2, n * (SIZE + 2) + 2)
    for grid in grids.values():
        assert grid.min() >= -1 and grid.max() <= 1
    for row, name in enumerate(["input", "roundtrip", "other_z"]):
        for col in (0, n - 1):
            torch.testing.assert_close(grid_tile(grids["reconstruction"], row, col, (SIZE, SIZE)),
                                       decodes[name][col].clamp(-1, 1))
    torch.testing.assert_close(grid_tile(grids["shared_noise_z_sem"], 1, 2, (SIZE, SIZE)),
                               shared[2].clamp(-1, 1))
    with pytest.raises(ValueError):
        model.qa_images(x[:1])
