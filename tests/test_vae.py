"""The Hessian penalty estimator against closed forms, and the β-VAE (shapes, loss, output range, learning)."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch
from test_training import tiny_cohort  # noqa: F401  (fixture: a real preprocessed demo cohort)

from cohortlens.models.hessian import hessian_penalty, rademacher, second_directional_differences
from cohortlens.models.registry import PRESETS, build_model, resolve_config
from cohortlens.models.training.data import SliceBatches, center_crop_batch, qa_rows, training_rows
from cohortlens.models.training.loop import train
from cohortlens.models.training.settings import TrainSettings, fingerprint
from cohortlens.models.vae import BetaVAE
from cohortlens.preprocess.store import SliceStore
from cohortlens.runtime import seed_everything


def quadratic_forms(d: int, m: int, seed: int = 0):
    """G(z)_o = Σ_ij C_oij z_i z_j for m outputs; the Hessian of output o is H_o = C_o + C_oᵀ (constant)."""
    g = torch.Generator().manual_seed(seed)
    C = torch.randn(m, d, d, generator=g, dtype=torch.float64)
    H = C + C.transpose(1, 2)

    def G(z):
        return torch.einsum("bi,oij,bj->bo", z.double(), C, z.double()).float()

    return G, H


def off_diagonal_energy(H: torch.Tensor) -> torch.Tensor:
    """2 Σ_{i≠j} H_ij² per output: the variance of vᵀHv over Rademacher v."""
    off = H - torch.diag_embed(torch.diagonal(H, dim1=-2, dim2=-1))
    return 2 * off.square().sum((-2, -1))


def test_second_difference_is_exact_vthv_for_a_quadratic():
    G, H = quadratic_forms(d=6, m=3)
    z = torch.randn(5, 6)
    sdd = second_directional_differences(G, z, k=3, epsilon=0.1, generator=torch.Generator().manual_seed(7))
    v = rademacher((3, 5, 6), like=z, generator=torch.Generator().manual_seed(7))
    exact = torch.einsum("kbi,oij,kbj->kbo", v.double(), H, v.double())
    assert sdd.shape == (3, 5, 3)
    torch.testing.assert_close(sdd.double(), exact, rtol=1e-3, atol=1e-2)


def test_estimator_mean_matches_closed_form_off_diagonal_energy():
    G, H = quadratic_forms(d=5, m=4, seed=1)
    # 20000 independent estimates (one per batch row; H does not depend on z)
    z = torch.randn(20000, 5, generator=torch.Generator().manual_seed(2))
    var = hessian_penalty(G, z, k=2, epsilon=0.1, reduction=None, generator=torch.Generator().manual_seed(3))
    expected = off_diagonal_energy(H)
    # the k=2 sample variance is unbiased; its spread over 20000 draws gives well under 5 % error
    np.testing.assert_allclose(var.double().mean(0).numpy(), expected.numpy(), rtol=0.05)
    assert hessian_penalty(G, z[:64], reduction="max", generator=torch.Generator().manual_seed(3)) == pytest.approx(
        float(hessian_penalty(G, z[:64], reduction=None, generator=torch.Generator().manual_seed(3)).max()))


def test_estimator_matches_autograd_hessian_of_a_smooth_network():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2)).double()
    z0 = torch.randn(4, dtype=torch.float64)
    H = torch.stack([torch.autograd.functional.hessian(lambda z, o=o: net(z)[o], z0) for o in range(2)]).detach()
    expected = off_diagonal_energy(H)
    assert float(expected.min()) > 1e-3  # a genuinely entangled function
    z = z0.float().expand(40000, 4).contiguous()
    var = hessian_penalty(lambda b: net(b.double()).float(), z, k=2, epsilon=0.05, reduction=None,
                          generator=torch.Generator().manual_seed(4))
    np.testing.assert_allclose(var.detach().double().mean(0).numpy(), expected.numpy(), rtol=0.08)


def test_estimator_is_zero_for_a_diagonal_hessian():
    a = torch.linspace(0.5, 2.0, 6)

    def separable(z):  # every output is a sum of one-coordinate functions: the Hessian is diagonal everywhere
        return torch.stack([(a * torch.sin(z)).sum(1), (z**3 - 2 * z**2).sum(1), torch.exp(0.3 * z).sum(1)], 1)

    z = torch.randn(256, 6)
    var = hessian_penalty(separable, z, k=2, epsilon=0.1, reduction=None)
    assert float(var.max()) < 1e-6
    G, _ = quadratic_forms(d=6, m=3)
    assert float(hessian_penalty(G, z, k=2, reduction="mean")) > 1.0  # the same estimator sees entanglement


def test_penalty_trains_the_decoder_and_vanishes_for_a_linear_decoder():
    vae = BetaVAE(image_size=32, latent_dim=8, channels=[8, 16], hessian_weight=1.0)
    z = torch.randn(4, 8)
    hp = hessian_penalty(vae.decode, z)
    hp.backward()
    assert float(hp.detach()) > 0
    # every weight of the decoder is pushed (biases of the output layer cancel in the second difference)
    weights = [(n, p) for n, p in vae.decoder.named_parameters() if n.endswith("weight") and p.ndim > 1]
    assert weights and all(float(p.grad.abs().sum()) > 0 for _, p in weights)
    linear = torch.nn.Linear(8, 100)
    assert float(hessian_penalty(linear, z).detach()) < 1e-6


def test_vae_shapes_loss_parts_and_unbounded_output():
    torch.manual_seed(0)
    vae = BetaVAE(image_size=32, latent_dim=16, channels=[8, 16, 16])
    x = torch.rand(6, 1, 32, 32) * 2 - 1
    loss, parts = vae.training_loss(x)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert set(parts) == {"recon", "kl", "hessian"} and all(torch.isfinite(v) for v in parts.values())
    e1 = vae.embed(x)
    vae.eval()
    e2 = vae.embed(x)
    assert e1.shape == (6, 16) and torch.equal(e1, e2)  # μ: deterministic, same in train and eval mode
    # and independent of the rest of the batch. Not bitwise: CPU kernels (oneDNN) may choose another algorithm
    # per batch shape, so sums are reordered. The bound is float32 rounding: a few ulps (2^-23 ≈ 1.2e-7) times
    # the conv/linear fan-in (≤ a few thousand terms) relative to the output scale; a batch-dependent layer
    # (BatchNorm statistics, a cross-sample op) moves μ by orders of magnitude more.
    scale = float(e1.abs().max())
    torch.testing.assert_close(vae.embed(x[:2]), e1[:2], rtol=1e-5, atol=1e-5 * scale)
    out = vae.decode(vae.embed(x))
    assert out.shape == (6, 1, 32, 32)
    # no sigmoid / tanh on the output: a constant -3 bias must pass straight through
    with torch.no_grad():
        vae.decoder.out.conv.bias.fill_(-3.0)
        assert float(vae.decode(torch.zeros(2, 16)).max()) < -1.0
    with pytest.raises(ValueError, match="divisible"):
        BetaVAE(image_size=36, channels=[8, 16, 32])


def test_presets_carry_the_poster_hyperparameters_and_config_overrides_them():
    nako, chex = PRESETS["vae"]["nako"], PRESETS["vae"]["chexpert"]
    assert (nako["lr"], nako["hessian_weight"], nako["batch_size"], nako["latent_dim"], nako["crop"]) == (5e-3, 5e-6, 64, 128, 256)
    assert (chex["lr"], chex["hessian_weight"], chex["batch_size"], chex["latent_dim"]) == (2.5e-3, 5e-7, 128, 128)
    dae_n, dae_c = PRESETS["dae"]["nako"], PRESETS["dae"]["chexpert"]
    assert (dae_n["lr"], dae_n["batch_size"], dae_n["latent_dim"], dae_c["lr"], dae_c["batch_size"]) == (1e-3, 5, 512, 5e-4, 64)
    cfg = resolve_config("vae", {"preset": "nako", "lr": 1e-4})
    assert cfg["lr"] == 1e-4 and cfg["batch_size"] == 64
    model = build_model("vae", {"preset": "demo", "crop": 32, "channels": [8, 16], "latent_dim": 12})
    assert isinstance(model, BetaVAE) and model.embedding_dim == 12 and model.image_size == 32
    with pytest.raises(KeyError, match="preset"):
        resolve_config("vae", {"preset": "nope"})


@pytest.mark.slow
def test_tiny_vae_learns_real_slices(tiny_cohort, tmp_path):
    """A few hundred steps on real (phantom) slices: loss falls and reconstructions beat the mean image."""
    cfg = resolve_config("vae", {"preset": "demo", "crop": 32, "channels": [8, 16, 32], "latent_dim": 16,
                                 "batch_size": 16, "steps": 240, "lr": 3e-3, "checkpoint_every": 1000,
                                 "log_every": 20, "hessian_batch": 4})
    settings = TrainSettings.from_config(cfg)
    store = SliceStore(tiny_cohort / "pre" / "index.parquet")
    splits = pl.read_parquet(tiny_cohort / "splits.parquet")
    rows = training_rows(store.index, splits, "all")
    data = SliceBatches(store.shard_dir, rows["shard"].to_numpy(), rows["row"].to_numpy(), store.canvas,
                        batch_size=16, crop=32, seed=0)
    seed_everything(0)
    model = build_model("vae", cfg)
    result = train(model, data, settings, tmp_path, config=cfg, fingerprint_=fingerprint("vae", cfg), threads=1)
    losses = [r["loss"] for r in result.log]
    assert losses[-1] < 0.5 * losses[0]
    # held-out slices: reconstruction error well below that of the training set's mean image
    held_out = center_crop_batch(store, qa_rows(store.index, splits, 8), 32)
    train_mean = center_crop_batch(store, rows.gather_every(max(1, rows.height // 400)), 32).mean(0)
    model.eval()
    with torch.no_grad():
        rec = model.decode(model.embed(held_out))
    mse_model = float((rec - held_out).square().mean())
    mse_mean = float((train_mean - held_out).square().mean())
    assert mse_model < 0.7 * mse_mean, (mse_model, mse_mean)
    assert float(rec.min()) < -0.8  # the -1 background is reachable: no squashing output activation
