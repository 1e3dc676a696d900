"""TensorBoard scalars through the `tensorboard` package's own writer (no TensorFlow), and the
sink that maps our metric names onto the tags the PyTorch engine used."""

from __future__ import annotations

from pathlib import Path

from tensorboard.summary import Writer

from ..research.curriculum import Signal
from .sink import Metrics, RunEnd


class TensorBoard:
    """Scalars through the `tensorboard` package's own writer (no TensorFlow needed)."""

    def __init__(self, directory: Path):
        self.writer = Writer(str(directory))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for tag, v in values.items():
            self.writer.add_scalar(tag, float(v), step)

    def close(self) -> None:
        self.writer.close()


TB_TAGS = {
    "train/loss": "Train/Loss",
    "train/loss_ema": "Train/LossEMA",
    "train/lr": "Train/LR",
    "train/grad_norm": "Train/GradNorm",
    "train/mask_prob": "Train/MaskProb",
    "train/phase": "Train/Phase",
    "train/lr_multiplier": "Train/LRMultiplier",
    "system/tokens_per_sec": "System/TokensPerSec",
    "system/mfu": "System/MFU",
    "curriculum/wwm_improvement": "Research/WWM_Improvement",
    "curriculum/span_improvement": "Research/Span_Improvement",
    "analytics/loss_slope": "Research/LossSlope",
    "analytics/noise_fraction": "Research/NoiseFraction",
    "analytics/oscillation_rate": "Research/OscillationRate",
}


TB_PREFIXES = {"locale_ema/": "Research/EMA_Loss_", "task_ema/": "Tasks/", "val/": "Eval/", "quick/": "Eval/quick_"}


def tensorboard_tag(key: str) -> str | None:
    """The TensorBoard tag of a metric key (None: not plotted, e.g. the ETA)."""
    if key in TB_TAGS:
        return TB_TAGS[key]
    for prefix, tag in TB_PREFIXES.items():
        if key.startswith(prefix):
            return tag + key[len(prefix) :].replace("/", "_")
    return None


class TensorBoardSink:
    def __init__(self, directory: Path):
        self.tb = TensorBoard(directory)

    def write(self, step: int, metrics: Metrics) -> None:
        tags = {tensorboard_tag(k): v for k, v in metrics.items() if v is not None}
        self.tb.scalars(step, {t: v for t, v in tags.items() if t is not None})

    def signal(self, sig: Signal) -> None:
        self.tb.scalars(sig.step, {f"Signals/{sig.kind}": sig.value})

    def close(self, end: RunEnd) -> None:
        self.tb.close()
