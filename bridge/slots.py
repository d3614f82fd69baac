"""Newest-value-wins hand-off between two threads: a slow consumer never builds latency."""

from __future__ import annotations

import threading
import time
from typing import Generic, TypeVar

T = TypeVar("T")


class LatestSlot(Generic[T]):
    """Holds one value. `put` replaces it (counting values never taken); `take` waits for a new one.

    Guarantees: `put` never blocks on the consumer; `take` returns each value at most once and
    never waits longer than its timeout; after `close`, waiting `take` calls return None at once.
    """

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._value: T | None = None
        self._version = 0  # bumped by every put
        self._taken_version = 0  # the version the consumer last took
        self._closed = False
        self.overwritten = 0  # values replaced before anyone took them (dropped frames)

    def put(self, value: T) -> None:
        with self._condition:
            if self._version != self._taken_version:
                self.overwritten += 1
            self._value = value
            self._version += 1
            self._condition.notify_all()

    def take(self, timeout: float) -> T | None:
        """The newest value not yet taken, or None after `timeout` seconds or once closed."""
        deadline = time.monotonic() + max(0.0, timeout)
        with self._condition:
            while self._version == self._taken_version and not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._condition.wait(remaining)
            if self._version == self._taken_version:
                return None
            self._taken_version = self._version
            return self._value

    def peek(self) -> T | None:
        """The newest value, taken or not (None before the first put); does not mark it taken."""
        with self._condition:
            return self._value

    @property
    def pending(self) -> bool:
        """True when a value was put and not yet taken."""
        with self._condition:
            return self._version != self._taken_version

    def close(self) -> None:
        """Wake every waiting `take`; later takes return pending values, then None at once."""
        with self._condition:
            self._closed = True
            self._condition.notify_all()
