"""StreamConfig: every setting of one stream, validated in one place."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from .noise import MAX_SEEDS
from .prompts import MAX_TRANSITION_SECONDS

MODES = ("img2img", "txt2img")
TXT2IMG_NOISES = ("new", "seed")
MAX_INPUT_ZOOM = 8.0  # input_zoom: at most an eighth of the fitted part's width and height
INPUT_FITS = ("crop", "letterbox", "stretch")  # how a frame of another aspect ratio meets the size (pipeline.frames)
CFG_TYPES = ("none", "full", "self", "initialize")
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """'auto' (or None) means CUDA when available, else CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device: {device!r} is not a torch device ({exc})") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r}: this torch sees no CUDA GPU (torch {torch.__version__})")
    return resolved


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """'auto' (or None) means float16 on CUDA, float32 elsewhere."""
    if dtype is None or dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in set(_DTYPES.values()):
            raise ValueError(f"dtype: {dtype} is not supported (float32, float16 or bfloat16)")
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise ValueError(f"dtype: {dtype!r} is not supported (float32, float16 or bfloat16)")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class StreamConfig:
    """The settings of one stream. Construct it (or `dataclasses.replace` it) to validate."""

    width: int = 512  # output and processing width in pixels, a multiple of 8
    height: int = 512  # output and processing height in pixels, a multiple of 8
    mode: str = "img2img"  # "img2img" (frames in) or "txt2img" (no input)
    txt2img_noise: str = "new"  # txt2img: "new" noise each frame (StreamDiffusion's), or the "seed"'s (a still picture)
    input_fit: str = "crop"  # a frame of another aspect ratio: its middle "crop"ped, "letterbox"ed, or "stretch"ed
    input_zoom: float = 1.0  # 1..MAX_INPUT_ZOOM: take 1/zoom of the fitted part's width and height (a digital zoom)
    input_pan_x: float = 0.0  # -1..1: where the part taken sits across the frame (0: the middle; -1 left, 1 right)
    input_pan_y: float = 0.0  # -1..1: likewise down it (-1 top, 1 bottom)
    t_index_list: tuple[int, ...] = (32, 45)  # indices into the scheduler's timesteps, one per denoising step
    num_inference_steps: int = 50  # length of the LCM timestep schedule the indices point into
    frame_buffer_size: int = 1  # frames taken and returned per call (a leading batch dimension when > 1)
    use_denoising_batch: bool = True  # Stream Batch: all steps in one UNet call; False runs them one by one
    cfg_type: str = "self"  # "none", "full" (CFG), "self" (RCFG self-negative), "initialize" (RCFG onetime-negative)
    guidance_scale: float = 1.2  # CFG scale; guidance is off at 1.0 or below
    delta: float = 1.0  # RCFG: scale of the virtual residual noise used as the negative prediction
    seed: int = 2  # seeds the stream's noise (unless seed_blend is given) and the similarity filter's draws
    seed_blend: tuple[tuple[int, float], ...] = ()  # (seed, weight) pairs: their noise blended (pipeline/noise.py)
    prompt_transition: float = 0.0  # seconds a new prompt (or blend) takes to fade in from the one shown; 0: at once
    similarity_filter: bool = False  # skip frames that are nearly the same as the last processed one
    similarity_threshold: float = 0.98  # cosine similarity above which skipping becomes possible, in [0, 1)
    similarity_max_skip: int = 10  # at most this many consecutive frames skipped
    dtype: torch.dtype | str = "auto"  # "auto": float16 on CUDA, float32 on CPU
    device: torch.device | str = "auto"  # "auto": CUDA when available, else CPU
    kv_cache: bool = True  # precompute the prompt's cross-attention keys and values once per prompt
    text_encoder_graph: bool = True  # with a CUDA step graph: the text encoder as a CUDA graph too
    prompt_cache_size: int = 16  # recent prompt embeddings kept on the device (a blend of 8 and its negative fit)
    lcm_original_steps: int = 50  # LCM's original_inference_steps (the distillation schedule length)
    overlap_decode: bool = False  # img2img: decode each x_0 during the next frame's step (one frame later)
    overlap_encode: bool = False  # img2img: encode each frame during the previous frame's UNet (one frame later)

    def __post_init__(self) -> None:
        device = resolve_device(self.device)
        object.__setattr__(self, "device", device)
        object.__setattr__(self, "dtype", resolve_dtype(self.dtype, device))
        if isinstance(self.t_index_list, (list, tuple)):
            object.__setattr__(self, "t_index_list", tuple(self.t_index_list))
        if isinstance(self.seed_blend, (list, tuple)) and all(isinstance(p, (list, tuple)) for p in self.seed_blend):
            object.__setattr__(self, "seed_blend", tuple(tuple(pair) for pair in self.seed_blend))
        self._validate()

    def _validate(self) -> None:
        for name in ("width", "height"):
            value = getattr(self, name)
            if not _is_int(value) or value < 8 or value % 8:
                raise ValueError(f"{name}: {value!r} must be a positive multiple of 8")
        if self.mode not in MODES:
            raise ValueError(f"mode: {self.mode!r} must be one of {', '.join(MODES)}")
        if self.txt2img_noise not in TXT2IMG_NOISES:
            raise ValueError(f"txt2img_noise: {self.txt2img_noise!r} must be one of {', '.join(TXT2IMG_NOISES)}")
        if self.input_fit not in INPUT_FITS:
            raise ValueError(f"input_fit: {self.input_fit!r} must be one of {', '.join(INPUT_FITS)}")
        if not _is_number(self.input_zoom) or not 1.0 <= self.input_zoom <= MAX_INPUT_ZOOM:
            raise ValueError(f"input_zoom: {self.input_zoom!r} must be a number in 1..{MAX_INPUT_ZOOM:g}")
        for name in ("input_pan_x", "input_pan_y"):
            if not _is_number(getattr(self, name)) or not -1.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}: {getattr(self, name)!r} must be a number in -1..1")
        if self.cfg_type not in CFG_TYPES:
            raise ValueError(f"cfg_type: {self.cfg_type!r} must be one of {', '.join(CFG_TYPES)}")
        if not _is_int(self.num_inference_steps) or not 1 <= self.num_inference_steps <= 1000:
            raise ValueError(f"num_inference_steps: {self.num_inference_steps!r} must be an integer in 1..1000")
        if not _is_int(self.lcm_original_steps) or not 1 <= self.lcm_original_steps <= 1000:
            raise ValueError(f"lcm_original_steps: {self.lcm_original_steps!r} must be an integer in 1..1000")
        if self.num_inference_steps > self.lcm_original_steps:
            raise ValueError(
                f"num_inference_steps: {self.num_inference_steps} must not exceed "
                f"lcm_original_steps ({self.lcm_original_steps})"
            )
        self._validate_t_index_list()
        if not _is_int(self.frame_buffer_size) or not 1 <= self.frame_buffer_size <= 16:
            raise ValueError(f"frame_buffer_size: {self.frame_buffer_size!r} must be an integer in 1..16")
        for name in ("use_denoising_batch", "similarity_filter", "kv_cache", "overlap_decode", "overlap_encode"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: {getattr(self, name)!r} must be True or False")
        for name in ("overlap_decode", "overlap_encode"):
            if getattr(self, name) and self.mode != "img2img":
                raise ValueError(f"{name}: for img2img only (it runs the VAE beside another frame's UNet)")
        if not _is_number(self.guidance_scale) or not 0.0 <= self.guidance_scale <= 30.0:
            raise ValueError(f"guidance_scale: {self.guidance_scale!r} must be a number in 0..30")
        if not _is_number(self.delta) or not 0.0 <= self.delta <= 5.0:
            raise ValueError(f"delta: {self.delta!r} must be a number in 0..5")
        if not _is_int(self.seed) or not 0 <= self.seed < 2**63:
            raise ValueError(f"seed: {self.seed!r} must be a non-negative integer")
        self._validate_seed_blend()
        if not _is_number(self.prompt_transition) or not 0.0 <= self.prompt_transition <= MAX_TRANSITION_SECONDS:
            raise ValueError(f"prompt_transition: {self.prompt_transition!r} must be a number of seconds in "
                             f"0..{MAX_TRANSITION_SECONDS:g}")
        if not _is_number(self.similarity_threshold) or not 0.0 <= self.similarity_threshold < 1.0:
            raise ValueError(f"similarity_threshold: {self.similarity_threshold!r} must be in [0, 1)")
        if not _is_int(self.similarity_max_skip) or not 0 <= self.similarity_max_skip <= 10_000:
            raise ValueError(f"similarity_max_skip: {self.similarity_max_skip!r} must be an integer in 0..10000")
        if not _is_int(self.prompt_cache_size) or not 1 <= self.prompt_cache_size <= 256:
            raise ValueError(f"prompt_cache_size: {self.prompt_cache_size!r} must be an integer in 1..256")
        if self.dtype == torch.float16 and self.device.type == "cpu":
            raise ValueError("dtype: float16 is not supported on the CPU; use float32 or bfloat16")

    def _validate_seed_blend(self) -> None:
        blend = self.seed_blend
        shape_ok = isinstance(blend, tuple) and all(isinstance(pair, tuple) and len(pair) == 2 for pair in blend)
        if not shape_ok or len(blend) > MAX_SEEDS:
            raise ValueError(f"seed_blend: {blend!r} must be a list of up to {MAX_SEEDS} (seed, weight) pairs")
        for seed, weight in blend:
            if not _is_int(seed) or not 0 <= seed < 2**63:
                raise ValueError(f"seed_blend: seed {seed!r} must be a non-negative integer")
            if not _is_number(weight) or weight < 0.0:
                raise ValueError(f"seed_blend: weight {weight!r} (seed {seed}) must be a finite number >= 0")
        if blend and not any(weight > 0.0 for _, weight in blend):
            raise ValueError(f"seed_blend: {[list(pair) for pair in blend]}: at least one weight must be above 0")

    def _validate_t_index_list(self) -> None:
        steps = self.t_index_list
        if not isinstance(steps, tuple) or not steps or not all(_is_int(i) for i in steps):
            raise ValueError(f"t_index_list: {self.t_index_list!r} must be a non-empty list of integers")
        if len(steps) > 16:
            raise ValueError(f"t_index_list: {list(steps)} has more than 16 steps")
        if any(not 0 <= i < self.num_inference_steps for i in steps):
            raise ValueError(
                f"t_index_list: {list(steps)} has an index outside 0..{self.num_inference_steps - 1} "
                f"(num_inference_steps={self.num_inference_steps})"
            )
        if any(b <= a for a, b in zip(steps, steps[1:])):
            raise ValueError(f"t_index_list: {list(steps)} must be strictly increasing (noisiest step first)")

    @property
    def denoising_steps(self) -> int:
        """n: the number of denoising steps per frame."""
        return len(self.t_index_list)

    @property
    def guidance_active(self) -> bool:
        """True when the cfg type combines a negative prediction (guidance_scale > 1)."""
        return self.cfg_type != "none" and self.guidance_scale > 1.0

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) in pixels."""
        return self.width, self.height

    def replace(self, **changes) -> "StreamConfig":
        """A validated copy with `changes` applied; unknown names raise ValueError."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"unknown setting(s): {', '.join(unknown)}")
        return dataclasses.replace(self, **changes)


