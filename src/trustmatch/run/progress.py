"""Training progress: a tqdm bar on a terminal, one plain line per log interval anywhere else.

A cluster log, CI or ``nohup`` captures the bar's carriage-return redraws as thousands of partial
lines; a scheduler log needs whole lines with the step, the averages, the speed and the time left.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from tqdm.auto import tqdm


def _format_seconds(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    """``update`` per step, ``log`` per interval, ``write`` for evaluation lines; silent when disabled."""

    def __init__(self, total: int, initial: int, desc: str, enabled: bool, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.total, self.step, self.desc, self.enabled = total, initial, desc, enabled
        self.bar = None
        if enabled and self.stream.isatty():
            self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True, file=self.stream)
        self._start, self._start_step = time.perf_counter(), initial

    @property
    def lines(self) -> bool:
        """Plain lines instead of a bar (output is not a terminal)."""
        return self.enabled and self.bar is None

    def update(self, n: int = 1) -> None:
        self.step += n
        if self.bar is not None:
            self.bar.update(n)

    def log(self, shown: dict[str, float]) -> None:
        """The interval's averages: on the bar's postfix, or as one line with the speed and time left."""
        if self.bar is not None:
            self.bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items()})
        elif self.lines:
            elapsed = time.perf_counter() - self._start
            rate = (self.step - self._start_step) / elapsed if elapsed > 0 else 0.0
            left = (self.total - self.step) / rate if rate > 0 else 0.0
            values = " ".join(f"{k} {v:.3g}" for k, v in shown.items())
            self.write(
                f"{self.desc}: step {self.step}/{self.total} {values} | {rate:.2f} step/s, "
                f"{_format_seconds(elapsed)} elapsed, {_format_seconds(left)} left"
            )

    def write(self, line: str) -> None:
        """A whole line that never interleaves with the bar (printed even with the bar disabled)."""
        if self.bar is not None:
            self.bar.write(line, file=sys.stdout)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
