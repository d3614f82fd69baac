"""Give back a thread's idle OpenMP workers, so the inference thread runs at full speed on a CPU.

torch's CPU kernels run on OpenMP. GNU libgomp keeps a pool of worker threads for every thread
that ever started a parallel region, and while more OpenMP threads exist than CPUs it stops
spin-waiting between regions: each small kernel then pays a sleep and a wake-up. The engine is
built (and warmed up) on the main thread but runs on the inference thread, which makes two
pools; measured on 2 cores, tiny model, 2 steps, 256x256: 155 ms a frame in a thread against
120 ms on the main thread, and the same again once the main thread's pool is given back.

`omp_pause_resource_all(omp_pause_soft)` (OpenMP 5.0) frees the calling thread's pool in
libgomp; the next parallel region on that thread simply makes a new one. Only libgomp (the
runtime torch's Linux wheels ship) is touched: LLVM's libomp pauses every thread of the process
instead, which would be wrong while the inference thread runs.
"""

from __future__ import annotations

import ctypes
import logging
import re
import sys
import threading

log = logging.getLogger(__name__)

OMP_PAUSE_SOFT = 1  # omp_pause_resource_t: keep the runtime initialised, free the threads
_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_looked = False


def _libgomp() -> ctypes.CDLL | None:
    """libgomp as loaded into this process (by torch), or None when there is none."""
    global _library, _looked
    with _lock:
        if not _looked:
            _looked = True
            _library = _find_libgomp()
        return _library


def _find_libgomp() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            paths = sorted(set(re.findall(r"(/\S*/libgomp[^/\s]*\.so[^/\s]*)", maps.read())))
    except OSError:
        return None
    for path in paths:
        try:
            library = ctypes.CDLL(path)  # already loaded: this only finds it
            library.omp_pause_resource_all.argtypes = [ctypes.c_int]
            library.omp_pause_resource_all.restype = ctypes.c_int
            return library
        except (OSError, AttributeError):  # an old libgomp without OpenMP 5.0's pause
            continue
    return None


def release_idle_workers() -> bool:
    """Free the OpenMP worker pool of the calling thread (libgomp only); True when it did.
    Safe to call at any time outside a parallel region: other threads' pools are not touched."""
    library = _libgomp()
    if library is None:
        return False
    try:
        return library.omp_pause_resource_all(OMP_PAUSE_SOFT) == 0
    except Exception as exc:  # never worth stopping a show for
        log.debug("omp_pause_resource_all failed: %s", exc)
        return False
