"""Sources and sinks by URI-like names: `kind[:target][?option=value&...]`.

    testpattern            video:clip.mp4?loop=1     camera:0        ndi:TD Out     spout:TDOut
    null                   file:out.mp4              file:frames/%05d.png           virtualcam
    spout:sdbridge         ndi:sdbridge              virtualcam?backend=obs&device=OBS Virtual Camera
    window                 window:Preview            window:Preview?scale=0.5
    virtualcam?size=1280x720&fit=crop                 file:out.mp4?size=1920x1080&filter=nearest
    syphon:TDSyphonSpoutOut                          syphon:sdbridge                syphon:?flip=1
    file:show.mp4?fragment=0&overwrite=1             (a classic mp4, replacing show.mp4: README, "What runs where")

Each transport module is imported only when used, so a missing platform library affects only
the transport that needs it, and says so in one line (TransportUnavailable).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..frames import FILTERS, FITS
from .base import Sink, Source, SourceEnded, SourceLost, TransportUnavailable

__all__ = [
    "SINK_KINDS", "SOURCE_KINDS", "Sink", "Source", "SourceEnded", "SourceLost", "TransportSpec",
    "TransportUnavailable", "open_sink", "open_source", "parse_spec", "sink_size",
]

SOURCE_KINDS = ("testpattern", "video", "camera", "ndi", "spout", "syphon")
SINK_KINDS = ("virtualcam", "spout", "ndi", "file", "null", "window", "syphon")
MAX_SINK_SIDE = 8192  # pixels: past any webcam, encoder or NDI receiver in use
_NEEDS_TARGET = {"video": "a file, as in video:clip.mp4", "file": "a path, as in file:out.mp4",
                 "ndi": "a name, as in ndi:sdbridge", "spout": "a name, as in spout:sdbridge",
                 "syphon": "a name, as in syphon:sdbridge"}


@dataclass(frozen=True)
class TransportSpec:
    """A parsed source or sink name."""

    kind: str  # "video", "file", ...
    target: str = ""  # what follows the first ':' (a path, a sender name, a device)
    options: dict = field(default_factory=dict)  # from "?key=value&key=value", values as strings

    def __str__(self) -> str:
        return f"{self.kind}:{self.target}" if self.target else self.kind


def parse_spec(text: str, *, role: str) -> TransportSpec:
    """Parse `kind[:target][?options]`; `role` is "source" or "sink" (it names the field in errors)."""
    kinds = SOURCE_KINDS if role == "source" else SINK_KINDS
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{role}: an empty name; one of {', '.join(kinds)}")
    body, _, query = text.strip().partition("?")
    kind, _, target = body.partition(":")
    kind = kind.strip().lower()
    if kind not in kinds:
        raise ValueError(f"{role}: {text!r} is not a {role}; use one of {', '.join(kinds)}")
    options = {}
    for item in filter(None, query.split("&")):
        key, equals, value = item.partition("=")
        if not equals or not key:
            raise ValueError(f"{role}: {text!r}: option {item!r} must look like key=value")
        options[key.strip()] = value.strip()
    if kind in _NEEDS_TARGET and not target and kind != "syphon":
        raise ValueError(f"{role}: {text!r} needs {_NEEDS_TARGET[kind]}")
    return TransportSpec(kind, target.strip(), options)


def _option(spec: TransportSpec, name: str, convert, default):
    if name not in spec.options:
        return default
    raw = spec.options[name]
    try:
        if convert is bool:
            if raw.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ValueError(raw)
            return raw.lower() in ("1", "true", "yes", "on")
        return convert(raw)
    except ValueError:
        raise ValueError(f"{spec}: option {name}={raw!r} is not a valid {convert.__name__}") from None


def _check_options(spec: TransportSpec, allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(spec.options) - set(allowed))
    if unknown:
        raise ValueError(f"{spec}: unknown option(s) {', '.join(unknown)}; known: {', '.join(allowed) or 'none'}")


def open_source(text: str, *, fps: float = 30.0) -> Source:
    """Open the source named `text`. Raises ValueError (bad name) or TransportUnavailable."""
    spec = parse_spec(text, role="source")
    if spec.kind == "testpattern":
        _check_options(spec, ("width", "height", "fps"))
        from .testpattern import TestPatternSource

        return TestPatternSource(width=_option(spec, "width", int, 640), height=_option(spec, "height", int, 480),
                                 fps=_option(spec, "fps", float, fps))
    if spec.kind == "video":
        _check_options(spec, ("loop", "realtime"))
        from .video import VideoSource

        return VideoSource(path=spec.target, loop=_option(spec, "loop", bool, False),
                           realtime=_option(spec, "realtime", bool, True))
    if spec.kind == "camera":
        _check_options(spec, ("width", "height", "fps"))
        from .camera import CameraSource

        return CameraSource(device=spec.target or "0", width=_option(spec, "width", int, None),
                            height=_option(spec, "height", int, None), fps=_option(spec, "fps", float, None))
    if spec.kind == "spout":
        _check_options(spec, ())
        from .spout import SpoutSource

        return SpoutSource(name=spec.target)
    if spec.kind == "ndi":
        _check_options(spec, ("timeout", "pixel_format", "bandwidth", "receiver_name"))
        from .ndi import NDISource

        options = {name: spec.options[name] for name in ("pixel_format", "bandwidth", "receiver_name") if name in spec.options}
        if "timeout" in spec.options:
            options["timeout"] = _option(spec, "timeout", float, None)
        return NDISource(name=spec.target, **options)
    _check_options(spec, ("timeout", "flip"))
    from .syphon import SyphonSource

    options = {"timeout": _option(spec, "timeout", float, None)} if "timeout" in spec.options else {}
    return SyphonSource(name=spec.target, flip=_option(spec, "flip", bool, False), **options)


def sink_size(spec: TransportSpec, width: int, height: int) -> tuple[tuple[int, int], str, str]:
    """The size a sink of a fixed size opens at: its `size=WxH` option, else the engine's
    `width` x `height`; how frames of another size are fitted into it (its `fit` option:
    letterbox, the default, crop or stretch); and how they are scaled (its `filter` option:
    bilinear, the default, or nearest). See bridge.frames.fitted."""
    fit = spec.options.get("fit", "letterbox").lower()
    if fit not in FITS:
        raise ValueError(f"{spec}: option fit={spec.options['fit']!r} must be one of {', '.join(FITS)}")
    scaling = spec.options.get("filter", "bilinear").lower()
    if scaling not in FILTERS:
        raise ValueError(f"{spec}: option filter={spec.options['filter']!r} must be one of {', '.join(FILTERS)}")
    if "size" not in spec.options:
        return (width, height), fit, scaling
    raw = spec.options["size"]
    wide, _, high = raw.lower().partition("x")
    if not (wide.isdecimal() and high.isdecimal()):
        raise ValueError(f"{spec}: option size={raw!r} must look like 1280x720")
    size = int(wide), int(high)
    if not all(2 <= side <= MAX_SINK_SIDE and side % 2 == 0 for side in size):
        raise ValueError(f"{spec}: option size={raw!r}: width and height must be even numbers from 2 to "
                         f"{MAX_SINK_SIDE} (video encoders and virtual cameras halve the colour resolution)")
    return size, fit, scaling


def _fitting(sink: Sink, fit: str, scaling: str) -> Sink:
    sink.fit = fit
    sink.filter = scaling
    return sink


def open_sink(text: str, *, width: int, height: int, fps: float = 30.0, keep_existing: bool = False) -> Sink:
    """Open the sink named `text` for frames of `width` x `height` at about `fps`.
    `keep_existing`: a file sink records beside an existing file even with overwrite=1 (a sink
    opened again after failures must not replace the recording it made)."""
    spec = parse_spec(text, role="sink")
    if spec.kind == "null":
        _check_options(spec, ())
        from .null import NullSink

        return NullSink()
    if spec.kind == "file":
        _check_options(spec, ("codec", "size", "fit", "filter", "fragment", "overwrite", "record", "split"))
        from .file import FRAGMENT_SECONDS, MIN_SPLIT_SECONDS, FileSink, is_image_sequence

        (width, height), fit, scaling = sink_size(spec, width, height)
        record = _option(spec, "record", bool, True)
        # (record=0 opens only to check the name, codec and disk: a file it replaced would be lost)
        overwrite = _option(spec, "overwrite", bool, False) and not keep_existing and record
        split = _option(spec, "split", float, None)
        if split is not None and (not MIN_SPLIT_SECONDS <= split <= 7 * 86400 or is_image_sequence(spec.target)):
            raise ValueError(f"{spec}: option split={spec.options['split']!r} must be seconds from "
                             f"{MIN_SPLIT_SECONDS:g} to a week, for a video file (not a PNG sequence)")
        sink = _fitting(FileSink(path=spec.target, width=width, height=height, fps=fps,
                                 codec=spec.options.get("codec"), overwrite=overwrite,
                                 fragment=_option(spec, "fragment", float, FRAGMENT_SECONDS)), fit, scaling)
        sink.record_at_start = record or keep_existing  # (opened again: it records, as it did)
        sink.split_seconds = split
        return sink
    if spec.kind == "virtualcam":
        _check_options(spec, ("backend", "device", "size", "fit", "filter"))
        from .virtualcam import VirtualCamSink

        (width, height), fit, scaling = sink_size(spec, width, height)
        return _fitting(VirtualCamSink(width=width, height=height, fps=fps,
                                       device=spec.options.get("device") or spec.target or None,
                                       backend=spec.options.get("backend")), fit, scaling)
    if spec.kind == "spout":
        _check_options(spec, ())
        from .spout import SpoutSink

        return SpoutSink(name=spec.target)
    if spec.kind == "ndi":
        _check_options(spec, ("pixel_format", "alpha", "size", "fit", "filter"))
        from .ndi import NDISink

        options = {"pixel_format": spec.options["pixel_format"]} if "pixel_format" in spec.options else {}
        if "alpha" in spec.options:
            options["alpha"] = _option(spec, "alpha", bool, False)
        for name in ("fit", "filter"):
            if name in spec.options and "size" not in spec.options:
                raise ValueError(f"{spec}: {name} needs size=WxH (without a size the sender takes each frame's own)")
        (width, height), fit, scaling = sink_size(spec, width, height)
        return _fitting(NDISink(name=spec.target, width=width, height=height, frame_rate=fps,
                                follow_size="size" not in spec.options, **options), fit, scaling)
    if spec.kind == "window":
        _check_options(spec, ("scale",))
        from .window import WindowSink

        return WindowSink(title=spec.target or "sdbridge", scale=_option(spec, "scale", float, 1.0),
                          width=width, height=height)
    _check_options(spec, ("flip",))
    from .syphon import SyphonSink

    return SyphonSink(name=spec.target, flip=_option(spec, "flip", bool, False))