def t_index_list_from_strength(strength: float, steps: int, num_inference_steps: int) -> tuple[int, ...]:
    """Map img2img strength in (0, 1] to `steps` evenly spaced indices, the first at (1 - strength).

    strength 1.0 starts at the noisiest timestep (index 0); small strengths start near the
    end of the schedule and change the input little.
    """
    if not _is_number(strength) or not 0.0 < strength <= 1.0:
        raise ValueError(f"strength: {strength!r} must be a number in (0, 1]")
    if not _is_int(num_inference_steps) or not 1 <= num_inference_steps <= 1000:
        raise ValueError(f"num_inference_steps: {num_inference_steps!r} must be an integer in 1..1000")
    if not _is_int(steps) or not 1 <= steps <= num_inference_steps:
        raise ValueError(f"steps: {steps!r} must be an integer in 1..{num_inference_steps}")
    start = round((1.0 - strength) * (num_inference_steps - 1))
    start = min(start, num_inference_steps - steps)
    span = num_inference_steps - start
    return tuple(start + (k * span) // steps for k in range(steps))


def aspect_size(source_width: int, source_height: int, area: int, *, multiple: int = 64,
                limit: int = 2048) -> tuple[int, int]:
    """A processing size of the source's aspect ratio and about `area` pixels: width and height
    multiples of `multiple` (64: what the SD models' VAE and UNet halve a size by) from `multiple`
    to `limit`. Of all such sizes, the one that strays least from the aspect ratio and the area,
    both measured as log ratios, the aspect counted double (a shape that looks wrong is worse
    than a few percent of cost either way); a tie goes to the smaller size.
    1280x720 at 512x512's area: 704x384; 640x480: 576x448; 1080x1920: 384x704."""
    if min(source_width, source_height, area, multiple) <= 0 or limit < multiple:
        raise ValueError(f"aspect_size: {source_width}x{source_height}, area {area}, multiple {multiple}, "
                         f"limit {limit}: all must be positive, the limit at least the multiple")
    aspect, sides = source_width / source_height, range(multiple, limit + 1, multiple)

    def cost(size: tuple[int, int]) -> tuple[float, int]:
        width, height = size
        return 2 * abs(math.log(width / height / aspect)) + abs(math.log(width * height / area)), width * height

    return min(((width, height) for width in sides for height in sides), key=cost)


def parse_resolution(value, *, name: str = "resolution") -> tuple[int, int]:
    """(width, height) from a pair of whole numbers or text such as "768x432"; ValueError naming
    `name` otherwise (the sizes themselves are checked by StreamConfig and the model)."""
    if isinstance(value, str):
        parts = value.lower().replace("x", " ").replace(",", " ").split()
    elif isinstance(value, (list, tuple)):
        parts = list(value)
    else:
        parts = []
    try:
        width, height = (int(part) if isinstance(part, str) else part for part in parts)
    except ValueError:
        width = height = None
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (width, height)):
        raise ValueError(f"{name}: {value!r} must be a width and a height in pixels, e.g. (768, 432) or '768x432'")
    return width, height
