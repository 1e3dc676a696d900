"""Building a run: corpus on the devices, initial state, the compiled step (shared with benchmarks)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh

from .config import Config
from .corpus.store import Corpus
from .data import Streams, ValWindows, open_configured, selected_locales, val_windows
from .errors import UserError
from .sampler import DeviceCorpus, build_device_corpus
from .sharding import check_devices, make_mesh, put, replicated, state_shardings
from .step import StepControls, StepFn, TrainState, init_model, init_state, make_train_step
from .tasks import build_verse_index


@dataclass
class Setup:
    """Everything the loop needs, built the same way for training and for benchmarks."""

    mesh: Mesh
    locales: list[str]
    device_corpus: DeviceCorpus
    windows: ValWindows
    graphdef: nnx.GraphDef
    state: TrainState
    state_sharding: Any  # TrainState-shaped tree of NamedSharding (sharding.state_shardings)
    has_words: bool
    corpus: Corpus
    streams: Streams  # (train, held-out) host streams from Corpus.stream, reused by the evaluation suite


def build(cfg: Config) -> Setup:
    """Open the corpus, put its training split on the devices, initialise the state."""
    mesh = make_mesh(parallel=cfg.parallel)
    check_devices(cfg, mesh)
    corpus = open_configured(cfg.data)
    locales = selected_locales(corpus, cfg.data)
    tokens, words, starts = corpus.stream(locales, heldout=False)
    everywhere = replicated(mesh)
    device_corpus = build_device_corpus(tokens, words, starts, cfg.data.seq_len, everywhere)
    if cfg.mtl.enabled:
        index = build_verse_index(corpus, locales, starts)
        device_corpus = dataclasses.replace(device_corpus, verses=put(index, everywhere))
    if int(device_corpus.valid_cum[-1]) == 0:
        raise UserError(f"data.seq_len = {cfg.data.seq_len}: longer than every locale's training text in {corpus.path}")
    heldout = corpus.stream(locales, heldout=True)
    windows = val_windows(heldout[0], heldout[2], locales, cfg.data.seq_len, cfg.training.val_windows)
    graphdef, state, shardings = placed_state(cfg, mesh)
    return Setup(mesh, locales, device_corpus, windows, graphdef, state, shardings, bool(words.any()), corpus,
                 ((tokens, words, starts), heldout))


def placed_state(cfg: Config, mesh: Mesh) -> tuple[nnx.GraphDef, TrainState, Any]:
    """The model's graph, and the initial train state placed on the mesh by its logical axes."""
    model = init_model(cfg, mesh)
    state = init_state(cfg, model)
    shardings = state_shardings(mesh, state)
    return nnx.graphdef(model), put(state, shardings), shardings


def compile_step(cfg: Config, s: Setup, controls: StepControls) -> StepFn:
    """Ahead-of-time compiled train step with explicit shardings (the state's from its logical
    axes, everything else replicated) and the state donated."""
    step = make_train_step(cfg, s.graphdef, s.mesh, n_locales=len(s.locales))
    everywhere = replicated(s.mesh)
    return jax.jit(step, donate_argnums=0, in_shardings=(s.state_sharding, everywhere, everywhere, everywhere),
                   out_shardings=(s.state_sharding, everywhere)).lower(
        s.state, s.device_corpus, jax.random.key(cfg.training.seed), controls).compile()


