#!/usr/bin/env bash
# The GPU figures of the engine issues in one prepared run on an H100/H200 (the `device` tool),
# each step with a time limit, JSON under $OUT, a short table printed last.
#
# Here, once, in the repository root (the device has torch, transformers, numpy, safetensors,
# but no diffusers):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl diffusers importlib_metadata zipp
# Then: run(command="bash bench/gpu_check.sh eager", carry=[".whl"], timeout_s=560); the same
# with "compiled" (issue 5's backend; inductor compiles first, a few minutes) if time is left;
# and give_back.
set -u
PART="${1:-eager}"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
export PYTHONUNBUFFERED=1
OUT="${OUT:-bench/results/gpu}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

bench() {  # bench SECONDS NAME ARGS...: one configuration set, killed after SECONDS
  local seconds=$1 name=$2
  shift 2
  timeout "$seconds" python3 -m bridge.cli -q bench --time-limit 60 --json "$OUT/$name.json" "$@" \
    || echo "bench $name: exit $? (timeout or failure)"
}

if [ "$PART" = eager ]; then
  # issue 2: eager sd-turbo 1 step (target >= 40 fps); sd15 4 steps stream batch vs sequential (target >= 2.5x)
  # issue 3: the runtime's threads over the engine alone (target <= 1 ms), latency at 30 fps in
  bench 180 sd_turbo_1step_eager --arch sd-turbo --steps 1 --cfg self --width 512 --height 512 --frames 300 --warmup 30 --runtime
  bench 220 sd15_4step_batch_vs_sequential --arch sd15 --steps 4 --cfg self --width 512 --height 512 --frames 200 --warmup 20 --sequential
  bench 100 sd15_2step_self --arch sd15 --steps 2 --cfg self --width 512 --height 512 --frames 200 --warmup 20
else
  # issue 5: compiled sd-turbo 1 step (target >= 170 fps, p99 <= 1.3x median, < 6 GiB); sd15 4 steps self (>= 100 fps)
  bench 280 sd_turbo_1step_compiled --backend compiled --arch sd-turbo --steps 1 --cfg self --width 512 --height 512 --frames 600 --warmup 30
  bench 260 sd15_4step_compiled --backend compiled --arch sd15 --steps 4 --cfg self --width 512 --height 512 --frames 400 --warmup 30
fi

python3 - "$OUT" <<'PY'
import json, pathlib, sys
rows = []
for path in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    for r in json.loads(path.read_text()):
        rows.append(f"{r['arch']:<9} {r['backend']:<8} {r['steps']:>2} {r['cfg_type']:<10} {'batch' if r['use_denoising_batch'] else 'seq':<5} "
                    f"{r['fps']:7.1f} fps  median {r['ms_median']:6.2f} ms  p99 {r['ms_p99']:6.2f} ms  "
                    f"{r['peak_mem_gib']:5.2f} GiB  {r['device']}" + (f"  x{r['speedup_vs_sequential']:.2f} vs seq" if 'speedup_vs_sequential' in r else "")
                    + (f"  runtime {r['runtime_overhead']['overhead_ms']:+.2f} ms/frame" if 'runtime_overhead' in r else ""))
print("\n".join(rows) or "no results")
PY
