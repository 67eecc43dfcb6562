#!/usr/bin/env bash
# Everything a short GPU session should measure, in one prepared run, inside a deadline
# (GPU_SESSION_SECONDS, default 540: set it to the command's time limit minus about 60 s, since a
# kill from outside leaves no time to collect; not yet run on a GPU):
#
#   benchmarks/gpu_session.sh OUT_DIR            # CUDA: the measurements
#   benchmarks/gpu_session.sh OUT_DIR --smoke    # the same steps on the CPU at toy sizes (CI, ~1 minute)
#
# 1. benchmarks/bench_gpu.py: the paper preset's training throughput, inference time and peak GPU
#    memory, bf16 autocast on and off (alone on the GPU, so the timings are clean);
# 2. `vaeuda demo --device cuda` on the cohorts of seeds 0-3 and seed 0 a second time (run-to-run
#    determinism on CUDA), side by side with the paper preset through the command line
#    (train-source, adapt, segment on 4 MR / 1 CT of the seed-0 cohort, a few iterations: does it run,
#    how fast, are the labels written on the input grid);
# 3. benchmarks/bf16_accuracy.py: the seed-0 demo's adapted model in bf16 against fp32 on a test CT.
#
# Writes at most 8 files to OUT_DIR (its earlier ones are removed first): env.txt, bench_gpu.json,
# demos.json (every demo's report.json, with its models' weights digests), demos.md, paper_cli.log,
# bf16.json, fig2.png, logs.tar.gz. Every step's time limit is cut to what is left of the deadline,
# and what finished is collected also when the run is stopped or runs out of time; the exit status
# is 1 if any step failed. PYTHON names the interpreter (default python3); the engine is taken
# from this checkout. Where that Python lacks SimpleITK or MONAI (a GPU machine with its own
# PyTorch), put their wheels in a folder `.whl` at the repository root: they are installed into a
# scratch folder first.
set -u
OUT=${1:?usage: benchmarks/gpu_session.sh OUT_DIR [--smoke]}
SMOKE=${2:-}
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
RESULTS="env.txt bench_gpu.json demos.json demos.md paper_cli.log bf16.json fig2.png logs.tar.gz"
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
for f in $RESULTS; do rm -f "$OUT/$f"; done      # no earlier run's file passes for this one's
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_session.XXXXXX") || exit 2
LOGS=$WORK/logs; mkdir -p "$LOGS"
T0=$(date +%s)
DEADLINE=$(( T0 + ${GPU_SESSION_SECONDS:-540} ))
FAILED=""
log() { echo "[gpu_session $(( $(date +%s) - T0 ))s] $*"; }
# a step's time limit: at most $1 seconds, ending no later than $2 (default: 15 s before the deadline,
# for collecting)
limit() { local left=$(( ${2:-$(( DEADLINE - 15 ))} - $(date +%s) )); [ "$left" -lt "$1" ] || left=$1; [ "$left" -gt 1 ] || left=1; echo "$left"; }
# a child stuck in a CUDA call may ignore SIGTERM: SIGKILL 10 s after it
TIMEOUT="timeout -k 10"

collect() {
  "$PY" - "$WORK" > "$OUT/demos.json" 2>> "$LOGS/collect.log" <<'PY'
import glob, json, os, sys
out = {}   # each demo's report.json (it holds the models' weights digests), or null where none was written
for d in sorted(glob.glob(os.path.join(sys.argv[1], "demo_*"))):
    report = os.path.join(d, "report.json")
    out[os.path.basename(d)] = json.load(open(report, encoding="utf-8")) if os.path.exists(report) else None
print(json.dumps(out, indent=1))
PY
  for d in "$WORK"/demo_*; do [ -f "$d/report.md" ] && { echo "# $(basename "$d")"; cat "$d/report.md"; echo; }; done \
      > "$OUT/demos.md"
  [ -f "$WORK/demo_s0/fig2.png" ] && cp "$WORK/demo_s0/fig2.png" "$OUT/fig2.png"
  tar czf "$OUT/logs.tar.gz" -C "$WORK" logs
}

