"""A stand-in for syphon-python (macOS-only) and the bits of PyObjC's Metal it uses, for tests on Linux.

Follows cansik/syphon-python 0.2.0 (syphon/server.py, client.py, server_directory.py,
utils/raw.py, utils/numpy.py) and the Syphon framework underneath it:

- `SyphonMetalServer(name, device=None, command_queue=None)`: `name`, `device`, `command_queue`,
  `context`, `publish_frame_texture(texture, region=None, size=None, is_flipped=False,
  command_buffer=None, auto_commit=True)`, `publish()`, `stop()`, `has_clients`. Its surface is
  BGRA8Unorm (SyphonMetalServer.m); an unflipped texture is copied row for row (the blit path),
  a flipped one upside down, an RGBA one swizzled (the render path).
- `SyphonServerDirectory()`: `run_loop_interval` (1.0 s), `servers` (runs the calling thread's
  run loop once, then lists `SyphonServerDescription(uuid, name, app_name, icon, raw)`),
  `update_run_loop()`, `servers_matching_name(name=None, app_name=None)`.
- `SyphonMetalClient(description, device=None)`: `is_valid`, `has_new_frame`,
  `new_frame_image` (a BGRA8Unorm texture, or None), `stop()`.
- `utils.raw.create_mtl_texture(device, width, height, pixel_format=MTLPixelFormatRGBA8Unorm)`,
  `copy_bytes_to_mtl_texture`, `copy_mtl_texture_to_bytes`; `utils.numpy.copy_image_to_mtl_texture
  (image (H, W, 4), texture)` and `copy_mtl_texture_to_image(texture)` -> (H, W, 4) uint8, the
  texture's bytes as they are (no swizzle, no flip; row 0 is the texture's row 0, the top).

Cocoa objects that Metal and the directory hand out autoreleased (a command buffer, the
directory's server list) must be made inside `objc.autorelease_pool()`: a thread without an
AppKit event loop never drains one otherwise, and every frame would leak until the thread ends.
Calls made outside a pool are recorded in `autorelease_violations`.

Like Syphon, servers announce and retire themselves through distributed notifications, which
macOS delivers on the main thread's run loop only: the shared directory's list changes only
when the main thread runs its run loop (`update_run_loop` there); on another thread that call
returns at once and the list stays as it was. A server that stops tells its clients (they
become invalid) at once. Two servers may share a name (Syphon does not rename).
"""

from __future__ import annotations

import dataclasses
import contextlib
import threading
import time
import types
import uuid as uuid_module
from enum import Enum
from typing import Any

import numpy as np

# ------------------------------------------------------------------ objc (PyObjC): autorelease pools

_pools = threading.local()
autorelease_violations: list[str] = []


@contextlib.contextmanager
def autorelease_pool():
    _pools.depth = getattr(_pools, "depth", 0) + 1
    try:
        yield
    finally:
        _pools.depth -= 1


def _autoreleased(what: str) -> None:
    if getattr(_pools, "depth", 0) == 0:
        autorelease_violations.append(f"{what} outside an autorelease pool on {threading.current_thread().name}")


objc = types.ModuleType("objc")
objc.autorelease_pool = autorelease_pool

# ------------------------------------------------------------------ Metal (PyObjC), the parts used

MTLPixelFormatRGBA8Unorm = 70
MTLPixelFormatBGRA8Unorm = 80

metal_device_available = True  # False: MTLCreateSystemDefaultDevice() returns None (a Mac without Metal)


class _Region:
    def __init__(self, origin, size) -> None:
        self.origin, self.size = tuple(origin), tuple(size)


def MTLRegion(origin, size):  # noqa: N802 (PyObjC's names)
    return _Region(origin, size)


def MTLRegionMake2D(x, y, width, height):  # noqa: N802
    return _Region((x, y, 0), (width, height, 1))


class _Texture:
    def __init__(self, pixel_format: int, width: int, height: int) -> None:
        self._format, self._width, self._height = pixel_format, width, height
        self._bytes = np.zeros((height, width, 4), np.uint8)

    def width(self) -> int:
        return self._width

    def height(self) -> int:
        return self._height

    def pixelFormat(self) -> int:  # noqa: N802
        return self._format

    def replaceRegion_mipmapLevel_withBytes_bytesPerRow_(self, region, level, data, bytes_per_row):  # noqa: N802
        x, y = region.origin[:2]
        width, height = region.size[:2]
        rows = np.frombuffer(memoryview(data).cast("B"), np.uint8)[: bytes_per_row * height].reshape(height, bytes_per_row)
        self._bytes[y:y + height, x:x + width] = rows[:, : width * 4].reshape(height, width, 4)

    def getBytes_bytesPerRow_bytesPerImage_fromRegion_mipmapLevel_slice_(  # noqa: N802
            self, buffer, bytes_per_row, bytes_per_image, region, level, slice_number):
        x, y = region.origin[:2]
        width, height = region.size[:2]
        target = np.frombuffer(memoryview(buffer).cast("B"), np.uint8)
        target[: width * height * 4] = self._bytes[y:y + height, x:x + width].reshape(-1)


