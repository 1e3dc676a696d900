"""Every config key is live: setting it to another valid value changes what it should change.

The key list comes from the schema (`config.SECTIONS`), so a new key fails
`test_every_key_is_probed_or_listed_inert` until it has a probe here or a reason in INERT.
Each probe names a context (the settings under which the key matters: masking on, multi-task
learning on, a diverging run), one other value, and the observable that must move:

- step: the train step as the loop builds it (`runtime.jit_step`, controls from the curriculum
  through `loop.step_controls`). A key whose value is compiled into the step is live when the
  traced program differs (its equations and the values it closes over: an ignored key leaves
  it as it was); a key that reaches the step at
  run time (seed, corpus, masking controls) must change the numbers of three steps: losses,
  gradient norms, learning rates, loss EMA, locale sums and the parameters after them. The
  research formulas behind these keys are held to independent references elsewhere
  (test_model, test_optim, test_sampler, test_curriculum, test_tasks).
- research: the research state (curriculum, EMAs, grokking) fed a fixed metric series through
  `ResearchState.observe`/`validated`, and the step controls it hands out at every step.
- evaluation: the evaluation suite's results and go/no-go on the initial parameters.
- run: a whole `train` command: which steps were logged, validated, evaluated and kept, the
  signals, the exit code, the files and the console.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest

from genesis_jax import config as C

INERT = {
    "data.cache_dir": "where the embedded corpus is imported; a path",
    "data.verify_corpus": "re-hashes the corpus at start and refuses altered bytes (test_survival); trains the same",
    "checkpoint.async_save": "when the checkpoint is written, not what (test_checkpoint checks the meta of an async save)",
    "training.host_huge_pages": "how the train command's process is launched, not what it computes (test_relaunch)",
    "parallel.data": "a layout: every mesh follows the one-device losses (test_sharding); one device here",
    "parallel.fsdp": "a layout: every mesh follows the one-device losses (test_sharding); one device here",
    "parallel.tensor": "a layout: every mesh follows the one-device losses (test_sharding); one device here",
}


def merged(*layers: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for layer in layers:
        for section, body in layer.items():
            out[section] = {**out.get(section, {}), **body}
    return out


BASE: dict[str, dict[str, Any]] = {
    "model": {"preset": "test", "compute_dtype": "float32", "n_layers": 2},
    "data": {"seq_len": 16},
    "training": {"batch_size": 2, "max_steps": 6, "log_interval": 1, "val_interval": 0},
    "optim": {"warmup_steps": 1},
    "logging": {"tensorboard": False, "progress": "lines"},
}
# Masking from step 0: the curriculum is put in WWM (or SPAN) at step 0 with a ramp under way.
MASK_SHAPE = {"data": {"seq_len": 64}, "training": {"batch_size": 4}}
WWM_CTX = merged(MASK_SHAPE, {"curriculum": {"wwm_ramp_steps": 4, "wwm_mask_prob": 0.4, "mask_ramp_start": 0.2}})
SPAN_CTX = merged(MASK_SHAPE, {"curriculum": {"span_ramp_steps": 4, "span_mask_prob": 0.4, "mask_ramp_start": 0.2}})
MTL_CTX = {
    "mtl": {
        "enabled": True,
        "lm_weight": 0.25,
        "coherence_weight": 0.25,
        "cross_ref_weight": 0.25,
        "paraphrase_weight": 0.25,
        "head_dim": 16,
        "max_len": 48,
        "cross_ref_min_distance": 20,
    },
    "training": {"grad_accum_steps": 4},
}
# The research series: a loss that falls 1.5% per 5 steps until step 40, then lies flat, so
# that each phase test, ramp, anchor and stun decides inside 160 steps.
RESEARCH_CTX = {
    "curriculum": {
        "wwm_trigger_steps": 10,
        "wwm_window": 5,
        "wwm_ramp_steps": 6,
        "span_trigger_steps": 30,
        "span_window": 5,
        "span_ramp_steps": 6,
        "plateau_lr_patience": 12,
        "stun_max_count": 2,
        "stun_cooldown_steps": 20,
        "analytics_window": 10,
        "mask_ramp_start": 0.05,
    },
    "eval": {"grokking_min_step": 20, "grokking_window": 30, "grokking_drop": 0.1},
}
EVAL_CTX = {"eval": {"val_windows": 4, "reconstruction_windows": 2, "alignment_keys": 8, "embed_len": 32}}
RUN_CTX = {
    "training": {"max_steps": 8, "val_interval": 4},
    "checkpoint": {"save_interval": 2, "keep": 2},
    "eval": {"val_windows": 2, "reconstruction_windows": 2, "alignment_keys": 4},
}
DIVERGE_CTX = {
    "optim": {"lr": 1e4, "warmup_steps": 0},
    "training": {"max_steps": 8, "on_nonfinite": "rollback", "nonfinite_limit": 2},
    "checkpoint": {"save_interval": 2},
}


@dataclass(frozen=True)
class Probe:
    value: Any  # the other valid value
    observable: str  # step, research, evaluation, run
    context: tuple[dict[str, dict[str, Any]], ...] = ()
    phase: str = ""  # step observable: "wwm" or "span" puts the curriculum there at step 0
    program: bool = False  # changes no value by design: the traced program must change instead


def step_probe(value: Any, *ctx: dict[str, dict[str, Any]], phase: str = "", program: bool = False) -> Probe:
    return Probe(value, "step", ctx, phase, program)


PROBES: dict[str, Probe] = {
    "model.preset": step_probe("tiny"),
    "model.dim": step_probe(48),
    "model.n_layers": step_probe(3),
    "model.n_heads": step_probe(2),
    "model.n_kv_heads": step_probe(2),
    "model.intermediate_size": step_probe(96),
    "model.norm_type": step_probe("deepnorm"),
    "model.deepnorm_beta_init": step_probe(False, {"model": {"norm_type": "deepnorm"}}),
    "model.rope_base": step_probe(100.0),
    "model.attention": step_probe("reference", program=True),
    "model.remat": step_probe(True, program=True),
    "model.scan_unroll": step_probe(2, program=True),
    "model.embed_init_std": step_probe(0.1),
    "model.compute_dtype": step_probe("bfloat16"),
    "data.corpus": step_probe("<other corpus>"),
    "data.locales": step_probe(["en", "fr"]),
    "data.seq_len": step_probe(24),
    "data.mask_id": step_probe(1, WWM_CTX, phase="wwm"),
    "training.max_steps": step_probe(40),
    "training.batch_size": step_probe(4),
    "training.grad_accum_steps": step_probe(2),
    "training.seed": step_probe(1),
    "training.log_interval": Probe(5, "research", (RESEARCH_CTX,)),
    "training.val_interval": Probe(0, "run", (RUN_CTX,)),
    "training.val_windows": Probe(3, "run", (RUN_CTX,)),
    "training.on_nonfinite": Probe("skip", "run", (DIVERGE_CTX,)),
    "training.nonfinite_limit": Probe(3, "run", (DIVERGE_CTX,)),
    "training.rollback_lr_scale": Probe(0.25, "run", (DIVERGE_CTX,)),
    "training.init_from": Probe("<an export>", "run", (RUN_CTX,)),
    "optim.lr": step_probe(0.01),
    "optim.schedule": step_probe("constant"),
    "optim.warmup_steps": step_probe(2),
    "optim.min_lr_ratio": step_probe(0.5),
    "optim.beta1": step_probe(0.5),
    "optim.beta2": step_probe(0.5),
    "optim.eps": step_probe(1e-3),
    "optim.weight_decay": step_probe(0.5),
    "optim.decay_embedding": step_probe(True),
    "optim.grad_clip": step_probe(0.01),
    "checkpoint.save_interval": Probe(5, "run", (RUN_CTX,)),
    "checkpoint.keep": Probe(1, "run", (RUN_CTX,)),
    "checkpoint.permanent_interval": Probe(4, "run", (RUN_CTX,)),
    "logging.tensorboard": Probe(True, "run", (RUN_CTX,)),
    "logging.progress": Probe("bar", "run", (RUN_CTX,)),
    "logging.report_interval": Probe(4, "run", (RUN_CTX,)),
    "curriculum.enabled": step_probe(False, WWM_CTX, phase="wwm"),
    "curriculum.wwm_mask_prob": step_probe(0.8, WWM_CTX, phase="wwm"),
    "curriculum.wwm_ramp_steps": step_probe(1, WWM_CTX, phase="wwm"),
    "curriculum.mask_ramp_start": step_probe(0.05, WWM_CTX, phase="wwm"),
    "curriculum.span_mask_prob": step_probe(0.8, SPAN_CTX, phase="span"),
    "curriculum.span_ramp_steps": step_probe(1, SPAN_CTX, phase="span"),
    "curriculum.span_min_len": step_probe(1, SPAN_CTX, phase="span"),
    "curriculum.span_max_len": step_probe(8, SPAN_CTX, phase="span"),
    "curriculum.loss_ema_decay": step_probe(0.5),
    **{
        f"curriculum.{k}": Probe(v, "research", (RESEARCH_CTX,))
        for k, v in {
            "wwm_trigger_steps": 50,
            "wwm_window": 10,
            "wwm_threshold": 0.02,
            "span_trigger_steps": 45,
            "span_window": 12,
            "span_threshold": 0.002,
            "analytics_window": 3,
            "locale_ema_decay": 0.5,
            "plateau_lr_patience": 20,
            "plateau_lr_drop": 0.25,
            "plateau_min_delta": 0.05,
            "stun_max_count": 1,
            "stun_cooldown_steps": 60,
            "stun_recovery_steps": 10,
        }.items()
    },
    "eval.interval": Probe(4, "run", (RUN_CTX,)),
    **{
        f"eval.{k}": Probe(v, "evaluation", (EVAL_CTX,))
        for k, v in {
            "val_windows": 8,
            "reconstruction_windows": 4,
            "mask_prob": 0.5,
            "span_len": 1,
            "alignment_keys": 4,
            "embed_len": 16,
            "max_val_ppl": 1000.0,
            "max_train_val_gap": -1.0,
            "min_alignment_acc": 0.99,
        }.items()
    },
    **{
        f"eval.{k}": Probe(v, "research", (RESEARCH_CTX,))
        for k, v in {"grokking_drop": 0.3, "grokking_window": 10, "grokking_min_step": 100}.items()
    },
    "mtl.enabled": step_probe(False, MTL_CTX),
    **{
        f"mtl.{k}": step_probe(v, MTL_CTX)
        for k, v in {
            "lm_weight": 0.9,
            "coherence_weight": 0.9,
            "cross_ref_weight": 0.9,
            "paraphrase_weight": 0.9,
            "lm_loss_weight": 2.0,
            "coherence_loss_weight": 2.0,
            "cross_ref_loss_weight": 2.0,
            "paraphrase_loss_weight": 2.0,
            "max_len": 24,
            "head_dim": 8,
            "triplet_margin": 2.0,
            "paraphrase_scale": 1.0,
            "cross_ref_window": 1,
            "cross_ref_min_distance": 5,
        }.items()
    },
    "mtl.task_ema_decay": Probe(0.5, "research", (RESEARCH_CTX,)),
}


def schema_keys() -> list[str]:
    return [f"{name}.{f.name}" for name, cls in C.SECTIONS.items() for f in dataclasses.fields(cls)]


def test_every_key_is_probed_or_listed_inert():
    keys = schema_keys()
    assert len(keys) == len(set(keys)) and len(keys) > 90
    neither = [k for k in keys if k not in PROBES and k not in INERT]
    both = [k for k in keys if k in PROBES and k in INERT]
    stale = [k for k in [*PROBES, *INERT] if k not in keys]
    assert not neither, (
        f"config keys neither probed nor listed inert (with a reason) in tests/unit/training/test_knobs.py: {neither}"
    )
    assert not both and not stale, (both, stale)
    assert all(len(reason) > 20 for reason in INERT.values())


# -- building configs -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def corpora(fixture_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The fixture corpus, and one with another held-out split (other training bytes)."""
    from conftest import write_textdir

    from genesis_jax.corpus.importers import import_textdir
    from genesis_jax.corpus.store import CorpusWriter

    base = tmp_path_factory.mktemp("other")
    writer = CorpusWriter()
    import_textdir(writer, write_textdir(base / "src", repeat=30))
    return {
        "fixture": str(fixture_corpus),
        "other": str(writer.write(base / "corpus", val_fraction=0.2, split_seed=1)),
        "export": str(write_export(base / "export")),
    }


