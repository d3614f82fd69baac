"""The settings of `sdbridge run`: a TOML file and/or flags (flags win), validated in one place.

The TOML file is flat and uses the flags' names (dashes or underscores):

    source = "ndi:TD Out"
    sink = ["virtualcam", "spout:sdbridge"]
    model = "stabilityai/sd-turbo"
    prompt = "a watercolor city at night"
    width = 512
    height = 512
    t_index_list = [32, 45]
    osc_port = 7450
    status_target = "127.0.0.1:9001"

    [presets.1]            # /sd/preset 1
    prompt = "a foggy harbour"
    guidance_scale = 1.4
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from .control import DEFAULT_BIND, DEFAULT_OSC_PORT, ControlSettings
from .control.table import INPUT_FITS, LIVE_LORA_SLOTS, check_presets
from .params import PROMPT_NAMES
from .runtime import FALLBACKS
from .transports import parse_spec

# as pipeline's (StreamConfig's modes, pipeline.loading's LoRA scale limit): not imported, which would load torch
MODES = ("img2img", "txt2img")
ASPECTS = ("fixed", "source")  # RunSettings.aspect
MAX_LORA_SCALE = 10.0


RANDOM_PREFIX = "random:"
RANDOM_ARCHS = ("tiny", "sd15", "sd-turbo")  # pipeline.ARCHS (kept here: reading settings must not import torch)
ENGINE_BACKENDS = ("compiled", "eager", "tensorrt")  # pipeline.backends.BACKENDS, likewise
CUDA_GRAPH_MODES = ("step", "modules", "off")  # pipeline.backends.compiled.CUDA_GRAPH_MODES, likewise
PLANNED_BACKENDS: tuple[str, ...] = ()  # pipeline.backends.PLANNED: designed, refused with the engine's reason
MAX_SIZE = 4096  # width and height: far above what runs live; a typo's 1048576 is refused, not allocated
MAX_FPS = 1000.0  # the runtime's limit


@dataclass(frozen=True)
class RunSettings:
    """Everything one run needs. None for an engine setting means the engine's default."""

    source: str = "testpattern"  # where frames come from (see bridge.transports); txt2img reads none
    mode: str = "img2img"  # img2img (the source's frames turned by the prompt) or txt2img (the prompt alone)
    txt2img_noise: str | None = None  # txt2img: "new" noise each frame (the default) or the "seed"'s: a still picture
    input_fit: str | None = None  # a source of another aspect ratio: crop (the engine's default), letterbox, stretch
    sink: tuple[str, ...] = ()  # where frames go; several allowed
    model: str = "stabilityai/sd-turbo"  # hub id, folder, single file, or random:tiny|sd15|sd-turbo
    vae: str | None = None  # the loader's VAE choice (None: its default, TAESD)
    lcm_lora: str | None = None  # LCM-LoRA weights fused into the UNet
    lora: tuple[str, ...] = ()  # style LoRAs "FILE[:SCALE]" fused after it (StreamDiffusion's lora_dict)
    live_lora: tuple[str, ...] = ()  # style LoRAs "FILE[:SCALE]" whose strength /sd/lora/N changes (up to 4)
    single_file_config: str | None = None  # a single-file checkpoint's configs: a diffusers folder or hub id
    allow_pickle: bool = False  # allow .ckpt/.bin/.pt weights (they can run code)
    width: int = 512  # processing and output size
    height: int = 512
    aspect: str = "fixed"  # "source": width x height becomes a size of the source's shape, as many pixels
    t_index_list: tuple[int, ...] | None = None  # denoising timestep indices (overrides steps/strength)
    steps: int | None = None  # number of denoising steps (with strength: evenly spread indices)
    strength: float | None = None  # img2img strength in (0, 1] (with steps)
    cfg: str | None = None  # cfg_type: none, full, self, initialize
    guidance: float | None = None  # guidance_scale
    delta: float | None = None  # RCFG residual-noise scale
    seed: int | None = None
    prompt: str = ""
    negative_prompt: str | None = None
    prompt_transition: float | None = None  # seconds a prompt change fades in (None: the engine's, 0)
    similarity_filter: bool | None = None
    similarity_threshold: float | None = None
    backend: str = "eager"
    compile_steps: tuple[int, ...] = ()  # also ready these step counts at start (compiled: compile; step graphs: capture)
    sizes: tuple[str, ...] = ()  # other sizes ("768x448") /sd/resolution may switch to: readied at start
    cuda_graphs: str | None = None  # CUDA graphs: step, modules (compiled only), off; None: the backend's default
    fp8: bool = False  # eager/compiled on an Ada/Hopper GPU: the UNet's transformer layers multiply in fp8
    fuse_qkv: bool | None = None  # eager/compiled: each self-attention layer's q, k, v from one projection
    fuse_math: bool | None = None  # compiled: the step's arithmetic between the modules compiled too
    # (None for either: the backend's default, on for compiled on CUDA, fuse_qkv unless fp8; off elsewhere)
    overlap_decode: bool = False  # decode each frame's result during the next frame's step (one frame later)
    overlap_encode: bool = False  # encode each frame during the previous frame's UNet (one frame later)
    engines: str = "engines"  # tensorrt backend: the engine cache folder `sdbridge build-engines` wrote
    backend_fallback: str | None = None  # run on this backend when the chosen one cannot start (said loudly)
    device: str = "auto"
    dtype: str = "auto"
    fps: float = 30.0  # output rate
    fallback: str = "last"  # last, black, raw
    duration: float | None = None  # stop after this many seconds
    frames: int | None = None  # stop after this many processed frames
    status: bool = True  # the terminal status line
    osc: bool = True  # OSC control (False: no port is opened)
    osc_port: int = DEFAULT_OSC_PORT  # UDP and TCP port for OSC in
    osc_bind: str = DEFAULT_BIND  # interface OSC and OSCQuery listen on
    osc_allow: tuple[str, ...] | None = None  # only these sender addresses/networks (None: any that reach us)
    osc_prefix: str = "/sd"  # address prefix of every parameter
    osc_aliases: bool = True  # also accept StreamDiffusionTD's addresses
    status_target: str | None = None  # host:port for OSC status out (None: off)
    oscquery: bool = True  # serve OSCQuery over HTTP
    oscquery_port: int | None = None  # None: OSC port + 1
    zeroconf: bool = False  # advertise OSCQuery and the OSC ports over mDNS
    presets: dict | None = None  # {cue: {parameter: value}} recalled by /sd/preset i

    def __post_init__(self) -> None:
        if isinstance(self.osc_allow, str):
            object.__setattr__(self, "osc_allow", tuple(self.osc_allow.split(",")))
        if self.presets is not None:
            if not isinstance(self.presets, dict):
                raise ValueError(f"presets: {self.presets!r} must be a table of numbered presets ([presets.1] ...)")
            object.__setattr__(self, "presets", check_presets(self.presets))
        if isinstance(self.sink, str):
            object.__setattr__(self, "sink", (self.sink,))
        for name in ("t_index_list", "compile_steps"):
            if isinstance(getattr(self, name), (list, str)):
                object.__setattr__(self, name, _int_list(getattr(self, name), name))
        if isinstance(self.sizes, str):
            object.__setattr__(self, "sizes", tuple(item for item in self.sizes.replace(",", " ").split()))
        self._validate()

    def _validate(self) -> None:
        types = {f.name: f.type for f in dataclasses.fields(self)}
        for name, value in dataclasses.asdict(self).items():
            _check_type(name, value, types[name])
        parse_spec(self.source, role="source")
        if not self.sink:
            raise ValueError("sink: none given; add --sink (virtualcam, spout:NAME, ndi:NAME, file:out.mp4, window or null)")
        for sink in self.sink:
            parse_spec(sink, role="sink")
        if not self.model.strip():
            raise ValueError(f"model: {self.model!r} is empty; give a hub id, a folder, a file or random:tiny")
        if self.model.startswith(RANDOM_PREFIX) and self.model[len(RANDOM_PREFIX):] not in RANDOM_ARCHS:
            raise ValueError(f"model: {self.model!r} is not a random-weight architecture; one of "
                             f"{', '.join(RANDOM_PREFIX + arch for arch in RANDOM_ARCHS)}")
        for text in self.lora:
            parse_lora(text)
        for text in self.live_lora:
            parse_lora(text, name="live_lora")
        if len(self.live_lora) > LIVE_LORA_SLOTS:
            raise ValueError(f"live_lora: {len(self.live_lora)} given; at most {LIVE_LORA_SLOTS} can be live "
                             f"(/sd/lora/1 .. /sd/lora/{LIVE_LORA_SLOTS}); fuse the others with --lora")
        if self.live_lora and "tensorrt" in (self.backend, self.backend_fallback):
            raise ValueError("live_lora: TensorRT engines hold fixed weights, so their strengths cannot change; "
                             "fuse the LoRAs with --lora (and build the engines with them) or run --backend compiled")
        if self.live_lora and self.fp8:
            raise ValueError("live_lora: fp8 runs on a quantized copy of the weights that a strength change cannot "
                             "reach; run without --fp8 or fuse the LoRAs with --lora")
        refused = random_model_refuses(self.model, vae=self.vae, lcm_lora=self.lcm_lora, lora=self.lora,
                                       live_lora=self.live_lora,
                                       single_file_config=self.single_file_config)
        if refused:
            raise ValueError(refused)
        if self.backend not in ENGINE_BACKENDS + PLANNED_BACKENDS:  # refused before minutes of model loading
            raise ValueError(f"backend: {self.backend!r} is not available; choose one of {', '.join(ENGINE_BACKENDS)}")
        for name in ("width", "height"):
            value = getattr(self, name)
            if not 0 < value <= MAX_SIZE:
                raise ValueError(f"{name}: {value!r} must be a positive multiple of 8 up to {MAX_SIZE}")
        if self.mode not in MODES:
            raise ValueError(f"mode: {self.mode!r} must be one of {', '.join(MODES)}")
        if self.aspect not in ASPECTS:
            raise ValueError(f"aspect: {self.aspect!r} must be one of {', '.join(ASPECTS)}")
        if self.input_fit is not None and self.input_fit not in INPUT_FITS:
            raise ValueError(f"input_fit: {self.input_fit!r} must be one of {', '.join(INPUT_FITS)}")
        if self.fallback not in FALLBACKS:
            raise ValueError(f"fallback: {self.fallback!r} must be one of {', '.join(FALLBACKS)}")
        for name in ("fps", "duration"):
            value = getattr(self, name)
            if value is not None and (not math.isfinite(value) or value <= 0):
                raise ValueError(f"{name}: {value!r} must be a positive number")
        if self.fps > MAX_FPS:
            raise ValueError(f"fps: {self.fps!r} must be at most {MAX_FPS:g}")
        for name in ("frames", "steps"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name}: {value!r} must be a positive integer")
        if self.backend_fallback is not None and (self.backend_fallback not in ENGINE_BACKENDS
                                                  or self.backend_fallback == self.backend):
            raise ValueError(f"backend_fallback: {self.backend_fallback!r} must be another of "
                             f"{', '.join(ENGINE_BACKENDS)} than backend {self.backend!r}")
        if self.cuda_graphs is not None and self.cuda_graphs not in CUDA_GRAPH_MODES:
            raise ValueError(f"cuda_graphs: {self.cuda_graphs!r} must be one of {', '.join(CUDA_GRAPH_MODES)}")
        if self.fp8 and self.backend == "tensorrt":
            raise ValueError("fp8: the tensorrt backend runs its engines' own precision; fp8 is for eager and compiled")
        if self.fuse_qkv and self.backend == "tensorrt":
            raise ValueError("fuse_qkv: the tensorrt backend runs its built engines; fuse_qkv is for eager and compiled")
        if self.fuse_math and self.backend != "compiled":
            raise ValueError(f"fuse_math: needs backend 'compiled' (it compiles the step's arithmetic), "
                             f"not {self.backend!r}")
        if self.fuse_qkv and self.fp8:
            raise ValueError("fuse_qkv and fp8 cannot be combined (fp8 scales each projection on its own); choose one")
        if self.cuda_graphs == "modules" and self.backend != "compiled":
            raise ValueError(f"cuda_graphs: 'modules' needs backend 'compiled' (backend is {self.backend!r}); "
                             "'step' captures any backend's whole step")
        for size in self.sizes:
            parse_size(size)
        for count in self.compile_steps:
            if not 1 <= count <= 16:
                raise ValueError(f"compile_steps: {count!r} must be a number of steps from 1 to 16")
        if self.t_index_list is not None and (self.steps is not None or self.strength is not None):
            raise ValueError("t_index_list: give either t_index_list or steps/strength, not both")
        if not self.osc and self.status_target is not None:  # it would be silently off
            raise ValueError(f"status_target: {self.status_target!r} is sent by the OSC control, which osc = false "
                             "(--no-osc) turns off; drop one of them")
        if not self.osc and self.zeroconf:
            raise ValueError("zeroconf: advertises the OSC control, which osc = false (--no-osc) turns off; "
                             "drop one of them")
        self.control_settings()  # validates the OSC settings (ValueError naming the field)

    def control_settings(self) -> ControlSettings:
        return ControlSettings(
            osc_port=self.osc_port, osc_bind=self.osc_bind, osc_allow=self.osc_allow, osc_prefix=self.osc_prefix,
            osc_aliases=self.osc_aliases, status_target=self.status_target, oscquery=self.oscquery,
            oscquery_port=self.oscquery_port, zeroconf=self.zeroconf,
        )


