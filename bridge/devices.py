"""What this machine can use: each check returns (name, available, detail) and never raises."""

from __future__ import annotations

import glob
import importlib
import importlib.util
import os
import sys


def check_gpu() -> tuple[str, bool, str]:
    try:
        import torch
    except ImportError as exc:
        return "GPU", False, f"torch is not installed ({exc})"
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        return "GPU", True, f"CUDA {torch.version.cuda}: {', '.join(names)}"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "GPU", True, ("Apple MPS; the engine uses the CPU unless told --device mps "
                             "(not tested on MPS: sdbridge's tests and benchmarks run on CPUs and NVIDIA GPUs)")
    reason = "torch was built without CUDA" if torch.version.cuda is None else "no CUDA device visible"
    return "GPU", False, f"{reason}; the engine runs on the CPU (slow, fine for the demo)"


def check_compile() -> tuple[str, bool, str]:
    """Whether `--backend compiled` can run: torch.compile in this interpreter, and a C++ compiler
    for inductor's CPU kernels (CUDA kernels come from triton)."""
    import shutil

    import torch

    from pipeline.backends.compiled import compile_unavailable_reason

    reason = compile_unavailable_reason()
    if reason is not None:
        return "torch.compile", False, f"{reason}; use --backend eager"
    if torch.cuda.is_available():
        if importlib.util.find_spec("triton") is None:
            return "torch.compile", False, "triton is not installed: inductor needs it for CUDA kernels"
        return "torch.compile", True, "--backend compiled can run on CUDA (triton)"
    compiler = next((name for name in ("c++", "g++", "clang++", "cl") if shutil.which(name)), None)
    if compiler is None:
        return "torch.compile", False, "no C++ compiler on PATH for inductor's CPU kernels; --backend compiled needs one"
    return "torch.compile", True, f"--backend compiled can run (C++ compiler: {compiler})"


def check_tensorrt() -> tuple[str, bool, str]:
    try:
        tensorrt = importlib.import_module("tensorrt")
    except ImportError:
        return "TensorRT", False, "not installed (pip install 'sdbridge[tensorrt]' on a CUDA machine)"
    except Exception as exc:  # a broken install raises all sorts
        return "TensorRT", False, f"import failed: {exc}"
    return "TensorRT", True, f"version {getattr(tensorrt, '__version__', '?')}"


def check_spout() -> tuple[str, bool, str]:
    from .transports.base import TransportUnavailable
    from .transports.spout import import_spoutgl

    try:
        import_spoutgl()
    except TransportUnavailable as exc:
        return "Spout", False, str(exc)
    return "Spout", True, "SpoutGL installed"


def check_syphon() -> tuple[str, bool, str]:
    from .transports.base import TransportUnavailable
    from .transports.syphon import import_syphon, metal_device

    try:
        device = metal_device(import_syphon())
    except TransportUnavailable as exc:
        return "Syphon", False, str(exc)
    return "Syphon", True, f"syphon-python installed, Metal device {device.name()}"


def check_ndi() -> tuple[str, bool, str]:
    from .transports.base import TransportUnavailable
    from .transports.ndi import import_cyndilib

    try:
        cyndilib = import_cyndilib()
    except TransportUnavailable as exc:
        return "NDI", False, str(exc)
    return "NDI", True, f"cyndilib {getattr(cyndilib, '__version__', '')} (NDI runtime bundled)".replace("  ", " ")


def check_virtualcam() -> tuple[str, bool, str]:
    from .transports.base import TransportUnavailable
    from .transports.virtualcam import import_pyvirtualcam

    try:
        pyvirtualcam = import_pyvirtualcam()
    except TransportUnavailable as exc:
        return "virtual camera", False, str(exc)
    backends = list(pyvirtualcam.camera.BACKENDS)
    if not backends:
        return "virtual camera", False, f"pyvirtualcam has no backend on {sys.platform}"
    if sys.platform.startswith("linux"):
        loopbacks = [path for path in sorted(glob.glob("/sys/devices/virtual/video4linux/video*"))]
        if not loopbacks:
            return "virtual camera", False, "no v4l2loopback device: run `sudo modprobe v4l2loopback devices=1 exclusive_caps=1`"
        names = ", ".join("/dev/" + os.path.basename(path) for path in loopbacks)
        return "virtual camera", True, f"v4l2loopback: {names}"
    return "virtual camera", True, f"backends: {', '.join(backends)} (the OBS Virtual Camera must be installed)"


def check_cameras() -> tuple[str, bool, str]:
    if sys.platform.startswith("linux"):
        found = sorted(glob.glob("/dev/video*"))
        return "cameras", bool(found), ", ".join(found) if found else "no /dev/video* device"
    return "cameras", True, "listed by the OS (camera:NAME on Windows, camera:INDEX on macOS)"


def check_window() -> tuple[str, bool, str]:
    from .transports.base import TransportUnavailable
    from .transports.window import check_display, import_tkinter

    try:
        check_display()
        tkinter = import_tkinter()
    except TransportUnavailable as exc:
        return "window", False, str(exc).removeprefix("window: ")
    return "window", True, f"Tk {tkinter.TkVersion} (a preview window can open)"


def check_mdns() -> tuple[str, bool, str]:
    from .control.mdns import zeroconf_problem

    problem = zeroconf_problem()
    if problem:
        return "mDNS", False, problem.removeprefix("zeroconf: ")
    import zeroconf

    return "mDNS", True, f"python-zeroconf {zeroconf.__version__} (--zeroconf: OSCQuery clients find the bridge)"


CHECKS = (
    check_gpu, check_compile, check_tensorrt, check_spout, check_syphon, check_ndi, check_virtualcam, check_cameras,
    check_window, check_mdns,
)


def report() -> list[tuple[str, bool, str]]:
    """Every check's result; a check that raises becomes an unavailable line, never a traceback."""
    results = []
    for check in CHECKS:
        try:
            results.append(check())
        except Exception as exc:
            results.append((check.__name__.removeprefix("check_"), False, f"check failed: {type(exc).__name__}: {exc}"))
    return results
