#!/usr/bin/env bash
# The GPU figures of issues 3 and 5 in prepared runs on an H100/H200 (the `device` tool), each
# step with a time limit, a short table printed last; the JSON and log of each step go into
# $OUT/results.tar.gz as soon as the step ends (so a call cut short keeps every finished step).
#
# Here, once, in the repository root (the device has torch, transformers, numpy, safetensors,
# zipp, but no diffusers):
#   mkdir -p .git/info && echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1 importlib_metadata
# Then: run(command="BUDGET=550 bash bench/gpu_check.sh all 2>&1 | tee $OUT/gpu_check.log", carry=[".whl"],
#   timeout_s=590) (or one of the other parts below);
# and give_back.
#   turbo: sd-turbo 1 step 512x512: eager through the runtime (issue 3: overhead <= 1 ms, latency
#          budget; issue 5: eager >= 40 fps), compiled with prompt changes at 60 fps (issue 5:
#          >= 170 fps, p99 <= 1.3x median, < 6 GiB, no frame later than two periods)
#          (turbo measures the compiled modules each in cudagraph trees: --cuda-graphs modules)
#   step:  bench/graph_check.py (the whole-step CUDA graph equals the same modules without it), then
#          sd-turbo 1 step and sd15 4 steps RCFG self through the step graph, with prompt changes
#          and the runtime's overhead (issue 5: >= 170 fps, >= 100 fps; issue 3)
#   sd15:  sd15 4 steps RCFG self 512x512, compiled, synchronous and pipelined (issue 5: >= 100 fps)
#   next:  graph_check (now also 8-bit GPU frames, frames in flight, eager's step graph, a size change
#          and back), then sd-turbo eager, eager with --cuda-graphs step (with 6 size changes at 60 fps),
#          compiled step graph, each also --pipelined (issue 5)
#   prompt: prompt changes with the text encoder run without its CUDA graph (part next runs them with it)
#   inductor: the compiled step graph with conv_1x1_as_mm, epilogue_fusion=false, coordinate_descent_tuning
#   fp8:   sd-turbo and sd15 compiled with the UNet's transformer layers in fp8, and fp8's change of the output
#   profile: sd-turbo and sd15 4 steps compiled with --profile (kernel time by kind), without the fusions (the
#          default on CUDA since session 10's run of this part); sd-turbo against --fuse-math
#          and against --fuse-qkv, sd15 against cuDNN's attention and against --fuse-qkv --fuse-math together;
#          both against --cudnn-benchmark, eager's step graph against it with
#          --channels-last, sd15's kernels without graphs, sd15 with fp8 (16,384 rows per layer); BUDGET=550
#          cuts the last few
#   options: sd15 4 steps with the defaults, then --inductor combo_kernels, aggressive_fusion, conv_1x1_as_mm,
#          max_autotune_pointwise (BUDGET=560 cuts the last)
#   defaults: graph_check alone, with its defaults (on CUDA the fusions, as the backend's)
#   fused: graph_check without the fusions (graph_check's own default, like the backend's, has them on CUDA)
#   ready: sd-turbo compiled, a second step count compiled beside the running show (bench/ready_check.py),
#          without the fused step math, then with it (the default on CUDA)
#   kernels: what sd15 4 steps may still gain (88.5 fps on an H200 against 100; its GPU busy 97% of a frame):
#          sd15 with the defaults and --profile, with --fp8 (scaled per token: 16,384 rows per layer), without
#          the step graph (the time of the VAE encoder, the UNet and the decoder), then on the faster of
#          fp16 and fp8 coordinate descent tuning and max-autotune of the matrix products; sd-turbo --fp8;
#          graph_check of the defaults last
#   inside: sd15 4 steps compiled with --profile, to read the ten largest kernels of each kind (which norms,
#          which fused operators take inductor's 2.9 ms a frame)
#   tuning: sd15 4 steps with inductor's coordinate descent tuning (a long compile), then with the defaults
#   autotune: the same with max-autotune of the matrix products, then with the defaults
#   overlap: sd15 4 steps with the defaults, then with --overlap-decode (each frame's decode a side-stream branch
#          of the step graph beside the next frame's UNet, one frame later), with --overlap-encode too (the
#          frame's encode beside the previous frame's UNet), graph_check of both, sd-turbo with both, sd15 with
#          --overlap-encode alone (about 9 min on a fresh machine: BUDGET=560); the defaults and both with
#          --profile: the GPU's busy time and how much of the kernels' time ran side by side
#   transition: prompt changes that fade in (--prompt-transition 0.4: every frame of a fade builds its cross-attention
#          K/V outside the step graph) against cuts, sd-turbo and sd15 compiled at 60 fps (issue 5: no frame later
#          than two periods)
#   lora:  a live LoRA's strength moved 8 times at 60 fps (--lora-changes 8), sd-turbo and sd15 compiled: the cost of
#          one change and the largest gap (nothing may compile or recapture)
#   input: sd-turbo compiled fed 1920x1080 frames (--input-size), cropped and letterboxed into 512x512, against
#          512x512 frames: what a camera or NDI source of another size costs the engine; and the CPU's cost of fitting
#          512x512 into sinks of their own size (bench/sink_convert.py, seconds)
#   all:   one lease's worth (about 9 min on a fresh machine), most wanted first, each step cut to what is left
#          of BUDGET seconds (550 for a 590 s call): graph_check, sd-turbo compiled step graph with prompt changes, sd15
#          4 steps, sd-turbo eager, eager's step graph, fp8, prompt changes without the encoder's graph
set -u
PART="${1:-turbo}"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
export PYTHONUNBUFFERED=1
OUT="${OUT:-bench/results/gpu}"
mkdir -p "$OUT"
# each step's JSON and log go to WORK, and after each step all of them into $OUT/results.tar.gz
# (the device tool brings back at most 8 files, and a call cut short by its time limit must still
# bring back every step that finished)
WORK="${GPU_CHECK_WORK:-$(mktemp -d)}"
mkdir -p "$WORK"
pack() {
  tar czf "$OUT/results.tar.gz.partial" -C "$WORK" . && mv -f "$OUT/results.tar.gz.partial" "$OUT/results.tar.gz"
}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader || true
python3 -c "import torch, transformers, diffusers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'diffusers', diffusers.__version__, torch.cuda.get_device_name())"

