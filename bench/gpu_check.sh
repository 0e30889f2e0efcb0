#!/usr/bin/env bash
# Run bench/gpu_check.py on a GPU machine that has no package registry (docs/GPU_CHECK.md).
#
# 1. Prints the Python it uses (python3, or $PYTHON) and what it finds installed.
# 2. Installs from the carried wheels/ folder ONLY the distributions this machine lacks (or has in a
#    version that does not fit), with pip --no-index --no-deps --target into a scratch folder put on
#    PYTHONPATH: the machine's own torch (CUDA build), transformers 5.x, numpy... stay as they are.
#    (Not a `venv --system-site-packages`: the GPU image's python3 is itself a venv, and a venv made from
#    a venv sees the base interpreter's site-packages, not that venv's torch.)
# 3. Runs the check with the repository on PYTHONPATH (the repo is carried as a working tree, not installed).
# A wheel that does not install (e.g. it does not match this Python) is reported clearly and the check
# still runs: each of its parts records its own import error in the JSON.
#
# Usage: OUT=/some/dir bash bench/gpu_check.sh [gpu_check.py options...]
# Env:   PYTHON (default python3), WHEELS (default <repo>/wheels), GPU_CHECK_SITE (default /tmp/rise-gpu-check-site),
#        GPU_CHECK_TIMEOUT (seconds, default 465: the script's own budget is 420 s)
set -u -o pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-$REPO/bench/results}"
PY="${PYTHON:-python3}"
WHEELS="${WHEELS:-$REPO/wheels}"
SITE="${GPU_CHECK_SITE:-/tmp/rise-gpu-check-site}"
LIMIT="${GPU_CHECK_TIMEOUT:-465}"
export OUT PYTHONUNBUFFERED=1
mkdir -p "$OUT"

# What must import for the check, as "distribution specifier": ours, then diffusers 0.39's own requirements.
REQUIREMENTS='
diffusers ==0.39.0
websockets >=13
prometheus-client >=0.20
huggingface-hub >=0.34.0,<2.0
safetensors >=0.8.0
httpx <1.0.0
requests
regex !=2019.12.17
filelock
Pillow
numpy
torch
transformers
'

setup() {
    echo "== gpu_check.sh: repo $REPO, out $OUT, wheels $WHEELS"
    if ! command -v "$PY" >/dev/null 2>&1; then
        echo "ERROR: no $PY on PATH (set PYTHON=...)"
        return 2
    fi
    echo "== python: $(command -v "$PY") -> $("$PY" -V 2>&1) ($("$PY" -c 'import sys; print(sys.executable)'))"
    command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>&1 | head -4
    local wanted
    wanted="$("$PY" - "$WHEELS" "$REQUIREMENTS" <<'EOF'
import importlib.metadata as md
import re
import sys
from pathlib import Path

wheels, requirements = Path(sys.argv[1]), sys.argv[2]
try:
    from packaging.specifiers import SpecifierSet
except ImportError:  # presence is then all that is checked
    SpecifierSet = None

def norm(name):
    return re.sub(r"[-_.]+", "_", name).lower()

carried = {norm(p.name.split("-")[0]): p.name for p in wheels.glob("*.whl")} if wheels.is_dir() else {}
print(f"== carried wheels: {', '.join(sorted(carried.values())) or 'none'}", file=sys.stderr)
for line in requirements.split("\n"):
    if not line.strip():
        continue
    name, _, spec = line.strip().partition(" ")
    try:
        version = md.version(name)
    except md.PackageNotFoundError:
        version = None
    fits = version is not None and (not spec or SpecifierSet is None or SpecifierSet(spec).contains(version, prereleases=True))
    if fits:
        print(f"   have    {name} {version}", file=sys.stderr)
        continue
    why = "missing" if version is None else f"{version} does not satisfy {spec}"
    if norm(name) in carried:
        print(f"   install {name} ({why}) from {carried[norm(name)]}", file=sys.stderr)
        print(name + spec.replace(" ", ""))
    else:
        print(f"   WARNING {name} {why}, and no wheel for it is carried: the parts that need it will fail", file=sys.stderr)
EOF
)" || { echo "ERROR: could not check the installed packages"; return 2; }
    local -a install=()
    [ -n "$wanted" ] && mapfile -t install <<<"$wanted"
    export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
    if [ "${#install[@]}" -gt 0 ]; then
        echo "== installing ${install[*]} into $SITE (pip --no-index --no-deps --find-links $WHEELS)"
        mkdir -p "$SITE"
        if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
                --target "$SITE" --find-links "$WHEELS" "${install[@]}"; then
            echo "ERROR: pip could not install ${install[*]} from $WHEELS for $("$PY" -V 2>&1)."
            echo "       A wheel that does not match this Python or platform? (the carried ones are py3-none-any;"
            echo "       websockets 17 needs Python >= 3.11, diffusers 0.39 >= 3.10). Trying to unpack them instead."
            for w in "$WHEELS"/*.whl; do "$PY" -m zipfile -e "$w" "$SITE" || echo "ERROR: cannot unpack $w"; done
        fi
        export PYTHONPATH="$REPO:$SITE${PYTHONPATH#"$REPO"}"
    fi
    echo "== PYTHONPATH=$PYTHONPATH"
    "$PY" - <<'EOF' 2>&1 | grep -v "^Multiple distributions"
import importlib

for name in ("torch", "diffusers", "transformers", "websockets", "prometheus_client", "PIL", "safetensors"):
    try:
        mod = importlib.import_module(name)
        print(f"   import {name:<18} ok  {getattr(mod, '__version__', '')}  {getattr(mod, '__file__', '')}")
    except Exception as exc:
        print(f"   import {name:<18} FAILED: {type(exc).__name__}: {exc}")
try:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    print(f"   torch CUDA {torch.version.cuda}, available {torch.cuda.is_available()}, {gpu}")
except Exception as exc:
    print(f"   torch: {exc}")
EOF
    return 0
}

run() {
    setup || echo "== setup failed (see above); running the check anyway"
    cd "$REPO" || return 2
    echo "== running bench/gpu_check.py $* (limit ${LIMIT} s)"
    if command -v timeout >/dev/null 2>&1; then
        timeout -k 15 "$LIMIT" "$PY" -u bench/gpu_check.py --out "$OUT" "$@"
    else
        "$PY" -u bench/gpu_check.py --out "$OUT" "$@"
    fi
    local rc=$?
    echo "== gpu_check.py exit $rc; files in $OUT:"
    ls -la "$OUT"
    return $rc
}

run "$@" 2>&1 | tee "$OUT/gpu_check_console.log"
exit "${PIPESTATUS[0]}"
