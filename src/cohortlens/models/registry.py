"""Autoencoder models by name: presets, config resolution and construction.

Model modules are imported on first use, so reading the presets (or building one model) does not import
every model and its dependencies.

Config entries (`models.<name>` in the workflow config) are flat dicts: trainer keys (see
`training.settings.TrainSettings`) next to model keys (see the model's `from_config`). `preset: <name>` starts from
one of `PRESETS[model]` below; any key given next to it overrides the preset. Saving and loading a trained model:
`cohortlens.models.modelfile`.
"""

from __future__ import annotations

import importlib
from typing import Any, Mapping

from torch import nn

from cohortlens.models.protocol import AutoencoderModel

# registry key -> "module:Class"
MODELS = {
    "vae": "cohortlens.models.vae:BetaVAE",
    "dae": "cohortlens.models.dae:DiffusionAutoencoder",
}

# Poster 001 (Hunecke, Graf, Rückert): per dataset learning rate, Hessian-penalty weight, batch, latent, 256 px.
# Steps, channels, checkpoint cadence and EMA decay are not in the poster: chosen here.
_VAE_256 = {"crop": 256, "latent_dim": 128, "channels": [32, 64, 128, 256, 256], "subunits": 2, "beta": 1.0,
            "recon_loss": "mse", "hessian_samples": 2, "hessian_epsilon": 0.1, "train_slices": "all",
            "steps": 50_000, "checkpoint_every": 1_000, "log_every": 50, "warmup_steps": 500}
_DAE_256 = {"crop": 256, "latent_dim": 512, "train_slices": "all", "ema_decay": 0.9999, "checkpoint_every": 2_000,
            "log_every": 100, "normalise": "train_zscore"}
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "vae": {
        # NAKO / GNC (paper 003's spine MRI)
        "nako": {**_VAE_256, "lr": 5e-3, "hessian_weight": 5e-6, "batch_size": 64},
        "chexpert": {**_VAE_256, "lr": 2.5e-3, "hessian_weight": 5e-7, "batch_size": 128},
        # the 64 px demo cohort on 2 CPU cores in about a minute (99 img/s: 300 steps in 73 s)
        "demo": {"crop": 64, "latent_dim": 128, "channels": [16, 32, 64], "subunits": 1, "beta": 1.0,
                 "recon_loss": "mse", "hessian_weight": 5e-6, "hessian_samples": 2, "hessian_epsilon": 0.1,
                 "hessian_batch": 8, "lr": 2e-3, "batch_size": 32, "steps": 300, "train_slices": "all", "checkpoint_every": 100,
                 "log_every": 10, "warmup_steps": 20},
    },
    "dae": {
        "nako": {**_DAE_256, "lr": 1e-3, "batch_size": 5, "steps": 400_000},
        "chexpert": {**_DAE_256, "lr": 5e-4, "batch_size": 64, "steps": 200_000},
        # architecture: models/dae.py's DEMO_TINY_CONFIG (64 px, 32-d z_sem), picked by its `from_config`, at
        # half its width (8 base channels): 68 img/s instead of 35 on 2 CPU cores, 250 steps in ~70 s
        # timestep_power 0.5: noisier steps twice as often as with uniform t (docs/models.md: the 250 steps' ridge
        # age R² 0.76 / 0.75 / 0.37 -> 0.84 / 0.77 / 0.49, sex unchanged); encoder_lr_mult 10: the semantic
        # encoder at 1e-2 (age R², seeds 0 / 1: 0.90 / 0.87, 0.92 / 0.66, 0.75 / 0.72 against 0.84 / 0.53,
        # 0.77 / 0.58, 0.49 / 0.23 at 1e-3; sex up too)
        "demo": {"crop": 64, "base_channels": 8, "norm_groups": 4, "lr": 1e-3, "batch_size": 16, "steps": 250,
                 "train_slices": "all", "ema_decay": 0.999, "checkpoint_every": 100, "log_every": 10,
                 "normalise": "train_zscore", "timestep_power": 0.5, "encoder_lr_mult": 10.0},
    },
}


def resolve_config(name: str, cfg: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The preset named by cfg['preset'] (if any) overridden by every other key of cfg."""
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; registered: {sorted(MODELS)}")
    cfg = dict(cfg or {})
    preset = cfg.get("preset")
    if preset is None:
        return cfg
    if preset not in PRESETS.get(name, {}):
        raise KeyError(f"{name}: unknown preset {preset!r}; available: {sorted(PRESETS.get(name, {}))}")
    return {**PRESETS[name][preset], **cfg}


def model_class(name: str) -> type[nn.Module]:
    """The model's class; ImportError when its module cannot be imported (e.g. MONAI missing)."""
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; registered: {sorted(MODELS)}")
    module_name, class_name = MODELS[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def available_models() -> dict[str, str | None]:
    """name -> None when importable, else the reason it is not."""
    out = {}
    for name in MODELS:
        try:
            model_class(name)
            out[name] = None
        except ImportError as exc:
            out[name] = f"{type(exc).__name__}: {exc}"
    return out


def build_model(name: str, cfg: Mapping[str, Any] | None = None) -> AutoencoderModel:
    """A freshly initialised model (torch's global RNG decides the initial weights: seed it first), built by the
    class's `from_config` from the resolved flat config."""
    cfg = resolve_config(name, cfg)
    cls = model_class(name)
    model = cls.from_config(cfg)
    for attr in ("name", "embedding_dim", "training_loss", "embed"):
        if not hasattr(model, attr):
            raise TypeError(f"{cls.__name__} does not implement the AutoencoderModel protocol: no {attr!r}")
    return model
