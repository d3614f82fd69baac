"""A folder of prebuilt engines, each under a key that says exactly what it was built for.

An engine is only valid for one model, resolution, batch, precision, TensorRT version and GPU
(TensorRT documents plans as specific to the GPU model they were built on, not only to its
compute capability); TensorRT does not check most of that itself. The key holds all of them,
the file name is derived from the key, and `manifest.json` records each file's key and sha256.
`load` refuses anything that does not match (a foreign file, a tampered one, another key),
naming the command that rebuilds it. Nothing here unpickles or executes what it reads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
COMPONENTS = ("unet", "vae_encoder", "vae_decoder")
PRECISIONS = ("fp16", "fp32", "bf16", "fp8")


class EngineCacheError(RuntimeError):
    """No usable engine for a key; the message says why and how to rebuild."""


@dataclass(frozen=True)
class EngineKey:
    """Everything an engine depends on."""

    component: str  # unet, vae_encoder or vae_decoder
    model_hash: str  # sha256 of the model's weights (see model_weights_hash)
    width: int  # pixels
    height: int  # pixels
    batch: int  # rows per call the engine was built for
    precision: str  # fp16, fp32, bf16, fp8
    tensorrt_version: str  # e.g. "10.7.0"
    compute_capability: str  # e.g. "9.0" (H100/H200), "8.9" (RTX 4090)
    gpu: str  # the GPU's name, e.g. "NVIDIA GeForce RTX 4090" (an L40 shares its compute capability)

    def __post_init__(self) -> None:
        if self.component not in COMPONENTS:
            raise ValueError(f"component: {self.component!r} must be one of {', '.join(COMPONENTS)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision: {self.precision!r} must be one of {', '.join(PRECISIONS)}")
        for name in ("width", "height", "batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}: {value!r} must be a positive integer")
        for name in ("model_hash", "tensorrt_version", "compute_capability"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value or any(c in value for c in "/\\\0"):
                raise ValueError(f"{name}: {value!r} must be a non-empty string without path separators")
        if not isinstance(self.gpu, str) or not self.gpu.strip():
            raise ValueError(f"gpu: {self.gpu!r} must be the GPU's name")

    @property
    def digest(self) -> str:
        """sha256 of every field: two keys share a digest only if they are equal."""
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    @property
    def filename(self) -> str:
        return (
            f"{self.component}-{self.width}x{self.height}-b{self.batch}-{self.precision}"
            f"-trt{self.tensorrt_version}-sm{self.compute_capability}-{self.digest[:16]}.engine"
        )


EXPORT_FORMAT = 1  # the ONNX export's wrappers: engines of another export are refused (model_weights_hash)


def model_weights_hash(*modules: torch.nn.Module) -> str:
    """sha256 over the export format, each module's configuration (a diffusers model's `config`,
    without private entries such as the folder it came from: settings like the attention heads
    or the VAE's scaling factor change the computation, not the weights' shapes), and its
    parameters and buffers (names, dtypes, shapes, bytes), in order."""
    digest = hashlib.sha256(f"export {EXPORT_FORMAT}".encode())
    for index, module in enumerate(modules):
        config = {k: v for k, v in dict(getattr(module, "config", None) or {}).items() if not k.startswith("_")}
        digest.update(f"{index}:config:{json.dumps(config, sort_keys=True, default=str)}".encode())
        for name, tensor in sorted(module.state_dict().items()):
            data = tensor.detach().cpu().contiguous()
            digest.update(f"{index}:{name}:{data.dtype}:{tuple(data.shape)}".encode())
            digest.update(data.view(torch.uint8).numpy() if data.numel() else b"")  # (the buffer: no copy of it)
    return digest.hexdigest()


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class EngineCache:
    """Engines in `folder`, listed with their keys and sha256 sums in manifest.json."""

    def __init__(self, folder: str | Path, *, rebuild_hint: str = "sdbridge build-engines") -> None:
        self.folder = Path(folder)
        self.rebuild_hint = rebuild_hint

    def _manifest(self) -> dict:
        path = self.folder / MANIFEST
        if not path.exists():
            return {}
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise EngineCacheError(f"engine cache {self.folder}: unreadable {MANIFEST} ({exc}); rebuild with: {self.rebuild_hint}") from None
        return manifest if isinstance(manifest, dict) else {}

    def _write_manifest(self, manifest: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=self.folder, delete=False, suffix=".tmp", encoding="utf-8") as handle:
            json.dump(manifest, handle, indent=2, sort_keys=True)
        os.replace(handle.name, self.folder / MANIFEST)

    def store(self, key: EngineKey, engine: bytes) -> Path:
        """Write an engine built for `key` and record it (atomic: a reader never sees half a file)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / key.filename
        with tempfile.NamedTemporaryFile("wb", dir=self.folder, delete=False, suffix=".tmp") as handle:
            handle.write(engine)
        os.replace(handle.name, path)
        try:
            manifest = self._manifest()
        except EngineCacheError as exc:  # the rebuild its message asks for must work: start it afresh
            log.warning("%s; writing a new one", exc)
            manifest = {}
        manifest[key.filename] = {"key": asdict(key), "sha256": hashlib.sha256(engine).hexdigest(), "bytes": len(engine)}
        self._write_manifest(manifest)
        return path

    def has(self, key: EngineKey) -> bool:
        try:
            self.verify(key)
        except EngineCacheError:
            return False
        return True

    def verify(self, key: EngineKey) -> Path:
        """The engine's path once its manifest entry and sha256 match `key`; EngineCacheError otherwise."""
        path = self.folder / key.filename
        entry = self._manifest().get(key.filename)
        what = f"{key.component} engine for {key.width}x{key.height} batch {key.batch} {key.precision}"
        if entry is None or not path.exists():
            raise EngineCacheError(f"no {what} in {self.folder}{self._nearest(key)}; build it first with: {self.rebuild_hint}")
        if not (isinstance(entry, dict) and isinstance(entry.get("key"), dict) and isinstance(entry.get("sha256"), str)):
            raise EngineCacheError(f"{path.name}: its {MANIFEST} entry is malformed; refusing it; "
                                   f"rebuild with: {self.rebuild_hint}")
        recorded = entry["key"]
        if recorded != asdict(key):
            changed = [f.name for f in fields(key) if recorded.get(f.name) != getattr(key, f.name)]
            raise EngineCacheError(
                f"{path.name} was built for another {', '.join(changed) or 'setting'}; refusing it; rebuild with: {self.rebuild_hint}"
            )
        if _sha256_file(path) != entry.get("sha256"):
            raise EngineCacheError(f"{path.name} does not match its recorded sha256 (changed or damaged); "
                                   f"refusing it; rebuild with: {self.rebuild_hint}")
        return path

    def _nearest(self, key: EngineKey) -> str:
        """Where the folder holds engines of the same component, size, batch and precision for
        something else (another TensorRT, another GPU, other weights): what differs, as
        ' (its engines ... were built for another X)'; '' where it holds none (or no readable manifest)."""
        try:
            entries = self._manifest().values()
        except EngineCacheError:
            return ""
        same = ("component", "width", "height", "batch", "precision")
        differing = []
        for entry in entries:
            recorded = entry.get("key") if isinstance(entry, dict) else None
            if not isinstance(recorded, dict) or any(recorded.get(name) != getattr(key, name) for name in same):
                continue
            differing.append([f.name for f in fields(key) if f.name not in same and recorded.get(f.name) != getattr(key, f.name)])
        if not differing:
            return ""
        changed = min(differing, key=len)
        described = {"model_hash": "model weights", "tensorrt_version": "TensorRT version",
                     "compute_capability": "GPU compute capability", "gpu": "GPU"}
        now = {"tensorrt_version": f"TensorRT {key.tensorrt_version}", "gpu": key.gpu,
               "compute_capability": f"compute capability {key.compute_capability}"}
        here = [now[name] for name in changed if name in now]
        return (f" (it holds one built for another {' and '.join(described.get(n, n) for n in changed)}"
                f"{'; this machine: ' + ', '.join(here) if here else ''})")

    def load(self, key: EngineKey) -> bytes:
        """The verified engine bytes for `key` (read once, then checked, so nothing changes in between)."""
        path = self.verify(key)
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != self._manifest()[key.filename]["sha256"]:
            raise EngineCacheError(f"{path.name} changed while it was read; rebuild with: {self.rebuild_hint}")
        return data
