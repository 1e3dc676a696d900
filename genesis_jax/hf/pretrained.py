"""`train --init-from DIR`: a new run starts from the weights of a Hugging Face model directory
(an export, or any Llama with the 260-byte vocabulary), checked against `[model]` first."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
from flax import nnx

from ..config.schema import Config, ModelSpec
from ..core.errors import UserError
from ..parallel.sharding import put
from ..training.state import TrainState
from .files import check_compatible, read_weights
from .layout import from_hf


def read_pretrained(directory: Path, model: ModelSpec) -> dict[str, Any]:
    """The decoder's parameter tree from `directory`, or one line naming what does not fit."""
    where = f"training.init_from = {directory}"
    if not directory.is_dir():
        raise UserError(f"{where}: not a directory")
    try:
        hf = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{where}: no config.json (not a Hugging Face model directory)") from None
    except (ValueError, OSError) as e:
        raise UserError(f"{where}: config.json unreadable ({e})") from None
    if not isinstance(hf, dict):
        raise UserError(f"{where}: config.json is not a JSON object")
    check_compatible(hf, model, directory)
    try:
        return from_hf(read_weights(directory), model)
    except ValueError as e:
        raise UserError(f"{where}: {e.args[0] if e.args else e}") from None


def start_from_pretrained(state: TrainState, shardings: Any, cfg: Config) -> TrainState:
    """`state` with the decoder's parameters read from `training.init_from` (task heads and the
    optimizer state stay as initialised), placed like the parameters they replace."""
    loaded = read_pretrained(Path(cfg.training.init_from).expanduser(), cfg.model)
    pure = nnx.to_pure_dict(state.params)

    def merge(ours: dict[str, Any], theirs: dict[str, Any]) -> None:
        for key, value in theirs.items():
            if isinstance(value, dict):
                merge(ours[key], value)
            else:
                ours[key] = value

    merge(pure, loaded)
    params = jax.tree.map(lambda x: x, state.params)  # a new State to fill
    nnx.replace_by_pure_dict(params, pure)
    return dataclasses.replace(state, params=put(params, shardings.params))