def write_export(out: Path) -> Path:
    """A Hugging Face directory of BASE's model with other weights (seed 7), for training.init_from."""
    import json

    from flax import nnx

    from genesis_jax.hf import files, layout
    from genesis_jax.training.state import init_model

    cfg = C.from_dict(merged(BASE, {"training": {"seed": 7}}))
    out.mkdir()
    files.write_weights(layout.to_hf(nnx.to_pure_dict(nnx.state(init_model(cfg), nnx.Param)), cfg.model), out, 1 << 30)
    (out / "config.json").write_text(json.dumps(files.hf_config(cfg.model, cfg.data.seq_len, "float32")))
    return out


def configs(key: str, probe: Probe, corpora: dict[str, str]) -> tuple[C.Config, C.Config]:
    """(context, context with the key set to the probe's value)."""
    section, name = key.split(".")
    ctx = merged(BASE, {"data": {"corpus": corpora["fixture"]}}, *probe.context)
    value = {"<other corpus>": corpora["other"], "<an export>": corpora["export"]}.get(str(probe.value), probe.value)
    changed = merged(ctx, {section: {name: value}})
    a, b = C.from_dict(ctx), C.from_dict(changed)
    assert a != b, f"{key} = {value!r} left the loaded config as it was (ignored at load, or the context's value)"
    return a, b


