"""One `sdbridge run`: settings -> engine -> runtime, with signals, status line and a summary."""

from __future__ import annotations

import _thread
import dataclasses
import functools
import gc
import logging
import os
import signal
import stat
import sys
import threading
import time

import numpy as np

from .aspect import ShapeFollower
from .errors import UserError
from .params import ParameterStore
from .runtime import Runtime, RuntimeConfig
from .settings import RunSettings
from .telemetry import status_line
from .transports import TransportUnavailable, open_sink, open_source, parse_spec
from .transports.base import Source, SourceLost

log = logging.getLogger("bridge")

# SIGBREAK: Windows' CTRL_BREAK_EVENT, how a supervisor (the TouchDesigner extension) stops us there
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGBREAK") if hasattr(signal, name))
STATUS_SECONDS = 1.0  # status line refresh on a terminal
PLAIN_STATUS_SECONDS = 10.0  # and when stderr is a file or pipe


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived before the runtime was running (while loading); a BaseException
    like KeyboardInterrupt, so no `except Exception` on the way swallows it."""


class StopSignals:
    """SIGINT/SIGTERM: while loading, abort (raise Interrupted); while running, ask the runtime
    to stop. Installed only on the main thread; the previous handlers come back on exit.
    request_from_thread() does the same for a stop asked by another thread (--stop-on-stdin-eof)."""

    def __init__(self) -> None:
        self.runtime: Runtime | None = None
        self.received: int | None = None
        self._previous = {}
        self._active = False  # between __enter__ and __exit__: a late request must not hit the old handlers
        self._raised = False  # Interrupted raised once: a second stop while the first unwinds waits for it
        self._lock = threading.Lock()

    def _handle(self, signum, _frame) -> None:
        self.received = signum
        if self.runtime is not None:
            self.runtime.request_stop()
        elif not self._raised:  # (a supervisor closes stdin and signals too: the second must not
            self._raised = True  # interrupt the cleanup of the first with a traceback)
            raise Interrupted(signal.Signals(signum).name)

    def request_from_thread(self, signum: int = signal.SIGTERM) -> None:
        """What `signum` arriving does, asked from another thread. Running: the runtime is asked to
        stop (request_stop is thread-safe). Loading: the main thread gets the signal itself
        (pthread_kill: a real signal, which also ends a blocking call such as a sleep or a socket
        wait; on Windows, which has none, _thread.interrupt_main: Python's own pending-signal path,
        no console needed), and our handler raises Interrupted there. Without our handlers (not
        the main thread), `received` alone makes run_session stop once loaded."""
        with self._lock:
            if not self._active:
                return
            first = self.received is None
            self.received = signum
            runtime = self.runtime
            if runtime is not None:
                runtime.request_stop()
            elif first and signum in self._previous:
                _signal_main_thread(signum)

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        with self._lock:
            self._active = True
        return self

    def __exit__(self, *exc_info) -> None:
        with self._lock:
            self._active = False
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def _signal_main_thread(signum: int) -> None:
    if hasattr(signal, "pthread_kill"):
        signal.pthread_kill(threading.main_thread().ident, signum)
    else:  # Windows
        _thread.interrupt_main(signum)


def watch_stdin_for_eof(on_eof) -> threading.Thread:
    """--stop-on-stdin-eof: a daemon thread reading standard input until its end (the supervisor
    closed the pipe, or died), then on_eof(). What arrives before is read and ignored. It reads the
    file descriptor, not sys.stdin.buffer: a daemon thread blocked inside a buffered reader holds
    its lock, and the interpreter's shutdown can abort on that lock ("could not acquire lock for
    <_io.BufferedReader name='<stdin>'> at interpreter shutdown")."""
    try:
        fd = sys.stdin.fileno()
        mode = os.fstat(fd).st_mode
    except (AttributeError, OSError, ValueError):  # no stdin at all (pythonw), or not a real file
        raise UserError("--stop-on-stdin-eof: this process has no standard input to watch") from None
    if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)):  # (Windows reports its pipes as FIFOs)
        # /dev/null or a file ends at once (the run would stop as it starts); a terminal never
        # ends, and reading it from the background stops the whole process (SIGTTIN)
        raise UserError("--stop-on-stdin-eof: standard input is not a pipe (a terminal, a file or /dev/null); the "
                        "flag is for a program that starts the bridge with a pipe as its input")

    def read_until_eof() -> None:
        try:
            while os.read(fd, 65536):
                pass
        except OSError:
            pass  # the pipe is gone: as good as its end
        log.info("standard input closed: stopping")
        on_eof()

    thread = threading.Thread(target=read_until_eof, name="stdin-eof", daemon=True)
    thread.start()
    return thread


