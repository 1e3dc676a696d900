"""What the evaluation suite reports: one registry of its metrics, read by the go/no-go check,
the `eval` table, the training console, TensorBoard and the report's plots.

The suite (suite.py) computes results under these keys; a new metric is computed there
and declared here once (docs/design.md, "Where to add things"). Per-locale and per-pair entries
(`val/loss/<locale>`, `align/top1/<a>-<b>`) are details of their family and are not listed.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config.schema import EvalConfig
from ..data.masks import MASK_KINDS

VERSE = "verse"  # the reconstruction of a whole verse: a host-side mask, not a sampler kind


@dataclass(frozen=True)
class EvalMetric:
    key: str  # results key, e.g. "val/ppl"
    line: str  # the `eval` table line it is printed on
    short: str  # its name on that line
    fmt: str = "{:.3f}"
    panel: str | None = None  # the report's evaluation.png panel that plots it
    gate: str | None = None  # the [eval] key of its go/no-go threshold
    minimum: bool = False  # the gate is a lower bound (else an upper bound)
    console: bool = False  # printed on the training console after each quick evaluation

    @property
    def label(self) -> str:
        return f"{self.line} {self.short}"


def reconstruction_kinds() -> list[str]:
    """What masked reconstruction scores: the sampler's kinds marked for it, then the verse mask."""
    return [k.name for k in MASK_KINDS.values() if k.reconstruction] + [VERSE]


def eval_metrics() -> list[EvalMetric]:
    """Every metric of the suite, in table order (reconstruction follows the mask registry)."""
    out = [
        EvalMetric("val/loss", "validation", "loss", "{:.4f}", panel="validation loss"),
        EvalMetric("val/ppl", "validation", "perplexity", panel=None, gate="max_val_ppl"),
        EvalMetric("val/bpb", "validation", "bits/byte"),
        EvalMetric("train/loss", "validation", "train loss", "{:.4f}"),
        EvalMetric(
            "gap/val_minus_train",
            "train/validation",
            "gap",
            "{:+.4f}",
            panel="train/validation gap",
            gate="max_train_val_gap",
        ),
    ]
    for kind in reconstruction_kinds():
        out += [
            EvalMetric(
                f"recon/{kind}/accuracy",
                f"reconstruction {kind}",
                "accuracy",
                panel="reconstruction accuracy",
                console=kind == "random",
            ),
            EvalMetric(f"recon/{kind}/cer", f"reconstruction {kind}", "CER"),
            EvalMetric(f"recon/{kind}/masked_fraction", f"reconstruction {kind}", "masked", "{:.1%}"),
        ]
    out += [
        EvalMetric(
            "align/top1", "alignment", "top-1", panel="alignment", gate="min_alignment_acc", minimum=True, console=True
        ),
        EvalMetric("align/chance", "alignment", "chance"),
        EvalMetric("align/keys", "alignment", "keys", "{:.0f}"),
        EvalMetric("align/procrustes", "alignment", "procrustes"),
        EvalMetric("align/cka", "alignment", "CKA", panel="alignment"),
    ]
    return out


def gated_keys() -> list[str]:
    """The [eval] keys that hold thresholds (checked against EvalConfig by the tests)."""
    return [m.gate for m in eval_metrics() if m.gate]


def go_no_go(results: dict[str, float], gates: EvalConfig) -> list[str]:
    """The thresholds that failed (empty: go); a gated metric that is missing fails."""
    failed = []
    for m in eval_metrics():
        if m.gate is None:
            continue
        limit = float(getattr(gates, m.gate))
        value = results.get(m.key)
        if value is None:  # the corpus or the run could not give it (alignment needs two locales)
            failed.append(f"{m.label} not measured (this corpus or run cannot give it), so eval.{m.gate} cannot pass")
            continue
        shown = round(value, 4)
        if m.minimum and (value is None or value < limit):
            failed.append(f"{m.label} {shown} < eval.{m.gate} = {limit:g}")
        elif not m.minimum and (value is None or value > limit):
            failed.append(f"{m.label} {shown} > eval.{m.gate} = {limit:g}")
    return failed


def format_table(results: dict[str, float], locales: list[str]) -> str:
    """The `eval` command's table: one line per metric line, in registry order."""
    lines: dict[str, list[str]] = {}
    for m in eval_metrics():
        if m.key in results:
            lines.setdefault(m.line, []).append(f"{m.short} {m.fmt.format(results[m.key])}")
    out = [f"{name:<22s} " + "  ".join(parts) for name, parts in lines.items()]
    per_locale = [f"{loc} {results[f'val/loss/{loc}']:.3f}" for loc in locales if f"val/loss/{loc}" in results]
    if per_locale:
        out.insert(1 if out else 0, "  validation loss by locale: " + "  ".join(per_locale))
    return "\n".join(out)


def console_summary(results: dict[str, float]) -> str:
    """The headline metrics of a quick evaluation, for the training console."""
    return " | ".join(
        f"{m.label} {m.fmt.format(results[m.key])}" for m in eval_metrics() if m.console and m.key in results
    )


def panels() -> dict[str, list[str]]:
    """evaluation.png: panel title -> the metric keys drawn in it."""
    out: dict[str, list[str]] = {}
    for m in eval_metrics():
        if m.panel:
            out.setdefault(m.panel, []).append(m.key)
    return out