# -- observables ------------------------------------------------------------------------------
def digest(tree: Any) -> str:
    h = hashlib.sha256()
    for leaf in jax.tree.leaves(tree):
        h.update(np.ascontiguousarray(np.asarray(leaf, np.float64)).tobytes())
    return h.hexdigest()


COMPILED: dict[str, Any] = {}  # program hash -> its executable: a probe whose program is the context's reuses it


class StepRun:
    """A context's train step: its program (traced, with the values it closes over), and (run
    only when asked) its numbers."""

    def __init__(self, cfg: C.Config, phase: str):
        from genesis_jax.research.curriculum import SPAN, WWM
        from genesis_jax.research.state import ResearchState
        from genesis_jax.training import build as runtime
        from genesis_jax.training.loop import step_controls

        self.cfg = cfg
        self.setup = setup = runtime.build(cfg)
        research = ResearchState.fresh(cfg, setup.locales, setup.has_words)
        if phase:
            research.curriculum.starts = {WWM: 0, SPAN: 0} if phase == "span" else {WWM: 0}
        self.controls = [step_controls(research.curriculum.controls(s), cfg, research.lr_scale) for s in range(3)]
        self.traced = runtime.jit_step(cfg, setup.graphdef, setup.mesh, setup.state_sharding, len(setup.locales)).trace(
            setup.state, setup.device_corpus, jax.random.key(cfg.training.seed), self.controls[0]
        )
        h = hashlib.sha256(str(self.traced.jaxpr).encode())
        for const in self.traced.jaxpr.consts:  # closed-over arrays print as names only
            h.update(np.asarray(const).tobytes())
        self.program = h.hexdigest()
        self._numbers: dict[str, Any] | None = None

    def numbers(self) -> dict[str, Any]:
        """Three steps: every metric of each, and the parameters after them."""
        if self._numbers is None:
            if self.program not in COMPILED:
                COMPILED[self.program] = self.traced.lower().compile()
            step, state, out = COMPILED[self.program], self.setup.state, {}
            for s, ctl in enumerate(self.controls):
                state, m = step(state, self.setup.device_corpus, jax.random.key(self.cfg.training.seed), ctl)
                out.update({f"{k}@{s}": np.asarray(v).tolist() for k, v in m.items()})
            out["params"] = digest(state.params)
            self._numbers = out
        return self._numbers


