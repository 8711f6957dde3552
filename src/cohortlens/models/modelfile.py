"""model.pt, the trained autoencoder file: written by the trainer, read by the embedder.

One `torch.save` dict, loadable with `torch.load(weights_only=True)`:

    model           registry name ("vae" | "dae")
    embedding_dim   length of the per-slice embedding
    config          the resolved models.<name> config the model was built and trained with
    fingerprint     the training fingerprint (config + training slices; see `training.settings.fingerprint`)
    steps           training steps done
    final           the last train_log.csv row ({} when none)
    state_dict      the trained weights (on the CPU)
    ema_state_dict  the EMA weights, when the run kept an EMA (`ema_decay`)

`load_model` rebuilds the model through the registry from `model` and `config`, then loads the weights.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from cohortlens.io.tables import atomic_path
from cohortlens.models.registry import build_model
from cohortlens.types import PathLike


def _cpu_state(module: nn.Module) -> dict:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def save_model(path: PathLike, name: str, model: nn.Module, ema_module: nn.Module | None, config: Mapping, fp: str,
               steps: int, final: dict | None) -> None:
    """Write model.pt atomically (the format above)."""
    state = {"model": name, "embedding_dim": int(model.embedding_dim), "config": dict(config), "fingerprint": fp,
             "steps": int(steps), "final": final or {}, "state_dict": _cpu_state(model)}
    if ema_module is not None:
        state["ema_state_dict"] = _cpu_state(ema_module)
    with atomic_path(path, ".pt") as tmp:
        torch.save(state, tmp)


def load_model(path: PathLike, device: torch.device | str = "cpu", *, use_ema: bool = True
               ) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a trained model from model.pt (EMA weights when present and use_ema), in eval mode.

    Returns (model, info) with info = model.pt's metadata plus `weights`: "ema" | "raw".
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = build_model(state["model"], state["config"])
    weights = "ema" if use_ema and "ema_state_dict" in state else "raw"
    model.load_state_dict(state["ema_state_dict" if weights == "ema" else "state_dict"])
    model.to(device).eval()
    info = {k: v for k, v in state.items() if k not in ("state_dict", "ema_state_dict")}
    info["weights"] = weights
    return model, info
