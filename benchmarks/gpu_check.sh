#!/usr/bin/env bash
# The GPU check of the speed work, in ONE call on a lent GPU machine (H200, no internet; torch 2.11 cu130,
# transformers 5.17, peft 0.21.0, accelerate 1.15; no bitsandbytes, wandb or gguf). About 8 minutes.
#
#   here, once:        bash benchmarks/gpu_bundle.sh          # .gpu_bundle/site.tgz: MiniLM (fp16), bbc-news, bnb
#   on the machine:    run(command="bash benchmarks/gpu_check.sh", carry=[".gpu_bundle"], timeout_s=560)
#
# Phases, each under its own time limit so that one slow phase cannot take the others' time:
#   1. env       torch/CUDA/GPU, package versions, the host CPU's bf16 flags                 -> env.json
#   2. tests     the GPU-relevant tests on CUDA (the loop takes the GPU when torch sees one) -> tests.log
#   3. steps     one MiniLM-sized LoRA step on CUDA: fp32 vs bf16 base vs autocast, profile -> steps_cuda.json
#   4. bench     bench_trainer.py on CUDA, README config (800 rows, 256 tokens, batch 16, 2 epochs, lr 5e-4),
#                ours fp32/bf16 against HF fp32/bf16, interleaved                            -> bench_trainer.json
#   5. cpu       the host CPU at 2 threads: the same step, plus the oneDNN kernels it runs    -> steps_cpu.json
# then summary.json (the headline numbers of every phase). Progress and every phase's stderr: check.log.
# At most 8 files come back from $OUT; this writes 7.
#
# Without CUDA it says so and stops (exit 3) after env.json; GPU_CHECK_SMOKE=1 runs every phase at toy size
# on the CPU instead, to test this script's plumbing. Limits (seconds): TESTS_S, STEPS_S, BENCH_S, CPU_S;
# TESTS (the pytest arguments) and BENCH_REPEATS override the defaults.
set -uo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/gpu-check-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
BUNDLE=${BUNDLE:-.gpu_bundle}
SITE=${SITE:-/tmp/gpu-check-site}
START=$(date +%s)
LOG=$OUT/check.log
: > "$LOG"

say() { echo "[gpu_check +$(( $(date +%s) - START ))s] $*" | tee -a "$LOG" >&2; }

# --- the carried bundle: assets located by package, as the catalog does here ---------------------
if [ -f "$BUNDLE/site.tgz" ]; then
  mkdir -p "$SITE" && tar xzf "$BUNDLE/site.tgz" -C "$SITE" && say "bundle unpacked into $SITE"
  export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
else
  say "no $BUNDLE/site.tgz: build it with benchmarks/gpu_bundle.sh and carry $BUNDLE; tests that need MiniLM" \
      "will skip and the benchmark cannot find minilm-l6 / bbc-news"
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled WANDB_SILENT=true TOKENIZERS_PARALLELISM=false
export PYTHONUNBUFFERED=1 WORKBENCH_HOME=${WORKBENCH_HOME:-/tmp/gpu-check-home}

# --- 1. environment -----------------------------------------------------------------------------
"$PY" - > "$OUT/env.json" 2>>"$LOG" <<'EOF'
import importlib.metadata as md, json, os, platform
import torch
from workbench.catalog import DATASETS, MODELS
from workbench.loop.precision import cpu_bf16_flags

def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None

cuda = torch.cuda.is_available()
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
print(json.dumps({
    "cuda": cuda,
    "gpu": torch.cuda.get_device_name(0) if cuda else None,
    "capability": ".".join(map(str, torch.cuda.get_device_capability(0))) if cuda else None,
    "cuda_runtime": torch.version.cuda,
    "python": platform.python_version(),
    "packages": {n: version(n) for n in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "pandas",
                                          "scikit-learn", "safetensors", "pytest", "wandb", "gguf")},
    "assets": {a.name: str(a.path()) if a.installed else None for a in (MODELS["minilm-l6"], DATASETS["bbc-news"])},
    "host_cpu": cpu, "host_cpus": os.cpu_count(), "host_cpu_bf16_flags": cpu_bf16_flags(),
    "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
}, indent=2))
EOF
if [ ! -s "$OUT/env.json" ]; then
  say "the environment probe failed (python: $PY); see $LOG"
  exit 2
fi
CUDA=$("$PY" -c "import json,sys; print(int(json.load(open(sys.argv[1]))['cuda']))" "$OUT/env.json")
say "environment: $(tr -d '\n' < "$OUT/env.json" | head -c 400)"

if [ "$CUDA" = 1 ]; then
  DEVICE=cuda
  TESTS_DEFAULT="tests/test_trainer.py tests/test_peft_methods.py tests/test_methods.py tests/test_qlora.py \
tests/test_chat.py tests/test_seq2seq.py tests/test_llm_classifier.py tests/test_zeroshot.py tests/test_kernels.py \
tests/test_export.py tests/test_store_launch.py tests/test_bucketing.py tests/test_precision.py"
  STEP_ARGS="--batch-size 16 --max-length 256 --step-rounds 5 --steps-per-round 4"
  CPU_STEP_ARGS="--batch-size 16 --max-length 128 --step-rounds 3 --steps-per-round 1"
  BENCH_ARGS="--train-samples 800 --eval-samples 100000 --max-length 256 --batch-size 16 --epochs 2 --lr 5e-4 \
--repeats ${BENCH_REPEATS:-2}"
  TESTS_S=${TESTS_S:-170}; STEPS_S=${STEPS_S:-70}; BENCH_S=${BENCH_S:-230}; CPU_S=${CPU_S:-70}
