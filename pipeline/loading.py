"""Load real models: a diffusers folder, a hub id, or one original-layout `.safetensors` file.

`load_components` first resolves every source (model, VAE, LCM-LoRA: local path or hub snapshot)
and refuses pickle-based weights, so a typo, an unreachable hub or a `.ckpt` is reported before
minutes go into loading a UNet; then it loads each component, logging its time at INFO.
Pickle files (.ckpt, .pt, .pth, .bin, .pkl) are refused unless `allow_pickle=True`, and the
refusal happens before anything is unpickled.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ModelLoadError, UnsafeWeightsError
from .live_lora import MAX_LIVE_LORAS, Factors, LiveLoras, peft_factors
from .models import UNET_CONFIGS, Components
from .schedule import NoiseSchedule

log = logging.getLogger(__name__)

DEFAULT_VAE = "taesd-default"  # TAESD (AutoencoderTiny) from the hub, for SD 1.x/2.x latents
MODEL_VAE = "model"  # the checkpoint's own AutoencoderKL
TAESD_REPO = "madebyollin/taesd"
SAFE_SUFFIX = ".safetensors"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
FILE_SUFFIXES = (SAFE_SUFFIX, *PICKLE_SUFFIXES, ".json", ".yaml", ".yml", ".onnx", ".gguf")
LORA_WEIGHT_NAME = "pytorch_lora_weights"
PICKLE_OPT_IN = "allow_pickle=True (CLI --allow-pickle)"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
# File name stems of each component's weights in a diffusers folder: (safetensors, pickle).
_WEIGHT_STEMS = {
    "unet": ("diffusion_pytorch_model", "diffusion_pytorch_model"),
    "vae": ("diffusion_pytorch_model", "diffusion_pytorch_model"),
    "text_encoder": ("model", "pytorch_model"),
}
_ARCH_CANDIDATES = ("sd15", "sd-turbo")


@dataclass
class _Loaded:
    """The parts as they come off disk, before they become `Components`."""

    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler_config: dict
    vae: torch.nn.Module | None = None


def load_components(
    model_id_or_path: str,
    *,
    vae: str | None = DEFAULT_VAE,
    lcm_lora: str | None = None,
    loras: Sequence[tuple[str, float]] = (),
    live_loras: Sequence[tuple[str, float]] = (),
    allow_pickle: bool = False,
    single_file_config: str | None = None,
    dtype: torch.dtype,
    device: torch.device,
) -> Components:
    """Load UNet, text encoder, tokenizer, schedule and VAE of a Stable Diffusion 1.x/2.x model.

    `model_id_or_path`: a diffusers folder, a hub id, or a single `.safetensors` checkpoint in the
    original (LDM) layout, whose configs come from `single_file_config` (a diffusers folder or hub
    id; default: the hub repository diffusers infers from the checkpoint's keys).
    `vae`: "taesd-default" (TAESD from the hub), "model" or None (the checkpoint's own
    AutoencoderKL), or a folder / hub id of an AutoencoderTiny or AutoencoderKL.
    `lcm_lora`: LoRA weights (folder, file or hub id) fused into the UNet's plain weights.
    `loras`: (weights, scale) pairs: style LoRAs fused after it, each at its scale (StreamDiffusion's
    `lora_dict`), into the UNet and, where they have one, the text encoder's part too.
    `live_loras`: (weights, scale) pairs, up to 4: style LoRAs whose strength can change while
    frames flow (`Components.live_loras`, see pipeline.live_lora), starting at these scales.
    """
    _check_arguments(model_id_or_path, vae=vae, lcm_lora=lcm_lora, single_file_config=single_file_config, dtype=dtype)
    loras = _check_loras(loras)
    live_loras = _check_loras(live_loras, name="live_loras")
    if len(live_loras) > MAX_LIVE_LORAS:
        raise ValueError(f"live_loras: {len(live_loras)} given; at most {MAX_LIVE_LORAS} can be live")
    started = time.perf_counter()
    with_model_vae = vae in (None, MODEL_VAE)
    source = _resolve_model(model_id_or_path, with_vae=with_model_vae, allow_pickle=allow_pickle)
    config_folder = None
    if single_file_config is not None and not source.is_file():
        log.warning("single_file_config %r is ignored: %r is a diffusers folder", single_file_config, model_id_or_path)
    elif single_file_config is not None:
        config_folder = _resolve_config(single_file_config, allow_pickle=allow_pickle)
    vae_folder = None if with_model_vae else _resolve_vae(vae, allow_pickle=allow_pickle)
    lora_file = None if lcm_lora is None else _resolve_lora(lcm_lora, allow_pickle=allow_pickle)
    style_files = [(_resolve_lora(name, allow_pickle=allow_pickle, what="lora"), name, scale)
                   for name, scale in loras]
    live_files = [(_resolve_lora(name, allow_pickle=allow_pickle, what="live_lora"), name, scale)
                  for name, scale in live_loras]

    # fused LoRAs are fused in full precision; live ones keep the loaded weights as their base and
    # compute in fp32 on a change (pipeline.live_lora), so alone they load at the run's dtype
    load_dtype = torch.float32 if lora_file is not None or style_files else dtype
    if source.is_file():
        loaded = _load_single_file(source, config=config_folder, with_vae=with_model_vae, dtype=load_dtype)
    else:
        loaded = _load_folder(source, with_vae=with_model_vae, allow_pickle=allow_pickle, dtype=load_dtype)
    if vae_folder is not None:
        loaded.vae = _load_vae(vae_folder, allow_pickle=allow_pickle, dtype=load_dtype)
    _check_compatible(loaded, model_id_or_path)
    if lora_file is not None:
        _fuse_lora(loaded, lora_file, lora_name=lcm_lora, model_name=model_id_or_path, allow_pickle=allow_pickle)
    for index, (style_file, name, scale) in enumerate(style_files):
        _fuse_lora(loaded, style_file, lora_name=name, model_name=model_id_or_path, allow_pickle=allow_pickle,
                   what="lora", adapter=f"style{index}", scale=scale)
    live_factors = [_live_lora_factors(loaded, live_file, lora_name=name, model_name=model_id_or_path,
                                       allow_pickle=allow_pickle, adapter=f"live{index}")
                    for index, (live_file, name, _) in enumerate(live_files)]

    arch = detect_arch(loaded.unet.config)
    components = Components(
        unet=loaded.unet,
        vae=loaded.vae,
        text_encoder=loaded.text_encoder,
        tokenizer=loaded.tokenizer,
        schedule=NoiseSchedule.from_scheduler_config(loaded.scheduler_config),
        arch=arch,
        source=model_id_or_path,
    )
    components.to(device, dtype)
    if live_files:
        components.live_loras = LiveLoras(
            [name for _, name, _ in live_files], [scale for _, _, scale in live_files], live_factors,
            {"unet": components.unet, "text_encoder": components.text_encoder},
        )
        live = components.live_loras
        for slot, (name, scale) in enumerate(zip(live.names, live.scales), start=1):
            log.info("live LoRA %d (OSC /sd/lora/%d): %s at %g", slot, slot, Path(name).name, scale)
        log.info("live LoRAs: %.1f MiB kept for their %d layers", live.kept_bytes / 2**20, live.layers)
    log.info("loaded %r (%s) in %.1f s", model_id_or_path, arch, time.perf_counter() - started)
    return components


def _check_arguments(model_id_or_path, *, vae, lcm_lora, single_file_config, dtype) -> None:
    for name, value in (("model_id_or_path", model_id_or_path), ("vae", vae), ("lcm_lora", lcm_lora),
                        ("single_file_config", single_file_config)):
        if (value is not None or name == "model_id_or_path") and not (isinstance(value, str) and value.strip()):
            raise ValueError(f"{name}: {value!r} must be a non-empty string")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype: {dtype!r} must be a floating-point torch.dtype")


MAX_LORA_SCALE = 10.0


def _check_loras(loras, *, name: str = "loras") -> list[tuple[str, float]]:
    """`loras` as a list of (weights, scale); ValueError naming what is wrong (as `name`)."""
    if isinstance(loras, (str, bytes)) or not isinstance(loras, Sequence):
        raise ValueError(f"{name}: {loras!r} must be a list of (weights, scale) pairs")
    checked = []
    for pair in loras:
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError(f"{name}: {pair!r} must be a (weights, scale) pair")
        weights, scale = pair
        if not isinstance(weights, str) or not weights.strip():
            raise ValueError(f"{name}: {weights!r} must be a non-empty path or hub id")
        number = isinstance(scale, (int, float)) and not isinstance(scale, bool) and math.isfinite(scale)
        if not number or abs(scale) > MAX_LORA_SCALE:
            limit = f"{MAX_LORA_SCALE:g}"
            raise ValueError(f"{name}: {weights}: scale {scale!r} must be a number in -{limit}..{limit}")
        checked.append((weights, float(scale)))
    return checked


def detect_arch(unet_config) -> str:
    """"sd15" or "sd-turbo" where the UNet config matches that architecture exactly, else "custom"."""
    for arch in _ARCH_CANDIDATES:
        if all(_same(unet_config.get(key), value) for key, value in UNET_CONFIGS[arch].items()):
            return arch
    return "custom"


def _same(actual, expected) -> bool:
    if isinstance(expected, (tuple, list)):
        return isinstance(actual, (tuple, list)) and list(actual) == list(expected)
    return actual == expected


# ---------------------------------------------------------------------------------------------
# Resolving sources: local paths, hub snapshots, pickle refusal


def _resolve_model(name: str, *, with_vae: bool, allow_pickle: bool) -> Path:
    """A local single file or a checked diffusers folder (downloaded for a hub id)."""
    path = Path(name).expanduser()
    if path.is_file():
        return _check_single_file(path, what="model", allow_pickle=allow_pickle)
    components = ["unet", "text_encoder"] + (["vae"] if with_vae else [])
    if not path.is_dir():
        if not _looks_like_hub_id(name):
            raise ModelLoadError(f"model path not found: {str(path)!r}")
        patterns = ["*.json", "*.txt"] + _weight_patterns(components, allow_pickle=allow_pickle)
        path = _hub_snapshot(
            name, patterns=patterns, subject=f"model {name!r} is not a local folder or file",
            hint="pass a local folder or a .safetensors file",
        )
    return _check_pipeline_folder(path, components=components, allow_pickle=allow_pickle)


def _looks_like_hub_id(name: str) -> bool:
    """"org/name" or "name", no other path separators, not ending in a weights/config file suffix."""
    if os.sep != "/" and os.sep in name:
        return False
    return bool(_HUB_ID.match(name)) and not name.lower().endswith(FILE_SUFFIXES)


def _check_single_file(path: Path, *, what: str, allow_pickle: bool) -> Path:
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        _refuse_or_warn(path, allow_pickle=allow_pickle)
    elif suffix != SAFE_SUFFIX:
        raise ModelLoadError(f"{what} file {str(path)!r}: unsupported type {suffix!r}; expected a {SAFE_SUFFIX} file")
    elif path.suffix != SAFE_SUFFIX:  # diffusers picks its loader by the exact name: .SAFETENSORS goes to torch.load
        raise ModelLoadError(f"{what} file {str(path)!r}: rename it to end in {SAFE_SUFFIX!r}, lower case "
                             "(the loaders read any other spelling as a pickle)")
    elif not _has_safetensors_header(path):
        raise UnsafeWeightsError(f"{what} file {str(path)!r} is named {SAFE_SUFFIX} but is not one (a renamed "
                                 f"pickle?); refusing to load it")
    return path


def _has_safetensors_header(path: Path) -> bool:
    """Whether `path` starts as a safetensors file does: the header's length (8 bytes, little
    endian, within the file), then the header's JSON object. A pickle or zip does not."""
    try:
        with open(path, "rb") as file:
            start = file.read(9)
        size = path.stat().st_size
    except OSError:
        return False
    return len(start) == 9 and 2 <= int.from_bytes(start[:8], "little") <= size - 8 and start[8:] == b"{"