def research_series(cfg: C.Config) -> dict[str, Any]:
    """Fixed metrics for 160 steps and validations every 10 steps through the research state."""
    from genesis_jax.research.state import ResearchState
    from genesis_jax.training.loop import step_controls

    r = ResearchState.fresh(cfg, ["en", "fr"], has_words=True)
    rng = np.random.default_rng(0)
    signals, controls = [], []
    for s in range(160):
        ema = 3.0 * np.exp(-0.003 * min(s, 40))
        m = {
            "loss": np.float32(ema + 0.02 * rng.normal()),
            "loss_ema": np.float32(ema),
            "locale_loss_sum": np.array([ema, 2 * ema + 0.1 * rng.normal()]),
            "locale_count": np.array([1.0, 2.0]),
            "task/coherence/count": np.float32(1.0),
            "task/coherence/loss": np.float32(rng.uniform()),
            "task/coherence/acc": np.float32(rng.uniform()),
        }
        signals += [dataclasses.astuple(x) for x in r.observe(s, m)]
        controls.append(jax.tree.map(float, dataclasses.asdict(step_controls(r.curriculum.controls(s), cfg))))
        if s % 10 == 0:
            sig = r.validated(s, 3.0 * 0.95 ** (s / 10))
            signals += [dataclasses.astuple(sig)] if sig else []
    return {"signals": signals, "controls": controls, "state": r.state_dict()}


