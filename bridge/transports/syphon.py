"""`syphon:NAME`: not supported yet. Syphon shares Metal/OpenGL textures on macOS only, and its
Python bindings need a GL or Metal context on the main thread; until that is done cleanly,
NDI carries video between apps on macOS."""

from __future__ import annotations

from .base import TransportUnavailable

MESSAGE = "Syphon is not supported yet; use NDI on macOS"


def SyphonSource(**_options):  # noqa: N802 (named like the class it stands in for)
    raise TransportUnavailable(MESSAGE)


def SyphonSink(**_options):  # noqa: N802
    raise TransportUnavailable(MESSAGE)
