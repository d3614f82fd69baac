"""The whole per-frame step in one CUDA graph: VAE encode, the stream-batch UNet call with its
guidance and LCM arithmetic, VAE decode, the bad-output check and the conversion to 8-bit
pixels, replayed with one launch per frame.

Why: the compiled modules alone still launch dozens of small kernels per frame between them
(noise, guidance, the consistency function, the output check) and each compiled call checks its
guards; on a GPU that waits on the CPU (sd-turbo, 1 step, 512x512: 9.2 ms per frame through the
per-module graphs on an H100, about 60 % of it launch gaps). One graph removes all of that.

What a graph reads, it reads from fixed addresses, so everything that may change during a show
is a buffer updated in place before the replay, never a value baked into the graph:
- the input frame (copied into `inputs`: 8-bit RGB at the engine's size, which the graph converts
  itself, or any other frame converted beforehand), the frames in flight and their RCFG stock noise,
  the last good output, the x_0 the next step decodes (overlap_decode) and the latents its UNet
  takes (overlap_encode) (the `state` buffers: the stream's state *is* these tensors between
  replays), the bad-output counters;
- the prompt: the backend's static conditioning buffers (`prepare` copies a new prompt's
  embeddings and K/V in, outside the graph);
- guidance scale and delta (0-d tensors), the step coefficients (strength, t_index_list of the
  same length) and the noise (seed): the stream updates those tensors in place.
What changes the graph's shape or its Python control flow is part of the key, one graph each:
cfg type, guidance on or off, steps, frames per call, stream batch or sequential, size, and
`overlap_decode` / `overlap_encode` (the VAE's work for another frame is a branch of the graph
beside the UNet, forked to a side stream and joined back, so the GPU may run them side by side).
`capture` makes the graphs of the current settings before frames flow (both sides of guidance
crossing 1), so a change between them captures nothing during a show.

Every frame replays, the first after a start, a reset, a seed, step-count or size change too:
the frames in flight are then first filled from that frame outside the graph (its VAE encode
and the noising to each later step, as the step itself would), and then it replays. The
similarity filter's decision happens before the replay (it reads the input picture), so the
filter works with graphs too.

A capture that fails turns the graphs off for the rest of the run (the device's capture state may
be unsure after it), except one that runs out of memory: that is the one set of settings too large
beside the rest, whose frames then run without a graph while the others keep theirs.

`replay="eager"` runs the same body again at every replay instead of a CUDA graph: the same
buffers and in-place updates, on any device, which is how the CPU tests check this plumbing.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Callable

import torch

from .errors import is_out_of_memory, release_cached_memory

log = logging.getLogger(__name__)


SOURCES = ("pixels", "images")  # what a step graph takes: 8-bit RGB at the engine's size, or model input

#: step graphs captured on demand (a size or step count an operator changed to mid-show, not readied
#: at start) kept at most; beyond it the least recently used is released (captured again if used).
#: Each holds its inputs, outputs and state buffers for both sources (about 10 MB at 512x512 in
#: float16, 16 times that at 2048x2048): a fader sweeping /sd/resolution would otherwise grow GPU
#: memory by that for every size it passed.
ON_DEMAND_LIMIT = 8


@dataclass
class _Step:
    """One captured step: its static input, state buffers and outputs, and the graph."""

    inputs: torch.Tensor  # "pixels": (b, H, W, 3) uint8 RGB; "images": (b, 3, H, W) in [-1, 1], model dtype
    state: object  # StreamState whose tensors are the graph's state buffers
    output: torch.Tensor  # (b, 3, H, W) in [-1, 1]: the frame out (the graph's own memory)
    pixels: torch.Tensor  # (b, H, W, 3) uint8: the same as 8-bit RGB
    replay: Callable[[], None]


def graph_key(config) -> tuple:
    """What fixes a step graph's shapes and control flow (everything else is a buffer)."""
    return (config.mode, config.cfg_type, config.guidance_active, config.denoising_steps, config.frame_buffer_size,
            config.use_denoising_batch, config.width, config.height, config.overlap_decode, config.overlap_encode)