class _TextureDescriptor:
    def __init__(self, pixel_format: int, width: int, height: int) -> None:
        self.pixel_format, self.width, self.height = pixel_format, width, height

    @classmethod
    def texture2DDescriptorWithPixelFormat_width_height_mipmapped_(cls, pixel_format, width, height, mipmapped):  # noqa: N802
        return cls(pixel_format, width, height)


class _CommandBuffer:
    def commitAndWaitUntilSubmitted(self) -> None:  # noqa: N802
        pass


class _CommandQueue:
    def commandBuffer(self) -> _CommandBuffer:  # noqa: N802
        _autoreleased("MTLCommandQueue.commandBuffer()")
        return _CommandBuffer()


class _Device:
    def name(self) -> str:
        return "Stand-in Metal GPU"

    def newCommandQueue(self) -> _CommandQueue:  # noqa: N802
        return _CommandQueue()

    def newTextureWithDescriptor_(self, descriptor: _TextureDescriptor) -> _Texture:  # noqa: N802
        return _Texture(descriptor.pixel_format, descriptor.width, descriptor.height)


def MTLCreateSystemDefaultDevice():  # noqa: N802
    return _Device() if metal_device_available else None


Metal = types.ModuleType("Metal")
for _name in ("MTLPixelFormatRGBA8Unorm", "MTLPixelFormatBGRA8Unorm", "MTLRegion", "MTLRegionMake2D",
              "MTLCreateSystemDefaultDevice"):
    setattr(Metal, _name, globals()[_name])
Metal.MTLTextureDescriptor = _TextureDescriptor

# ------------------------------------------------------------------ the machine: servers and the directory

_lock = threading.Condition()
_servers: dict[str, dict] = {}  # uuid -> {"raw", "alive", "surface" (H, W, 4) BGRA or None, "frame", "clients"}
_directory: list[dict] = []  # the shared directory's list, as the main thread last saw it
_pending: list[tuple[str, dict]] = []  # ("announce" | "retire", raw) not yet delivered to the main thread
clients_open = 0
app_name = "Python"  # SyphonServerDescriptionAppNameKey of servers made now (this process's name)


def reset() -> None:
    global clients_open, app_name, metal_device_available
    with _lock:
        _servers.clear()
        _directory.clear()
        _pending.clear()
        clients_open = 0
        app_name = "Python"
        metal_device_available = True
        autorelease_violations.clear()


def servers_alive() -> list[str]:
    with _lock:
        return [entry["raw"]["SyphonServerDescriptionNameKey"] for entry in _servers.values() if entry["alive"]]


def _post(kind: str, raw: dict) -> None:
    with _lock:
        _pending.append((kind, raw))
        _lock.notify_all()


def vanish(server: "SyphonMetalServer") -> None:
    """The server's app dies without stopping it: no retire message reaches its clients (they stay
    valid, and get no frames); the directory drops it when its announce-request ping times out,
    delivered on the main thread like any directory change."""
    with _lock:
        _servers[server._uuid]["alive"] = False
        _servers[server._uuid]["silent"] = True
    _post("retire", server._raw)


def _deliver_pending() -> bool:
    with _lock:
        delivered = bool(_pending)
        for kind, raw in _pending:
            uuid = raw["SyphonServerDescriptionUUIDKey"]
            _directory[:] = [entry for entry in _directory if entry["SyphonServerDescriptionUUIDKey"] != uuid]
            if kind == "announce":
                _directory.append(raw)
        _pending.clear()
        return delivered


# ------------------------------------------------------------------ syphon.server_directory


class SyphonServerNotification(Enum):
    Announce = "SyphonServerAnnounceNotification"
    Update = "SyphonServerUpdateNotification"
    Retire = "SyphonServerRetireNotification"


@dataclasses.dataclass
class SyphonServerDescription:
    uuid: str
    name: str
    app_name: str
    icon: Any
    raw: Any


