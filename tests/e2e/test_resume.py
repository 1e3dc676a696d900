"""End to end: a run killed with SIGKILL, or stopped by SIGTERM, resumes exactly; a failure
inside training saves what is valid and exits non-zero with one line."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT

pytestmark = pytest.mark.slow

MAX_STEPS = 300


CURRICULUM = """
[curriculum]
wwm_trigger_steps = 40
wwm_window = 20
wwm_threshold = 1.0
wwm_ramp_steps = 100
span_trigger_steps = 60
span_window = 20
span_threshold = 1.0
span_ramp_steps = 50
span_min_len = 1
span_max_len = 3
plateau_lr_patience = 30
plateau_min_delta = 0.5
stun_max_count = 2
stun_cooldown_steps = 100
stun_recovery_steps = 40
[eval]
grokking_min_step = 100
grokking_window = 150
grokking_drop = 0.01
"""


def write_config(path: Path, corpus: Path, extra: str = "") -> Path:
    path.write_text(
        extra
        + f"""
[model]
preset = "test"
compute_dtype = "float32"
[data]
corpus = "{corpus}"
seq_len = 32
[training]
max_steps = {MAX_STEPS}
batch_size = 4
log_interval = 1
val_interval = 100
val_windows = 4
[optim]
warmup_steps = 5
[checkpoint]
save_interval = 50
keep = 2
[logging]
tensorboard = true
"""
    )
    return path


def command(cfg: Path, run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "genesis_jax.train", "--config", str(cfg), "--run-dir", str(run_dir)]


ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}


def logged(
    run_dir: Path, table: str = "training_logs", cols: str = "step, loss, loss_ema, grad_norm, lr"
) -> list[tuple]:
    db = run_dir / "metrics.sqlite"
    if not db.exists():
        return []
    con = sqlite3.connect(db, timeout=30)
    try:
        return con.execute(f"SELECT {cols} FROM {table} ORDER BY 1").fetchall()
    except sqlite3.OperationalError:
        return []
    finally:
        con.close()


def research_fields(run_dir: Path, step: int) -> dict[str, object]:
    """The research state a checkpoint holds, one entry per field ("curriculum.baseline",
    "locale_ema.ema.en", "last_grokking", ...), lists kept whole."""
    meta = json.loads((run_dir / "checkpoints" / str(step) / "meta" / "metadata").read_text())

    def flat(prefix: str, d: object) -> dict[str, object]:
        if isinstance(d, dict) and d:
            return {
                k: v for key, sub in d.items() for k, v in flat(f"{prefix}.{key}" if prefix else str(key), sub).items()
            }
        return {prefix: d}

    return flat("", meta["research"])


def assert_same_research_state(ref: Path, run: Path, fields: list[str]) -> None:
    """Every checkpoint both runs hold carries the same research state, field by field; the
    named fields must be among them (so that a field dropped from the state fails too)."""
    steps = sorted(
        {int(p.name) for p in (ref / "checkpoints").iterdir() if p.name.isdigit()}
        & {int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()}
    )
    assert steps, "no checkpoint step in common"
    for step in steps:
        a, b = research_fields(ref, step), research_fields(run, step)
        assert sorted(a) == sorted(b), (step, sorted(set(a) ^ set(b)))
        for name in fields:
            assert any(k == name or k.startswith(name + ".") for k in a), f"no research field {name}"
        for name in a:
            assert _same(a[name], b[name]), (
                f"research field {name} at step {step}: uninterrupted {a[name]!r}, resumed {b[name]!r}"
            )


def _same(a: object, b: object) -> bool:
    """Numbers (None read as NaN) within rtol 1e-6, anything else equal."""
    try:
        return bool(np.allclose(np.asarray(a, float), np.asarray(b, float), rtol=1e-6, equal_nan=True))
    except (TypeError, ValueError):
        return a == b


def run_until(cfg: Path, run_dir: Path, min_step: int, sig: int) -> subprocess.Popen:
    """Start training, wait until `min_step` is logged, send `sig`."""
    proc = subprocess.Popen(
        command(cfg, run_dir), env=ENV, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        rows = logged(run_dir, cols="step")
        if rows and rows[-1][0] >= min_step:
            proc.send_signal(sig)
            break
        time.sleep(0.01)
    proc.wait(timeout=240)
    return proc


@pytest.fixture(scope="module")
def reference(tmp_path_factory, fixture_corpus):
    base = tmp_path_factory.mktemp("resume")
    cfg = write_config(base / "run.toml", fixture_corpus)
    run = base / "uninterrupted"
    r = subprocess.run(command(cfg, run), env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return cfg, run


def assert_same_logs(a: Path, b: Path, cols: str = "step, loss, loss_ema, grad_norm, lr") -> None:
    ra, rb = logged(a, cols=cols), logged(b, cols=cols)
    assert [r[0] for r in ra] == [r[0] for r in rb] == list(range(MAX_STEPS))
    np.testing.assert_allclose(np.array(rb, dtype=float)[:, 1:], np.array(ra, dtype=float)[:, 1:], rtol=1e-6, atol=1e-7)
    va = sorted(logged(a, "evaluation_logs", "step, name, value"))
    vb = sorted(logged(b, "evaluation_logs", "step, name, value"))
    assert [v[:2] for v in va] == [v[:2] for v in vb]
    np.testing.assert_allclose([v[2] for v in vb], [v[2] for v in va], rtol=1e-6)


def test_run_directory_layout(reference):
    _, run = reference
    assert (run / "config.toml").is_file() and (run / "metrics.sqlite").is_file()
    assert any((run / "tensorboard").iterdir())
    steps = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [250, 300]  # keep = 2
    status = logged(run, "experiments", "status, final_step")
    assert status == [("completed", MAX_STEPS)]


def test_sigkill_then_resume_is_exact(reference, tmp_path):
    cfg, ref = reference
    run = tmp_path / "killed"
    proc = run_until(cfg, run, 120, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    r = subprocess.run(command(cfg, run), env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming" in r.stderr
    assert_same_logs(ref, run)
    assert logged(run, "experiments", "status, launches") == [("completed", 2)]


def test_sigterm_saves_current_step_and_resumes(reference, tmp_path):
    cfg, ref = reference
    run = tmp_path / "terminated"
    proc = run_until(cfg, run, 70, signal.SIGTERM)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    saved = max(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert saved > 70  # a checkpoint at the step where it stopped, not the last periodic one
    assert logged(run, "experiments", "status") == [("interrupted",)]
    r = subprocess.run(command(cfg, run), env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and f"from step {saved}" in r.stderr
    assert_same_logs(ref, run)


FAILING_RUN = """
import sys
from genesis_jax import train
from genesis_jax.telemetry.sqlite import MetricsDB
original = MetricsDB.log_train
def failing(self, row):
    if row["step"] == 65:
        raise OSError("disk full (injected)")
    original(self, row)
