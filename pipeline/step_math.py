"""The arithmetic of a step between its modules, plain or fused.

Between the VAE and UNet calls a frame runs a few dozen small tensor operations: the 8-bit input
to [-1, 1], the noising, the guidance and LCM arithmetic after the UNet, the virtual residual
noise, the bad-output check and the conversion back to 8 bits. Plain, each line is a kernel or
two (about 40 kernels a frame for sd-turbo's 1 step, 60 or more for 4 steps with RCFG); inside a
step graph on a GPU they cost a few microseconds each, about 0.1 ms of a 5.9 ms frame. Fused
(the compiled backend's `fuse_math` option), each function below goes through torch.compile,
so inductor makes each one or two kernels.

Every function is pure (tensors and constants in, tensors out) and the stream calls them
through one `StepMath`, so plain and fused run the same code. Fused functions compile for each
shape they meet (dynamic=False, like the modules): the stream runs them for every readied
configuration before frames flow (a step graph's capture does, or `StreamDiffusion.warm_up`'s
dry run of the step without one), and `StreamDiffusion.ready` runs them for a new step count or
size on its own thread beside the frames (a dry run on a copy of the stream), so no frame waits
for a compilation.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from typing import Callable

import torch

from .errors import innermost_line
from .faults import keep_good
from .frames import pixels_to_images, to_pixels
from .guidance import guided_x0, next_stock_noise
from .schedule import add_noise

log = logging.getLogger(__name__)


def pixels_out(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> contiguous (B, H, W, 3) uint8: what a step graph hands out."""
    return to_pixels(images).contiguous()


@dataclass(frozen=True)
class StepMath:
    """The step's arithmetic, each plain or compiled (see the module docstring)."""

    add_noise: Callable
    guided_x0: Callable
    next_stock_noise: Callable
    keep_good: Callable
    pixels_to_images: Callable
    pixels_out: Callable
    fused: bool = False


PLAIN = StepMath(add_noise, guided_x0, next_stock_noise, keep_good, pixels_to_images, pixels_out)


class FusedOrPlain:
    """A compiled function that falls back to the plain one, for good and said once, when the
    compiler fails on it (the step then runs that part as written, never stops).

    `compiling_elsewhere()`, when given, says whether another thread is compiling beside the
    frames (`StreamDiffusion.ready`): this thread's calls then use the graphs compiled so far
    only, and a call none of them takes runs as written at once, instead of waiting on dynamo's
    process-wide compile lock for the other thread's whole compilation."""

    def __init__(self, name: str, compiled: Callable, plain: Callable,
                 compiling_elsewhere: Callable[[], bool] | None = None) -> None:
        self.name, self.compiled, self.plain = name, compiled, plain
        self.failed: str | None = None  # the compiler's error, once it failed
        self._compiling_elsewhere = compiling_elsewhere
        self._cached_only = torch._dynamo.run(compiled) if compiling_elsewhere is not None else None

    def __call__(self, *args, **kwargs):
        if self.failed is None:
            compiled = self.compiled
            if self._compiling_elsewhere is not None and self._compiling_elsewhere():
                compiled = self._cached_only
            try:
                return compiled(*args, **kwargs)
            except torch._dynamo.exc.TorchDynamoException as exc:  # tracing or the compiler failed (dynamo is
                # loaded by then: torch.compile made `compiled`)
                self.failed = innermost_line(exc)
                log.warning("fused step math: %s could not be compiled (%s); it runs as written", self.name, self.failed)
                log.debug("fused step math: %s", self.name, exc_info=exc)
        return self.plain(*args, **kwargs)


def fused(compile_function: Callable[[Callable], Callable],
          compiling_elsewhere: Callable[[], bool] | None = None) -> StepMath:
    """PLAIN's functions, each through `compile_function` (e.g. functools.partial(torch.compile, ...));
    `compiling_elsewhere`: see FusedOrPlain."""
    compiled = {}
    for field in fields(StepMath):
        if field.name != "fused":
            plain = getattr(PLAIN, field.name)
            compiled[field.name] = FusedOrPlain(field.name, compile_function(plain), plain, compiling_elsewhere)
    return StepMath(**compiled, fused=True)