# After stop() (which waits up to a second for the threads), how much longer a thread still inside
# an engine call may take before the process exits without it: the whole stop stays within 3 s.
STRAGGLER_SECONDS = 0.8


def run_session(settings: RunSettings, *, stream=None, stop_on_stdin_eof: bool = False) -> dict:
    """Run until the source ends, a limit is reached or a signal arrives; the final figures.

    Transports and the OSC ports open before the model loads, so a missing sender, a missing
    device or a port in use is reported at once; OSC values that arrive while the model loads
    are applied on the first frame. `stream`: where the status line goes (sys.stderr as it is
    when called, so a replaced stderr is followed). `stop_on_stdin_eof`: the end of standard
    input stops the run exactly as SIGTERM does (a supervisor's stop channel that works where
    signals do not, e.g. from a Windows GUI program without a console).
    """
    stream = sys.stderr if stream is None else stream
    with StopSignals() as signals:
        sinks, first_source, plane = [], None, None
        store = ParameterStore()
        live: dict = {}  # the runtime, once built: the control plane starts before it
        try:
            if stop_on_stdin_eof:  # inside the try: an end of input already there aborts loading here
                watch_stdin_for_eof(lambda: signals.request_from_thread(signal.SIGTERM))
            config = _stream_config(settings)
            sinks, first_source, config = _open_transports(settings, config)
            plane = _start_control(settings, store, live)
            engine = _build_engine(settings, config)
            _check_preset_sizes(settings, engine)
            _first_frame(engine, first_source)
            gc.collect()
            gc.freeze()  # the model's objects never need collecting: shorter pauses of every thread
            store.attach_prompt_encoder(engine.prepare_prompt)
            if getattr(engine, "ready_beside_frames", False):  # compiled: a new step count or size compiles beside
                store.attach_readier(engine.ready)
            runtime = _make_runtime(settings, engine, sinks, first_source, store)
            live["runtime"] = runtime
            # still inside the try: a stop that lands before this line raises Interrupted, which is
            # handled here; after it, the handlers ask the runtime to stop instead of raising
            signals.runtime = runtime
        except Interrupted:
            _close_all(sinks, first_source, plane, store)
            log.info("interrupted while starting")
            return {"state": "interrupted"}
        except BaseException:
            _close_all(sinks, first_source, plane, store)
            raise
        if signals.received is not None:
            runtime.request_stop()
        started = time.monotonic()
        try:
            runtime.start()
            origin = "txt2img" if config.mode == "txt2img" else settings.source
            log.info("running: %s -> %s (%dx%d, %s) -> %s; Ctrl+C stops", origin, settings.model,
                     config.width, config.height, runtime.telemetry.backend, ", ".join(settings.sink))
            _watch(runtime, stream, settings.status)
        finally:
            runtime.stop()
            _close_all([], None, plane, store)
        summary = runtime.snapshot()
        summary["seconds"] = time.monotonic() - started
        summary["stragglers"] = runtime.stragglers(STRAGGLER_SECONDS)
        summary["sinks"] = runtime.sinks_sent()
        summary["recordings"] = runtime.recordings()
        return summary


def _start_control(settings: RunSettings, store: ParameterStore, live: dict):
    """The OSC control plane around `store`, bound now (UserError when a port is taken)."""
    if not settings.osc:
        return None
    from .control import ControlPlane

    def telemetry() -> dict:
        runtime = live.get("runtime")
        return runtime.snapshot() if runtime is not None else {"state": "starting"}

    def action(name: str):
        def call() -> None:
            runtime = live.get("runtime")
            if runtime is not None:
                getattr(runtime, name)()
        return call

    plane = ControlPlane(store=store, settings=settings.control_settings(), telemetry=telemetry,
                         on_pause=action("pause"), on_resume=action("resume"), presets=settings.presets,
                         on_record_stop=action("record_stop"), on_record_start=action("record_start"))
    return plane.start()


def _check_preset_sizes(settings: RunSettings, engine) -> None:
    """A preset's resolution the model cannot take (the SD models: multiples of 64) is one line
    at start, like every other bad preset value (the settings check only multiples of 8)."""
    components, config = getattr(engine, "components", None), getattr(engine, "config", None)
    if components is None or config is None:
        return
    for cue, values in sorted((settings.presets or {}).items()):
        if "resolution" in values:
            width, height = values["resolution"]
            try:
                components.check_fits(config.replace(width=width, height=height))
            except ValueError as exc:
                raise UserError(f"presets.{cue}.resolution: {exc}") from None