elif [ "${GPU_CHECK_SMOKE:-0}" = 1 ]; then
  say "CUDA absent: GPU_CHECK_SMOKE=1, so every phase runs at toy size on the CPU (plumbing only, no figures)"
  DEVICE=cpu
  TESTS_DEFAULT="tests/test_bucketing.py"
  STEP_ARGS="--batch-size 2 --max-length 16 --step-rounds 1 --steps-per-round 1"
  CPU_STEP_ARGS=$STEP_ARGS
  BENCH_ARGS="--quick --train-samples 32 --eval-samples 32 --max-length 32 --repeats ${BENCH_REPEATS:-1}"
  TESTS_S=${TESTS_S:-300}; STEPS_S=${STEPS_S:-600}; BENCH_S=${BENCH_S:-1800}; CPU_S=${CPU_S:-600}
else
  say "CUDA absent: torch sees no GPU here, so there is nothing to check (env.json written)." \
      "Run this on the GPU machine, or set GPU_CHECK_SMOKE=1 to test the script at toy size on the CPU."
  printf '{"cuda": false, "phases": {}}\n' > "$OUT/summary.json"
  exit 3
fi
TESTS=${TESTS:-$TESTS_DEFAULT}

declare -A STATUS
phase() {  # phase NAME SECONDS OUTFILE COMMAND...: run with a time limit, stdout to OUTFILE, stderr to the log
  local name=$1 limit=$2 out=$3; shift 3
  say "$name: start (limit ${limit}s)"
  local t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$out" 2>>"$LOG"
  local rc=$?
  case $rc in
    0) STATUS[$name]="ok" ;;
    124|137) STATUS[$name]="timed out after ${limit}s" ;;
    *) STATUS[$name]="exit $rc" ;;
  esac
  say "$name: ${STATUS[$name]} in $(( $(date +%s) - t0 ))s"
}

# --- 2. tests on the device -------------------------------------------------------------------------
# shellcheck disable=SC2086  # TESTS is a list of pytest arguments
phase tests "$TESTS_S" "$OUT/tests.log" "$PY" -m pytest -q -p no:cacheprovider -m "not integration" \
  -o addopts="" $TESTS
say "tests: $(grep -E '(passed|failed|error|skipped)' "$OUT/tests.log" | tail -1)"

# --- 3. one training step on the device: fp32 vs bf16 base vs autocast ------------------------------
# shellcheck disable=SC2086
phase steps "$STEPS_S" "$OUT/steps_$DEVICE.json" "$PY" benchmarks/bench_trainer.py --steps --device "$DEVICE" \
  $STEP_ARGS --profile

# --- 4. the training benchmark: ours against HF Trainer, fp32 and bf16 -------------------------------
# shellcheck disable=SC2086
phase bench "$BENCH_S" "$OUT/bench_trainer.json" "$PY" benchmarks/bench_trainer.py --device "$DEVICE" \
  --precision fp32,bf16 $BENCH_ARGS

# --- 5. the host CPU at laptop size: does native bf16 pay there, and which kernels run --------------
if [ "$DEVICE" = cuda ]; then
  # shellcheck disable=SC2086
  phase cpu "$CPU_S" "$OUT/steps_cpu.json" "$PY" benchmarks/bench_trainer.py --steps --device cpu --threads 2 \
    $CPU_STEP_ARGS --profile --onednn
fi

# --- summary ---------------------------------------------------------------------------------------
STATUS_JSON=$(for k in "${!STATUS[@]}"; do printf '%s\t%s\n' "$k" "${STATUS[$k]}"; done)
STATUS_JSON="$STATUS_JSON" "$PY" - "$OUT" > "$OUT/summary.json" 2>>"$LOG" <<'EOF'
import json, os, re, sys
from pathlib import Path

out = Path(sys.argv[1])

def load(name):
    try:
        return json.loads((out / name).read_text())
    except (OSError, ValueError):
        return None

status = dict(line.split("\t", 1) for line in os.environ["STATUS_JSON"].splitlines() if "\t" in line)
tests = (out / "tests.log").read_text(errors="replace") if (out / "tests.log").exists() else ""
counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed)", tests.splitlines()[-1] if tests.strip() else "")}
env = load("env.json") or {}
summary = {"cuda": env.get("cuda"), "phases": status, "env": env, "tests": counts}
for name in ("steps_cuda.json", "steps_cpu.json"):
    steps = load(name)
    if steps:
        summary[name.removesuffix(".json")] = {k: steps.get(k) for k in ("device", "shape", "median_ms", "vs_fp32")}
bench = load("bench_trainer.json")
if bench:
    summary["bench"] = {
        "device": bench.get("device"),
        "samples_per_second": {s: v["median_phase"] for s, v in bench["sides"].items()},
        "accuracy": {s: v["median_accuracy"] for s, v in bench["sides"].items()},
        "predict_samples_per_second": {s: v["median_predict_samples_per_second"] for s, v in bench["sides"].items()},
        "peak_memory_mb": {s: v["peak_memory_mb"] for s, v in bench["sides"].items()},
        "per_precision": bench.get("per_precision"), "best_vs_best": bench.get("best_vs_best"),
        "fraction_of_matmul_peak": bench.get("fraction_of_matmul_peak"),
        "matmul_peak_gflops": bench.get("ceiling", {}).get("matmul_peak_gflops"),
    }
print(json.dumps(summary, indent=2))
EOF
say "done: $(ls "$OUT" | tr '\n' ' ')"
[ -z "$(for k in "${!STATUS[@]}"; do [ "${STATUS[$k]}" = ok ] || echo x; done)" ]
