"""`sdbridge bench` as a user types it: the JSON it writes (the keys the benchmark method names),
--sequential's ratio, --runtime's alternating-round overhead figures; and the runtime
measurement on its own with a stand-in engine of known cost."""

import json
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from bridge.runtime_bench import measure_runtime_overhead

from test_cli import sdbridge

REQUIRED = {"arch", "backend", "steps", "cfg_type", "width", "height", "frame_buffer_size", "fps", "ms_median",
            "ms_p95", "ms_p99", "peak_mem_gib", "device", "torch", "commit", "command"}


@pytest.mark.slow
def test_bench_writes_every_figure_with_the_sequential_ratio_and_the_runtime_overhead(tmp_path):
    out = tmp_path / "bench.json"
    result = sdbridge("bench", "--arch", "tiny", "--steps", "2", "--width", "64", "--height", "64", "--frames", "8",
                      "--warmup", "2", "--device", "cpu", "--sequential", "--runtime", "--profile", "2", "--json", str(out),
                      timeout=300)
    assert result.returncode == 0, result.stderr
    batched, sequential = json.loads(out.read_text())
    for run in (batched, sequential):
        assert REQUIRED <= run.keys()
        assert run["arch"] == "tiny" and run["backend"] == "eager" and run["steps"] == 2
        assert (run["width"], run["height"]) == (64, 64) and run["fps"] > 0
        assert run["ms_median"] <= run["ms_p95"] <= run["ms_p99"]
        assert "bench" in run["command"]
        assert run["text_encoder_graph"] is False and run["cuda_graphs_used"] == "off"  # no CUDA here
    assert batched["use_denoising_batch"] and not sequential["use_denoising_batch"]
    assert batched["speedup_vs_sequential"] == pytest.approx(batched["fps"] / sequential["fps"])
    overhead = batched["runtime_overhead"]
    assert overhead["rounds"] >= 1 and overhead["frames"] >= 2
    assert overhead["overhead_ms"] == pytest.approx(overhead["runtime_frame_ms"] - overhead["engine_ms"])
    assert overhead["between_calls_ms"] == pytest.approx(overhead["runtime_frame_ms"] - overhead["runtime_inference_ms"])
    assert len(overhead["overhead_ms_rounds"]) == overhead["rounds"]
    assert set(overhead["thread_cpu_ms_per_frame"]) == {"capture", "inference", "output", "sink 1 NullSink"}
    assert overhead["thread_cpu_ms_per_frame"]["inference"] > 0
    assert "through the runtime" in result.stdout and "alternating rounds" in result.stdout
    assert batched["profile"]["frames"] == 2 and batched["profile"]["by_kind"] and "profile" not in sequential
    assert "profile (cpu operators (own time)" in result.stdout
    # two steps: the frame leaves one call after it went in
    assert overhead["latency_budget_ms"] == pytest.approx(2 * overhead["engine_ms"] + 1000.0 / overhead["source_fps"])
    print("\n" + result.stdout)


class SleepingEngine:
    """Takes `seconds` a frame without using the CPU: what the runtime adds shows plainly."""

    def __init__(self, seconds: float, size: int = 32) -> None:
        self.seconds = seconds
        self.config = SimpleNamespace(width=size, height=size, mode="img2img", use_denoising_batch=True, t_index_list=[0])
        self.calls = 0

    def __call__(self, pixels):
        self.calls += 1
        time.sleep(self.seconds)
        return np.zeros((self.config.height, self.config.width, 3), np.uint8)