def _check_pipeline_folder(folder: Path, *, components: list[str], allow_pickle: bool) -> Path:
    required = [f"{name}/config.json" for name in components]
    required += ["tokenizer/vocab.json", "scheduler/scheduler_config.json"]
    missing = [name for name in required if not (folder / name).is_file()]
    if missing:
        raise ModelLoadError(
            f"{str(folder)!r} is not a diffusers pipeline folder: missing {', '.join(missing)} "
            "(expected model_index.json with unet/, text_encoder/, tokenizer/, scheduler/ and optionally vae/)"
        )
    for name in components:
        _check_weights(folder / name, allow_pickle=allow_pickle)
    return folder


def _check_weights(folder: Path, *, allow_pickle: bool) -> None:
    """Refuse a component folder whose weights are pickles only, before anything is unpickled."""
    files = sorted(folder.iterdir()) if folder.is_dir() else []
    if any(file.name.endswith(SAFE_SUFFIX) for file in files):
        return
    pickles = [file for file in files if file.suffix.lower() in PICKLE_SUFFIXES]
    if pickles:
        _refuse_or_warn(pickles[0], allow_pickle=allow_pickle)
        return
    opt_in = "" if allow_pickle else f"; pickle-only (.bin) weights need {PICKLE_OPT_IN}"
    raise ModelLoadError(f"no weights in {str(folder)!r}: expected a {SAFE_SUFFIX} file{opt_in}")