MetricsDB.log_train = failing
sys.exit(train.main(sys.argv[1:], own_process=True))
"""


def test_failure_inside_training_saves_and_exits_nonzero(reference, tmp_path):
    cfg, ref = reference
    run = tmp_path / "run"
    args = ["--config", str(cfg), "--run-dir", str(run), "--set", "checkpoint.async_save=false"]
    r = subprocess.run(
        [sys.executable, "-c", FAILING_RUN, *args], env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 1
    line = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert len(line) == 1 and "disk full (injected)" in line[0] and "saved step 67" in line[0]
    assert "Traceback" not in r.stderr
    trace = Path(line[0].rsplit("traceback in ", 1)[1])  # the full traceback, for the bug hunt
    text = trace.read_text()  # the frame that raised, then the error (their layout is Python's)
    assert trace.parent == run / "logs" and "in failing" in text and "OSError: disk full (injected)" in text
    assert logged(run, "experiments", "status") == [("failed",)]
    steps = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert steps[-1] == 67 and 50 in steps  # the step dispatched when logging step 65 failed
    # Resuming from the failure's checkpoint continues exactly like the uninterrupted run.
    r = subprocess.run(command(cfg, run), env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "from step 67" in r.stderr
    ref_rows = [x for x in logged(ref) if x[0] >= 66]
    got_rows = [x for x in logged(run) if x[0] >= 66]  # step 66 was logged while saving
    assert [x[0] for x in got_rows] == [x[0] for x in ref_rows]
    np.testing.assert_allclose(np.array(got_rows)[:, 1:], np.array(ref_rows)[:, 1:], rtol=1e-6, atol=1e-7)


def test_resume_refuses_another_shape_and_lists_changed_settings(fixture_corpus, tmp_path, capsys):
    from genesis_jax import train

    cfg = write_config(tmp_path / "run.toml", fixture_corpus)
    run = ["--config", str(cfg), "--run-dir", str(tmp_path / "run")]
    assert train.main(run + ["--set", "training.max_steps=3", "--set", "training.val_interval=0"]) == 0
    capsys.readouterr()
    assert train.main(run + ["--set", "training.max_steps=5", "--set", "model.dim=64"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1
    assert "model.dim: checkpoint 32, config 64" in err
    assert (
        train.main(
            run + ["--set", "training.max_steps=5", "--set", "training.val_interval=0", "--set", "optim.lr=0.01"]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert "resuming" in err and "optim.lr: 0.003 -> 0.01" in err and "training.max_steps: 3 -> 5" in err


@pytest.fixture(scope="module")
def curriculum_reference(tmp_path_factory, fixture_corpus):
    base = tmp_path_factory.mktemp("curriculum")
    cfg = write_config(base / "run.toml", fixture_corpus, CURRICULUM)
    run = base / "uninterrupted"
    r = subprocess.run(command(cfg, run), env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    signals = logged(run, "grokking_signals", "step, type, value")
    kinds = [(s, k) for s, k, _ in signals]
    # Hand-derived schedule (log_interval = 1): stun when 30 steps pass without a 50% better
    # minimum (step 30), WWM tested at 40 -> 60, active from 62, ramp to 162; SPAN eligible from
    # 122, tested 122 -> 142, active from 144 (before the WWM ramp completed: no WWM anchor);
    # no stagnation is counted during the ramps, so the second stun waits for the SPAN anchor
    # (144 + 50 = 194): 195 sets the new minimum, 196..225 are its 30 stagnant steps.
    assert (30, "lr_stun") in kinds and (225, "lr_stun") in kinds
    assert (60, "wwm_activation") in kinds and (142, "span_activation") in kinds and (194, "span_anchor") in kinds
    assert not [s for s, k in kinds if k == "lr_stun" and 62 <= s < 194]  # none inside a ramp
    # Validations at 0, 100, 200, 300: the first eligible one signals; 200 is inside its window.
    assert (100, "grokking") in kinds and (200, "grokking") not in kinds
    return cfg, run


RESEARCH_FIELDS = [
    "curriculum.starts",
    "curriculum.baseline",
    "curriculum.anchors",
    "curriculum.improvement",
    "curriculum.stuns",
    "curriculum.last_observed",
    "curriculum.analytics.lifetime",
    "curriculum.analytics.wwm",
    "curriculum.analytics.span",
    "locale_ema",
    "val_history",
    "last_grokking",
    "nonfinite.events",
    "nonfinite.lr_scale",
]


@pytest.mark.parametrize("kill_at", [110, 240], ids=["mid-wwm-ramp", "after-second-stun"])
def test_curriculum_resume_after_sigkill_is_exact(curriculum_reference, tmp_path, kill_at):
    cfg, ref = curriculum_reference
    run = tmp_path / "killed"
    proc = run_until(cfg, run, kill_at, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    r = subprocess.run(command(cfg, run), env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_logs(
        ref, run, cols="step, loss, loss_ema, grad_norm, lr, mask_prob, phase, wwm_improvement, span_improvement"
    )
    rows = logged(run, cols="step, mask_prob, phase, lr")
    assert {p for _, _, p, _ in rows} == {1, 2, 3}
    assert 0.05 < rows[112][1] < 0.15  # mid-ramp mask probability was logged
    sig = lambda d: sorted(logged(d, "grokking_signals", "step, type, value"))  # noqa: E731
    assert [x[:2] for x in sig(run)] == [x[:2] for x in sig(ref)]
    np.testing.assert_allclose([x[2] for x in sig(run)], [x[2] for x in sig(ref)], rtol=1e-6)
    lang = lambda d: logged(d, "language_logs", "step, locale, ema_loss")  # noqa: E731
    la, lb = lang(ref), lang(run)
    assert [x[:2] for x in la] == [x[:2] for x in lb]
    np.testing.assert_allclose([x[2] or 0 for x in lb], [x[2] or 0 for x in la], rtol=1e-6)
    assert_same_research_state(ref, run, RESEARCH_FIELDS)


def test_grokking_signal_pins_its_checkpoint(fixture_corpus, tmp_path):
    from genesis_jax.research.analytics import validation_drop

    assert validation_drop([(0, 4.0), (5, 5.0), (9, 3.0)], 10, 4.0, 10) == pytest.approx(0.2)
    assert validation_drop([(0, 4.0)], 20, 1.0, 10) is None  # nothing inside the window
    cfg = write_config(tmp_path / "run.toml", fixture_corpus)
    run = tmp_path / "run"
    r = subprocess.run(
        command(cfg, run)
        + [
            "--set",
            "training.max_steps=60",
            "--set",
            "training.val_interval=10",
            "--set",
            "checkpoint.keep=1",
            "--set",
            "checkpoint.save_interval=20",
            "--set",
            "eval.grokking_min_step=15",
            "--set",
            "eval.grokking_window=100",
            "--set",
            "eval.grokking_drop=0.05",
        ],
        env=ENV,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    signals = logged(run, "grokking_signals", "step, type, value")
    grok = [s for s in signals if s[1] == "grokking"]
    assert len(grok) == 1 and grok[0][0] >= 15 and grok[0][2] >= 0.05  # one signal per window
    pinned = grok[0][0]
    steps = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == sorted({pinned, 60})  # keep = 1, plus the pinned one
    assert json.loads((run / "checkpoints" / "pinned.json").read_text()) == [pinned]


def test_multitask_resume_after_sigkill_is_exact(fixture_corpus, tmp_path):
    extra = (
        "[mtl]\nenabled = true\nlm_weight = 0.4\ncoherence_weight = 0.2\ncross_ref_weight = 0.2\n"
        "paraphrase_weight = 0.2\nmax_len = 32\ncross_ref_min_distance = 20\n"
    )
    cfg = write_config(tmp_path / "run.toml", fixture_corpus, extra)
    sets = ["--set", "training.grad_accum_steps=2", "--set", "training.max_steps=70"]
    ref = tmp_path / "ref"
    # The reference runs beside the run that is killed (the two compile at once: the test's time).
    ref_proc = subprocess.Popen(
        command(cfg, ref) + sets, env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    run = tmp_path / "killed"
    cmd = command(cfg, run) + sets
    proc = subprocess.Popen(cmd, env=ENV, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        rows = logged(run, cols="step")
        if rows and rows[-1][0] >= 55:  # past the checkpoint at 50
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait(timeout=240)
    assert proc.returncode == -signal.SIGKILL
    _, err = ref_proc.communicate(timeout=300)
    assert ref_proc.returncode == 0, err[-2000:]
    r = subprocess.run(cmd, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    ra, rb = logged(ref), logged(run)
    assert [x[0] for x in ra] == [x[0] for x in rb] == list(range(70))
    np.testing.assert_allclose(np.array(rb, dtype=float)[:, 1:], np.array(ra, dtype=float)[:, 1:], rtol=1e-6, atol=1e-7)
    ta = sorted(logged(ref, "evaluation_logs", "step, name, value"))
    tb = sorted(logged(run, "evaluation_logs", "step, name, value"))
    assert [x[:2] for x in ta if x[1].startswith("task/")] == [x[:2] for x in tb if x[1].startswith("task/")]
    np.testing.assert_allclose(
        [x[2] for x in tb if x[1].startswith("task/")], [x[2] for x in ta if x[1].startswith("task/")], rtol=1e-6
    )
    assert_same_research_state(
        ref, run, [*RESEARCH_FIELDS, "task_ema.coherence/loss", "task_ema.cross_ref/acc", "task_ema.paraphrase/loss"]
    )


def tensorboard_scalars(run: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    out: dict[str, dict[int, float]] = {}
    for tag in acc.Tags()["tensors"]:
        out[tag] = {
            e.step: float(np.asarray(__import__("tensorboard").util.tensor_util.make_ndarray(e.tensor_proto)))
            for e in acc.Tensors(tag)
        }
    for tag in acc.Tags()["scalars"]:
        out[tag] = {e.step: e.value for e in acc.Scalars(tag)}
    return out


def test_tensorboard_has_the_spec_tags_with_the_logged_values(curriculum_reference):
    """The TensorBoard tags of the run-directory format (System/MFU only where the peak FLOP/s is known, i.e. on a GPU;
    Research/WWM_Improvement only once a WWM ramp completes, which this run never reaches), and
    Train/Loss equal to the SQLite rows, a second sink written from the same metrics."""
    _, run = curriculum_reference
    tags = tensorboard_scalars(run)
    spec = [
        "Train/Loss",
        "Train/LossEMA",
        "Train/LR",
        "Train/GradNorm",
        "Train/MaskProb",
        "Train/Phase",
        "System/TokensPerSec",
        "Research/Span_Improvement",
        "Eval/loss",
        "Eval/ppl",
        "Eval/bpb",
    ]
    spec += [f"Research/EMA_Loss_{loc}" for loc in ("en", "fr", "ru")] + [
        f"Eval/loss_{loc}" for loc in ("en", "fr", "ru")
    ]
    missing = [t for t in spec if t not in tags]
    assert not missing, (missing, sorted(tags))
    rows = {s: loss for s, loss in logged(run, cols="step, loss")}
    assert set(tags["Train/Loss"]) == set(rows)
    np.testing.assert_allclose(
        [tags["Train/Loss"][s] for s in sorted(rows)], [rows[s] for s in sorted(rows)], rtol=1e-6
    )
    assert {tags["Train/Phase"][s] for s in rows} == {1.0, 2.0, 3.0}
