"""Progress of a run: a bar in a terminal, periodic log lines in non-interactive logs."""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("geoseg")

__all__ = ["Progress"]


class Progress:
    """Counts finished blocks and megapixels; ``mode`` is auto | bar | log | none."""

    def __init__(self, total_blocks: int, total_pixels: int, mode: str = "auto", every_s: float = 10.0):
        self.total_blocks = total_blocks
        self.total_pixels = total_pixels
        self.blocks = 0
        self.pixels = 0
        self.t0 = time.monotonic()
        self.every_s = every_s
        self._last = self.t0
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "log"
        self.mode = mode
        self._bar = None
        if mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(total=total_blocks, unit="block", dynamic_ncols=True, file=sys.stderr)

    @property
    def mpx_per_s(self) -> float:
        dt = max(time.monotonic() - self.t0, 1e-9)
        return self.pixels / 1e6 / dt

    def update(self, pixels: int, blocks: int = 1) -> None:
        self.blocks += blocks
        self.pixels += pixels
        if self._bar is not None:
            self._bar.update(blocks)
            self._bar.set_postfix_str(f"{self.mpx_per_s:.2f} Mpx/s", refresh=False)
        elif self.mode == "log":
            now = time.monotonic()
            if now - self._last >= self.every_s or self.blocks == self.total_blocks:
                self._last = now
                log.info(
                    "blocks %d/%d (%.0f%%), %.2f Mpx/s",
                    self.blocks, self.total_blocks, 100.0 * self.blocks / max(self.total_blocks, 1),
                    self.mpx_per_s,
                )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