# A run stopped early: stop each background step (a subshell) and what it runs (`timeout`, which passes
# the signal on to its command and waits for it), and wait for those, so nothing writes into $WORK after.
stop_jobs() {
  local pid kid kids=""
  for pid in $(jobs -p); do
    kids="$kids $(pgrep -P "$pid")"
    kill "$pid"
  done 2>/dev/null
  for kid in $kids; do
    kill "$kid" 2>/dev/null
    while kill -0 "$kid" 2>/dev/null; do sleep 0.2; done
  done
}

finish() {
  local status=$?
  trap - EXIT INT TERM
  stop_jobs
  wait 2>/dev/null
  collect
  rm -rf "$WORK"
  log "wrote $(ls "$OUT" | tr '\n' ' ')"
  if [ -n "$FAILED" ]; then
    echo "gpu_session.sh: error: these steps failed or ran out of time:$FAILED (their logs are in $OUT/logs.tar.gz)." >&2
    status=1
  fi
  exit "$status"
}
trap finish EXIT
trap 'FAILED="$FAILED stopped"; exit 1' INT TERM

if ! "$PY" -c "import SimpleITK, monai" 2>/dev/null && ls "$REPO"/.whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" \
      "$REPO"/.whl/*.whl || { FAILED="$FAILED wheels"; exit 3; }
  export PYTHONPATH=$WORK/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$REPO/VAEUDASegmentation${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1

if [ "$SMOKE" = "--smoke" ]; then
  DEVICE=cpu; PRESET=tiny; DEMO="--quick"; RUNS="s0:0"; BENCH="--smoke"; ITERS_SRC=4; ITERS_ADAPT=2
  THREADS=1; T_BENCH=300; T_DEMO=300; T_CLI=300
  [ -n "${GPU_SESSION_SECONDS:-}" ] || DEADLINE=$(( T0 + 900 ))
else
  DEVICE=cuda; PRESET=paper; DEMO=""; RUNS="s0:0 s0b:0 s1:1 s2:2 s3:3"; BENCH="--iterations 10 --repeats 3"
  ITERS_SRC=60; ITERS_ADAPT=30; THREADS=3; T_BENCH=150; T_DEMO=270; T_CLI=120
fi

{ command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$PY" -c "import sys, torch, SimpleITK, monai, numpy; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), 'SimpleITK', SimpleITK.Version.VersionString(), 'monai', monai.__version__, 'numpy', numpy.__version__)"
  echo "cpus $(nproc)"; } > "$OUT/env.txt" 2>&1
log "$(tr '\n' ' ' < "$OUT/env.txt")"

# 1. throughput and memory, alone on the device
$TIMEOUT "$(limit "$T_BENCH")" "$PY" "$REPO/benchmarks/bench_gpu.py" --device "$DEVICE" $BENCH \
    --out "$OUT/bench_gpu.json" > "$LOGS/bench_gpu.log" 2>&1
rc=$?; log "bench_gpu.py rc=$rc"; [ $rc = 0 ] || FAILED="$FAILED bench_gpu"

