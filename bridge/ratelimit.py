"""Logging at most once per interval per key: a storm of bad packets, frames or values must not
flood a show's log (or slow the show writing it). What was held back is counted and said with
the next line of that key. Thread-safe; the clock can be given (tests)."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

LOG_INTERVAL_SECONDS = 5.0  # each kind of repeated message is logged at most this often


class RateLimitedLog:
    """`logger`'s messages at most once per `interval` per key; the suppressed count is reported next time."""

    def __init__(self, logger: logging.Logger, *, interval: float = LOG_INTERVAL_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._logger, self._interval, self._clock = logger, interval, clock
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def log(self, level: int, key: str, message: str, *args: Any, exc_info: bool = False) -> bool:
        """Log `message` (with `args`) unless `key` was logged less than `interval` ago; whether it was."""
        now = self._clock()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self._interval:
                self._suppressed[key] = self._suppressed.get(key, 0) + 1
                return False
            self._last[key] = now
            suppressed = self._suppressed.pop(key, 0)
        if suppressed:
            message += f" (and {suppressed} more like it in the last {self._interval:g} s)"
        self._logger.log(level, message, *args, exc_info=exc_info)
        return True

    def warning(self, key: str, message: str, *args: Any) -> bool:
        return self.log(logging.WARNING, key, message, *args)