class SyphonServerDirectory:
    def __init__(self) -> None:
        self.run_loop_interval: float = 1.0

    @property
    def servers(self) -> list[SyphonServerDescription]:
        self.update_run_loop()
        _autoreleased("SyphonServerDirectory.sharedDirectory().servers()")
        with _lock:
            listed = list(_directory)
        return [SyphonServerDescription(str(s["SyphonServerDescriptionUUIDKey"]), str(s["SyphonServerDescriptionNameKey"]),
                                        str(s["SyphonServerDescriptionAppNameKey"]), s["SyphonServerDescriptionIconKey"], s)
                for s in listed]

    def update_run_loop(self) -> None:
        """NSRunLoop.currentRunLoop().runMode_beforeDate_(default mode, now + run_loop_interval): on
        the main thread, waits for the next notification (at most the interval) and delivers what
        came; on any other thread there is nothing to run and it returns at once."""
        if threading.current_thread() is not threading.main_thread():
            return
        deadline = time.monotonic() + self.run_loop_interval
        with _lock:
            while not _pending:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                _lock.wait(remaining)
        _deliver_pending()

    def add_observer(self, notification: SyphonServerNotification, handler) -> None:
        raise NotImplementedError("the bridge does not observe directory notifications")

    def servers_matching_name(self, name=None, app_name=None) -> list[SyphonServerDescription]:
        return [server for server in self.servers
                if (name is not None and name == server.name) or (app_name is not None and app_name == server.app_name)]


# ------------------------------------------------------------------ syphon.server


def _bgra_surface(texture: _Texture, region, is_flipped: bool) -> np.ndarray:
    x, y, width, height = region
    pixels = texture._bytes[y:y + height, x:x + width]
    if texture.pixelFormat() == MTLPixelFormatRGBA8Unorm:
        pixels = pixels[..., [2, 1, 0, 3]]
    elif texture.pixelFormat() != MTLPixelFormatBGRA8Unorm:
        raise ValueError(f"unsupported texture pixel format {texture.pixelFormat()}")
    return np.ascontiguousarray(pixels[::-1] if is_flipped else pixels)


class SyphonMetalServer:
    def __init__(self, name: str, device: Any = None, command_queue: Any = None) -> None:
        self.name = name
        self.device = device if device is not None else MTLCreateSystemDefaultDevice()
        self.command_queue = command_queue if command_queue is not None else self.device.newCommandQueue()
        self.context = object()  # the Objective-C SyphonMetalServer
        self._uuid = f"info.v002.Syphon.{uuid_module.uuid4()}"
        self._raw = {"SyphonServerDescriptionUUIDKey": self._uuid, "SyphonServerDescriptionNameKey": name,
                     "SyphonServerDescriptionAppNameKey": app_name, "SyphonServerDescriptionIconKey": None}
        with _lock:
            _servers[self._uuid] = {"raw": self._raw, "alive": True, "surface": None, "frame": 0, "clients": 0}
        _post("announce", self._raw)

    def publish_frame_texture(self, texture, region=None, size=None, is_flipped: bool = False,
                              command_buffer=None, auto_commit: bool = True) -> None:
        size = (texture.width(), texture.height()) if size is None else size
        region = (0, 0, *size) if region is None else region
        if command_buffer is None:
            command_buffer = self.command_queue.commandBuffer()
        surface = _bgra_surface(texture, region, is_flipped)
        if auto_commit:
            command_buffer.commitAndWaitUntilSubmitted()
        with _lock:  # Syphon publishes in the command buffer's completed handler
            entry = _servers[self._uuid]
            if entry["alive"]:
                entry["surface"] = surface
                entry["frame"] += 1

    def publish(self) -> None:
        pass

    def stop(self) -> None:
        with _lock:
            entry = _servers.get(self._uuid)
            if entry is None or not entry["alive"]:
                return
            entry["alive"] = False
        _post("retire", self._raw)

    @property
    def has_clients(self) -> bool:
        with _lock:
            return _servers[self._uuid]["clients"] > 0


# ------------------------------------------------------------------ syphon.client


class SyphonMetalClient:
    def __init__(self, description: SyphonServerDescription, device: Any = None) -> None:
        global clients_open
        self._description = description
        self.device = device if device is not None else MTLCreateSystemDefaultDevice()
        self.context = object()  # the Objective-C SyphonMetalClient
        self._uuid = description.raw["SyphonServerDescriptionUUIDKey"]
        self._stopped = False
        self._last_frame = 0
        with _lock:
            entry = _servers.get(self._uuid)
            self._connected = entry is not None and entry["alive"]
            if self._connected:
                entry["clients"] += 1
            clients_open += 1

    def _entry(self) -> dict | None:
        entry = _servers.get(self._uuid)
        return entry if entry is not None and not self._stopped else None

    @property
    def is_valid(self) -> bool:
        with _lock:
            entry = self._entry()
            return self._connected and entry is not None and (entry["alive"] or entry.get("silent", False))

    @property
    def has_new_frame(self) -> bool:
        with _lock:
            entry = self._entry()
            return entry is not None and entry["alive"] and entry["frame"] != self._last_frame

    @property
    def new_frame_image(self):
        with _lock:
            entry = self._entry()
            if entry is None or not entry["alive"] or entry["surface"] is None:
                return None
            self._last_frame = entry["frame"]
            surface = entry["surface"]
        texture = _Texture(MTLPixelFormatBGRA8Unorm, surface.shape[1], surface.shape[0])
        texture._bytes[:] = surface
        return texture

    def stop(self) -> None:
        global clients_open
        with _lock:
            if self._stopped:
                return
            self._stopped = True
            clients_open -= 1
            entry = _servers.get(self._uuid)
            if self._connected and entry is not None:
                entry["clients"] -= 1


