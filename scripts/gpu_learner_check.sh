#!/usr/bin/env bash
# The learner check on a lent GPU machine (scripts/gpu_learner_check.py), in two halves.
#
#   scripts/gpu_learner_check.sh wheels   # here, once: pydantic's wheels into .whl/ (ignored)
#   scripts/gpu_learner_check.sh run OUT  # there: install them, run the check into OUT
#
# That machine has torch, transformers, numpy, msgpack and PyYAML (Python 3.12) but not
# pydantic, which hapo.config needs: its wheels travel with the working tree (carry .whl).
# The device command, at most a few minutes of its time:
#   scripts/gpu_learner_check.sh run "$OUT"     with carry [".whl"], timeout ~480 s
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
wheels)
    exclude="$(git rev-parse --git-path info/exclude)"
    mkdir -p "$(dirname "$exclude")"
    grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"
    platforms=()
    for n in 2_28 2_27 2_24 2_17 2014 1; do
        case $n in 2014 | 1) platforms+=(--platform "manylinux${n}_x86_64") ;;
        *) platforms+=(--platform "manylinux_${n}_x86_64") ;; esac
    done
    # The versions installed in this project's venv, for CPython 3.12.
    for spec in $(.venv/bin/python -c 'import importlib.metadata as m
for name in ("pydantic", "pydantic-core", "annotated-types", "typing-inspection"):
    print(f"{name}=={m.version(name)}")'); do
        python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
            --implementation cp "${platforms[@]}" -d .whl "$spec"
    done
    ls .whl
    ;;
run)
    out="${2:?usage: $0 run OUT}"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
    python3 scripts/gpu_learner_check.py --out "$out" 2>&1 | tee "$out/gpu_learner_check.log"
    ;;
*)
    sed -n '2,10p' "$0"
    exit 2
    ;;
esac
