"""fp8 (e4m3) matrix multiplications for the UNet's transformer layers (Hopper and Ada GPUs).

At 512x512 the linear layers of the UNet's transformer blocks (attention projections, the
feed-forward GEGLU, proj_in/proj_out in SD 2.x) are a large share of the arithmetic, and
`torch._scaled_mm` runs them at twice the fp16 matrix rate on compute capability 8.9 and up.
Each such nn.Linear becomes an `Fp8Linear`: the weight quantized once to e4m3, with a scale per
output channel; the input quantized at each call with a scale per row (per token); the product
in fp8, scaled back by both and returned in the input's dtype. Per-row scales need no reduction
over the whole input before the first row can be cast: compiled, each row's scale and its cast
fuse into the kernel that made the row (a LayerNorm, the GEGLU), where one scale for the whole
tensor (`scaling="tensor"`, the first method, measured slower than fp16 for sd-turbo on an
H200) costs a reduction kernel and a cast kernel per layer.

What is not converted: the cross-attention to_k/to_v (the K/V cache runs them once per
prompt, not per frame), everything outside the transformer blocks (convolutions, the time
embedding, whose few rows gain nothing), and a layer whose sizes are not multiples of 16
(what fp8 matrix kernels need). A call whose number of rows is not a multiple of 16 runs the
dequantized weight in the input's dtype instead.

Quality: fp8 keeps about two significant digits, so outputs change; `sdbridge bench --fp8`
measures the change of the output frames against the same model without fp8.

Measured on an H200 at 512x512 (README, Backends): it pays neither way. Per row, sd15's 4-step
UNet (16,384 rows a layer) spent 0.26 ms less a frame in its matrix products but 1.37 ms more in
fused kernels, most of it the quantization after the GEGLU, which inductor compiled as a looped
reduction that computes the GEGLU twice; 81.0 fps against 88.2.
"""

from __future__ import annotations

import copy
import logging

import torch
import torch.nn.functional as F

from .attention import unfuse_self_attention
from .errors import innermost_line

log = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
ALIGN = 16  # fp8 matrix kernels want every size a multiple of this
MIN_CAPABILITY = (8, 9)  # Ada and Hopper have fp8 tensor cores
SCALINGS = ("row", "tensor")  # a scale per row (input) and per output channel (weight); one per tensor
SKIPPED = ("attn2.to_k", "attn2.to_v")  # cross-attention K/V: once per prompt (pipeline/attention.py)