# ------------------------------------------------------------------ syphon.utils.raw and syphon.utils.numpy


def create_mtl_texture(device, width: int, height: int, pixel_format: int = MTLPixelFormatRGBA8Unorm):
    descriptor = _TextureDescriptor.texture2DDescriptorWithPixelFormat_width_height_mipmapped_(pixel_format, width, height, False)
    return device.newTextureWithDescriptor_(descriptor)


def copy_bytes_to_mtl_texture(data, texture) -> None:
    region = MTLRegion((0, 0, 0), (texture.width(), texture.height(), 1))
    texture.replaceRegion_mipmapLevel_withBytes_bytesPerRow_(region, 0, data, texture.width() * 4)


def copy_mtl_texture_to_bytes(texture, buffer=None) -> bytes:
    if texture.pixelFormat() not in (MTLPixelFormatBGRA8Unorm, MTLPixelFormatRGBA8Unorm):
        raise Exception("Not correct pixel format (expected MTLPixelFormatBGRA8Unorm or MTLPixelFormatRGBA8Unorm)")
    bytes_per_row = texture.width() * 4
    bytes_per_image = bytes_per_row * texture.height()
    buffer = bytearray(bytes_per_image) if buffer is None else buffer
    if len(buffer) != bytes_per_image:
        raise Exception(f"Buffer is not big enough (expected: {bytes_per_image}, actual: {len(buffer)})")
    texture.getBytes_bytesPerRow_bytesPerImage_fromRegion_mipmapLevel_slice_(
        buffer, bytes_per_row, bytes_per_image, MTLRegionMake2D(0, 0, texture.width(), texture.height()), 0, 0)
    return bytes(buffer)


def copy_image_to_mtl_texture(image: np.ndarray, texture) -> None:
    assert len(image.shape) == 3, "Image has to be of shape (m, n, 4)"
    assert image.shape[2] == 4, "Image has to be of shape (m, n, 4)"
    copy_bytes_to_mtl_texture(image.tobytes(), texture)


def copy_mtl_texture_to_image(texture) -> np.ndarray:
    image = np.frombuffer(copy_mtl_texture_to_bytes(texture), dtype=np.uint8)  # read-only, as in 0.2.0
    return image.reshape((texture.height(), texture.width(), 4))


# ------------------------------------------------------------------ the modules, for sys.modules


def _module(name: str, **members) -> types.ModuleType:
    module = types.ModuleType(name)
    for key, value in members.items():
        setattr(module, key, value)
    return module


_server_directory = _module("syphon.server_directory", SyphonServerDirectory=SyphonServerDirectory,
                            SyphonServerDescription=SyphonServerDescription,
                            SyphonServerNotification=SyphonServerNotification)
_raw = _module("syphon.utils.raw", create_mtl_texture=create_mtl_texture, copy_bytes_to_mtl_texture=copy_bytes_to_mtl_texture,
               copy_mtl_texture_to_bytes=copy_mtl_texture_to_bytes)
_numpy = _module("syphon.utils.numpy", copy_image_to_mtl_texture=copy_image_to_mtl_texture,
                 copy_mtl_texture_to_image=copy_mtl_texture_to_image)
_utils = _module("syphon.utils", raw=_raw, numpy=_numpy)
syphon = _module("syphon", SyphonMetalServer=SyphonMetalServer, SyphonMetalClient=SyphonMetalClient,
                 SyphonServerDirectory=SyphonServerDirectory, SyphonServerDescription=SyphonServerDescription,
                 SyphonServerNotification=SyphonServerNotification, utils=_utils,
                 server=_module("syphon.server", SyphonMetalServer=SyphonMetalServer),
                 client=_module("syphon.client", SyphonMetalClient=SyphonMetalClient),
                 server_directory=_server_directory)

MODULES = {"syphon": syphon, "syphon.server": syphon.server, "syphon.client": syphon.client,
           "syphon.server_directory": _server_directory, "syphon.utils": _utils, "syphon.utils.raw": _raw,
           "syphon.utils.numpy": _numpy, "Metal": Metal, "objc": objc}