def _refuse_or_warn(path: Path, *, allow_pickle: bool) -> None:
    if not allow_pickle:
        raise UnsafeWeightsError(
            f"refusing to load {str(path)!r}: {path.suffix} files are Python pickles, which can run arbitrary "
            f"code when loaded; pass {PICKLE_OPT_IN} only for files you trust, or use a {SAFE_SUFFIX} version"
        )
    log.warning("loading pickle-based weights from %r (allow_pickle=True): only for files you trust", str(path))


def _resolve_config(name: str, *, allow_pickle: bool = False) -> Path:
    """The folder whose configs and tokenizer describe a single-file checkpoint. Without
    `allow_pickle`, one with a component folder of pickled weights only is refused: diffusers
    loads a component the checkpoint lacks (a text encoder) from there, pickle or not (where
    there is a .safetensors file too, that one is loaded)."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not allow_pickle:
            for folder in sorted(child for child in path.iterdir() if child.is_dir()):
                files = sorted(folder.iterdir())
                pickles = [f for f in files if f.suffix.lower() in PICKLE_SUFFIXES]
                if pickles and not any(f.name.endswith(SAFE_SUFFIX) for f in files):
                    _refuse_or_warn(pickles[0], allow_pickle=False)
        return path
    if path.exists():
        raise ModelLoadError(f"single_file_config {str(path)!r}: expected a folder (a diffusers folder of the "
                             "checkpoint's architecture), not a file")
    if not _looks_like_hub_id(name):
        raise ModelLoadError(f"single_file_config path not found: {str(path)!r}")
    return _hub_snapshot(
        name, patterns=["*.json", "*.txt"], subject=f"single_file_config {name!r} is not a local folder",
        hint="pass single_file_config=<a local diffusers folder of the checkpoint's architecture> "
             "(sdbridge: --single-file-config)",
    )


def _resolve_vae(name: str, *, allow_pickle: bool) -> Path:
    """A folder with the VAE's config.json (a pipeline folder's vae/ is accepted too)."""
    path = Path(name).expanduser()
    if path.is_file():
        raise ModelLoadError(f"vae {str(path)!r}: expected a folder of an AutoencoderTiny or AutoencoderKL "
                             "(its config.json and weights), not a file")
    if not path.is_dir():
        if name != DEFAULT_VAE and not _looks_like_hub_id(name):
            raise ModelLoadError(f"vae path not found: {str(path)!r}")
        repo = TAESD_REPO if name == DEFAULT_VAE else name
        subject = (
            f"the default VAE (TAESD, hub id {TAESD_REPO!r}) is not in the local hub cache"
            if name == DEFAULT_VAE else f"vae {name!r} is not a local folder"
        )
        patterns = ["config.json", "vae/config.json"]
        patterns += _weight_patterns(["vae"], allow_pickle=allow_pickle, root_too=True)
        path = _hub_snapshot(
            repo, patterns=patterns, subject=subject,
            hint="pass vae=<local folder of an AutoencoderTiny or AutoencoderKL>, "
            "or vae='model' for the checkpoint's own VAE",
        )
    if not (path / "config.json").is_file() and (path / "vae" / "config.json").is_file():
        path = path / "vae"
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"vae {name!r}: no config.json in {str(path)!r}")
    _check_weights(path, allow_pickle=allow_pickle)
    return path


def _resolve_lora(name: str, *, allow_pickle: bool, what: str = "lcm_lora") -> Path:
    """The LoRA weights file: a file, or the one weights file of a folder or hub repository."""
    path = Path(name).expanduser()
    if not path.exists():
        if not _looks_like_hub_id(name):
            raise ModelLoadError(f"{what} path not found: {str(path)!r}")
        suffixes = [SAFE_SUFFIX] + ([".bin"] if allow_pickle else [])
        path = _hub_snapshot(
            name, patterns=[LORA_WEIGHT_NAME + s for s in suffixes], subject=f"{what} {name!r} is not a local file",
            hint=f"pass {what}=<a local LoRA .safetensors file>",
        )
    if path.is_dir():
        files = sorted(path.glob(f"*{SAFE_SUFFIX}"))
        files = files or sorted(p for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        preferred = [p for p in files if p.stem == LORA_WEIGHT_NAME]
        if len(preferred) != 1 and len(files) != 1:
            raise ModelLoadError(f"{what} {name!r}: expected one weights file in {str(path)!r}, found {len(files)}")
        path = (preferred or files)[0]
    return _check_single_file(path, what=what, allow_pickle=allow_pickle)


def _weight_patterns(components: list[str], *, allow_pickle: bool, root_too: bool = False) -> list[str]:
    """Hub file patterns of the full-precision weights (single or sharded), not fp16/other variants."""
    patterns = []
    for name in components:
        safe_stem, pickle_stem = _WEIGHT_STEMS[name]
        stems = [(safe_stem, SAFE_SUFFIX)] + ([(pickle_stem, ".bin")] if allow_pickle else [])
        for folder in [f"{name}/"] + ([""] if root_too else []):
            patterns += [f"{folder}{stem}{suffix}" for stem, suffix in stems]
            patterns += [f"{folder}{stem}-*{suffix}" for stem, suffix in stems]
    return patterns


def _hub_offline() -> bool:
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return constants.HF_HUB_OFFLINE or value.upper() in ("1", "ON", "YES", "TRUE")


def _hub_snapshot(repo_id: str, *, patterns: list[str], subject: str, hint: str) -> Path:
    """The local snapshot of a hub repository (from the cache when offline); one clear error otherwise."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError

    log.info("fetching %s from the hub (or its local cache)", repo_id)
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=_hub_offline()))
    except RepositoryNotFoundError as exc:
        raise ModelLoadError(f"{subject}, and the hub has no accessible repository {repo_id!r}; {hint}") from exc
    except Exception as exc:  # offline mode, no cache, connection/HTTP errors: all mean "unreachable"
        raise ModelLoadError(f"{subject}, and the hub could not be reached: {_reason(exc)}; {hint}") from exc


