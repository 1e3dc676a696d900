"""`verify` catches a wrong backend; the console line and bar; permanent checkpoints."""

import csv
import io

import jax.numpy as jnp

from genesis_jax import config as C, verify
from genesis_jax.config.schema import CheckpointConfig
from genesis_jax.kernels.reference import decode_attention, reference_attention
from genesis_jax.model import attention
from genesis_jax.model.attention import Backend
from genesis_jax.telemetry.console import Console, format_line
from genesis_jax.training.checkpoint import Checkpointer


def test_verify_passes_real_backends_and_fails_a_wrong_one(tmp_path, capsys, monkeypatch):
    out = tmp_path / "verify.csv"
    assert verify.main(["--out", str(out)]) == 0
    rows = {r["backend"]: r for r in csv.DictReader(out.open())}
    assert set(rows) == {"xla", "reference", "pallas", "mosaic", "cudnn", "auto"}  # every registered backend
    assert all(rows[name]["status"] == "pass" for name in ("xla", "reference", "pallas", "auto"))
    assert rows["cudnn"]["status"] == rows["mosaic"]["status"] == "unavailable"  # no GPU here

    def future(q, k, v, *, causal=True, segment_ids=None, sm_scale=None):
        return reference_attention(q, k, v, causal=False)  # attends to the future: wrong, with the right shapes

    # A backend registered once is checked by verify (and accepted by the config) with no other change.
    monkeypatch.setitem(
        attention.BACKENDS, "future", Backend("future", future, decode_attention, None, "a wrong kernel")
    )
    assert C.from_dict({"model": {"attention": "future"}}).model.attention == "future"
    # The others were checked above: the second run checks the new one (and xla, auto) only.
    monkeypatch.setattr(attention, "BACKENDS", {k: attention.BACKENDS[k] for k in ("reference", "xla", "future")})
    assert verify.main([]) == 1
    text = capsys.readouterr().out
    assert "future | float32 | FAIL" in text and "1 check(s) failed" in text


def test_console_line_against_a_hand_written_one():
    m = {
        "step": 1200,
        "loss": 1.83142,
        "loss_ema": 1.99651,
        "lr": 2.4731e-3,
        "grad_norm": 0.5567,
        "phase_name": "WWM",
        "mask_prob": 0.0625,
        "improvement": 1.61,
        "tokens_per_sec": 15123.0,
        "lr_mult": 0.56,
        "stuns": 1,
        "stun_max": 1,
    }
    assert format_line(m, 1500, 138.0) == (
        "step    1200/1500 | loss 1.8314 | ema 1.9965 | lr 2.47e-03 | gnorm  0.557 | WWM  mask  6.2%  +1.6% | "
        "lr x0.56 (stun 1/1) |    15.1k tok/s | ETA 2m18s"
    )


def test_progress_bar_never_erases_a_log_line():
    stream = io.StringIO()
    console = Console(100, "bar", stream)
    console.progress(10, 5.0)
    console.print("step 10 line")
    console.progress(100, 0.0)  # the last step is always drawn (others at most every 0.1 s)
    console.close()
    text = stream.getvalue()
    # Each log line is written whole after clearing the bar, and stays: the bar is redrawn after it.
    assert "\r\x1b[Kstep 10 line\n" in text and text.index("step 10 line\n") < text.index("100/100")
    assert "\n" not in text.split("step 10 line\n", 1)[1]  # later bar draws only rewrite their own line


def test_permanent_interval_keeps_every_multiple_besides_the_last_ones(tmp_path):
    ckpt = Checkpointer(tmp_path / "checkpoints", CheckpointConfig(keep=2, permanent_interval=4, async_save=False))
    state = {"w": jnp.zeros(3)}
    for step in range(1, 12):
        ckpt.save(step, state, {"step": step})
    ckpt.close()
    kept = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert kept == [4, 8, 10, 11]