BUDGET="${BUDGET:-0}"  # seconds for the whole part, 0: none; a step gets at most what is left of it

cut_to_budget() {  # cut_to_budget SECONDS: SECONDS, or what is left of BUDGET (less a margin) if that is less; 0: skip
  local seconds=$1
  if [ "$BUDGET" -gt 0 ]; then
    local left=$((BUDGET - SECONDS - 15))
    [ $left -lt 30 ] && left=0
    [ $left -lt "$seconds" ] && seconds=$left
  fi
  echo "$seconds"
}

bench() {  # bench SECONDS NAME ARGS...: one configuration set, killed after SECONDS
  local seconds name=$2
  seconds=$(cut_to_budget "$1")
  shift 2
  if [ "$seconds" -eq 0 ]; then echo "== $name: skipped, the budget is spent"; return; fi
  echo "== $name (limit ${seconds}s): sdbridge bench $*"
  local started=$SECONDS
  timeout -k 5 "$seconds" python3 -m bridge.cli bench --json "$WORK/$name.json" "$@" > "$WORK/$name.log" 2>&1
  local rc=$?
  echo "   exit $rc after $((SECONDS - started)) s"
  [ $rc -eq 0 ] || tail -n 25 "$WORK/$name.log"
  pack
}

graph_check() {  # graph_check SECONDS [ARGS...]: bench/graph_check.py, killed after SECONDS; a failure is said loudly,
  # and the benchmarks still run (device time is scarce; their JSON is then read knowing the graphs differ)
  local seconds
  seconds=$(cut_to_budget "$1")
  shift
  if [ "$seconds" -eq 0 ]; then echo "== graph_check $*: skipped, the budget is spent"; return; fi  # (timeout 0: none)
  echo "== graph_check $* (limit ${seconds}s)"
  timeout -k 5 "$seconds" python3 bench/graph_check.py --json "$WORK/graph_check.json" "$@" > "$WORK/graph_check.log" 2>&1
  local rc=$?
  echo "   exit $rc"
  tail -n 3 "$WORK/graph_check.log"
  if [ $rc -eq 3 ]; then echo "   (skipped: no CUDA here)"
  elif [ $rc -ne 0 ]; then echo "GRAPH CHECK FAILED (exit $rc): the step-graph figures below come from graphs that differ"; fi
  pack
}