def test_runtime_overhead_alternates_rounds_and_accounts_each_thread():
    engine = SleepingEngine(0.08)  # slower than the 30 fps source
    figures = measure_runtime_overhead(engine, frames=12, warmup=2, input_size=(32, 32), rounds=3, timeout=30)
    assert figures["rounds"] == 3 and len(figures["overhead_ms_rounds"]) == 3
    # 2 warm-up calls, then per round: 4 alone + (2 warm-up + 4) through the runtime; then one
    # round at a steady 30 fps (2 warm-up + 4) for the latency the issue asks about
    assert engine.calls == 2 + 3 * (4 + 6) + 6
    steady = figures["latency_steady"]
    assert steady["source_fps"] == 30.0 and steady["latency_ms_median"] >= 80.0
    assert steady["latency_budget_ms"] == pytest.approx(figures["engine_ms"] + 1000.0 / 30.0)
    assert figures["frames"] == 3 * 3  # intervals between the 4 measured frames of each round
    assert figures["engine_ms"] >= 80.0 and figures["runtime_frame_ms"] >= 80.0
    assert figures["latency_ms_median"] is not None and figures["runtime_inference_ms"] >= 80.0
    # the latency figures pool every round's published frames after its warm-up (3 rounds of 4)
    assert figures["latency_frames"] == 3 * 4
    assert figures["latency_ms_median"] >= 80.0 and figures["latency_ms_p95"] >= figures["latency_ms_median"]
    assert figures["source_fps"] == 30.0
    # lag 0 (one step): the budget is one engine call plus one input period
    assert figures["latency_budget_ms"] == pytest.approx(figures["engine_ms"] + 1000.0 / 30.0)
    assert set(figures["thread_cpu_ms_per_frame"]) == {"capture", "inference", "output", "sink 1 NullSink"}


