"""Rate-limited warnings for guest errors (style.md: "rate-limited WARNING
for guest errors, nothing per descriptor").  A guest can make the same
mistake millions of times a second; the log gets the first one, then at
most one line per interval saying how many were suppressed."""

from __future__ import annotations

import logging
import time


class RateLimitedLog:
    """``warn(msg, *args)`` logs at most once per ``interval`` seconds."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0) -> None:
        self.logger = logger
        self.interval = interval
        self._last = -interval
        self.suppressed = 0
        self.total = 0

    def warn(self, msg: str, *args: object) -> None:
        self.total += 1
        now = time.monotonic()
        if now - self._last < self.interval:
            self.suppressed += 1
            return
        if self.suppressed:
            msg += f" ({self.suppressed} more like it suppressed)"
        self.logger.warning(msg, *args)
        self._last = now
        self.suppressed = 0