# 2. the demos and the command-line run side by side, all ending by PHASE2_END (step 3 keeps its time)
PHASE2_END=$(( $(date +%s) + T_DEMO )); [ "$PHASE2_END" -lt $(( DEADLINE - 15 )) ] || PHASE2_END=$(( DEADLINE - 15 ))
for run in $RUNS; do
  name=${run%%:*}; seed=${run##*:}
  ( OMP_NUM_THREADS=$THREADS $TIMEOUT "$(limit "$T_DEMO" "$PHASE2_END")" "$PY" -m vaeuda demo --out "$WORK/demo_$name" \
        --seed "$seed" --device "$DEVICE" $DEMO --progress json > "$LOGS/demo_$name.log" 2>&1
    echo "rc=$?" >> "$LOGS/demo_$name.log" ) &
done
( C=$WORK/demo_s0/cohort; P=$WORK/cli
  export OMP_NUM_THREADS=$THREADS
  while [ "$(date +%s)" -lt $(( PHASE2_END - 30 )) ]; do   # until the seed-0 demo has written its cohort, or has stopped
    [ -f "$C/splits.json" ] || grep -q '^rc=' "$LOGS/demo_s0.log" 2>/dev/null && break; sleep 2
  done
  [ -f "$C/splits.json" ] || { echo "no cohort: the seed-0 demo wrote none"; echo "paper_cli rc=1"; exit 1; }
  # the scans by split, as the demo chose them: 4 MR training scans, the first CT training and test scans
  read -r MR1 MR2 MR3 MR4 CT_ADAPT CT_TEST < <("$PY" -c "import sys; from vaeuda.demo import cohort_split as split; c = sys.argv[1]; print(*split(c, 'mr', 'train')[:4], split(c, 'ct', 'train')[0], split(c, 'ct', 'test')[0])" "$C")
  set -x
  $TIMEOUT "$(limit "$T_CLI" "$PHASE2_END")" "$PY" -m vaeuda train-source --out "$P/source.safetensors" --preset "$PRESET" \
      --iterations "$ITERS_SRC" --device "$DEVICE" --progress json \
      "$C/${MR1}_image.nii.gz" "$C/${MR2}_image.nii.gz" "$C/${MR3}_image.nii.gz" "$C/${MR4}_image.nii.gz" &&
  $TIMEOUT "$(limit "$T_CLI" "$PHASE2_END")" "$PY" -m vaeuda adapt --model "$P/source.safetensors" --out "$P/adapted.safetensors" \
      --iterations "$ITERS_ADAPT" --device "$DEVICE" --progress json "$C/${CT_ADAPT}_image.nii.gz" &&
  $TIMEOUT "$(limit "$T_CLI" "$PHASE2_END")" "$PY" -m vaeuda segment --model "$P/adapted.safetensors" --out "$P/seg" \
      --device "$DEVICE" "$C/${CT_TEST}_image.nii.gz" &&
  $TIMEOUT "$(limit 60 "$PHASE2_END")" "$PY" -c "import sys, SimpleITK as s, numpy as n; a, b = s.ReadImage(sys.argv[1]), s.ReadImage(sys.argv[2]); print('on the input grid:', a.GetSize() == b.GetSize() and a.GetSpacing() == b.GetSpacing() and a.GetOrigin() == b.GetOrigin() and a.GetDirection() == b.GetDirection(), 'label values:', n.unique(s.GetArrayFromImage(a)).tolist())" \
      "$P/seg/${CT_TEST}_image_seg.nii.gz" "$C/${CT_TEST}_image.nii.gz" &&
  $TIMEOUT "$(limit 60 "$PHASE2_END")" "$PY" -m vaeuda info "$P/adapted.safetensors" > "$LOGS/cli_info.json"
  echo "paper_cli rc=$?" ) > "$OUT/paper_cli.log" 2>&1 &
wait
for f in "$LOGS"/demo_*.log "$OUT/paper_cli.log"; do   # each ends in its step's exit status
  name=$(basename "$f" .log); status=$(tail -1 "$f")
  log "$name: $status"
  [ "${status##*rc=}" = 0 ] || FAILED="$FAILED $name"
done
collect   # now too: a kill from outside during step 3 would leave no time for the exit trap

# 3. bf16 against fp32 on the trained, adapted model
D=$WORK/demo_s0
if [ -f "$D/models/adapted.safetensors" ]; then
  TEST=$("$PY" -c "import sys; from vaeuda.demo import cohort_split; print(cohort_split(sys.argv[1], 'ct', 'test')[0])" "$D/cohort")
  $TIMEOUT "$(limit 90)" "$PY" "$REPO/benchmarks/bf16_accuracy.py" --model "$D/models/adapted.safetensors" \
      --device "$DEVICE" "$D/cohort/${TEST}_image.nii.gz" "$D/cohort/${TEST}_label.nii.gz" \
      > "$OUT/bf16.json" 2> "$LOGS/bf16.log"
  rc=$?; log "bf16_accuracy.py rc=$rc"; [ $rc = 0 ] || FAILED="$FAILED bf16_accuracy"
else
  FAILED="$FAILED bf16_accuracy"
fi