def random_model_refuses(model: str, **options: str | None) -> str | None:
    """Why `options` (the loader's vae, lcm_lora, single_file_config, named as the caller's user
    names them) cannot go with `model`, or None: a random-weight model is built, not loaded, so a
    VAE, LCM-LoRA or checkpoint config given for it would be silently ignored."""
    given = [name for name, value in options.items() if value not in (None, ())]
    if not model.startswith(RANDOM_PREFIX) or not given:
        return None
    return (f"{', '.join(given)}: {model!r} is a random-weight model, built rather than loaded, so "
            f"{'this does' if len(given) == 1 else 'these do'} not apply; drop {'it' if len(given) == 1 else 'them'} "
            f"or name a real model")


def parse_lora(text: str, *, name: str = "lora") -> tuple[str, float]:
    """'style.safetensors:0.8' -> ('style.safetensors', 0.8); without a scale, 1.0. A colon not
    followed by a number belongs to the path (C:\\loras\\style.safetensors)."""
    path, separator, scale = str(text).rpartition(":")
    try:
        value = float(scale) if separator and path else None
    except ValueError:
        value = None
    if value is None:
        path, value = str(text), 1.0
    if not path.strip():
        raise ValueError(f"{name}: {text!r} names no file; give FILE[:SCALE]")
    if not math.isfinite(value) or abs(value) > MAX_LORA_SCALE:
        raise ValueError(f"{name}: {text!r}: the scale must be a number in -{MAX_LORA_SCALE:g}..{MAX_LORA_SCALE:g}")
    return path, value


