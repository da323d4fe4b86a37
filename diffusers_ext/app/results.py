"""What the page shows of a comparison besides the two images: the difference image and the session's
speed vs deviation chart. No gradio here (plain numpy and lists), so it is tested without a browser.

    difference_image(stock, patched, gain)   |stock - patched| * gain, clipped to [0, 1]
                                             (= amplified(absolute_difference(stock, patched), gain))
    record_of(run)                           one run of the session's history (a `RunRecord`)
    comparable(history)                      the runs made with the latest run's settings
    chart_rows(history)                      the chart's points: stock at (0, 1), one per comparable run
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DIFFERENCE_GAINS = (1, 4, 16, 64)
DEFAULT_GAIN = 4
MAX_HISTORY = 100          # runs kept per browser session (a few hundred bytes each)
CHART_X = "deviation from stock (relative L2)"
CHART_Y = "speed ratio (stock / patched)"


def absolute_difference(stock: np.ndarray, patched: np.ndarray) -> np.ndarray:
    """|stock - patched| per pixel and channel: two (H, W, C) images -> (H, W, C) in their common float
    dtype (float64 in -> float64 out)."""
    stock, patched = np.asarray(stock), np.asarray(patched)
    if stock.shape != patched.shape:
        raise ValueError(f"the images differ in shape: stock {stock.shape}, patched {patched.shape}")
    dtype = np.result_type(stock.dtype, patched.dtype, np.float32)
    return np.abs(stock.astype(dtype) - patched.astype(dtype))


def amplified(difference: np.ndarray, gain: float = DEFAULT_GAIN) -> np.ndarray:
    """difference * gain clipped to [0, 1], in the difference's float dtype: full brightness in a channel
    means a difference of 1 / gain or more there; black, none."""
    if not (np.isfinite(gain) and gain > 0):
        raise ValueError(f"the difference gain must be a finite number > 0, got {gain!r}")
    difference = np.asarray(difference)
    return np.clip(difference * difference.dtype.type(gain), 0, 1)


def difference_image(stock: np.ndarray, patched: np.ndarray, gain: float = DEFAULT_GAIN) -> np.ndarray:
    """The difference image: |stock - patched| * gain clipped to [0, 1], per pixel and channel; (H, W, C)
    images in [0, 1] -> (H, W, C) in their common float dtype (float64 in -> float64 out)."""
    return amplified(absolute_difference(stock, patched), gain)


def difference_caption(gain: float) -> str:
    """The difference image's scale in words (its label on the page)."""
    return f"|stock - patched| x {gain:g} (white: {1 / gain:g} or more)"


@dataclass(frozen=True)
class RunRecord:
    """One image comparison of the session: enough for the history table and the chart.

    settings: what the numbers depend on besides the method (model, prompt or class label, size, sampling
        steps, batch, guidance, seed, warm-up): runs compare only at equal settings.
    deviation: relative L2 distance of the patched images from the stock ones (||patched - stock|| / ||stock||).
    """

    settings: tuple
    method: str
    options: str
    stock_ms: float
    patched_ms: float
    deviation: float

    @property
    def speed_ratio(self) -> float:
        return self.stock_ms / self.patched_ms

    @property
    def label(self) -> str:
        return self.method if self.options == "defaults" else f"{self.method} ({self.options})"


def options_text(options: dict) -> str:
    """`merge_ratio=0.25, agent_steps=(0, 3)`, or `defaults` for none given."""
    return ", ".join(f"{k}={v!r}" for k, v in options.items()) or "defaults"


def record_of(summary: dict, settings: dict) -> RunRecord:
    """The history entry of a `compare_pipeline` summary made with `settings` (a dict, see `RunRecord`)."""
    return RunRecord(tuple(settings.items()), summary["method"], options_text(summary["options"]),
                     summary["stock_ms_per_step"], summary["patched_ms_per_step"], summary["image_rel_l2"])


def settings_text(settings: tuple) -> str:
    return ", ".join(f"{k} {v}" for k, v in settings)


def comparable(history: list[RunRecord]) -> list[RunRecord]:
    """The runs of `history` made with the latest run's settings, oldest first (empty history: [])."""
    return [r for r in history if r.settings == history[-1].settings] if history else []


def chart_rows(history: list[RunRecord]) -> list[dict]:
    """Points of the speed vs deviation chart: stock at (0, 1) and every run comparable with the latest;
    [] when fewer than two runs compare (one point says nothing a table does not)."""
    if len(comparable(history)) < 2:
        return []
    latest = history[-1].settings
    points = [{CHART_X: 0.0, CHART_Y: 1.0, "method": "stock", "run": "stock"}]
    return points + [{CHART_X: r.deviation, CHART_Y: r.speed_ratio, "method": r.method, "run": f"#{i} {r.label}"}
                     for i, r in enumerate(history, 1) if r.settings == latest]   # numbered as in the table


HISTORY_HEADERS = ["#", "method", "options", "stock ms/step", "patched ms/step", "speed ratio", "deviation",
                   "settings"]


def history_rows(history: list[RunRecord]) -> list[list]:
    """The session's runs as table rows, newest first."""
    return [[i, r.method, r.options, round(r.stock_ms, 1), round(r.patched_ms, 1), round(r.speed_ratio, 2),
             round(r.deviation, 4), settings_text(r.settings)]
            for i, r in reversed(list(enumerate(history, 1)))]
