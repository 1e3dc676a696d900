"""Building a run: corpus on the devices, initial state, the compiled step (shared with the
benchmarks and with `plan`, which builds the same step from shapes alone)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh

from ..config.schema import Config
from ..core.errors import UserError
from ..corpus.store import Corpus
from ..data.device import DeviceCorpus, corpus_arrays
from ..data.host import Streams, ValWindows, open_configured, selected_locales, val_windows
from ..data.verses import build_verse_index, check_possible
from ..model.memory import check_training
from ..parallel.sharding import check_devices, make_mesh, put, replicated, state_shardings
from .state import TrainState, init_model, init_state
from .step import StepControls, StepFn, make_train_step


@dataclass
class HostData:
    """The corpus as the run will hold it, read on the host: nothing is on a device yet."""

    corpus: Corpus
    locales: list[str]
    arrays: DeviceCorpus  # host (NumPy) arrays of the training split the devices hold
    windows: ValWindows
    has_words: bool
    streams: Streams  # (train, held-out) host streams from Corpus.stream, reused by the evaluation suite


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
    streams: Streams  # as HostData.streams


def load_data(cfg: Config) -> HostData:
    """Open the corpus and lay out its training split and validation windows on the host."""
    corpus = open_configured(cfg.data)
    locales = selected_locales(corpus, cfg.data)
    tokens, words, starts = corpus.stream(locales, heldout=False)
    arrays = corpus_arrays(tokens, words, starts, cfg.data.seq_len)
    if cfg.mtl.enabled:
        arrays = dataclasses.replace(arrays, verses=build_verse_index(corpus, locales, starts))
        check_possible(cfg.mtl, arrays.verses, locales)
    if int(arrays.valid_cum[-1]) == 0:
        raise UserError(f"data.seq_len = {cfg.data.seq_len}: longer than every locale's training text in {corpus.path}")
    heldout = corpus.stream(locales, heldout=True)
    windows = val_windows(heldout[0], heldout[2], locales, cfg.data.seq_len, cfg.training.val_windows)
    return HostData(corpus, locales, arrays, windows, bool(words.any()), ((tokens, words, starts), heldout))


def build(cfg: Config) -> Setup:
    """Open the corpus, put its training split on the devices, initialise the state."""
    check_training(cfg)  # before anything is allocated
    mesh = make_mesh(parallel=cfg.parallel)
    check_devices(cfg.training.batch_size, cfg.model, mesh)
    data = load_data(cfg)
    device_corpus = put(data.arrays, replicated(mesh))
    graphdef, state, shardings = placed_state(cfg, mesh)
    return Setup(
        mesh,
        data.locales,
        device_corpus,
        data.windows,
        graphdef,
        state,
        shardings,
        data.has_words,
        data.corpus,
        data.streams,
    )


def placed_state(cfg: Config, mesh: Mesh) -> tuple[nnx.GraphDef, TrainState, Any]:
    """The model's graph, and the initial train state placed on the mesh by its logical axes."""
    model = init_model(cfg, mesh)
    state = init_state(cfg, model)
    shardings = state_shardings(mesh, state)
    return nnx.graphdef(model), put(state, shardings), shardings


def abstract_state(cfg: Config, mesh: Mesh) -> tuple[nnx.GraphDef, TrainState, Any]:
    """`placed_state` without computing anything: shapes, dtypes and shardings only (to compile
    for devices that are absent)."""
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: init_model(cfg, mesh)))
    shapes = jax.eval_shape(lambda: init_state(cfg, init_model(cfg, mesh)))
    shardings = state_shardings(mesh, shapes)
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)
    return graphdef, state, shardings


def jit_step(
    cfg: Config, graphdef: nnx.GraphDef, mesh: Mesh, state_sharding: Any, n_locales: int
) -> jax.stages.Wrapped:
    """The train step under `jax.jit` with explicit shardings (the state's from its logical axes,
    everything else replicated) and the state donated."""
    step = make_train_step(cfg, graphdef, mesh, n_locales=n_locales)
    everywhere = replicated(mesh)
    return jax.jit(
        step,
        donate_argnums=0,
        in_shardings=(state_sharding, everywhere, everywhere, everywhere),
        out_shardings=(state_sharding, everywhere),
    )


def compile_step(cfg: Config, s: Setup, controls: StepControls) -> StepFn:
    """The train step compiled ahead of time for the setup's mesh."""
    step = jit_step(cfg, s.graphdef, s.mesh, s.state_sharding, len(s.locales))
    return step.lower(s.state, s.device_corpus, jax.random.key(cfg.training.seed), controls).compile()