def run_script(script: str, out, *args: str, timeout: float = 120):
    """bench/`script` with `args` and `--json out` in a child Python: (its result, the JSON it wrote)."""
    import subprocess
    import sys

    from test_cli import REPO, child_env

    result = subprocess.run([sys.executable, f"bench/{script}", *args, "--json", str(out)], cwd=REPO, env=child_env(),
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr
    record = json.loads(out.read_text())
    assert script in record["command"]
    return result, record


def test_runtime_floor_script_writes_both_step_counts(tmp_path):
    _, record = run_script("runtime_floor.py", tmp_path / "floor.json", "--engine-ms", "40", "--frames", "6", "--size", "32")
    assert [r["steps"] for r in record["results"]] == [1, 2]
    for steps, r in zip((1, 2), record["results"]):
        assert r["engine_ms"] >= 40.0 and r["frames"] >= 2
        assert r["latency_budget_ms"] == pytest.approx(steps * r["engine_ms"] + 1000.0 / 30.0)


def test_host_overhead_script_times_both_cases_around_a_no_op_replay(tmp_path):
    _, record = run_script("host_overhead.py", tmp_path / "host.json", "--size", "64", "--frames", "20", timeout=180)
    assert [(r["cfg_type"], r["steps"]) for r in record["rows"]] == [("none", 1), ("self", 4)]
    assert all(0 < r["host_us_per_frame"] < 1e5 for r in record["rows"])


def test_sink_convert_script_times_each_sink_and_says_how(tmp_path):
    result, record = run_script("sink_convert.py", tmp_path / "sinks.json", "--size", "64", "--frames", "5")
    assert [(r["sink"], r["filter"]) for r in record["rows"][2:4]] == [("1280x720 RGB crop", "bilinear"),
                                                                       ("1280x720 RGB crop", "nearest")]
    assert record["rows"][-1]["sink"] == "64x64 BGRA stretch" and record["pillow"]
    assert all(0 < r["median_ms"] <= r["p95_ms"] < 1e4 for r in record["rows"])
    assert "1920x1080 RGB letterbox" in result.stdout


def test_pipelined_timing_submits_each_frame_before_taking_the_previous_result():
    import torch

    from bridge.benchmarking import time_calls

    events = []

    class Pending:
        def __init__(self, k):
            self.k = k

        def result(self):
            events.append(("result", self.k))

    def submit(frame):
        events.append(("submit", frame))
        return Pending(frame)

    times = time_calls(lambda frame: events.append(("call", frame)), list(range(10)), count=5, warmup=2,
                       device=torch.device("cpu"), submit=submit)
    assert len(times) == 5 and all(t >= 0 for t in times)
    assert events[:2] == [("call", 0), ("call", 1)]  # the warm-up frames, called as usual
    measured = events[2:]
    assert measured == [("submit", 0)] + [e for k in range(1, 6) for e in (("submit", k), ("result", k - 1))] + [
        ("result", 5)]


def test_bench_pipelined_runs_the_engine_through_submit(tiny_components):
    from bridge.benchmarking import BenchSettings, run_benchmark

    settings = BenchSettings(arch="tiny", steps=2, width=32, height=32, frames=6, warmup=2, device="cpu", pipelined=True)
    synchronous, pipelined = run_benchmark(settings, components=tiny_components)
    assert (synchronous["pipelined"], pipelined["pipelined"]) == (False, True)
    assert pipelined["frames_measured"] == synchronous["frames_measured"] == 6 and pipelined["fps"] > 0


def test_frames_of_another_size_are_fed_and_fitted_and_the_row_says_so(tiny_components):
    """--input-size: what a 16:9 camera costs a square engine (upload, crop or letterbox, resize)."""
    from bridge.benchmarking import BenchSettings, run_benchmark, synthetic_frames
    from bridge.commands.bench import format_table

    settings = BenchSettings(arch="tiny", steps=1, width=32, height=32, frames=4, warmup=1, device="cpu",
                             input_size=(96, 54), input_fit="letterbox")
    assert synthetic_frames(settings)[0].shape == (54, 96, 3)
    (row,) = run_benchmark(settings, components=tiny_components)
    assert row["input_size"] == (96, 54) and row["input_fit"] == "letterbox" and row["frames_measured"] == 4
    row["commit"] = "abc"  # (the command adds it)
    assert "eager/in96x54-letterbox" in format_table([row]).splitlines()[2]
    assert "/in" not in format_table([{**row, "input_size": None}]).splitlines()[2]


def test_each_row_is_handed_out_as_soon_as_it_is_measured(tiny_components):
    """`checkpoint`: the rows so far after each row and each figure added to one (a script's
    timeout that kills the profile keeps the timings), and a cut-short row says so."""
    import copy

    from bridge.benchmarking import BenchSettings, run_benchmark

    snapshots = []
    settings = BenchSettings(arch="tiny", steps=2, width=32, height=32, frames=4, warmup=1, device="cpu",
                             pipelined=True, profile_frames=2)
    rows = run_benchmark(settings, components=tiny_components, checkpoint=lambda r: snapshots.append(copy.deepcopy(r)))
    assert [len(snapshot) for snapshot in snapshots] == [1, 2, 2]  # synchronous, pipelined, then its profile
    assert "profile" not in snapshots[1][0] and "profile" in snapshots[2][0] and snapshots[2] == rows
    assert not any(row["time_limited"] for row in rows) and {row["frames_per_call"] for row in rows} == {1}
    limited = BenchSettings(arch="tiny", steps=2, width=32, height=32, frames=1000, warmup=1, device="cpu",
                            time_limit=0.2)
    (row,) = run_benchmark(limited, components=tiny_components)
    assert row["time_limited"] and row["frames_measured"] < 1000


def test_a_bench_json_is_whole_after_every_row(tmp_path):
    """The JSON holds each configuration's rows as they come, written whole each time (no
    .partial left behind)."""
    from test_cli import sdbridge

    target = tmp_path / "rows.json"
    result = sdbridge("-q", "bench", "--arch", "tiny", "--device", "cpu", "--width", "32", "--height", "32",
                      "--frames", "3", "--warmup", "1", "--steps", "1", "2", "--time-limit", "0.000001",
                      "--json", str(target), timeout=120)
    assert result.returncode == 0, result.stderr
    rows = json.loads(target.read_text())
    assert [row["steps"] for row in rows] == [1, 2] and all(row["commit"] and row["command"] for row in rows)
    assert all(row["time_limited"] and row["frames_measured"] == 1 for row in rows)
    assert "cut short by --time-limit: 1 of 3 frames measured" in result.stdout
    assert [path.name for path in tmp_path.iterdir()] == ["rows.json"]


def test_prompt_and_size_changes_through_the_runtime_report_the_gaps(tiny_components):
    """--prompt-changes and --size-changes: each change reaches the engine through the parameter
    store while frames flow, and the gaps between frames are reported (no timing is asserted)."""
    from bridge.benchmarking import BenchSettings, run_benchmark

    settings = BenchSettings(arch="tiny", steps=2, width=32, height=32, frames=4, warmup=3, device="cpu")
    (result,) = run_benchmark(settings, components=tiny_components, prompt_changes=2, size_changes=3,
                              other_size=(64, 32))
    prompts, sizes = result["prompt_changes"], result["size_changes"]
    assert prompts["changes"] == 2 and prompts["last_prompt_applied"] is True
    assert sizes["changes"] == 3 and sizes["sizes"] == ["64x32", "32x32", "64x32"]
    assert sizes["last_applied"] is True
    for figures in (prompts, sizes):
        assert figures["frames"] > 3 and figures["gap_ms_max"] >= figures["gap_ms_median"] > 0
        assert figures["gap_ms_max_after_change"] is not None
        largest = figures["largest_gap"]  # the largest gap, split into the call and the wait before it
        assert abs(largest["ms"] - figures["gap_ms_max"]) < 1e-6
        assert abs(largest["call_ms"] + largest["before_call_ms"] - largest["ms"]) < 1e-6
        assert largest["call_ms"] > 0 and largest["before_call_ms"] >= 0
    assert prompts["encode_ms_max"] > 0  # the prompt worker encoded each new text
    assert sizes["encode_ms_max"] is None  # no text to encode


def test_live_lora_changes_through_the_runtime_report_their_cost_and_the_gaps():
    """--lora-changes: a random live LoRA on the attention projections, its strength moved
    through /sd/lora/1's path while frames flow (a model of its own: the LoRA writes its weights)."""
    from bridge.benchmarking import LORA_BENCH_RANK, BenchSettings, run_benchmark

    settings = BenchSettings(arch="tiny", steps=2, width=32, height=32, frames=4, warmup=3, device="cpu")
    (result,) = run_benchmark(settings, lora_changes=3)
    changes = result["lora_changes"]
    assert changes["changes"] == 3 and changes["last_applied"] is True and changes["graphs_compiled"] in (0, None)
    from pipeline import random_components
    from pipeline.live_lora import ATTENTION_PROJECTIONS

    unet = random_components("tiny", dtype=torch.float32, device=torch.device("cpu")).unet
    layers = [m for path, m in unet.named_modules()
              if isinstance(m, torch.nn.Linear) and any(path.endswith("." + t) for t in ATTENTION_PROJECTIONS)]
    assert changes["layers"] == len(layers) == 32  # tiny: 8 attention layers x q, k, v, out
    kept = sum(4 * (m.weight.numel() + LORA_BENCH_RANK * (m.in_features + m.out_features)) for m in layers)
    assert changes["kept_mib"] == pytest.approx(kept / 2**20)  # W0 of each layer and its factors (fp32 here)
    assert changes["set_ms_max"] >= changes["set_ms_median"] > 0
    assert changes["frames"] > 3 and changes["gap_ms_max"] >= changes["gap_ms_median"] > 0


def test_the_largest_gap_is_split_into_the_call_and_the_wait_before_it():
    import numpy as np

    from bridge.commands.bench import _gap_parts_text
    from bridge.runtime_bench import _gap_parts

    started = np.array([0.000, 0.020, 0.045, 0.061])
    finished = np.array([0.010, 0.030, 0.060, 0.070])  # the largest gap ends the third call: 30 ms
    parts = _gap_parts(started, finished, changed_at=[0.005, 0.040, 0.065])
    assert parts == pytest.approx({"ms": 30.0, "call_ms": 15.0, "before_call_ms": 15.0, "since_change_ms": 20.0})
    assert _gap_parts(started, finished, changed_at=[])["since_change_ms"] is None
    assert _gap_parts(started[:1], finished[:1], changed_at=[]) is None
    text = _gap_parts_text(parts, 12.34)
    assert text == "; largest: call 15.0 + before it 15.0 ms, 20 ms after a change; prompt encode up to 12.3 ms"


def test_the_table_names_what_each_row_ran_with():
    """A row's backend column names its CUDA graphs, fusions (what ran, not what was asked),
    inductor options and frames in flight, so rows of one run can be told apart."""
    from bridge.commands.bench import format_table

    row = {"arch": "sd15", "backend": "compiled", "steps": 4, "cfg_type": "self", "use_denoising_batch": True,
           "width": 512, "height": 512, "fps": 88.5, "ms_median": 11.29, "ms_p95": 11.41, "ms_p99": 11.46,
           "peak_mem_gib": 2.26, "cuda_graphs_used": "step", "fuse_math": True, "fuse_qkv": True, "pipelined": True,
           "inductor": [["conv_1x1_as_mm", True]], "device": "NVIDIA H200", "torch": "2.11.0", "commit": "abc"}
    table = format_table([row, {**row, "fuse_math": False, "fuse_qkv": False, "inductor": [], "pipelined": False}])
    first, second = table.splitlines()[2:4]
    assert "compiled+step/fmath/qkv/conv_1x1_as_mm=True/pipe" in first
    assert second.split()[1] == "compiled+step"
    fp8_rows = format_table([{**row, "fp8": True, "fp8_scaling": "row", "fuse_qkv": False, "fuse_math": False,
                              "inductor": [], "pipelined": False},
                             {**row, "fp8": True, "fp8_scaling": "tensor", "fuse_qkv": False, "fuse_math": False,
                              "inductor": [], "pipelined": False}]).splitlines()[2:4]
    assert [line.split()[1] for line in fp8_rows] == ["compiled+step/fp8", "compiled+step/fp8-tensor"]
    long_rows = format_table([{**row, "overlap_decode": True, "overlap_encode": True}, row]).splitlines()
    assert "compiled+step/fmath/qkv/overlap-dec/overlap-enc/conv_1x1_as_mm=True/pipe" in long_rows[2]
    rows = long_rows[2:4]
    assert len({line.index(" 4 self ") for line in rows}) == 1  # the steps column lines up after any label
    assert len(long_rows[1]) == len(long_rows[0]) == len(rows[0]) == len(rows[1])


def test_faster_picks_the_result_with_more_frames_per_second(tmp_path):
    """bench/faster.py, which gpu_check.sh asks whether fp8 beat fp16 before stacking tuning on it:
    each file's best row counts; a missing or cut-short file loses; a tie keeps the first."""
    import subprocess
    import sys

    from test_cli import REPO, child_env

    fp16, fp8, broken = tmp_path / "fp16.json", tmp_path / "fp8.json", tmp_path / "broken.json"
    fp16.write_text(json.dumps([{"fps": 85.1}, {"fps": 88.5, "pipelined": True}]))
    fp8.write_text(json.dumps([{"fps": 90.2}, {"fps": 94.0, "pipelined": True}]))
    broken.write_text('[{"fps": 120')  # a run killed while writing

    def faster(first, second):
        result = subprocess.run([sys.executable, "bench/faster.py", str(first), str(second)], cwd=REPO, env=child_env(),
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    assert faster(fp16, fp8) == str(fp8) and faster(fp8, fp16) == str(fp8)
    assert faster(fp16, broken) == str(fp16) and faster(broken, fp16) == str(fp16)
    assert faster(fp16, tmp_path / "missing.json") == str(fp16) and faster(fp16, fp16) == str(fp16)


def test_a_json_path_that_cannot_be_written_is_refused_before_measuring(tmp_path):
    (tmp_path / "afile").write_text("")
    for target in (tmp_path, tmp_path / "afile" / "results.json"):
        result = sdbridge("-q", "bench", "--arch", "tiny", "--device", "cpu", "--width", "64", "--height", "64",
                          "--frames", "3", "--warmup", "1", "--json", str(target), timeout=60)
        assert result.returncode == 2 and result.stderr.strip().splitlines() == [
            f"sdbridge bench: error: --json {target}: " + ("Is a directory" if target == tmp_path else "File exists")]


def test_a_cpu_dry_run_can_take_the_step_graph_path(tiny_components):
    """--step-graph-replay eager: where no CUDA graph is captured, the bench's frames go through
    the step graph's path anyway (its CPU replay), as gpu_check's dry run needs to."""
    from bridge.benchmarking import BenchSettings, run_benchmark

    settings = BenchSettings(arch="tiny", steps=2, width=32, height=32, frames=3, warmup=2, device="cpu",
                             overlap_decode=True, step_graph_replay="eager")
    (row,) = run_benchmark(settings, components=tiny_components)
    assert row["step_graph_replays"] >= 3
    (plain,) = run_benchmark(settings.__class__(**{**settings.__dict__, "step_graph_replay": None}),
                             components=tiny_components)
    assert plain["step_graph_replays"] == 0
