"""PNG plots of a run from its SQLite logs, in <run>/reports/ (`python -m genesis_jax.report`,
and the report-snapshot hook during training):

- training.png: loss and loss EMA with the learning rate on a second axis, phases shaded,
  signals (activations, stuns, grokking) marked;
- locales.png: per-locale training EMA and validation loss;
- evaluation.png: evaluation metrics over steps (validation, reconstruction, alignment).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from ..core.errors import UserError
from ..core.writing import replacing
from ..evaluation import metrics as eval_metrics

PHASE_COLOURS = {1: None, 2: "#fde9c9", 3: "#d9ecf7"}
SIGNAL_COLOURS = {
    "wwm_activation": "#d98b00",
    "span_activation": "#1f77b4",
    "lr_stun": "#c0392b",
    "grokking": "#2e8b57",
}


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise UserError("plots need matplotlib: pip install 'genesis-jax[report]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _rows(con: sqlite3.Connection, sql: str) -> list[tuple[Any, ...]]:
    try:
        return con.execute(sql).fetchall()
    except sqlite3.OperationalError:
        return []


def _save(plt: Any, fig: Any, path: Path) -> Path:
    fig.tight_layout()
    try:
        with replacing(path) as tmp:
            fig.savefig(tmp, dpi=110, format=path.suffix.lstrip("."))
    finally:
        plt.close(fig)
    return path


def _shade_phases(ax: Any, steps: list[int], phases: list[int]) -> None:
    start = 0
    for i in range(1, len(steps) + 1):
        if i == len(steps) or phases[i] != phases[start]:
            colour = PHASE_COLOURS.get(phases[start])
            if colour:
                ax.axvspan(
                    steps[start],
                    steps[i - 1],
                    color=colour,
                    alpha=0.8,
                    lw=0,
                    label={2: "WWM", 3: "SPAN"}[phases[start]],
                )
            start = i


def plot_training(plt: Any, con: sqlite3.Connection, out: Path) -> Path | None:
    rows = _rows(con, "SELECT step, loss, loss_ema, lr, phase FROM training_logs ORDER BY step")
    if not rows:
        return None
    steps = [r[0] for r in rows]
    fig, ax = plt.subplots(figsize=(10, 5))
    _shade_phases(ax, steps, [int(r[4] or 1) for r in rows])
    ax.plot(steps, [r[1] for r in rows], lw=0.8, alpha=0.5, label="loss")
    ax.plot(steps, [r[2] for r in rows], lw=1.6, label="loss EMA")
    for step, kind in _rows(con, "SELECT step, type FROM grokking_signals ORDER BY step"):
        if kind in SIGNAL_COLOURS:
            ax.axvline(step, color=SIGNAL_COLOURS[kind], ls="--", lw=1)
            ax.annotate(
                kind,
                (step, ax.get_ylim()[1]),
                rotation=90,
                va="top",
                ha="right",
                fontsize=7,
                color=SIGNAL_COLOURS[kind],
            )
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/byte)")
    lr_ax = ax.twinx()
    lr_ax.plot(steps, [r[3] for r in rows], color="grey", lw=1, label="learning rate")
    lr_ax.set_ylabel("learning rate")
    handles = ax.get_legend_handles_labels()[0] + lr_ax.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="upper right", fontsize=8)
    ax.set_title("training")
    return _save(plt, fig, out / "training.png")


def plot_locales(plt: Any, con: sqlite3.Connection, out: Path) -> Path | None:
    rows = _rows(con, "SELECT step, locale, ema_loss, val_loss FROM language_logs ORDER BY step")
    if not rows:
        return None
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for loc in sorted({r[1] for r in rows}):
        ema = [(r[0], r[2]) for r in rows if r[1] == loc and r[2] is not None]
        val = [(r[0], r[3]) for r in rows if r[1] == loc and r[3] is not None]
        if ema:
            a.plot(*zip(*ema), lw=1, label=loc)
        if val:
            b.plot(*zip(*val), marker="o", ms=3, lw=1, label=loc)
    a.set_title("training EMA of per-sequence loss, by locale")
    b.set_title("validation loss, by locale")
    for ax in (a, b):
        ax.set_xlabel("step")
        ax.legend(fontsize=7, ncol=2)
    a.set_ylabel("cross-entropy (nats/byte)")
    return _save(plt, fig, out / "locales.png")


def plot_evaluation(plt: Any, con: sqlite3.Connection, out: Path) -> Path | None:
    rows = _rows(con, "SELECT step, name, value FROM evaluation_logs ORDER BY step")
    names = {r[1] for r in rows}
    # Training logs the quick suite under quick/ and periodic validation under its own key.
    panels = [
        (title, [n for key in keys for n in (key, f"quick/{key}") if n in names])
        for title, keys in eval_metrics.panels().items()
    ]
    panels = [p for p in panels if p[1]]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4), squeeze=False)
    for ax, (title, keys) in zip(axes[0], panels):
        for key in keys:
            pts = [(r[0], r[2]) for r in rows if r[1] == key]
            ax.plot(*zip(*pts), marker="o", ms=3, lw=1, label=key.replace("quick/", ""))
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    return _save(plt, fig, out / "evaluation.png")


def plot_run(run_dir: Path) -> list[Path]:
    """The plots written, or a UserError saying why there are none."""
    db = run_dir / "metrics.sqlite"
    if not db.is_file():
        raise UserError(f"{run_dir}: no metrics.sqlite (not a run directory, or it never logged)")
    plt = _pyplot()
    out = run_dir / "reports"
    out.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        written = [
            p for p in (plot_training(plt, con, out), plot_locales(plt, con, out), plot_evaluation(plt, con, out)) if p
        ]
    except sqlite3.DatabaseError as e:
        raise UserError(f"{db}: unreadable metrics database ({e})") from None
    finally:
        con.close()
    if not written:
        raise UserError(f"{db}: no rows to plot (the run has not logged a step yet); nothing written")
    return written
