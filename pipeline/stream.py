"""StreamDiffusion: the stream-batch img2img/txt2img engine (Kodaira et al. 2023).

Stream batch: with n denoising steps and b frames per call, one UNet call denoises n*b latents
at once, frame f at step 0 beside frame f-1 at step 1 ... frame f-n+1 at step n-1; the output
lags n-1 calls. Rows are step-major: rows [i*b, (i+1)*b) hold the frames at step i.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import math
import threading
import time
from dataclasses import dataclass, field, replace

import torch

from .backends import make_backend
from .config import StreamConfig, parse_resolution, t_index_list_from_strength
from .frames import (
    FrameKind, HostStaging, PendingFrame, as_tensor, deliver, frame_kind, from_model_output, takes_pixels,
    tensor_from_numpy, to_model_input,
)
from .faults import output_faults
from .guidance import RULES, unet_batches, unet_calls
from .models import Components
from .noise import blended_noise, seeded_noise
from .prompts import MAX_TRANSITION_SECONDS, PromptEncoder, blend_embeddings, transition_weight
from .schedule import StepCoefficients, step_coefficients
from .similarity import SimilarityFilter
from .step_math import PLAIN
from .step_graph import StepGraphs, graph_key

log = logging.getLogger(__name__)

# Each backend call of a step runs inside a profiler range of this prefix and the call's name
# ("sdbridge.encode", ".denoise", ".decode"): `sdbridge bench --profile` sums the time of each
# stage's kernels. A step graph's replay runs no Python, so it shows none of them.
STAGE_RANGE_PREFIX = "sdbridge."


def _stage(name: str):
    return torch.profiler.record_function(STAGE_RANGE_PREFIX + name)


# What `update` may change while frames flow; everything else needs a new engine.
RUNTIME_SETTINGS = frozenset(
    {
        "guidance_scale", "delta", "seed", "seed_blend", "prompt_transition", "txt2img_noise", "input_fit",
        "input_zoom", "input_pan_x", "input_pan_y", "t_index_list", "num_inference_steps", "cfg_type",
        "similarity_filter", "similarity_threshold", "similarity_max_skip", "width", "height",
    }
)


@dataclass(frozen=True)
class StreamStats:
    """Counters since the engine was built."""

    frames_in: int  # calls with an input frame (or txt2img calls)
    frames_processed: int  # calls that ran the VAE and UNet
    frames_skipped: int  # calls answered by the similarity filter with the previous output
    nonfinite_caught: int  # outputs with NaN/inf replaced by the last good output
    black_caught: int  # all-black outputs of a non-black input, replaced by the last good output

    @property
    def bad_caught(self) -> int:
        return self.nonfinite_caught + self.black_caught


@dataclass(frozen=True)
class StreamState:
    """What the stream carries from one call to the next; each call replaces it."""

    latent_buffer: torch.Tensor | None = None  # ((n-1)*b, 4, h, w): x_t of frames in flight, steps 1..n-1
    stock_noise: torch.Tensor | None = None  # ((n-1)*b, 4, h, w): their virtual residual noise (RCFG)
    last_output: torch.Tensor | None = None  # (b, 3, H, W) in [-1, 1]: the last good output
    undecoded: torch.Tensor | None = None  # (b, 4, h, w): overlap_decode: the last x_0, decoded by the next step
    encoded: torch.Tensor | None = None  # (b, 4, h, w): overlap_encode: the last frame's latents, the next UNet's


@dataclass(frozen=True)
class _Transition:
    """A prompt change fading in: from the prompt side shown when it began to its target."""

    start: "_PromptState"
    target: "_PromptState"
    began: float  # StreamDiffusion.clock() when it began
    seconds: float


@dataclass(frozen=True)
class _PromptState:
    """The prompt side, swapped as one object so a prompt change is atomic for the frame loop."""

    uncond: torch.Tensor  # (1, 77, D) negative prompt embedding
    cond: torch.Tensor  # (1, 77, D) prompt (or blended prompts) embedding
    conditions: dict = field(default_factory=dict)  # (uncond rows, cond rows) -> backend Conditioning


class _Capturing(threading.local):
    config: StreamConfig | None = None  # the settings a step graph is being captured for, in this thread


class StreamDiffusion:
    """One stream: frames in, frames out. See the README for the API and its guarantees."""

    @property
    def config(self) -> StreamConfig:
        """The current settings (while a step graph is captured, the capturing thread alone sees
        the settings being captured: a status reader elsewhere never sees them)."""
        captured = self._capturing.config
        return self._config if captured is None else captured

    @config.setter
    def config(self, value: StreamConfig) -> None:
        self._config = value

    @contextlib.contextmanager
    def capturing(self, config: StreamConfig):
        """Within: `config` is this thread's view of the settings (for a step graph's capture)."""
        self._capturing.config = config
        try:
            yield
        finally:
            self._capturing.config = None

    def __init__(
        self, components: Components, config: StreamConfig, *, backend: str = "eager", backend_options: dict | None = None
    ) -> None:
        """`backend`: "eager" or "compiled"; `backend_options`: keyword options of that backend (e.g. the
        compiled backend's `compile_backend`). A compiled backend compiles here (see `warm_up`)."""
        components.check_fits(config)
        self._capturing = _Capturing()
        self.components = components.to(config.device, config.dtype)
        self.backend = make_backend(backend, self.components, kv_cache=config.kv_cache, **(backend_options or {}))
        _check_live_loras(self.components, self.backend)
        self._math = getattr(self.backend, "step_math", PLAIN)  # the arithmetic between the modules, maybe fused
        replay = getattr(self.backend, "step_graphs", None)  # "cuda": the step, and the text encoder, as CUDA graphs
        self.prompts = PromptEncoder(
            self.components.tokenizer, self.components.text_encoder, cache_size=config.prompt_cache_size,
            graph=replay if config.text_encoder_graph else None,
        )
        self.similarity = SimilarityFilter(
            threshold=config.similarity_threshold, max_skip=config.similarity_max_skip, seed=config.seed
        )
        self.state = StreamState()
        self._counts = {"frames_in": 0, "frames_processed": 0, "frames_skipped": 0}
        self._caught = torch.zeros(2, dtype=torch.int64, device=config.device)  # non-finite, black
        # guidance scale and delta as 0-d tensors, updated in place: a step graph reads them
        self._guidance_scale = torch.zeros((), dtype=torch.float32, device=config.device)
        self._delta = torch.zeros((), dtype=torch.float32, device=config.device)
        self._kept: dict[tuple, object] = {}  # per name and shape: the tensors a step graph may read (_kept_tensors)
        self._staging = HostStaging()  # pinned buffers for numpy frames to and from a CUDA device
        self._side_stream = side_stream(config, self.backend)  # the overlapped VAE's (CUDA)
        self._graphs = StepGraphs(self, replay=replay) if replay else None  # the whole step in one graph
        # graph_key of each configuration whose step has run with the fused math (a dry run, one beside
        # the frames, or a step graph's capture): its fused functions are compiled
        self._math_ran: set[tuple] = set()
        self.config = config
        self._configure(config, previous=None)
        self.clock = time.monotonic  # what prompt transitions are timed by (a test may set its own)
        self._transition: _Transition | None = None
        self.set_prompt("")
        self.warm_up()

    @classmethod
    def from_pretrained(
        cls,
        model_id_or_path: str,
        config: StreamConfig,
        *,
        vae: str | None = "taesd-default",
        lcm_lora: str | None = None,
        loras=(),
        live_loras=(),
        allow_pickle: bool = False,
        single_file_config: str | None = None,
        backend: str = "eager",
        backend_options: dict | None = None,
    ) -> "StreamDiffusion":
        """Load a hub id, a diffusers folder or a single .safetensors checkpoint (see pipeline.loading).

        `vae`: TAESD by default, "model" for the checkpoint's own AutoencoderKL, or a folder/hub id.
        `lcm_lora`: LoRA weights merged into the UNet (LCM-LoRA for SD 1.5 models).
        `loras`: (weights, scale) pairs, style LoRAs merged after it at their scales.
        `live_loras`: (weights, scale) pairs, up to 4 style LoRAs whose strengths
        `set_lora_scales` changes while frames flow (not with tensorrt or fp8).
        `allow_pickle`: opt in to .ckpt/.pt/.bin files, which can run code when loaded.
        """
        from .loading import load_components

        components = load_components(
            model_id_or_path, vae=vae, lcm_lora=lcm_lora, loras=loras, live_loras=live_loras, allow_pickle=allow_pickle,
            single_file_config=single_file_config, dtype=config.dtype, device=config.device,
        )
        return cls(components, config, backend=backend, backend_options=backend_options)

    # ------------------------------------------------------------------ configuration

    def _configure(self, config: StreamConfig, previous: StreamConfig | None) -> None:
        """Derive everything that stays fixed between frames from `config`."""
        b, n = config.frame_buffer_size, config.denoising_steps
        steps_changed = previous is None or (previous.t_index_list, previous.num_inference_steps) != (
            config.t_index_list, config.num_inference_steps
        )
        if steps_changed:
            coefficients = step_coefficients(
                self.components.schedule, config.t_index_list, config.num_inference_steps,
                config.lcm_original_steps, config.device, config.dtype,
            )
            self._rows: StepCoefficients = self._kept_tensors("rows", coefficients.repeat_per_frame(b))  # (n*b,) step-major
        resized = previous is not None and previous.size != config.size
        new_noise = previous is None or (previous.seed, previous.seed_blend) != (config.seed, config.seed_blend)
        if new_noise or previous.denoising_steps != n or resized:
            self._noise = self._kept_tensors("noise", self._make_noise(config))  # (n*b, 4, h, w)
            self._txt2img_generator = torch.Generator(device=config.device).manual_seed(config.seed + 1)
            self.similarity.reseed(config.seed)
            # refill from the next frame; what an overlapped VAE keeps for it (an x_0 to decode, a
            # frame's latents) stays, as the last output does: a new size drops them (the old size)
            kept = self.state if not resized else StreamState()
            self.state = StreamState(last_output=kept.last_output, undecoded=kept.undecoded, encoded=kept.encoded)
        if previous is not None and RULES[config.cfg_type].uses_stock and self.state.latent_buffer is not None:
            if self.state.stock_noise is None:  # switched to RCFG: start from the re-noising noise
                self.state = replace(self.state, stock_noise=self._noise[b:])
        self._guidance_scale.fill_(config.guidance_scale)
        self._delta.fill_(config.delta)
        self.similarity.configure(threshold=config.similarity_threshold, max_skip=config.similarity_max_skip)
        if previous is not None and (resized or (config.similarity_filter and not previous.similarity_filter)):
            self.similarity.reset()

    def _kept_tensors(self, name: str, values):
        """`values` (a tensor or StepCoefficients) in the tensors this stream has kept for that
        name and shape since it began, so that each shape always lives at the same addresses: a
        step graph captured for 2 steps reads the 2-step tensors again after a 4-step spell."""
        key = (name, *(tuple(t.shape) for t in (values.as_tuple() if isinstance(values, StepCoefficients) else [values])))
        kept = self._kept[key] = _in_place(self._kept.get(key), values)
        return kept

    def _make_noise(self, config: StreamConfig) -> torch.Tensor:
        scale = self.components.vae_scale_factor
        shape = (config.denoising_steps * config.frame_buffer_size, 4, config.height // scale, config.width // scale)
        if config.seed_blend:
            return blended_noise(shape, config.seed_blend, device=config.device, dtype=config.dtype)
        return seeded_noise(shape, config.seed, device=config.device, dtype=config.dtype)

    def set_prompt(self, prompt: str, negative_prompt: str | None = None, *, transition: float | None = None) -> None:
        """Use these prompts from the next frame on (encoded once, cached; no reload).

        `transition`: seconds the change takes, fading from the prompt shown to this one (None:
        `config.prompt_transition`; see `_switch_prompt`)."""
        seconds = self._transition_seconds(transition)
        negative_prompt = "" if negative_prompt is None else negative_prompt
        source = functools.partial(self._plain_prompt, prompt, negative_prompt)
        target = source()
        self.prompt, self.negative_prompt = prompt, negative_prompt
        self._prompt_source = source
        self._switch_prompt(target, seconds)

    def _plain_prompt(self, prompt: str, negative_prompt: str) -> "_PromptState":
        return _PromptState(self.prompts.encode(negative_prompt), self.prompts.encode(prompt))  # (1, 77, D) each

    def set_prompt_blend(
        self, prompts: list[tuple[str, float]], *, negative_prompt: str | None = None, method: str = "linear",
        transition: float | None = None,
    ) -> None:
        """Blend several weighted prompts' embeddings ("linear" mean or "slerp") from the next frame
        on (`transition` as for `set_prompt`)."""
        seconds = self._transition_seconds(transition)
        if not isinstance(prompts, (list, tuple)) or not all(
            isinstance(p, (list, tuple)) and len(p) == 2 and isinstance(p[0], str) for p in prompts
        ):
            raise ValueError(f"prompts: expected a list of (prompt, weight) pairs, got {prompts!r}")
        if not all(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for _, w in prompts):
            raise ValueError(f"prompts: each weight must be a finite number, got {[w for _, w in prompts]!r}")
        if negative_prompt is not None and not isinstance(negative_prompt, str):
            raise ValueError(f"negative_prompt: expected a string, got {type(negative_prompt).__name__} "
                             f"{negative_prompt!r}")
        pairs = tuple((prompt, float(weight)) for prompt, weight in prompts)
        negative_prompt = "" if negative_prompt is None else negative_prompt
        source = functools.partial(self._blended_prompt, pairs, negative_prompt, method)
        target = source()
        self.prompt = " | ".join(f"{prompt}:{weight:g}" for prompt, weight in prompts)
        self.negative_prompt = negative_prompt
        self._prompt_source = source
        self._switch_prompt(target, seconds)

    def _blended_prompt(self, pairs: tuple, negative_prompt: str, method: str) -> "_PromptState":
        embeddings = [self.prompts.encode(prompt) for prompt, _ in pairs]
        cond = blend_embeddings(embeddings, [weight for _, weight in pairs], method)  # (1, 77, D)
        return _PromptState(self.prompts.encode(negative_prompt), cond)

    def _transition_seconds(self, transition: float | None) -> float:
        if transition is None:
            return self.config.prompt_transition
        if not isinstance(transition, (int, float)) or isinstance(transition, bool) or not (
            0.0 <= transition <= MAX_TRANSITION_SECONDS
        ):
            raise ValueError(f"transition: {transition!r} must be a number of seconds in 0..{MAX_TRANSITION_SECONDS:g}")
        return float(transition)

    def _switch_prompt(self, target: _PromptState, seconds: float) -> None:
        """Show `target` from the next frame on: at once, or over `seconds` from the prompt shown
        now (a blend, if a transition was under way: a change during a transition never jumps),
        eased in and out, by the clock `self.clock` (time.monotonic). Before the first frame a
        change is immediate: there is no picture to fade from."""
        if seconds > 0.0 and self._counts["frames_in"] > 0:
            self._transition = _Transition(self._prompt_state, target, self.clock(), seconds)
        else:
            self._transition = None
            self._prompt_state = target

    def _advance_transition(self) -> None:
        """Before a frame: the prompt side at this moment of a transition (its end: the target)."""
        transition = self._transition
        if transition is None:
            return
        weight = transition_weight(self.clock() - transition.began, transition.seconds)
        if weight >= 1.0:
            self._prompt_state, self._transition = transition.target, None
            return
        start, target = transition.start, transition.target
        uncond = target.uncond if start.uncond is target.uncond else torch.lerp(start.uncond, target.uncond, weight)
        self._prompt_state = _PromptState(uncond, torch.lerp(start.cond, target.cond, weight))

    @property
    def lora_scales(self) -> tuple[float, ...]:
        """The live LoRAs' strengths, in the order they were loaded (empty without live LoRAs)."""
        live = self.components.live_loras
        return () if live is None else tuple(live.scales)

    def set_lora_scales(self, scales) -> None:
        """New strengths for live LoRAs (`live_loras=` at load), from the next frame on: a dict
        {index (0-based): scale} or a list of scales, one per live LoRA. The touched layers are
        rewritten in place, so nothing compiles or captures again; the prompt's cross-attention
        keys and values are computed again, and where a LoRA touches the text encoder its
        prompts are encoded again (a transition under way then lands at once). ValueError
        naming what is wrong; then nothing changes."""
        live = self.components.live_loras
        if live is None:
            raise ValueError("lora: no live LoRAs are loaded (load them with live_loras= or --live-lora)")
        if isinstance(scales, (list, tuple)):
            if len(scales) != len(live):
                raise ValueError(f"lora scales: {list(scales)!r} gives {len(scales)} scales for {len(live)} live LoRAs")
            scales = dict(enumerate(scales))
        if not isinstance(scales, dict):
            raise ValueError(f"lora scales: {scales!r} must be a dict of index -> scale or a list of scales")
        with torch.inference_mode():
            text_encoder = live.set_scales(scales)
        if text_encoder:
            self.prompts.clear()
            self._transition = None
            self._prompt_state = self._prompt_source()
            return
        # the UNet's weights changed: each prompt side's conditioning (its cached K/V) is computed again
        fresh = lambda state: _PromptState(state.uncond, state.cond)  # noqa: E731
        self._prompt_state = fresh(self._prompt_state)
        if self._transition is not None:
            self._transition = replace(self._transition, start=fresh(self._transition.start),
                                       target=fresh(self._transition.target))

    @property
    def in_transition(self) -> bool:
        """True while a prompt change is fading in."""
        return self._transition is not None

    def prepare_prompt(self, prompt: str) -> None:
        """Encode and cache `prompt` now. Thread-safe: a control thread can call it so that the
        frame loop's later `set_prompt` finds the embedding ready and never waits on the encoder."""
        self.prompts.encode(prompt)

    def update(self, **params) -> None:
        """Change run-time settings (see RUNTIME_SETTINGS, plus `strength` and `resolution`) from
        the next frame on.

        `resolution=(width, height)` (or width and height) changes the size frames are processed
        and returned at: the frames in flight restart at the new size, and the backend readies it
        (the compiled backend compiles and captures it unless `warm_up(sizes=...)` did at start,
        or `ready` on another thread did beside the frames; the tensorrt backend loads its
        prebuilt engines, or refuses a size that has none)."""
        new_config = self._target(params)
        previous, self.config = self.config, new_config
        kept = (self.state, self._txt2img_generator, self.similarity.snapshot())
        try:
            self._configure(new_config, previous)
            resized = new_config.size != previous.size
            if unet_batches(new_config) != unet_batches(previous) or not self._stepped(new_config) or resized:
                self.warm_up(keep=False)
        except BaseException:  # all or nothing: derive everything from the previous settings again, and
            self.config = previous  # put back what the change had restarted (the frames in flight, ...)
            self._configure(previous, new_config)
            self.state, self._txt2img_generator = kept[:2]
            self.similarity.restore(kept[2])
            raise

    def _target(self, params: dict) -> StreamConfig:
        """The settings `update(**params)` would make, checked (ValueError naming what is wrong)."""
        params = dict(params)
        if "resolution" in params:
            if "width" in params or "height" in params:
                raise ValueError("update: give resolution or width and height, not both")
            params["width"], params["height"] = parse_resolution(params.pop("resolution"))
        if "seed" in params and "seed_blend" not in params:
            params["seed_blend"] = ()  # a seed replaces a blend
        if "strength" in params:
            if "t_index_list" in params:
                raise ValueError("update: give strength or t_index_list, not both")
            steps = params.get("num_inference_steps", self.config.num_inference_steps)
            params["t_index_list"] = t_index_list_from_strength(
                params.pop("strength"), self.config.denoising_steps, steps
            )
        fixed = sorted(set(params) - RUNTIME_SETTINGS)
        if fixed:
            raise ValueError(
                f"update: {', '.join(fixed)} cannot change at run time (allowed: {', '.join(sorted(RUNTIME_SETTINGS))}, "
                "strength); build a new StreamDiffusion for it"
            )
        target = self.config.replace(**params)
        self.components.check_fits(target)
        return target

    def update_work(self, **params) -> str | None:
        """What `update(**params)` would do before it returns: "compile" (the backend compiles,
        or the fused math does for new shapes: seconds to minutes; `ready` can do it beside the
        frames), "capture" (a step graph's capture: a fraction of a second), or None. ValueError
        as `update` would raise it."""
        target = self._target(params)
        warmed = getattr(self.backend, "warmed", None)
        if warmed is not None and not warmed(unet_batches(target), **self._warm_up_shapes(target)):
            return "compile"
        if self._math.fused and not all(graph_key(side) in self._math_ran for side in _both_sides(target)):
            return "compile"  # the fused math's functions for these shapes (a capture would compile them too)
        return None if self._stepped(target) else "capture"

    @property
    def ready_beside_frames(self) -> bool:
        """Whether `ready` may compile on one thread while frames run on another (compiled backend,
        except with cudagraph trees)."""
        return bool(getattr(self.backend, "warms_beside_frames", False))

    def ready(self, **params) -> None:
        """Compile what `update(**params)` will need, on this thread, while frames go on running
        with the current settings on another; no setting changes. The update then compiles
        nothing (with step graphs it still captures one: a fraction of a second). Only where
        `ready_beside_frames`; ValueError as `update` would raise it."""
        if not self.ready_beside_frames:
            raise ValueError(f"backend: {self.backend.name!r} cannot compile beside running frames")
        target = self._target(params)
        with torch.inference_mode():  # as frames run: the compiled graphs' guards see the same tensors
            self._warm_up_backend(target, sorted(set(unet_batches(target))), beside_frames=True)
            if self._math.fused:
                with self.backend.compiling_beside_frames():
                    for side in _both_sides(target):
                        self._dry_run_beside_frames(side)

    def _warm_up_shapes(self, config: StreamConfig) -> dict:
        """The latents' (b, 4, h, w) and, for img2img, the images' (b, 3, H, W) shapes of `config`."""
        b, scale = config.frame_buffer_size, self.components.vae_scale_factor
        images = (b, 3, config.height, config.width) if config.mode == "img2img" else None
        return {"latents": (b, 4, config.height // scale, config.width // scale), "images": images}

    def warm_up(self, step_counts=(), sizes=(), *, keep: bool = True) -> None:
        """Ready the backend for every UNet batch the current cfg type and step count can reach,
        guidance on or off, so that no frame waits (the compiled backend compiles here; eager has
        nothing to do). Called by __init__ and by `update` when those batches or the size change.

        `step_counts`: other numbers of denoising steps to ready now as well, so that a later
        t_index_list of that length (an operator's change during a show) compiles nothing and,
        with step graphs, captures nothing. `sizes`: other (width, height) to ready the same way
        (the tensorrt backend loads their engines now: a size without engines is refused here).
        `keep`: hold the step graphs captured here for the stream's life; `update` passes False, so
        that graphs of sizes and step counts reached mid-show are released beyond a few
        (step_graph.ON_DEMAND_LIMIT)."""
        config = self.config
        limit = min(16, config.num_inference_steps)
        for count in step_counts:
            if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= limit:
                raise ValueError(f"step_counts: {count!r} must be a whole number of steps from 1 to {limit}")
        counts = sorted(set(step_counts) - {config.denoising_steps})
        resized = []
        for size in sizes:
            width, height = parse_resolution(size, name="sizes")
            other = config.replace(width=width, height=height)
            self.components.check_fits(other)
            if other.size != config.size and other not in resized:
                resized.append(other)
        batches = set(unet_batches(config))
        for count in counts:
            batches |= set(unet_batches(config.replace(t_index_list=tuple(range(count)))))
        for sized in [config, *resized]:
            self._warm_up_backend(sized, sorted(batches))
        if self._graphs is not None:
            ready = functools.partial(self._capture, keep=keep)  # each configuration's step graph
        elif self._math.fused:
            ready = self._dry_run  # no graph's capture runs the step: a dry run compiles the fused math
        else:
            return
        self._ready_both_sides(config, ready)  # the current settings, guidance on and off
        for sized in [config, *resized]:
            for count in [sized.denoising_steps, *counts]:
                other = sized.replace(t_index_list=tuple(range(count))) if count != sized.denoising_steps else sized
                if other != config:
                    self._ready_other(other, ready)

    def _warm_up_backend(self, config: StreamConfig, batches: list[int], *, beside_frames: bool = False) -> None:
        """The backend's warm-up for `config`'s size: latents (b, 4, h, w), embeds (1, 77, D),
        images (b, 3, H, W) for img2img (`_warm_up_shapes`). `beside_frames`: from `ready`, on
        another thread than the frames' (the compiled backend only)."""
        b, shapes = config.frame_buffer_size, self._warm_up_shapes(config)
        latents = self._noise[:b] if config.size == self.config.size else self._make_noise(config)[:b]
        images = None
        if shapes["images"] is not None:
            images = torch.zeros(shapes["images"], device=config.device, dtype=config.dtype)
        options = {"beside_frames": True} if beside_frames else {}
        self.backend.warmup(batches, latents=latents, embeds=self._prompt_state.cond, images=images, **options)

    def _ready_both_sides(self, config: StreamConfig, ready) -> None:
        """`ready` (a step graph's capture, or a dry run) for `config` with guidance on and off
        (once when cfg_type is none)."""
        for side in _both_sides(config):
            ready(side)

    def _capture(self, config: StreamConfig, keep: bool = True) -> None:
        """`config`'s step graph captured (its capture runs the step: the fused math compiles then)."""
        self._graphs.capture(config, keep=keep)
        if self._math.fused:
            self._math_ran.add(graph_key(config))

    def _stepped(self, config: StreamConfig) -> bool:
        """Whether `config`'s step is readied as warm_up readies it: its step graph captured, or
        with fused math and no graphs, its dry run done (True when neither applies)."""
        if self._graphs is not None:  # (a capture that failed is as ready as these settings get)
            return config in self._graphs or self._graphs.failure_for(config) is not None
        return graph_key(config) in self._math_ran or not self._math.fused

    def _ready_other(self, other: StreamConfig, ready) -> None:
        """`ready` `other` (another step count or size) now, with the step coefficients and
        noise this stream will keep for it (`_kept_tensors`): when an update later switches to
        it, `_configure` fills those same tensors with the real values."""
        if self._stepped(other):
            return
        current = self._rows, self._noise
        try:
            if other.t_index_list != self.config.t_index_list:  # else the current rows, as they are
                coefficients = step_coefficients(self.components.schedule, other.t_index_list,
                                                 other.num_inference_steps, other.lcm_original_steps, other.device,
                                                 other.dtype)
                self._rows = self._kept_tensors("rows", coefficients.repeat_per_frame(other.frame_buffer_size))
            self._noise = self._kept_tensors("noise", self._make_noise(other))
            self._ready_both_sides(other, ready)
        finally:
            self._rows, self._noise = current

    def _dry_run(self, config: StreamConfig) -> None:
        """Run `config`'s step on two black frames and forget them (state, bad-output counters
        and the txt2img generator put back): without a step graph, this is what compiles the fused
        step math (pipeline/step_math.py) for `config` before frames flow."""
        if graph_key(config) in self._math_ran:
            return
        saved = self.state, self._caught.clone(), self._txt2img_generator.get_state()
        try:
            self._two_black_frames(config)
        finally:
            self.state = saved[0]
            self._caught.copy_(saved[1])
            self._txt2img_generator.set_state(saved[2])
        self._math_ran.add(graph_key(config))

    def _dry_run_beside_frames(self, config: StreamConfig) -> None:
        """`_dry_run` for `config` on this thread while another runs frames (from `ready`), on a
        copy of this stream with state, counters, generator, step coefficients and noise of its
        own, whose UNet calls take their conditioning as given, not through the static buffers
        the frames' graphs read. Compiles the fused math's functions for `config`'s shapes and
        changes nothing the frames use."""
        if graph_key(config) in self._math_ran:
            return
        shadow = copy.copy(self)
        shadow.backend = _ConditioningAsGiven(self.backend)
        shadow._caught = torch.zeros_like(self._caught)
        shadow._side_stream = None  # its decodes, if any, stay on its own thread's stream
        shadow._txt2img_generator = torch.Generator(device=config.device).manual_seed(config.seed + 1)
        with torch.inference_mode(False):  # made as `update` will make them: the compiled math guards on it
            shadow._rows = step_coefficients(self.components.schedule, config.t_index_list, config.num_inference_steps,
                                             config.lcm_original_steps, config.device,
                                             config.dtype).repeat_per_frame(config.frame_buffer_size)
            shadow._noise = self._make_noise(config)
        shadow._two_black_frames(config)
        self._math_ran.add(graph_key(config))

    def _two_black_frames(self, config: StreamConfig) -> None:
        """`config`'s step on two black frames from an empty state. Two, because a first frame
        differs from the next for the compiler: the frames in flight are filled from it, and its
        fallback output is the input itself."""
        with torch.inference_mode(), self.capturing(config):
            self.state = StreamState()  # nothing in flight, no last output: as after a start
            shape = (config.frame_buffer_size, 3, config.height, config.width)
            images = torch.zeros(shape, device=self._noise.device, dtype=self._noise.dtype)
            for _ in range(2):
                if config.mode == "img2img":
                    self._step(images)
                else:
                    self._finish(self._denoise(latents=None), fallback=None)

    def reset(self) -> None:
        """Forget the frames in flight and the similarity reference (counters are kept)."""
        self.state = StreamState()
        self.similarity.reset()

    @property
    def stats(self) -> StreamStats:
        nonfinite, black = self._caught.tolist()  # one read of the device counters
        return StreamStats(nonfinite_caught=nonfinite, black_caught=black, **self._counts)

    # ------------------------------------------------------------------ per frame

    def __call__(self, frame):
        """img2img: one frame (or a batch of frame_buffer_size frames) in, the same kind out."""
        return self.submit(frame).result()

    @torch.inference_mode()
    def submit(self, frame) -> PendingFrame:
        """`__call__` without waiting for the result: the frame's work is queued on the device
        and `result()` of what this returns gives the output. On a CUDA device this lets the
        next frame be submitted (its upload overlapping this one's compute) before this one's
        download is waited for; elsewhere everything has run by the time it returns. Frames
        come out in the order they went in, each the caller's own memory; settings changed
        between two submits (`update`, `set_prompt`) apply from the second one on."""
        if self.config.mode != "img2img":
            raise ValueError("mode: this stream is 'txt2img'; call txt2img() (it takes no input frame)")
        self._advance_transition()
        frame = as_tensor(frame)
        kind = frame_kind(frame, self.config.frame_buffer_size)
        config = self.config
        self._counts["frames_in"] += 1
        graphs, in_kind = self._graphs, kind  # in_kind: the frame as it is now (the output goes back as `kind`)
        if graphs is not None and not config.similarity_filter and config.input_zoom == 1.0 and takes_pixels(
            frame, kind, width=config.width, height=config.height
        ):  # 8-bit RGB at the engine's size, all of it taken: the graph converts it too
            frame = self._pixels_on_device(frame, kind)  # (b, H, W, 3) uint8
            replayed = graphs.run(frame, source="pixels")
            if replayed is not None:
                self._counts["frames_processed"] += 1
                output, pixels = replayed  # the graph's memory: copied before the next replay
                return deliver(output, kind, pixels=pixels, staging=self._staging, owned=False)
            in_kind = replace(kind, library="torch", batched=True, device=frame.device)
            graphs = None  # no graph for this frame (the images graph would say the same)
        # 1. upload, resize and normalise on the device
        images = to_model_input(frame, in_kind, width=config.width, height=config.height, device=config.device,
                                dtype=config.dtype, staging=self._staging, fit=config.input_fit,
                                zoom=config.input_zoom, pan=(config.input_pan_x, config.input_pan_y))
        # 2. similarity filter: a near-identical frame gets the previous output, no VAE, no UNet
        if config.similarity_filter and self.state.last_output is not None and self.similarity.should_skip(images):
            self._counts["frames_skipped"] += 1
            return deliver(self.state.last_output, kind, staging=self._staging, owned=self._graphs is None)
        if config.similarity_filter and self.state.last_output is None:
            self.similarity.should_skip(images)  # records the reference
        # 3.-6. encode, denoise, decode, keep finite: one graph replay where there is one
        replayed = graphs.run(images, source="images") if graphs is not None else None
        output, pixels = replayed if replayed is not None else (self._step(images), None)
        self._counts["frames_processed"] += 1
        # 7. download in the caller's kind (a graph's memory is copied before the next replay)
        return deliver(output, kind, pixels=pixels, staging=self._staging, owned=replayed is None)

    def _pixels_on_device(self, frame, kind: FrameKind) -> torch.Tensor:
        """An 8-bit RGB frame as (b, H, W, 3) uint8 on the engine's device (no conversion)."""
        device = torch.device(self.config.device)
        if kind.library == "numpy" and device.type == "cuda":
            tensor = self._staging.upload(frame, device)
        else:
            tensor = tensor_from_numpy(frame) if kind.library == "numpy" else frame
            tensor = tensor.to(device, non_blocking=True)
        return tensor if kind.batched else tensor.unsqueeze(0)

    def _step(self, images: torch.Tensor) -> torch.Tensor:
        """Encode, denoise, decode, keep finite: (b, 3, H, W) in [-1, 1] in and out (what a step graph holds)."""
        if self.config.overlap_decode or self.config.overlap_encode:
            return self._overlapped_step(images)
        with _stage("encode"):
            latents = self.backend.encode(images)  # (b, 4, h, w)
        return self._finish(self._denoise(latents=latents), fallback=images)

    def _overlapped_step(self, images: torch.Tensor) -> torch.Tensor:
        """`_step` with the VAE beside the UNet instead of before or after it, on a side CUDA
        stream where there is one (forked from the current stream and joined back: in a step
        graph, branches the GPU may run side by side):
        - `overlap_decode`: the previous step's x_0 (`state.undecoded`) is decoded while this
          frame is denoised, and this x_0 kept for the next step. The outputs are the plain
          stream's one call later: frames f0, f1, f2 give out(f0), out(f0), out(f1), ...
        - `overlap_encode`: this frame is encoded for the next step while the UNet denoises the
          previous frame's latents (`state.encoded`). The outputs are the plain stream's for the
          frames f0, f0, f1, f2, ...
        Each adds a frame of latency, kept across seed and step-count changes (what is kept
        does not depend on them). The first step after a start, a reset or a size change has
        nothing kept, and does that work itself, in order."""
        config, state, side = self.config, self.state, self._side_stream
        undecoded = state.undecoded if config.overlap_decode else None
        encoded = state.encoded if config.overlap_encode else None
        decoded = next_latents = None
        if undecoded is not None or encoded is not None:
            with _on_side(side):
                if undecoded is not None:
                    with _stage("decode"):
                        decoded = self.backend.decode(undecoded)  # (b, 3, H, W)
                if encoded is not None:
                    with _stage("encode"):
                        next_latents = self.backend.encode(images)  # (b, 4, h, w)
        made_beside = [tensor for tensor in (decoded, next_latents) if tensor is not None]
        if encoded is None:
            with _stage("encode"):
                encoded = self.backend.encode(images)
            next_latents = encoded
        x0 = self._denoise(latents=encoded)
        if decoded is None:
            with _stage("decode"):
                decoded = self.backend.decode(x0)
        if side is not None and made_beside:
            _join(side, made_beside)
        self.state = replace(self.state, undecoded=x0 if config.overlap_decode else None,
                             encoded=next_latents if config.overlap_encode else None)
        return self._checked(decoded, fallback=images)

    @torch.inference_mode()
    def txt2img(self):
        """One generated frame as uint8 (H, W, 3) numpy RGB; (b, H, W, 3) when frame_buffer_size b > 1."""
        b = self.config.frame_buffer_size
        self._advance_transition()
        self._counts["frames_in"] += 1
        output = self._finish(self._denoise(latents=None), fallback=None)
        self._counts["frames_processed"] += 1
        kind = FrameKind("numpy", "HWC", batched=b > 1, device=torch.device("cpu"), dtype=torch.uint8)
        return from_model_output(output, kind)

    def _denoise(self, *, latents: torch.Tensor | None) -> torch.Tensor:
        """x_0 for the frames leaving the stream: (b, 4, h, w)."""
        b = self.config.frame_buffer_size
        first = self._rows[:b]
        if latents is None:  # txt2img: pure noise at the first step: new each frame, or the seed's (a still
            noise = self._noise[:b]  # picture that moves only when the prompt or the seed, or their blends, do)
            if self.config.txt2img_noise == "seed":
                x_t = noise
            else:
                x_t = torch.randn(noise.shape, generator=self._txt2img_generator, device=noise.device,
                                  dtype=noise.dtype)
            latents = x_t
        else:
            x_t = self._math.add_noise(latents, self._noise[:b], first.alpha_sqrt, first.beta_sqrt)  # (b, 4, h, w)
        if not self.config.use_denoising_batch:
            return self._sequential(x_t)
        if self._needs_priming():
            self.state = self._primed_state(latents)
        return self._stream_batch(x_t)

    def _needs_priming(self) -> bool:
        """Whether the next frame must fill the frames in flight (stream batch, several steps, none in flight)."""
        config = self.config
        return config.use_denoising_batch and config.denoising_steps > 1 and self.state.latent_buffer is None

    def _primed_state(self, latents: torch.Tensor) -> StreamState:
        """Fill the frames in flight with the first frame noised to each later step."""
        n, b = self.config.denoising_steps, self.config.frame_buffer_size
        later = self._rows[b:]
        buffer = self._math.add_noise(latents.repeat(n - 1, 1, 1, 1), self._noise[b:], later.alpha_sqrt, later.beta_sqrt)
        stock = self._noise[b:] if RULES[self.config.cfg_type].uses_stock else None
        return replace(self.state, latent_buffer=buffer, stock_noise=stock)

    def _stream_batch(self, x_t: torch.Tensor) -> torch.Tensor:
        """Stream batch: all n steps of n frames in one UNet call."""
        b, rule = self.config.frame_buffer_size, RULES[self.config.cfg_type]
        state = self.state
        if state.latent_buffer is not None:
            x_t = torch.cat([x_t, state.latent_buffer], dim=0)  # (n*b, 4, h, w)
        stock = None
        if rule.uses_stock:  # the new frames start with the noise they were noised with
            stock = self._noise[:b] if state.stock_noise is None else torch.cat([self._noise[:b], state.stock_noise])
        x0, eps, stock = self._guided_step(x_t, self._rows, stock, first_step_rows=b)
        if self.config.denoising_steps == 1:
            return x0
        later = self._rows[b:]
        buffer = self._math.add_noise(x0[:-b], self._noise[b:], later.alpha_sqrt, later.beta_sqrt)  # ((n-1)*b, 4, h, w)
        next_stock = None
        if rule.uses_stock:
            now = self._rows[:-b]
            next_stock = self._math.next_stock_noise(
                eps[:-b], stock[:-b], self._noise[b:], now.alpha_sqrt, now.beta_sqrt, now.c_skip, now.c_out,
                later.alpha_sqrt, later.beta_sqrt,
            )
        self.state = replace(state, latent_buffer=buffer, stock_noise=next_stock)
        return x0[-b:]

    def _sequential(self, x_t: torch.Tensor) -> torch.Tensor:
        """The reference: the same denoising, one UNet call per step, with the same per-step noise."""
        b, n, rule = self.config.frame_buffer_size, self.config.denoising_steps, RULES[self.config.cfg_type]
        stock = self._noise[:b] if rule.uses_stock else None
        for i in range(n):
            rows = self._rows[i * b:(i + 1) * b]
            x0, eps, stock = self._guided_step(x_t, rows, stock, first_step_rows=b if i == 0 else 0)
            if i == n - 1:
                break
            following = self._rows[(i + 1) * b:(i + 2) * b]
            noise = self._noise[(i + 1) * b:(i + 2) * b]
            if rule.uses_stock:
                stock = self._math.next_stock_noise(
                    eps, stock, noise, rows.alpha_sqrt, rows.beta_sqrt, rows.c_skip, rows.c_out,
                    following.alpha_sqrt, following.beta_sqrt,
                )
            x_t = self._math.add_noise(x0, noise, following.alpha_sqrt, following.beta_sqrt)
        return x0

    def _guided_step(self, x_t: torch.Tensor, rows: StepCoefficients, stock: torch.Tensor | None, *, first_step_rows: int):
        """One UNet call on `x_t` with guidance; returns (x0, guided eps, stock as used)."""
        config, rule = self.config, RULES[self.config.cfg_type]
        count = x_t.shape[0]
        uncond = rule.uncond_rows(count, first_step_rows) if config.guidance_active else 0
        x_in = torch.cat([x_t[:uncond], x_t], dim=0) if uncond else x_t  # (uncond + count, 4, h, w)
        rows_in = StepCoefficients(*(torch.cat([v[:uncond], v]) for v in rows.as_tuple())) if uncond else rows
        with _stage("denoise"):
            raw = self.backend.denoise(x_in, rows_in.timesteps, self._condition(uncond, count))
        return self._math.guided_x0(
            raw, x_in, rows_in.alpha_sqrt, rows_in.beta_sqrt, x_t, rows.alpha_sqrt, rows.beta_sqrt, rows.c_skip,
            rows.c_out, stock, self._delta, self._guidance_scale, uncond=uncond, guided=config.guidance_active,
            cfg_type=config.cfg_type, prediction_type=self.components.schedule.prediction_type,
        )

    def _prepare_conditions(self) -> None:
        """Ready every UNet batch layout of the current settings for the backend (a compiled
        backend copies a new prompt into the static buffers its graphs read): before a replay."""
        config, rule = self.config, RULES[self.config.cfg_type]
        for rows, first_step_rows in unet_calls(config):
            uncond = rule.uncond_rows(rows, first_step_rows) if config.guidance_active else 0
            self.backend.prepare(self._condition(uncond, rows))

    def _condition(self, uncond_rows: int, cond_rows: int):
        """The Conditioning of a batch layout, built once per prompt (read through one snapshot)."""
        prompt_state = self._prompt_state
        key = (uncond_rows, cond_rows)
        if key not in prompt_state.conditions:
            embeds = torch.cat(
                [prompt_state.uncond.expand(uncond_rows, -1, -1), prompt_state.cond.expand(cond_rows, -1, -1)], dim=0
            )  # (uncond_rows + cond_rows, 77, D)
            prompt_state.conditions[key] = self.backend.condition(embeds.contiguous())
        return prompt_state.conditions[key]

    def _finish(self, x0: torch.Tensor, *, fallback: torch.Tensor | None) -> torch.Tensor:
        """Decode, then `_checked`."""
        with _stage("decode"):
            output = self.backend.decode(x0)  # (b, 3, H, W)
        return self._checked(output, fallback=fallback)

    def _checked(self, output: torch.Tensor, *, fallback: torch.Tensor | None) -> torch.Tensor:
        """A bad output (see `output_faults`) replaced by the last good one, or by the input
        before there is one; kept as the last output."""
        previous = self.state.last_output
        if previous is None:
            previous = fallback if fallback is not None else torch.zeros_like(output)
        if output.device.type == "cpu" and not self._math.fused:  # nothing runs asynchronously: branch,
            faults = output_faults(output, fallback)  # and copy nothing when good
            if faults.any():
                output = previous
        else:  # select on the device: no host synchronisation
            output, faults = self._math.keep_good(output, previous, fallback)  # faults: (2,) non-finite, black
        self._caught.add_(faults)
        self.state = replace(self.state, last_output=output)
        return output


def _check_live_loras(components: Components, backend) -> None:
    """BackendUnavailable where live LoRAs cannot change what `backend` runs: its weights are
    fixed in engines (tensorrt) or copied into fp8 ones."""
    if components.live_loras is None:
        return
    from .errors import BackendUnavailable

    if backend.name == "tensorrt":
        raise BackendUnavailable("live LoRAs: the tensorrt backend's engines hold fixed weights; fuse the LoRAs "
                                 "with --lora (and build the engines with them) or run --backend compiled")
    if getattr(backend, "fp8_layers", 0):
        raise BackendUnavailable("live LoRAs: fp8 runs on a quantized copy of the weights that a strength change "
                                 "cannot reach; run without --fp8 or fuse the LoRAs with --lora")


def _both_sides(config: StreamConfig) -> list[StreamConfig]:
    """`config`, and with guidance flipped on or off (what a later guidance change may need),
    unless cfg_type is none (guidance never applies)."""
    if config.cfg_type == "none":
        return [config]
    flipped = 1.0 if config.guidance_active else max(1.2, config.guidance_scale)
    return [config, config.replace(guidance_scale=flipped)]


class _ConditioningAsGiven:
    """A backend whose UNet calls take the conditioning they are given (`_unet_with`), not the
    static buffers the frames' graphs read: what a step beside running frames calls."""

    def __init__(self, backend) -> None:
        self._backend = backend

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        return self._backend._unet_with(x_t, t, cond)

    def __getattr__(self, name: str):
        return getattr(self._backend, name)


def _in_place(old, new):
    """`new`'s values in `old`'s tensors when the shapes match (a step graph keeps reading
    them), else `new`. Works on a tensor or on StepCoefficients."""
    if old is None:
        return new
    pairs = list(zip(old.as_tuple(), new.as_tuple())) if isinstance(old, StepCoefficients) else [(old, new)]
    if any(a.shape != b.shape or a.dtype != b.dtype for a, b in pairs):
        return new
    for a, b in pairs:
        a.copy_(b)
    return old


def side_stream(config: StreamConfig, backend) -> "torch.cuda.Stream | None":
    """The CUDA stream `overlap_decode` and `overlap_encode` run the VAE on beside the UNet: with
    either on a CUDA device, unless the backend runs cudagraph trees (`cuda_graphs="modules"`,
    one stream each); None otherwise (the work then runs in order on the current stream). It has
    the default priority, the lowest: a step graph captures the step itself, the UNet's kernels,
    at a higher one (StepGraphs._capture_stream), so the VAE's kernels fill what the UNet leaves."""
    overlapped = config.overlap_decode or config.overlap_encode
    if not overlapped or config.device.type != "cuda" or getattr(backend, "cuda_graphs", None) == "modules":
        return None
    return torch.cuda.Stream(config.device)


@contextlib.contextmanager
def _on_side(side):
    """Within: work goes to `side` (None: the current stream), after what is queued so far."""
    if side is None:
        yield
        return
    side.wait_stream(torch.cuda.current_stream(side.device))
    with torch.cuda.stream(side):
        yield


def _join(side, made_there: list[torch.Tensor]) -> None:
    """The current stream waits for `side`'s work; the tensors `made_there`, allocated on `side`
    and used from now on on the current stream, are kept until that use is done (outside a graph's
    capture, where the graph's own memory pool keeps them)."""
    current = torch.cuda.current_stream(side.device)
    current.wait_stream(side)
    if not torch.cuda.is_current_stream_capturing():
        for tensor in made_there:
            tensor.record_stream(current)