def parse_size(text: str, name: str = "sizes") -> tuple[int, int]:
    """'768x448' -> (768, 448), each a multiple of 8 up to MAX_SIZE; ValueError naming `name`."""
    width, separator, height = str(text).lower().partition("x")
    if not separator or not width.strip().isdigit() or not height.strip().isdigit():
        raise ValueError(f"{name}: {text!r} must be WIDTHxHEIGHT in pixels, as in 768x448")
    size = int(width), int(height)
    if not all(0 < side <= MAX_SIZE and side % 8 == 0 for side in size):
        raise ValueError(f"{name}: {text!r}: width and height must be positive multiples of 8 up to {MAX_SIZE}")
    return size


def _int_list(value, name: str) -> tuple[int, ...]:
    items = value.replace(",", " ").split() if isinstance(value, str) else value
    try:
        return tuple(int(item) for item in items)
    except (TypeError, ValueError):
        example = "32,45" if name == "t_index_list" else "1,2,4"
        raise ValueError(f"{name}: {value!r} must be a list of integers, as in {example}") from None


def _check_type(name: str, value, annotation: str) -> None:
    """Check `value` against the field's annotation text (bool, int, float, str, tuple)."""
    if value is None:
        if "None" not in annotation:
            raise ValueError(f"{name}: a value is required")
        return
    if annotation.startswith("bool"):
        ok = isinstance(value, bool)
    elif annotation.startswith("int"):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif annotation.startswith("float"):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif annotation.startswith("dict"):
        ok = isinstance(value, dict)
    elif annotation.startswith("tuple[int"):
        ok = isinstance(value, tuple) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    elif annotation.startswith("tuple"):
        ok = isinstance(value, tuple) and all(isinstance(v, str) for v in value)
    else:
        ok = isinstance(value, str)
    if not ok:
        expected = annotation.split(" ")[0].split("[")[0]
        if annotation.startswith("tuple"):
            expected = "list of " + ("integers" if annotation.startswith("tuple[int") else "strings")
        shown = list(value) if isinstance(value, tuple) else value  # as written in the file
        raise ValueError(f"{name}: {shown!r} is not a valid {expected}")