def _reason(exc: BaseException) -> str:
    """One line: the exception type and its first line (plus the next one where the first is a heading)."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()] or [""]
    text = f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]
    return f"{type(exc).__name__}: {text[:300]}"


# ---------------------------------------------------------------------------------------------
# Loading


@contextmanager
def _loading(what: str, where: Path | str, *, failure: str | None = None):
    """Log start and elapsed time of one component; wrap any failure in one ModelLoadError line."""
    log.info("loading %s from %s", what, where)
    started = time.perf_counter()
    try:
        yield
    except ModelLoadError:
        raise
    except Exception as exc:
        failure = failure or f"could not load {what} from {str(where)!r}"
        raise ModelLoadError(f"{failure}: {_reason(exc)}") from exc
    log.info("loaded %s in %.1f s", what, time.perf_counter() - started)


def _load_folder(folder: Path, *, with_vae: bool, allow_pickle: bool, dtype: torch.dtype) -> _Loaded:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    options = dict(local_files_only=True, use_safetensors=None if allow_pickle else True, dtype=dtype)
    with _loading("unet", folder / "unet"):
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", **options)
    with _loading("text_encoder", folder / "text_encoder"):
        text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", **options)
    with _loading("tokenizer", folder / "tokenizer"):
        tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", local_files_only=True)
    with _loading("scheduler config", folder / "scheduler"):
        scheduler_config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))
    vae = None
    if with_vae:
        with _loading("vae", folder / "vae"):
            vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", **options)
    return _Loaded(unet, text_encoder, tokenizer, scheduler_config, vae)


def _load_single_file(path: Path, *, config: Path | None, with_vae: bool, dtype: torch.dtype) -> _Loaded:
    from diffusers import StableDiffusionPipeline

    options = dict(dtype=dtype, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    if config is not None:
        options.update(config=str(config), local_files_only=True)
    if not with_vae:
        options["vae"] = None  # not converted at all
    described = f"single-file checkpoint (configs from {str(config) if config else 'the hub default diffusers infers'})"
    try:
        with _loading(described, path), warnings.catch_warnings():
            # StableDiffusionPipeline warns about scheduler settings it then patches; only the betas are used here.
            warnings.filterwarnings("ignore", message="(?s).*steps_offset", category=FutureWarning)
            pipe = StableDiffusionPipeline.from_single_file(str(path), **options)
    except ModelLoadError as exc:
        hint = ("pass single_file_config=<a local diffusers folder (configs, tokenizer) of its architecture> "
                "(sdbridge: --single-file-config)")
        raise ModelLoadError(f"{exc}; {hint}") from exc.__cause__
    for name in ("unet", "text_encoder") + (("vae",) if with_vae else ()):
        _check_materialized(getattr(pipe, name), what=name, where=path)
    vae = pipe.vae if with_vae else None
    return _Loaded(pipe.unet, pipe.text_encoder, pipe.tokenizer, dict(pipe.scheduler.config), vae)


def _check_materialized(module: torch.nn.Module, *, what: str, where: Path) -> None:
    """Weights the checkpoint lacked stay on the meta device: report them instead of failing later."""
    missing = [name for name, parameter in module.named_parameters() if parameter.is_meta]
    if missing:
        raise ModelLoadError(
            f"{str(where)!r} has no weights for {len(missing)} {what} parameters (e.g. {missing[0]}); "
            "does single_file_config match the checkpoint's architecture?"
        )


def _load_vae(folder: Path, *, allow_pickle: bool, dtype: torch.dtype) -> torch.nn.Module:
    from diffusers import AutoencoderKL, AutoencoderTiny

    classes = {"AutoencoderTiny": AutoencoderTiny, "AutoencoderKL": AutoencoderKL}
    class_name = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("_class_name")
    if class_name not in classes:
        raise ModelLoadError(f"vae {str(folder)!r} is a {class_name!r}; expected one of {', '.join(classes)}")
    with _loading(f"vae ({class_name})", folder):
        return classes[class_name].from_pretrained(
            folder, local_files_only=True, use_safetensors=None if allow_pickle else True, dtype=dtype
        )


def _check_compatible(loaded: _Loaded, model_name: str) -> None:
    """Catch models the engine cannot run (SDXL, inpainting, mismatched parts) with a clear message."""
    unet = loaded.unet.config
    if unet.get("addition_embed_type") is not None:
        raise ModelLoadError(f"model {model_name!r} has an SDXL-style UNet; sdbridge runs SD 1.x/2.x models")
    latent_channels = loaded.vae.config.latent_channels
    if unet.in_channels != latent_channels:
        raise ModelLoadError(
            f"model {model_name!r}: UNet takes {unet.in_channels} input channels but the VAE makes "
            f"{latent_channels} (inpainting and depth models are not supported)"
        )
    hidden_size = loaded.text_encoder.config.hidden_size
    if unet.cross_attention_dim != hidden_size:
        raise ModelLoadError(
            f"model {model_name!r}: UNet cross_attention_dim {unet.cross_attention_dim} != text encoder "
            f"hidden_size {hidden_size}"
        )


def _no_text_encoder_part(record: logging.LogRecord) -> bool:
    """Drops diffusers' notice that a LoRA has no text-encoder part: most style LoRAs have none,
    and it reads like a problem on the terminal of a show."""
    return "No LoRA keys associated to CLIPTextModel" not in record.getMessage()


class _WarningCollector(logging.Handler):
    """Collects diffusers' warnings about LoRA keys that matched nothing (it only warns)."""

    SIGNS = ("unexpected keys", "missing keys", "No LoRA keys associated to UNet")

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.problems: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if any(sign in message for sign in self.SIGNS):
            self.problems.append(message.strip().splitlines()[0].split(". ")[0][:300])