# overridable for a CPU dry run of a part, which then takes the step graph's path too (its CPU replay):
#   GPU_CHECK_SD15="--arch tiny --steps 4 --cfg self --width 64 --height 64 --device cpu --step-graph-replay eager" \
#   GPU_CHECK_TURBO="--arch tiny --steps 1 --cfg none --width 64 --height 64 --device cpu --step-graph-replay eager" \
#   BUDGET=500 OUT=/tmp/dry bash bench/gpu_check.sh overlap
TURBO="${GPU_CHECK_TURBO:---arch sd-turbo --steps 1 --cfg none --width 512 --height 512}"
SD15="${GPU_CHECK_SD15:---arch sd15 --steps 4 --cfg self --width 512 --height 512}"
sd15_step() {  # sd15_step SECONDS NAME [ARGS...]: sd15 4 steps compiled with the step graph, a frame in flight too
  local seconds=$1 name=$2
  shift 2
  bench "$seconds" "$name" $SD15 --backend compiled --frames 400 --warmup 30 --time-limit 8 --pipelined "$@"
}
case "$PART" in
  turbo)
    bench 150 sd_turbo_1step_eager $TURBO --cuda-graphs off --frames 300 --warmup 30 --time-limit 30 --runtime
    bench 240 sd_turbo_1step_compiled_modules $TURBO --backend compiled --cuda-graphs modules --frames 600 --warmup 30 \
      --time-limit 30 --prompt-changes 8
    ;;
  step)
    # the whole step in one CUDA graph: first its correctness against the same modules without a graph
    graph_check 150
    bench 200 sd_turbo_1step_compiled_step $TURBO --backend compiled --frames 600 --warmup 30 --time-limit 30 \
      --prompt-changes 8 --runtime
    bench 200 sd15_4step_self_compiled_step --arch sd15 --steps 4 --cfg self --width 512 --height 512 --backend compiled \
      --frames 400 --warmup 30 --time-limit 30
    ;;
  latency)
    # issue 3: the runtime's overhead and latency (also at a steady 30 fps input) with sd-turbo, eager and step graph
    bench 70 sd_turbo_1step_eager_runtime $TURBO --cuda-graphs off --frames 150 --warmup 20 --time-limit 20 --runtime
    bench 130 sd_turbo_1step_step_runtime $TURBO --backend compiled --frames 300 --warmup 30 --time-limit 20 --runtime
    ;;
  sd15)
    bench 240 sd15_4step_self_compiled --arch sd15 --steps 4 --cfg self --width 512 --height 512 --backend compiled \
      --frames 400 --warmup 30 --time-limit 15 --pipelined
    ;;
  next)
    # session 4's work, about 6 min on a fresh machine: the checks first, then sd-turbo plain eager against
    # eager in one CUDA graph (no compile), then compiled with the step graph; each synchronous and pipelined
    graph_check 200
    bench 90 sd_turbo_1step_eager $TURBO --cuda-graphs off --frames 200 --warmup 20 --time-limit 12 --pipelined
    bench 75 sd_turbo_1step_eager_step $TURBO --cuda-graphs step --frames 600 --warmup 30 --time-limit 10 --pipelined \
      --size-changes 6
    bench 180 sd_turbo_1step_compiled_step $TURBO --backend compiled --frames 600 --warmup 30 --time-limit 10 \
      --pipelined --prompt-changes 8
    ;;
  prompt)
    # prompt changes at 60 fps with the compiled step graph, the text encoder without its CUDA graph: against
    # part next's compiled row (with it); about 1 min when part next ran before on the same machine (compile cache)
    bench 150 sd_turbo_1step_compiled_step_no_text_graph $TURBO --backend compiled --frames 100 --warmup 20 \
      --time-limit 5 --prompt-changes 8 --no-text-encoder-graph
    ;;
  inductor)
    # inductor options, one compilation each (about 1.5 min each on a fresh machine): against part next's compiled row
    bench 150 sd_turbo_1step_compiled_1x1mm $TURBO --backend compiled --frames 600 --warmup 30 --time-limit 10 \
      --pipelined --inductor conv_1x1_as_mm=true
    bench 150 sd_turbo_1step_compiled_no_epilogue $TURBO --backend compiled --frames 600 --warmup 30 --time-limit 10 \
      --pipelined --inductor epilogue_fusion=false
    bench 280 sd_turbo_1step_compiled_coordinate_descent $TURBO --backend compiled --frames 600 --warmup 30 \
      --time-limit 10 --pipelined --inductor coordinate_descent_tuning=true
    ;;
  fp8)
    # fp8 transformer layers (Hopper): speed against part next's and sd15's rows, and the output's change against fp16
    bench 200 sd_turbo_1step_compiled_step_fp8 $TURBO --backend compiled --frames 600 --warmup 30 --time-limit 10 \
      --pipelined --fp8
    bench 260 sd15_4step_self_compiled_fp8 --arch sd15 --steps 4 --cfg self --width 512 --height 512 --backend compiled \
      --frames 400 --warmup 30 --time-limit 10 --pipelined --fp8
    ;;
  all)
    graph_check 150  # 88.5 s on a warm H200 (tiny models compiled at 3 sizes and step counts)
    bench 170 sd_turbo_1step_compiled_step $TURBO --backend compiled --frames 600 --warmup 30 --time-limit 10 \
      --pipelined --prompt-changes 8
    bench 170 sd15_4step_self_compiled_step $SD15 --backend compiled --frames 400 --warmup 30 --time-limit 10 --pipelined
    bench 60 sd_turbo_1step_eager $TURBO --cuda-graphs off --frames 200 --warmup 20 --time-limit 8 --pipelined
    bench 70 sd_turbo_1step_eager_step $TURBO --cuda-graphs step --frames 600 --warmup 30 --time-limit 8 --pipelined \
      --size-changes 6
    bench 150 sd_turbo_1step_compiled_step_fp8 $TURBO --backend compiled --frames 600 --warmup 30 --time-limit 8 \
      --pipelined --fp8
    bench 90 sd_turbo_1step_compiled_step_no_text_graph $TURBO --backend compiled --frames 100 --warmup 20 \
      --time-limit 5 --prompt-changes 8 --no-text-encoder-graph
    ;;
  profile)  # where the time goes, and leads against a baseline of the same run (about 11 min on a fresh machine;
    # BUDGET=550 cuts the last few): each model's profile first (its compilation), then what reuses it
    bench 150 sd_turbo_1step_compiled_step_profile $TURBO --backend compiled --frames 600 --warmup 30 --time-limit 8 \
      --pipelined --profile 20 --no-fuse-math --no-fuse-qkv
    # the arithmetic between the modules compiled too (a few fused kernels instead of ~40)
    bench 90 sd_turbo_1step_compiled_step_fused $TURBO --backend compiled --frames 600 --warmup 30 --time-limit 8 \
      --pipelined --fuse-math --no-fuse-qkv
    # each self-attention layer's q, k, v from one projection (the UNet compiles again)
    bench 150 sd_turbo_1step_compiled_step_qkv $TURBO --backend compiled --frames 600 --warmup 30 --time-limit 8 \
      --pipelined --fuse-qkv --no-fuse-math
    bench 170 sd15_4step_self_compiled_step_profile $SD15 --backend compiled --frames 400 --warmup 30 --time-limit 8 \
      --pipelined --profile 20 --no-fuse-math --no-fuse-qkv
    # sd15's heads are 40 wide at 4,096 tokens (flash attention pads them to 64): cuDNN's attention instead
    bench 170 sd15_4step_self_compiled_step_sdpa_cudnn $SD15 --backend compiled --frames 400 --warmup 30 --time-limit 8 \
      --pipelined --sdpa cudnn --profile 10 --no-fuse-math --no-fuse-qkv
    bench 170 sd15_4step_self_compiled_step_qkv_fused $SD15 --backend compiled --frames 400 --warmup 30 --time-limit 8 \
      --pipelined --fuse-qkv --fuse-math
    # cuDNN timing its convolution algorithms, against its heuristics' choice
    bench 80 sd_turbo_1step_compiled_step_cudnn_bm $TURBO --backend compiled --frames 600 --warmup 30 --time-limit 8 \
      --pipelined --cudnn-benchmark
    bench 80 sd15_4step_self_compiled_step_cudnn_bm $SD15 --backend compiled --frames 400 --warmup 30 --time-limit 8 \
      --pipelined --cudnn-benchmark
    # eager's step graph with its weights in channels_last, against the same without (no compilation)
    bench 60 sd_turbo_1step_eager_step $TURBO --frames 400 --warmup 20 --time-limit 5 --pipelined
    bench 60 sd_turbo_1step_eager_step_nhwc $TURBO --frames 400 --warmup 20 --time-limit 5 --pipelined --channels-last
    # the same compiled modules launched one by one: their kernels, should the graph's replays hide them
    bench 70 sd15_4step_self_compiled_nographs_profile $SD15 --backend compiled --cuda-graphs off --frames 50 --warmup 10 \
      --time-limit 5 --profile 10
    bench 170 sd15_4step_self_compiled_step_fp8 $SD15 --backend compiled --frames 400 --warmup 30 --time-limit 8 \
      --pipelined --fp8
    ;;
  defaults)  # the step graph with the defaults (fused step math and q/k/v) against the same modules without it
    graph_check 200
    ;;
  fused)  # the step graph without the fusions against the same without a graph (plain graph_check has them on CUDA)
    graph_check 170 --no-fuse-math --no-fuse-qkv
    ;;
  kernels)  # sd15 4 steps against its 100 fps (about 10 min on a fresh machine; BUDGET=550 cuts the last)
    sd15_step 170 sd15_4step_self_compiled_step_defaults --profile 10
    # fp8 with a scale per token and per weight channel (the scales' reductions fuse into the kernels before)
    sd15_step 200 sd15_4step_self_compiled_step_fp8 --fp8 --profile 10
    # the same compiled modules without the step graph: the profile's time by stage (VAE encoder, UNet, decoder)
    bench 70 sd15_4step_self_compiled_nographs_stages $SD15 --backend compiled --cuda-graphs off --frames 50 \
      --warmup 10 --time-limit 5 --profile 10
    # inductor's tuning on top of the faster of the two above
    faster=""
    [ "$(python3 bench/faster.py "$WORK/sd15_4step_self_compiled_step_defaults.json" \
      "$WORK/sd15_4step_self_compiled_step_fp8.json")" = "$WORK/sd15_4step_self_compiled_step_fp8.json" ] && faster="--fp8"
    echo "   the faster: ${faster:-fp16}"
    sd15_step 220 sd15_4step_self_compiled_step_coordinate_descent --inductor coordinate_descent_tuning=true $faster
    sd15_step 300 sd15_4step_self_compiled_step_autotune_mm --inductor max_autotune_gemm=true $faster
    bench 150 sd_turbo_1step_compiled_step_fp8 $TURBO --backend compiled --frames 600 --warmup 30 --time-limit 8 \
      --pipelined --fp8
    graph_check 170  # the defaults (fused step math and q/k/v) in the step graph against the same without it
    ;;
  inside)  # what sd15's inductor kernels are: the ten largest of each kind (profile top_by_kind), one compile
    bench 200 sd15_4step_self_compiled_step_kernels $SD15 --backend compiled --frames 300 --warmup 30 --time-limit 5 \
      --pipelined --profile 10
    ;;
  tuning)  # inductor's coordinate descent tuning for sd15 4 steps (its UNet compiled for more than 200 s on an H200
    # in session 11, cut there), then the defaults on the same machine to compare with (about 9.5 min: BUDGET=560)
    sd15_step 400 sd15_4step_self_compiled_step_coordinate_descent --inductor coordinate_descent_tuning=true --profile 10
    sd15_step 130 sd15_4step_self_compiled_step_defaults --profile 10
    ;;
  autotune)  # the same with max-autotune of the matrix products (triton's GEMM templates timed against cuBLAS)
    sd15_step 400 sd15_4step_self_compiled_step_autotune_mm --inductor max_autotune_gemm=true --profile 10
    sd15_step 130 sd15_4step_self_compiled_step_defaults --profile 10
    ;;
  options)  # sd15 4 steps: inductor options of one ordinary compile each against the defaults on the same machine
    sd15_step 130 sd15_4step_self_compiled_step_defaults
    # independent small kernels launched as one (the long tail of sd15's 2.9 ms of fused kernels)
    sd15_step 150 sd15_4step_self_compiled_step_combo --inductor combo_kernels=true
    # fuse nodes that share no input too (fewer of the small kernels)
    sd15_step 150 sd15_4step_self_compiled_step_aggressive --inductor aggressive_fusion=true
    # sd15's transformer in/out projections are 1x1 convolutions: as matrix products, their epilogues fused
    sd15_step 150 sd15_4step_self_compiled_step_1x1mm --inductor conv_1x1_as_mm=true
    sd15_step 200 sd15_4step_self_compiled_step_autotune_pointwise --inductor max_autotune_pointwise=true
    ;;
  overlap)  # the VAE beside the UNet (--overlap-decode, --overlap-encode: side-stream branches of the step graph,
    # a frame more latency each) against the defaults on the same machine, then their graph against no graph
    sd15_step 170 sd15_4step_self_compiled_step_defaults --profile 10
    sd15_step 80 sd15_4step_self_compiled_step_overlap_decode --overlap-decode
    sd15_step 80 sd15_4step_self_compiled_step_overlap_both --overlap-decode --overlap-encode --profile 10
    graph_check 150 --overlap-decode --overlap-encode
    bench 120 sd_turbo_1step_compiled_step $TURBO --backend compiled --frames 600 --warmup 30 --time-limit 8 --pipelined
    bench 60 sd_turbo_1step_compiled_step_overlap_both $TURBO --backend compiled --frames 600 --warmup 30 \
      --time-limit 8 --pipelined --overlap-decode --overlap-encode
    sd15_step 80 sd15_4step_self_compiled_step_overlap_encode --overlap-encode
    ;;
  ready)  # a new step count compiled beside a running show at 60 fps (sdbridge run's readier): how long it took,
    # the frames made meanwhile, the largest gaps while it compiled and at the switch (bench/ready_check.py)
    for variant in plain fused; do  # plain: --no-fuse-math; fused: --fuse-math, whose functions are readied beside too
      seconds=$(cut_to_budget 300)
      [ "$seconds" -eq 0 ] && echo "== ready_check_$variant skipped (budget)" && continue
      echo "== ready_check_$variant (limit ${seconds}s)"
      flags="--no-fuse-math"; [ "$variant" = fused ] && flags="--fuse-math"
      timeout -k 5 "$seconds" python3 bench/ready_check.py --json "$WORK/ready_check_$variant.json" --arch sd-turbo \
        --steps 1 --to-steps 2 $flags > "$WORK/ready_check_$variant.log" 2>&1
      echo "   exit $?"
      tail -n 1 "$WORK/ready_check_$variant.log"
      pack
    done
    ;;
  transition)  # prompt changes fading in over 0.4 s (each frame of a fade: new K/V, copied into the graph's buffers)
    bench 180 sd_turbo_1step_compiled_step_transition $TURBO --backend compiled --frames 300 --warmup 30 \
      --time-limit 5 --prompt-changes 8 --prompt-transition 0.4
    bench 60 sd_turbo_1step_compiled_step_cut $TURBO --backend compiled --frames 300 --warmup 30 --time-limit 5 \
      --prompt-changes 8
    sd15_step 170 sd15_4step_self_compiled_step_transition --prompt-changes 8 --prompt-transition 0.4
    ;;
  lora)  # a live LoRA's strength moved 8 times at 60 fps (rank 16 on every attention projection, rewritten in place
    # between frames; the step graph reads the weights where they are): one change's cost and the largest gap
    bench 180 sd_turbo_1step_compiled_step_lora $TURBO --backend compiled --frames 300 --warmup 30 --time-limit 5 \
      --lora-changes 8
    sd15_step 170 sd15_4step_self_compiled_step_lora --lora-changes 8
    ;;
  input)  # frames of a 1080p camera or NDI source into a 512x512 engine: the pinned upload of 6 MB instead of
    # 0.75 MB, the fit (--input-fit crop: a view; letterbox: a pad) and the antialiased resize, before the step graph;
    # first, a few seconds of this machine's CPU fitting 512x512 into sinks of their own size (size=WxH&fit=)
    echo "== sink_convert: bench/sink_convert.py (the output thread's share, CPU)"
    timeout -k 5 90 python3 bench/sink_convert.py --json "$WORK/sink_convert.json" 2>&1 | tail -n 15
    bench 180 sd_turbo_1step_compiled_step_in512 $TURBO --backend compiled --frames 300 --warmup 30 --time-limit 5 \
      --pipelined
    bench 90 sd_turbo_1step_compiled_step_in1080_crop $TURBO --backend compiled --frames 300 --warmup 30 \
      --time-limit 5 --pipelined --input-size 1920x1080
    bench 90 sd_turbo_1step_compiled_step_in1080_letterbox $TURBO --backend compiled --frames 300 --warmup 30 \
      --time-limit 5 --pipelined --input-size 1920x1080 --input-fit letterbox
    ;;
  again)  # what part all left undone on its first lease: graph_check with more time, fp8 after its fix
    graph_check 170
    bench 150 sd_turbo_1step_compiled_step_fp8 $TURBO --backend compiled --frames 300 --warmup 20 --time-limit 5 --fp8
    ;;
  *) echo "unknown part $PART (turbo, step, latency, sd15, next, prompt, inductor, fp8, all, again, profile, fused, ready, kernels, inside, tuning, autotune, defaults, options, overlap, transition, lora, input)"; exit 2 ;;
esac

python3 - "$WORK" <<'PY'
import json, pathlib, sys
sys.path.insert(0, ".")
from bridge.commands.bench import format_table
results = []
for path in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    try:
        loaded = json.loads(path.read_text())
        results += loaded if isinstance(loaded, list) else []  # graph_check.json is a verdict, printed above
    except ValueError as exc:
        print(f"{path.name}: unreadable ({exc})")
print(format_table(results) if results else "no results")
PY

echo "(each step's JSON and log: $OUT/results.tar.gz)"
true