def quantize(tensor: torch.Tensor, *, rows: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 tensor, float32 scale) with tensor ~= e4m3 * scale: one scale for the whole tensor
    (0-d), or with `rows` one per row of a 2-d tensor ((rows, 1))."""
    magnitude = tensor.detach().abs()
    amax = magnitude.amax(dim=-1, keepdim=True) if rows else magnitude.amax()
    scale = amax.float().clamp(min=1e-12) / FP8_MAX
    return (tensor.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


class Fp8Linear(torch.nn.Module):
    """An nn.Linear whose weight is stored in e4m3 and multiplied with `torch._scaled_mm`.

    `scaling`: "row" (a scale per input row and per output channel) or "tensor" (one each);
    `out_dtype`: what _scaled_mm returns (None: the input's dtype; some GPUs' row-scaled kernels
    return bfloat16 only, cast back here); `fast_accum`: Hopper's faster fp8 accumulation."""

    def __init__(self, linear: torch.nn.Linear, *, scaling: str = "row", out_dtype: torch.dtype | None = None,
                 fast_accum: bool = False) -> None:
        super().__init__()
        if scaling not in SCALINGS:
            raise ValueError(f"fp8 scaling must be one of {', '.join(SCALINGS)}, not {scaling!r}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.scaling, self.out_dtype, self.fast_accum = scaling, out_dtype, fast_accum
        weight, scale = quantize(linear.weight.data, rows=scaling == "row")
        self.register_buffer("weight", weight)  # (out, in) e4m3; .t() is the column-major operand _scaled_mm takes
        self.register_buffer("weight_scale", scale.reshape(1, -1).contiguous() if scaling == "row" else scale)  # (1, out) or 0-d
        self.register_buffer("bias", None if linear.bias is None else linear.bias.data.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if rows % ALIGN:  # fp8 kernels need aligned sizes: the dequantized weight, in x's dtype
            return F.linear(x, self.dequantized_weight().to(x.dtype), self.bias)
        x_q, x_scale = self.quantized_rows(x)
        out = torch._scaled_mm(x_q, self.weight.t(), scale_a=x_scale, scale_b=self.weight_scale,
                               out_dtype=self.out_dtype or x.dtype, use_fast_accum=self.fast_accum)
        if out.dtype != x.dtype:
            out = out.to(x.dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)

    def quantized_rows(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x as (rows, in_features) in e4m3, row-major whatever x's layout (CUDA's _scaled_mm
        refuses another: the channels_last UNet hands this layer transposed views), and its scale
        ((rows, 1), or 0-d with scaling "tensor")."""
        return quantize(x.reshape(-1, self.in_features).contiguous(), rows=self.scaling == "row")

    def dequantized_weight(self) -> torch.Tensor:
        """The weight back in float32, (out, in)."""
        return self.weight.float() * self.weight_scale.reshape(-1, 1)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, e4m3, scaling={self.scaling}"


def kernel_settings(device: torch.device, dtype: torch.dtype, scaling: str) -> tuple[torch.dtype | None, bool]:
    """(out_dtype, fast_accum) for Fp8Linear on `device` with inputs of `dtype`: on CUDA fp8's fast
    accumulation, and for row scaling the dtype this torch and GPU's kernel can return (cuBLAS on
    Hopper returns float16; older paths bfloat16 only: tried once here on a 16x16 product)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None, False
    if scaling != "row":
        return None, True
    ones = torch.ones(16, 16, device=device).to(FP8)
    row_scales = torch.ones(16, 1, device=device)
    try:
        torch._scaled_mm(ones, ones.t(), scale_a=row_scales, scale_b=row_scales.t().contiguous(), out_dtype=dtype,
                         use_fast_accum=True)
        return None, True
    except (RuntimeError, ValueError) as exc:
        log.info("fp8: row-scaled products return bfloat16 here (%s); cast back to %s", innermost_line(exc, 160), dtype)
        return torch.bfloat16, True


def fp8_unavailable_reason(device: torch.device) -> str | None:
    """Why fp8 matrix multiplications cannot run on `device`, or None. On a CPU they run (torch's
    reference kernels: slow, for tests); on CUDA they need compute capability 8.9 or newer."""
    if not hasattr(torch, "_scaled_mm"):
        return f"torch {torch.__version__} has no torch._scaled_mm"
    device = torch.device(device)
    if device.type == "cuda":
        capability = torch.cuda.get_device_capability(device)
        if capability < MIN_CAPABILITY:
            return (f"{torch.cuda.get_device_name(device)} has compute capability {capability[0]}.{capability[1]}; "
                    f"fp8 needs {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or newer (Ada, Hopper)")
        return None
    if device.type != "cpu":
        return f"fp8 runs on CUDA (and on the CPU for tests), not on {device.type}"
    return None


def convertible(name: str, module: torch.nn.Module) -> bool:
    """Whether the UNet's module `name` becomes an Fp8Linear (see the module docstring)."""
    return (
        type(module) is torch.nn.Linear
        and ".attentions." in f".{name}"
        and not name.endswith(SKIPPED)
        and module.in_features % ALIGN == 0
        and module.out_features % ALIGN == 0
    )


def fp8_unet(unet: torch.nn.Module, scaling: str = "row") -> tuple[torch.nn.Module, int]:
    """A copy of `unet` with every convertible linear layer in fp8 (`scaling`: see Fp8Linear), and
    how many were converted. The original is left as it is (other engines may share it), and the
    copy shares its tensors: only the fp8 weights are new memory (see `_sharing_copy`)."""
    if scaling not in SCALINGS:
        raise ValueError(f"backend_options: fp8_scaling must be one of {', '.join(SCALINGS)}, not {scaling!r}")
    first = next(unet.parameters())
    out_dtype, fast_accum = kernel_settings(first.device, first.dtype, scaling)
    names = [name for name, module in unet.named_modules() if convertible(name, module)]
    converted = _sharing_copy(unet)
    # an engine with fuse_qkv on the same model fused its self-attention: the copy's fused
    # projections would stay in 16 bits, so it gets its three projections back, converted below
    # (as views of the shared fused weights, which the conversion only reads)
    if unfuse_self_attention(converted, own_weights=False):
        log.info("fp8: the UNet's fused self-attention projections separated again in the fp8 copy")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = converted.get_submodule(parent_name)
        setattr(parent, child, Fp8Linear(getattr(parent, child), scaling=scaling, out_dtype=out_dtype,
                                         fast_accum=fast_accum))
    log.info("fp8: %d linear layers of the UNet in e4m3, scaled per %s", len(names), scaling)
    return converted, len(names)


def _sharing_copy(unet: torch.nn.Module) -> torch.nn.Module:
    """A copy of `unet`'s modules (and attention processors) holding the very same parameter,
    buffer and fused-projection tensors: replacing a layer of the copy leaves the original as it
    is, and the copy costs no second set of weights (sd15's UNet is 1.7 GB in fp16). What changes
    a shared tensor in place (a channels_last conversion) changes it for both, as it would for
    two engines on one model."""
    shared = [*unet.parameters(), *unet.buffers()]
    for module in unet.modules():
        processor = getattr(module, "processor", None)
        shared += [value for value in getattr(processor, "__dict__", {}).values() if isinstance(value, torch.Tensor)]
    return copy.deepcopy(unet, memo={id(tensor): tensor for tensor in shared})
