"""--aspect source while the show runs: the processing size follows the source's shape.

A TouchDesigner TOP switched from 1280x720 to 1080x1920, a Spout sender's window resized, a
camera reopened at another mode: once a new shape has held for `settle_seconds`, the follower
asks for a processing size of that shape (pipeline.config.aspect_size, with the pixels of the
--width x --height asked for at start). A window being dragged to size passes through many
shapes and settles once: one change, not one per frame. The change goes through the parameter
store as /sd/resolution does (the output holds its last frame while the engine changes size,
and a size the engine cannot take is refused and reported), so an operator's own /sd/resolution
stands until the source changes shape again.
"""

from __future__ import annotations

from pipeline.config import aspect_size

SETTLE_SECONDS = 1.0  # a new source shape must hold this long before the size follows it


class ShapeFollower:
    """Watches the shape of the frames going in (`observe`, every frame) and says when the
    processing size should change, and to what."""

    def __init__(self, area: int, *, followed: tuple[int, int] | None = None,
                 settle_seconds: float = SETTLE_SECONDS) -> None:
        """`area`: the pixels to process (--width x --height); `followed`: the (width, height)
        of the source the size was chosen for at start (None: none yet)."""
        if area <= 0 or settle_seconds < 0:
            raise ValueError(f"ShapeFollower: area {area} must be positive, settle_seconds {settle_seconds} not negative")
        self.area, self.settle_seconds = area, settle_seconds
        self._followed = tuple(followed) if followed is not None else None  # the shape the size was last chosen for
        self._candidate: tuple[int, int] | None = None  # a new shape, and since when it has held
        self._since = 0.0

    def observe(self, width: int, height: int, now: float, current: tuple[int, int]) -> tuple[int, int] | None:
        """A frame of `width` x `height` came at `now` (seconds, monotonic) while the engine runs
        at `current` (width, height): the size to switch to, once per settled new shape and only
        when it differs from `current`; None otherwise."""
        shape = (width, height)
        if shape == self._followed:
            self._candidate = None
            return None
        if shape != self._candidate:
            self._candidate, self._since = shape, now
        if now - self._since < self.settle_seconds:
            return None
        self._followed, self._candidate = shape, None
        size = aspect_size(width, height, self.area)
        return size if size != tuple(current) else None
