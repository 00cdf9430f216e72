#!/usr/bin/env bash
# Download, here, the wheels that the GPU machine lacks for benchmarks/gpu_suite.sh, into .whl/ (git-ignored), and
# check that they and the working tree fit in what one device call carries (64 MiB in all).
#
#   bash scripts/prepare_gpu_wheels.sh          # then run the device command in README.md's "GPU figures"
#
# The GPU machine (Python 3.12, torch 2.11 cu130, no network) has transformers, accelerate, peft, safetensors,
# huggingface_hub, onnxruntime, opencv, pandas, pyarrow, fsspec, psutil, pyyaml, click, msgpack, protobuf, requests,
# attrs, scikit-image, pytest and nvidia-ml-py (see the device README's KINDS.md), but not:
#   diffusers                      the diffusion engine, the img2img baseline, FaceSnap's components
#   ray                            the Ray Data stage (and its jsonschema -> jsonschema-specifications, referencing,
#                                  rpds-py, which `import ray` needs)
# Versions are this project's venv's (diffusers 0.42.1 needs huggingface_hub >= 1.32: the machine has 1.33).
# Nothing else is carried: dlib and its model files (~100 MB) stay behind (the benchmarks take --synthetic-face),
# and so do insightface and onnxruntime-gpu (the insightface GPU test then skips, saying why).
#
# Ray's wheel is 76 MiB, over the budget on its own: 31 MiB of it is the Java jars. It is rewritten without
# ray/jars, ray/rllib, ray/serve, ray/llm and the dashboard's web build (scripts/trim_wheel.py), which a local Ray
# Data job never loads: 40 MiB. With diffusers (6 MiB) and the rest the wheels come to about 46 MiB.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
DEST=.whl
LIMIT_MIB=64
WHEELS=(diffusers==0.42.1 ray==2.60.0 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0
    rpds-py==2026.9.1)
RAY_DROP=(ray/jars/ ray/rllib/ ray/serve/ ray/llm/ ray/dashboard/client/build/)

git check-ignore -q "$DEST/x.whl" || { echo "$DEST/ must be git-ignored (it is in .gitignore)" >&2; exit 1; }
rm -rf "$DEST"
mkdir -p "$DEST"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
    manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d "$DEST" "${WHEELS[@]}"
"$PY" scripts/trim_wheel.py "$DEST"/ray-*.whl "${RAY_DROP[@]}"

# what travels: the wheels, plus every tracked or untracked-not-ignored file of the working tree
wheels_b=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
tree_b=$( (git ls-files -z --cached --others --exclude-standard | xargs -0 -r stat -c %s 2>/dev/null || true) |
    awk '{ s += $1 } END { print s + 0 }')
ls -l "$DEST"
"$PY" - "$wheels_b" "$tree_b" "$LIMIT_MIB" <<'EOF'
import sys
wheels, tree, limit = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
total = (wheels + tree) / 2**20
print(f"wheels {wheels / 2**20:.1f} MiB + working tree {tree / 2**20:.1f} MiB = {total:.1f} MiB (limit {limit:g} MiB)")
if total > limit:
    sys.exit("over the device call's limit: leave something out (see the header of this script)")
EOF