def evaluation_observable(cfg: C.Config) -> dict[str, Any]:
    from genesis_jax.evaluation.metrics import go_no_go
    from genesis_jax.evaluation.suite import EvalSuite
    from genesis_jax.training import build as runtime

    setup = runtime.build(cfg)
    results = EvalSuite(cfg, setup.corpus, setup.locales, setup.graphdef, setup.streams).run(
        setup.state.params, quick=False
    )
    return {"results": results, "go_no_go": go_no_go(results, cfg.eval)}


def run_observable(cfg: C.Config, tmp: Path) -> dict[str, Any]:
    from genesis_jax import train

    config = tmp / "run.toml"
    config.write_text(C.to_toml(cfg))
    console = io.StringIO()
    with contextlib.redirect_stdout(console), contextlib.redirect_stderr(io.StringIO()):
        code = train.main(["--config", str(config), "--run-dir", str(tmp / "run")])
    run = tmp / "run"
    with contextlib.closing(sqlite3.connect(run / "metrics.sqlite")) as db:
        logged = [r[0] for r in db.execute("SELECT step FROM training_logs ORDER BY step")]
        evaluated = sorted({(s, n.split("/")[0]) for s, n in db.execute("SELECT step, name FROM evaluation_logs")})
        val_losses = [
            r[0] for r in db.execute("SELECT value FROM evaluation_logs WHERE name = 'val/loss' ORDER BY step")
        ]
        signals = [tuple(r) for r in db.execute("SELECT step, type, value FROM grokking_signals ORDER BY id")]
        lrs = [r[0] for r in db.execute("SELECT lr FROM training_logs ORDER BY step")]
    kept = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    return {
        "code": code,
        "logged": logged,
        "evaluated": evaluated,
        "val_losses": val_losses,
        "signals": signals,
        "lrs": lrs,
        "kept": kept,
        "files": sorted(p.name for p in run.iterdir()),
        "bar": "\r" in console.getvalue(),
    }


def observe(cfg: C.Config, probe: Probe, tmp: Path) -> Any:
    if probe.observable == "step":
        return StepRun(cfg, probe.phase)
    if probe.observable == "research":
        return research_series(cfg)
    if probe.observable == "evaluation":
        return evaluation_observable(cfg)
    tmp.mkdir(parents=True, exist_ok=True)
    return run_observable(cfg, tmp)


@dataclass
class Baselines:
    """The context's observable, computed once per (observable, context)."""

    seen: dict[str, Any] = field(default_factory=dict)

    def get(self, cfg: C.Config, probe: Probe, tmp: Path) -> Any:
        key = f"{probe.observable}/{probe.phase}/{C.config_hash(cfg)}"
        if key not in self.seen:
            self.seen[key] = observe(cfg, probe, tmp)
        return self.seen[key]


@pytest.fixture(scope="module")
def baselines() -> Baselines:
    return Baselines()


def changed_entries(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Entries that differ; NaN equals NaN (a task not drawn in a step reports NaN in both)."""
    text = lambda v: json.dumps(v, sort_keys=True, default=str)  # noqa: E731
    return [k for k in sorted(set(a) | set(b)) if text(a.get(k)) != text(b.get(k))]


@pytest.mark.parametrize("key", sorted(PROBES))
def test_setting_a_key_changes_what_it_should(
    key: str, corpora: dict[str, str], baselines: Baselines, tmp_path: Path
) -> None:
    probe = PROBES[key]
    default, changed = configs(key, probe, corpora)
    base = baselines.get(default, probe, tmp_path / "default")
    after = observe(changed, probe, tmp_path / "changed")
    if probe.observable == "step":
        if probe.program or after.program != base.program:
            assert after.program != base.program, f"{key} = {probe.value!r} left the traced train step as it was"
            return
        base, after = base.numbers(), after.numbers()
    assert changed_entries(base, after), f"{key} = {probe.value!r} changed nothing in the {probe.observable} observable"
