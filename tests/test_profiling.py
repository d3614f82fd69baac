"""`sdbridge bench --profile N`: the kinds given to kernel and operator names (GPU names of the
forms cuDNN, cuBLAS, flash attention and inductor give their kernels; operator names as this
CPU's profile shows them), the per-frame arithmetic, and a real profile of the tiny engine on
this CPU (the CLI's is in test_bench). And the kernel choices (`--sdpa`, `--cudnn-benchmark`)."""

from types import SimpleNamespace

import pytest

from bridge.profiling import (TOP, TOP_PER_KIND, busy_us, device_intervals, kind_of, profile_line, stage_times,
                               summarize_times)

from test_cli import sdbridge


@pytest.mark.parametrize("name, kind", [
    ("sm90_xmma_fprop_implicit_gemm_f16f16_f16f32_f32_nhwckrsc_nhwc_tilesize128x128x64", "convolution"),
    ("nvjet_hsh_128x256_64x4_2x1_v_bz_coopA_NNT", "matrix product"),
    ("sm90_xmma_gemm_f16f16_f16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1", "matrix product"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 64, 4>, false>(Flash_fwd_params)",
     "attention"),
    ("triton_poi_fused_add_convolution_silu_3", "fused (inductor)"),  # a conv's bias and activation, not a conv
    ("triton_red_fused_native_group_norm_0", "fused (inductor)"),
    ("triton_tem_fused_mm_7", "matrix product"),  # a template matmul (max-autotune)
    ("## Call CompiledFxGraph fdn7ixvxl7nxgfkzwv2nuqhmbe3ug35xpet35zpds7y4d3ngvn52 ##", "fused (inductor)"),  # CPU
    ("Memcpy HtoD (Pinned -> Device)", "copy"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::Half>>", "elementwise"),
    ("void at::native::(anonymous namespace)::RowwiseMomentsCUDAKernel<c10::Half, float>", "normalisation"),
    ("void at::native::(anonymous namespace)::cunn_SoftMaxForward<8, c10::Half, float>", "attention"),
    ("aten::mkldnn_convolution", "convolution"),
    ("aten::addmm", "matrix product"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
    ("aten::native_group_norm", "normalisation"),
    ("aten::copy_", "copy"),
    ("aten::empty", "other"),
])
def test_kernel_and_operator_names_get_their_kind(name, kind):
    assert kind_of(name) == kind


def test_times_are_per_frame_by_kind_and_largest_first():
    entries = [("aten::addmm", 3000.0, 40), ("aten::mkldnn_convolution", 5000.0, 20), ("aten::mm", 1000.0, 20),
               ("aten::empty", 1000.0, 200)]
    summary = summarize_times(entries, frames=10)
    assert summary["ms_per_frame"] == pytest.approx(1.0)
    assert [(k["kind"], k["ms_per_frame"]) for k in summary["by_kind"]] == [
        ("convolution", pytest.approx(0.5)), ("matrix product", pytest.approx(0.4)), ("other", pytest.approx(0.1))]
    assert sum(k["share"] for k in summary["by_kind"]) == pytest.approx(1.0)
    assert [t["name"] for t in summary["top"]] == ["aten::mkldnn_convolution", "aten::addmm", "aten::mm", "aten::empty"]
    assert summary["top"][1]["calls_per_frame"] == 4.0
    many = summarize_times([(f"k{n}", float(n), 1) for n in range(TOP + 5)], frames=1)
    assert len(many["top"]) == TOP and many["top"][0]["name"] == f"k{TOP + 4}"
    assert list(many["top_by_kind"]) == ["other"] and len(many["top_by_kind"]["other"]) == TOP_PER_KIND
    fused = [(f"triton_per_fused_native_group_norm_{n}", 100.0 - n, 2) for n in range(TOP + 3)]
    mixed = summarize_times(fused + [("sm90_xmma_fprop_implicit_gemm_f16", 1000.0, 20)], frames=2)
    assert [t["name"] for t in mixed["top_by_kind"]["fused (inductor)"]] == [name for name, _, _ in fused[:TOP_PER_KIND]]
    assert mixed["top_by_kind"]["convolution"] == [mixed["top"][0]] and mixed["top"][0]["calls_per_frame"] == 10.0
    assert summarize_times([], frames=3)["by_kind"] == []
    with pytest.raises(ValueError, match="frames must be >= 1"):
        summarize_times(entries, frames=0)


def test_bench_profiles_the_engine_it_timed(tiny_components):
    from bridge.benchmarking import BenchSettings, run_benchmark

    settings = BenchSettings(arch="tiny", steps=2, width=32, height=32, frames=4, warmup=2, device="cpu", profile_frames=3)
    (result,) = run_benchmark(settings, components=tiny_components)
    profile = result["profile"]
    assert profile["frames"] == 3 and profile["source"] == "cpu operators (own time)"
    kinds = {k["kind"]: k["ms_per_frame"] for k in profile["by_kind"]}
    assert kinds["convolution"] > 0 and kinds["matrix product"] > 0 and kinds["attention"] > 0  # the UNet and VAE ran
    assert 0 < profile["ms_per_frame"] == pytest.approx(sum(kinds.values()))
    times = [t["ms_per_frame"] for t in profile["top"]]
    assert times == sorted(times, reverse=True) and all(t["name"].startswith("aten::") for t in profile["top"])
    assert profile["wall_ms_per_frame"] > 0
    stages = {s["stage"]: s["ms_per_frame"] for s in profile["by_stage"]}  # no step graph on a CPU: the ranges ran
    assert set(stages) == {"encode", "denoise", "decode"} and min(stages.values()) > 0
    assert sum(stages.values()) < profile["wall_ms_per_frame"]
    assert "by stage encode" in profile_line(profile)


def test_stage_times_sum_the_cpu_ranges_and_skip_their_gpu_annotations():
    import torch

    cpu, cuda = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA
    event = lambda name, device, gpu_us, cpu_us: SimpleNamespace(  # noqa: E731
        name=name, device_type=device, device_time_total=gpu_us, cpu_time_total=cpu_us)
    events = [event("sdbridge.denoise", cpu, 900.0, 40.0), event("sdbridge.denoise", cpu, 1000.0, 50.0),
              event("sdbridge.denoise", cuda, 5000.0, 0.0),  # the GPU-side span of the same range: idle time too
              event("sdbridge.decode", cpu, 300.0, 20.0), event("aten::conv2d", cpu, 200.0, 10.0)]
    assert stage_times(events, "sdbridge.", on_cuda=True) == {"denoise": 1900.0, "decode": 300.0}
    assert stage_times(events, "sdbridge.", on_cuda=False) == {"denoise": 90.0, "decode": 20.0}


def test_busy_time_counts_kernels_side_by_side_once():
    assert busy_us([]) == 0.0
    assert busy_us([(0.0, 10.0), (20.0, 25.0)]) == 15.0  # one after another, a gap between
    assert busy_us([(0.0, 10.0), (4.0, 6.0), (8.0, 14.0), (14.0, 15.0)]) == 15.0  # inside, overlapping, touching
    assert busy_us([(30.0, 40.0), (0.0, 10.0), (5.0, 35.0)]) == 40.0  # in any order


def test_device_intervals_are_the_kernels_not_the_ranges_or_cpu_work():
    import torch
    from torch.autograd.profiler_util import FunctionEvent

    cpu, cuda = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA
    events = [
        FunctionEvent(1, "sm90_xmma_fprop_implicit_gemm", 0, 10.0, 30.0, device_type=cuda),
        FunctionEvent(2, "triton_poi_fused_silu_0", 0, 25.0, 40.0, device_type=cuda),  # beside it (a side stream)
        FunctionEvent(3, "sdbridge.decode", 0, 0.0, 100.0, device_type=cuda),  # a stage's GPU-side span
        FunctionEvent(4, "my range", 0, 0.0, 90.0, device_type=cuda, is_user_annotation=True),
        FunctionEvent(5, "aten::conv2d", 0, 5.0, 50.0, device_type=cpu),
    ]
    intervals = device_intervals(events, "sdbridge.")
    assert intervals == [(10.0, 30.0), (25.0, 40.0)]
    assert busy_us(intervals) == 30.0  # of 35 µs of kernels: 5 side by side
    profile = {"source": "cuda kernels", "ms_per_frame": 0.035, "wall_ms_per_frame": 0.1, "by_kind": [],
               "top": [], "busy_ms_per_frame": 0.03, "side_by_side_ms_per_frame": 0.005}
    assert "GPU busy 0.03 ms (0.01 side by side)" in profile_line(profile)


def test_kernel_entries_leave_out_the_gpu_spans_of_annotations_and_stages():
    """Inductor's "## Call CompiledFxGraph ##" range has a GPU-side span covering its kernels: summed
    with them it doubled the kernel time and made up a "side by side" share."""
    import torch
    from torch.autograd.profiler_util import FunctionEvent, FunctionEventAvg

    from bridge.profiling import kernel_entries

    cpu, cuda = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA

    def average(name, microseconds, **kind):
        event = FunctionEventAvg()
        event.add(FunctionEvent(1, name, 0, 0.0, microseconds, **kind))
        event.self_device_time_total = microseconds  # (the profiler sums its kernels' time here)
        return event

    averages = [average("sm90_xmma_fprop_implicit_gemm", 20.0, device_type=cuda),
                average("triton_poi_fused_silu_0", 10.0, device_type=cuda),
                average("## Call CompiledFxGraph abc ##", 30.0, device_type=cuda, is_user_annotation=True),
                average("sdbridge.unet", 30.0, device_type=cuda),
                average("aten::conv2d", 25.0, device_type=cpu)]
    entries = kernel_entries(averages, "sdbridge.")
    assert entries == [("sm90_xmma_fprop_implicit_gemm", 20.0, 1), ("triton_poi_fused_silu_0", 10.0, 1)]
    assert summarize_times(entries, 1)["ms_per_frame"] == 0.03  # not 0.06


def test_a_negative_profile_count_is_refused_before_anything_runs():
    refused = sdbridge("bench", "--arch", "tiny", "--profile", "-1", timeout=60)
    assert refused.returncode == 2 and "--profile >= 0" in refused.stderr and "Traceback" not in refused.stderr


def test_the_sdpa_choice_reaches_the_attention_kernels_and_is_undone(tiny_components):
    """`--sdpa math` keeps the fused attention kernels out (the profile shows which ran); torch's
    own choice on this CPU is its flash kernel; the flags are as before afterwards."""
    import torch

    from bridge.benchmarking import BenchSettings, run_benchmark

    def attention_ops(sdpa: str) -> set[str]:
        settings = BenchSettings(arch="tiny", steps=1, width=32, height=32, frames=2, warmup=1, device="cpu",
                                 profile_frames=2, sdpa=sdpa)
        (result,) = run_benchmark(settings, components=tiny_components)
        assert result["sdpa"] == sdpa
        return {t["name"] for t in result["profile"]["top"] if "attention" in t["name"]}

    assert any("flash" in name for name in attention_ops("auto"))
    assert not any("flash" in name for name in attention_ops("math"))
    assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()


def test_kernel_choices_hold_inside_and_are_put_back():
    import torch

    from bridge.kernels import kernel_choices

    assert not torch.backends.cudnn.benchmark and torch.backends.cuda.flash_sdp_enabled()
    with kernel_choices(cudnn_benchmark=True, sdpa="cudnn"):
        assert torch.backends.cudnn.benchmark
        assert torch.backends.cuda.cudnn_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()
        assert not torch.backends.cuda.flash_sdp_enabled() and not torch.backends.cuda.mem_efficient_sdp_enabled()
    assert not torch.backends.cudnn.benchmark and torch.backends.cuda.flash_sdp_enabled()
    with kernel_choices():  # the defaults change nothing
        assert not torch.backends.cudnn.benchmark and torch.backends.cuda.flash_sdp_enabled()
    with pytest.raises(ValueError, match="sdpa: 'fast' must be one of auto, flash, efficient, cudnn, math"):
        with kernel_choices(sdpa="fast"):
            pass


def test_channels_last_eager_gives_the_same_frames_with_its_weights_in_nhwc():
    """`--channels-last` (eager): the convolutions' weights in channels_last, the frames those of
    the same weights in the usual layout (fresh models: the option changes the shared modules)."""
    import numpy as np
    import torch

    from pipeline import StreamConfig, StreamDiffusion, random_components

    config = StreamConfig(width=32, height=32, device="cpu", dtype="float32", t_index_list=(20, 35))
    frames = [np.random.default_rng(k).integers(0, 256, (32, 32, 3), dtype=np.uint8) for k in range(4)]
    outputs = {}
    for layout in (False, True):
        components = random_components("tiny", dtype=torch.float32, device="cpu", seed=0)
        engine = StreamDiffusion(components, config, backend_options={"channels_last": layout})
        convs = [m.weight for module in (components.unet, components.vae) for m in module.modules()
                 if isinstance(m, torch.nn.Conv2d) and m.weight.shape[1] > 1 and m.weight.shape[-1] > 1]  # 1x1: both
        assert convs and all(w.is_contiguous(memory_format=torch.channels_last) == layout for w in convs)
        outputs[layout] = [engine(frame).astype(int) for frame in frames]
    for plain, nhwc in zip(outputs[False], outputs[True]):
        assert np.abs(plain - nhwc).max() <= 1