def _fuse_lora(loaded: _Loaded, lora_file: Path, *, lora_name: str, model_name: str, allow_pickle: bool,
               what: str = "lcm_lora", adapter: str = "lcm", scale: float = 1.0) -> None:
    """load_lora_weights + fuse_lora (at `scale`) + unload: the UNet (and text encoder) keep plain,
    merged weights."""
    pipe = _load_adapter(loaded, lora_file, lora_name=lora_name, model_name=model_name, allow_pickle=allow_pickle,
                         what=what, adapter=adapter)
    pipe.fuse_lora(lora_scale=scale, adapter_names=[adapter])
    pipe.unload_lora_weights()
    log.info("fused %s %r into the UNet%s", what, lora_name, "" if scale == 1.0 else f" at scale {scale:g}")


def _live_lora_factors(loaded: _Loaded, lora_file: Path, *, lora_name: str, model_name: str, allow_pickle: bool,
                       adapter: str) -> dict[tuple[str, str], Factors]:
    """load_lora_weights, then the adapter's factors per (model, module path), then unload: the
    weights stay as they were (see pipeline.live_lora)."""
    pipe = _load_adapter(loaded, lora_file, lora_name=lora_name, model_name=model_name, allow_pickle=allow_pickle,
                         what="live_lora", adapter=adapter)
    try:
        factors = {("unet", path): f for path, f in peft_factors(loaded.unet, adapter, lora_name=lora_name).items()}
        factors.update({("text_encoder", path): f
                        for path, f in peft_factors(loaded.text_encoder, adapter, lora_name=lora_name).items()})
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from None
    finally:
        pipe.unload_lora_weights()
    text_encoder = sum(model == "text_encoder" for model, _ in factors)
    log.info("live lora %r: %d UNet layers, %d text-encoder layers", lora_name, len(factors) - text_encoder,
             text_encoder)
    return factors