def check_presets_fit(presets: dict | None, config) -> None:
    """Each preset's engine values applied to the run's StreamConfig, as the engine will apply
    them between frames: a preset the engine would refuse (a t_index_list outside the schedule)
    is an error at start, naming cue, field and value, not a refusal in the middle of a show."""
    from pipeline import t_index_list_from_strength

    for cue, values in (presets or {}).items():
        changes = {name: value for name, value in values.items() if name not in PROMPT_NAMES}
        if "resolution" in changes:
            changes["width"], changes["height"] = changes.pop("resolution")
        try:
            if "strength" in changes:
                changes["t_index_list"] = t_index_list_from_strength(
                    changes.pop("strength"), config.denoising_steps, config.num_inference_steps)
            config.replace(**changes)
        except ValueError as exc:
            raise ValueError(f"presets.{cue}.{exc}") from None


FIELDS = tuple(f.name for f in dataclasses.fields(RunSettings))


def read_config_file(path: str) -> dict:
    """The settings in a TOML file, keys normalised to field names; unknown keys are errors."""
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise ValueError(f"config: file not found: {path}") from None
    except OSError as exc:  # a folder, no permission
        raise ValueError(f"config: cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"config: {path} is not valid TOML: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"config: {path} is not valid TOML: {exc}") from None
    values = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name == "sinks":
            name = "sink"
        if name not in FIELDS:
            raise ValueError(f"config: {path}: unknown setting {key!r}; known: {', '.join(FIELDS)}")
        values[name] = tuple(value) if isinstance(value, list) and name != "presets" else value
    if values.get("oscquery_port") == "off":  # as the flag takes it
        values["oscquery"], values["oscquery_port"] = False, None
    return values


def merge(file_values: dict, flag_values: dict, **defaults) -> RunSettings:
    """Defaults, then the file, then the flags that were given (not None). A flag also replaces
    the file's other view of its setting: --t-index-list the file's steps and strength, --steps
    or --strength the file's t_index_list."""
    flags = {name: value for name, value in flag_values.items() if value is not None}
    values = dict(defaults)
    values.update(file_values)
    if "t_index_list" in flags:
        values.pop("steps", None)
        values.pop("strength", None)
    if flags.keys() & {"steps", "strength"}:
        values.pop("t_index_list", None)
    values.update(flags)
    return RunSettings(**values)