def _build_engine(settings: RunSettings, config):
    """build_engine, with any failure as one UserError line (the traceback goes to the debug log):
    a device that is not there, out of memory while loading, a corrupt file."""
    from .engine import build_engine
    from .recovery import describe

    try:
        return build_engine(settings, config)
    except (UserError, Interrupted):
        raise
    except Exception as exc:
        log.debug("building the engine failed", exc_info=True)
        raise UserError(f"model: cannot build the engine for {settings.model!r} on {config.device}: {describe(exc)}") from None


def _first_frame(engine, source) -> None:
    """Run one frame (the source's size, or VGA) before going live, then forget it: a device, dtype
    or size the engine cannot run fails here as one line instead of as every frame of the show."""
    from .recovery import describe

    config = engine.config
    source_format = getattr(source, "format", None)
    width, height = (source_format.width, source_format.height) if source_format is not None else (640, 480)
    try:
        if getattr(config, "mode", "img2img") == "txt2img":
            engine.txt2img()
        else:
            engine(np.full((height, width, 3), 128, np.uint8))
    except Exception as exc:
        log.debug("the first frame failed", exc_info=True)
        raise UserError(f"engine: the first frame failed on {config.device} ({config.dtype}): {describe(exc)}") from None
    engine.reset()


def _stream_config(settings: RunSettings):
    from .engine import stream_config

    try:
        return stream_config(settings)
    except ValueError as exc:
        raise UserError(str(exc)) from None


class NoInput(Source):
    """txt2img's source: nothing to read (the engine makes its pictures from the prompt alone)."""

    def __init__(self) -> None:
        self._closed = threading.Event()

    def read(self, timeout: float = 0.1):
        if self._closed.wait(max(timeout, 0.0)):
            raise SourceLost("closed")
        return None

    def close(self) -> None:
        self._closed.set()


def _open_transports(settings: RunSettings, config):
    """(sinks, source, config), or UserError with the transport's one-line reason. txt2img: no
    source is opened (NoInput stands in: the runtime's capture thread then reads nothing).
    --aspect source: the source opens first, and its first frame's shape sets the size in the
    config returned, at which the sinks then open (see sized_by_source)."""
    sinks, source = [], None
    txt2img = config.mode == "txt2img"
    try:
        if settings.aspect == "source" and not txt2img:
            source = open_source(settings.source, fps=settings.fps)
            source, config = sized_by_source(source, config, settings.source)
        for spec in settings.sink:
            sinks.append(open_sink(spec, width=config.width, height=config.height, fps=settings.fps))
        if txt2img:
            if settings.aspect == "source":
                log.info("--aspect source: txt2img reads no source; processing at %dx%d", config.width, config.height)
            log.info("txt2img: pictures from the prompt alone, at most %g a second; no source is read", settings.fps)
            return sinks, NoInput(), config
        if source is None:
            source = open_source(settings.source, fps=settings.fps)
        return sinks, source, config
    except (TransportUnavailable, ValueError) as exc:
        _close_all(sinks, source)
        raise UserError(str(exc)) from None
    except BaseException:
        _close_all(sinks, source)
        raise


#: --aspect source: how long the start waits for the source's first frame (a sender that is not
#: there yet, a camera still starting) before it processes at --width x --height instead
FIRST_FRAME_SECONDS = 5.0


def sized_by_source(source: Source, config, name: str, wait: float = FIRST_FRAME_SECONDS):
    """(source, config) for --aspect source: the config's size becomes one of the shape of the
    source's first frame with about as many pixels (pipeline.config.aspect_size), and the source
    hands that frame out again first. No frame within `wait` seconds, or a source that ends or is
    lost before one: the config as it is, said in the log."""
    from pipeline.config import aspect_size

    log.info("waiting up to %g s for the first frame of %s: its shape sets the processing size (--aspect source)",
             wait, name)
    deadline, frame = time.monotonic() + wait, None
    while frame is None and time.monotonic() < deadline:
        try:
            frame = source.read(timeout=0.1)
        except SourceLost as exc:  # (SourceEnded is one)
            log.warning("--aspect source: %s; processing at %dx%d", exc, config.width, config.height)
            return source, config
    if frame is None:
        log.warning("--aspect source: no frame from %s within %g s; processing at %dx%d until its frames come",
                    name, wait, config.width, config.height)
        return source, config
    height, width = frame.pixels.shape[:2]
    size = aspect_size(width, height, config.width * config.height)
    log.info("source %dx%d: processing at %dx%d, its shape with about %dx%d's pixels (--aspect source)",
             width, height, *size, config.width, config.height)
    return FirstFrameAgain(source, frame), dataclasses.replace(config, width=size[0], height=size[1])


