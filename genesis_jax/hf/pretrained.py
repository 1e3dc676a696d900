"""`train --init-from DIR`: the decoder's weights read from a Hugging Face model directory (an
export, or any Llama with the 260-byte vocabulary), checked against `[model]` first; the run
places them (training/state.py, `start_from_pretrained`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..config.schema import ModelSpec
from ..core.errors import UserError
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