def _load_adapter(loaded: _Loaded, lora_file: Path, *, lora_name: str, model_name: str, allow_pickle: bool,
                  what: str, adapter: str):
    """The pipeline with `lora_file` loaded as peft adapter `adapter` (not merged); ModelLoadError
    naming it where it does not fit."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=loaded.vae, text_encoder=loaded.text_encoder, tokenizer=loaded.tokenizer, unet=loaded.unet,
        scheduler=None, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    misfit = f"{what} {lora_name!r} does not fit the UNet of {model_name!r}"
    collector = _WarningCollector()
    diffusers_logger = logging.getLogger("diffusers")
    quiet = [handler for handler in diffusers_logger.handlers]  # diffusers' own, to the terminal
    diffusers_logger.addHandler(collector)
    for handler in quiet:
        handler.addFilter(_no_text_encoder_part)
    try:
        with _loading(what, lora_file, failure=misfit):
            pipe.load_lora_weights(
                str(lora_file.parent), weight_name=lora_file.name, adapter_name=adapter,
                use_safetensors=None if allow_pickle else True, local_files_only=True,
            )
    finally:
        diffusers_logger.removeHandler(collector)
        for handler in quiet:
            handler.removeFilter(_no_text_encoder_part)
    if collector.problems or adapter not in getattr(loaded.unet, "peft_config", {}):
        pipe.unload_lora_weights()
        raise ModelLoadError(f"{misfit}: {collector.problems[0] if collector.problems else 'it has no UNet weights'}")
    return pipe