class FirstFrameAgain(Source):
    """`source`, whose first `read` returns `frame` (read from it already) again; `shape` is
    that frame's (width, height)."""

    def __init__(self, source: Source, frame) -> None:
        self._source, self._frame = source, frame
        self.shape = (frame.width, frame.height)

    @property
    def format(self):
        return self._source.format

    def read(self, timeout: float = 0.1):
        frame, self._frame = self._frame, None
        return frame if frame is not None else self._source.read(timeout)

    def close(self) -> None:
        self._source.close()


def _close_all(sinks, source, *others) -> None:
    for transport in [*sinks, source, *others]:
        if transport is not None:
            try:
                transport.close()
            except Exception:
                log.exception("closing %s failed", type(transport).__name__)


#: sinks opened again by name once every send has failed for a while (bridge.lanes); a file
#: records into a new file beside the one that failed (never over it: a PNG sequence, into a
#: new take), a window is not opened again (closed, it stays closed)
REOPENED_SINKS = ("virtualcam", "spout", "syphon", "ndi", "file")


def sink_reopeners(specs, *, width: int, height: int, fps: float) -> list:
    """For each sink named in `specs`, opened for width x height: how to open it again by its
    name (None for the kinds not in REOPENED_SINKS)."""
    reopeners = []
    for spec in specs:
        parsed = parse_spec(spec, role="sink")
        if parsed.kind not in REOPENED_SINKS:
            reopeners.append(None)
        else:
            reopeners.append(functools.partial(open_sink, spec, width=width, height=height, fps=fps, keep_existing=True))
    return reopeners


def _make_runtime(settings: RunSettings, engine, sinks, first_source, store: ParameterStore) -> Runtime:
    """The runtime, handed the already open source first and reopening by name after a loss."""
    opened = [first_source]

    def source_factory():
        if opened:
            return opened.pop()
        return NoInput() if isinstance(first_source, NoInput) else open_source(settings.source, fps=settings.fps)

    config = RuntimeConfig(fps=settings.fps, fallback=settings.fallback, max_frames=settings.frames,
                           duration=settings.duration)
    reopen = sink_reopeners(settings.sink, width=engine.config.width, height=engine.config.height, fps=settings.fps)
    follow = None
    if settings.aspect == "source" and not isinstance(first_source, NoInput):
        shape = first_source.shape if isinstance(first_source, FirstFrameAgain) else None  # (None: no frame yet)
        follow = ShapeFollower(settings.width * settings.height, followed=shape)
    runtime = Runtime(engine=engine, open_source=source_factory, sinks=sinks, config=config, params=store,
                      reopen_sinks=reopen, follow_shape=follow)
    runtime.params.report_applied({"prompt": settings.prompt, "negative_prompt": settings.negative_prompt})
    return runtime


def _watch(runtime: Runtime, stream, show_status: bool) -> None:
    """Wait for the end, refreshing the status line (in place on a terminal)."""
    terminal = show_status and hasattr(stream, "isatty") and stream.isatty()
    interval = STATUS_SECONDS if terminal else PLAIN_STATUS_SECONDS
    while not runtime.wait(timeout=interval):
        if not show_status:
            continue
        line = status_line(runtime.snapshot())
        if terminal:
            stream.write("\r\x1b[2K" + line)
        else:
            stream.write(line + "\n")
        stream.flush()
    if terminal:
        stream.write("\n")


def format_summary(summary: dict) -> str:
    def ms(name: str) -> str:
        value = summary.get(name)
        return "-" if value is None else f"{value:.1f} ms"

    return "\n".join([
        f"ran {summary.get('seconds', 0):.1f} s: {summary['frames_in']} frames in, {summary['frames_processed']} processed, "
        f"{summary['frames_out']} sent",
        f"inference: median {ms('inference_ms_median')}, p95 {ms('inference_ms_p95')}",
        f"latency (capture to publish): median {ms('latency_ms_median')}, p95 {ms('latency_ms_p95')}",
        f"skipped {summary['frames_skipped']}, dropped {summary['frames_dropped']}, bad {summary['bad_frames']}, "
        f"source lost {summary['source_lost']}, sink errors {summary['sink_errors']}, "
        f"missed by slow sinks {summary.get('sink_missed', 0)}",
        *([f"frames each sink took: {', '.join(f'{name} {sent}' for name, sent in summary['sinks'])}"]
          if summary.get("sinks") else []),
        *([f"recorded: {', '.join(f'{path} ({frames} frames)' for path, frames in summary['recordings'])}"]
          if summary.get("recordings") else []),
    ])