def _beside_guidance(key: tuple) -> tuple:
    """A graph key less its guidance on/off: the settings whose two graphs a change of guidance
    scale switches between."""
    return key[:2] + key[3:]


class StepGraphs:
    """The step graphs of one StreamDiffusion, keyed by `graph_key`; see the module docstring."""

    def __init__(self, stream, *, replay: str = "cuda") -> None:
        if replay not in ("cuda", "eager"):
            raise ValueError(f"replay: {replay!r} must be 'cuda' or 'eager'")
        self._stream = stream
        self._replay = replay
        self._steps: dict[tuple, _Step] = {}
        self._on_demand: OrderedDict[tuple, None] = OrderedDict()  # keys captured with keep=False, oldest use first
        self._pool = torch.cuda.graph_pool_handle() if replay == "cuda" else None  # one pool for every step
        self._high_priority: torch.cuda.Stream | None = None  # see _capture_stream
        self.captures = 0  # steps captured so far
        self.replays = 0  # frames that ran through a step graph
        self.replaying = False  # True during a replay (with replay="eager", Python runs then too)
        self.failed: str | None = None  # why capturing failed: every frame then runs without a graph
        # settings whose capture ran out of memory (a size too large for the card beside the rest):
        # frames at those settings run without a graph, the others keep theirs; not tried again
        self.failed_keys: dict[tuple, str] = {}

    def __contains__(self, config) -> bool:
        return (graph_key(config), SOURCES[0]) in self._steps

    def capture(self, config, *, keep: bool = True) -> None:
        """Capture the step of `config` (no frames needed: the buffers are filled at the first replay).
        `keep`: hold it for the stream's life (what was readied at start); else it is one of the
        ON_DEMAND_LIMIT most recently used on-demand graphs, released beyond that."""
        key = graph_key(config)
        if keep:
            self._on_demand.pop(key, None)
        if (key, SOURCES[0]) in self._steps or config.mode != "img2img" or self.failed or key in self.failed_keys:
            return
        stream = self._stream
        started = time.perf_counter()
        saved_state = stream.state
        saved_counts, saved_caught = dict(stream._counts), stream._caught.clone()
        try:  # only control flow differs (guidance on or off); buffers are shared
            with torch.inference_mode(), stream.capturing(config):
                stream._prepare_conditions()
                state = self._new_state(config)  # one set of state buffers for both sources
                for source in SOURCES:
                    self._steps[key, source] = self._new_step(config, source, state)
        except Exception as exc:  # never stop the show for it: the same work runs without the graph
            reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            log.debug("capture failure", exc_info=exc)
            if is_out_of_memory(exc):  # these settings' buffers do not fit: the graphs that do stay
                self.failed_keys[key] = reason
                for source in SOURCES:
                    self._steps.pop((key, source), None)
                self._on_demand.pop(key, None)
                release_cached_memory()
                log.warning("could not capture the step graph for %dx%d, %d step(s): out of memory; frames at these "
                            "settings run without one, the other settings keep theirs (%s)", config.width,
                            config.height, config.denoising_steps, reason)
                return
            self.failed = reason  # anything else may have left the device's capture state unsure: no more graphs
            self._steps.clear()
            log.warning("could not capture the step in a CUDA graph (%s); every frame runs without one", self.failed)
            return
        finally:
            stream.state = saved_state
            stream._counts.clear()
            stream._counts.update(saved_counts)
            stream._caught.copy_(saved_caught)
        self.captures += 1
        log.info("captured the %s step graph (%s, %d step(s), guidance %s) in %.2f s", self._replay, config.cfg_type,
                 config.denoising_steps, "on" if config.guidance_active else "off", time.perf_counter() - started)
        if not keep:
            self._on_demand[key] = None
            self._release_beyond_limit(current=graph_key(stream.config))

    def _release_beyond_limit(self, current: tuple) -> None:
        """Release the least recently used on-demand graphs beyond ON_DEMAND_LIMIT (never those of
        the `current` key's settings, guidance on or off)."""
        for key in list(self._on_demand):
            if len(self._on_demand) <= ON_DEMAND_LIMIT:
                return
            if _beside_guidance(key) == _beside_guidance(current):
                continue
            del self._on_demand[key]
            for source in SOURCES:
                self._steps.pop((key, source), None)
            log.info("released the step graph for %dx%d, %d step(s) (more than %d captured since start; "
                     "captured again when used)", key[6], key[7], key[3], ON_DEMAND_LIMIT)

    def failure_for(self, config) -> str | None:
        """Why frames at `config`'s settings run without a step graph, when capturing failed."""
        return self.failed or self.failed_keys.get(graph_key(config))

    @property
    def held(self) -> int:
        """Step graphs held now (each for both sources)."""
        return len(self._steps) // len(SOURCES)

    def run(self, inputs: torch.Tensor, *, source: str = "images") -> tuple[torch.Tensor, torch.Tensor] | None:
        """Replay the current settings' step on `inputs`, "images" (b, 3, H, W) in [-1, 1] or
        "pixels" (b, H, W, 3) uint8 at the engine's size: (output, pixels), the graph's memory,
        valid until the next replay; None when this frame must run without the graph (no graph
        for these settings, or a state that does not fit it)."""
        stream = self._stream
        key = graph_key(stream.config)
        step = None if self.failed else self._steps.get((key, source))
        if step is None or not self._load_state(step, inputs, source):
            return None
        if self._on_demand:  # (none at all in a show that stays with what it readied at start)
            for used in [k for k in self._on_demand if _beside_guidance(k) == _beside_guidance(key)]:
                self._on_demand.move_to_end(used)  # guidance on and off of these settings: used together
        stream._prepare_conditions()
        step.inputs.copy_(inputs)
        self.replaying = True
        try:
            step.replay()
        finally:
            self.replaying = False
        self.replays += 1
        stream.state = step.state
        return step.output, step.pixels

    # ------------------------------------------------------------------ building

    def _new_state(self, config):
        """Zeroed state buffers of `config`'s shapes (a StreamState)."""
        stream = self._stream
        device, dtype = stream._noise.device, stream._noise.dtype
        b, n = config.frame_buffer_size, config.denoising_steps
        latent = stream._noise.shape[1:]  # (4, h, w)
        later = (n - 1) * b
        return type(stream.state)(
            torch.zeros(later, *latent, device=device, dtype=dtype) if n > 1 else None,
            torch.zeros(later, *latent, device=device, dtype=dtype) if n > 1 and _uses_stock(config) else None,
            torch.zeros(b, 3, config.height, config.width, device=device, dtype=dtype),
            torch.zeros(b, *latent, device=device, dtype=dtype) if config.overlap_decode else None,
            torch.zeros(b, *latent, device=device, dtype=dtype) if config.overlap_encode else None,
        )

    def _new_step(self, config, source: str, state) -> _Step:
        stream = self._stream
        device, dtype = stream._noise.device, stream._noise.dtype
        b = config.frame_buffer_size
        if source == "pixels":
            inputs = torch.zeros(b, config.height, config.width, 3, device=device, dtype=torch.uint8)
        else:
            inputs = torch.zeros(b, 3, config.height, config.width, device=device, dtype=dtype)

        def body() -> tuple[torch.Tensor, torch.Tensor]:
            stream.state = state
            images = stream._math.pixels_to_images(inputs, dtype) if source == "pixels" else inputs
            output = stream._step(images)  # replaces stream.state with the step's new tensors
            for buffer, new in zip(_tensors(state), _tensors(stream.state)):
                if buffer is not None and new is not None and new is not buffer:
                    buffer.copy_(new)
            return output, stream._math.pixels_out(output)

        if self._replay == "eager":
            output, pixels = body()

            def replay() -> None:
                new_output, new_pixels = body()
                output.copy_(new_output)
                pixels.copy_(new_pixels)

            return _Step(inputs, state, output, pixels, replay)

        side = torch.cuda.Stream(device)  # warm up outside the capture, as torch's CUDA graph recipe asks
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            body()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the prompt worker may run the text encoder on another thread meanwhile
        with torch.cuda.graph(graph, pool=self._pool, stream=self._capture_stream(config, device),
                              capture_error_mode="thread_local"):
            output, pixels = body()
        return _Step(inputs, state, output, pixels, graph.replay)

    def _capture_stream(self, config, device) -> "torch.cuda.Stream | None":
        """The stream a step is captured on: with the VAE overlapped (`overlap_decode`,
        `overlap_encode`), one of high priority, so that the step's own kernels, the UNet's (each
        frame's critical path), are captured at that priority and the VAE's branch at its side
        stream's normal one. Torch instantiates its graphs with
        cudaGraphInstantiateFlagUseNodePriority, so the GPU then starts the UNet's blocks first and
        the VAE's in what they leave free, instead of letting the VAE's large convolutions take SMs
        the UNet waits for. None otherwise (torch's own capture stream)."""
        if not (config.overlap_decode or config.overlap_encode):
            return None
        if self._high_priority is None:  # lower numbers are higher priorities; 0, the default, is the lowest
            self._high_priority = torch.cuda.Stream(device, priority=-1)
        return self._high_priority

    def _load_state(self, step: _Step, inputs: torch.Tensor, source: str) -> bool:
        """Make the stream's state the step's buffers (copied in when it lives elsewhere). A
        stream with nothing in flight yet (after a start, a reset, a seed, step-count or size
        change) is filled first, outside the graph, from this frame, as the step itself would
        fill it: the frames in flight from its latents noised to each later step, the last
        output from the frame itself, and with `overlap_encode` the latents kept for the UNet
        from the frame itself too. False when the state does not fit the step (the frame then
        runs without the graph). With `overlap_decode` a state with no x_0 kept (the first frame
        after a start, a reset or a size change) does not fit: that frame decodes its own, in order."""
        stream = self._stream
        current = stream.state
        if current is step.state:
            return True
        if step.state.undecoded is not None and current.undecoded is None:
            return False
        if current.last_output is None or (step.state.latent_buffer is not None and current.latent_buffer is None) or (
                step.state.encoded is not None and current.encoded is None):
            current = self._filled(current, inputs, source)
        for buffer, value in zip(_tensors(step.state), _tensors(current)):
            if buffer is None:
                continue
            if value is None or value.shape != buffer.shape:
                return False
            buffer.copy_(value)
        stream.state = step.state
        return True

    def _filled(self, current, inputs: torch.Tensor, source: str):
        """`current` with what is missing made from this frame, the way the stream's step makes it:
        with `overlap_encode` the latents the UNet takes (the frame's own, as a first step encodes
        them in order: frames f0, f1 are denoised as f0, f0, f1), the frames in flight
        (`_primed_state`, from the latents the UNet takes: the frame's, or with `overlap_encode`
        the ones kept) and the last output (the frame itself: a bad first output falls back to
        the input)."""
        stream = self._stream
        images = stream._math.pixels_to_images(inputs, stream._noise.dtype) if source == "pixels" else inputs
        overlapped = stream.config.overlap_encode
        if overlapped and current.encoded is None:
            current = replace(current, encoded=stream.backend.encode(images))
        if stream._needs_priming():  # (current is the stream's state)
            primed = stream._primed_state(current.encoded if overlapped else stream.backend.encode(images))
            current = replace(current, latent_buffer=primed.latent_buffer, stock_noise=primed.stock_noise)
        if current.last_output is None:
            current = replace(current, last_output=images)
        return current


def _uses_stock(config) -> bool:
    from .guidance import RULES

    return RULES[config.cfg_type].uses_stock


def _tensors(state) -> tuple:
    return (state.latent_buffer, state.stock_noise, state.last_output, state.undecoded, state.encoded)

