#!/usr/bin/env bash
# Install the benchmark peers (learn2learn 0.2.0 and higher 0.2.1) into their own virtual environment.
#
# The peers are never dependencies of mtml: they live in build/venv-bench (build/ is git-ignored), next to
# torch (pinned: a bare `torch` requirement pulls a multi-GB CUDA build), numpy and mtml itself (editable).
#
#   bash benchmarks/setup_peers.sh                # then:
#   build/venv-bench/bin/python benchmarks/sinusoid_maml.py
#
# learn2learn 0.2.0's sdist ships Cython-generated C that no longer compiles on Python 3.11, so this script
# regenerates the C from the shipped .pyx with a current Cython, builds without build isolation, makes its
# `from . import vision` import optional (vision needs torchvision, which the benchmark does not use), and adds
# gym, which learn2learn imports at start-up. higher installs with --no-deps (its metadata pins an old torch).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MTML_BENCH_VENV:-$ROOT/build/venv-bench}"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --quiet)
"${PIP[@]}" --upgrade pip setuptools wheel
"${PIP[@]}" "torch==$TORCH_VERSION" numpy "cython>=3" gym requests tqdm scipy
"${PIP[@]}" -e "$ROOT"  # with its own dependencies; torch is already pinned above

# higher: pure Python; its requirements would downgrade torch.
"${PIP[@]}" --no-deps "higher==0.2.1"

# learn2learn: rebuild the Cython extensions from source.
if ! "$VENV/bin/python" -c "import learn2learn" 2>/dev/null; then
    WORK="$(mktemp -d)"
    trap 'rm -rf "$WORK"' EXIT
    "$VENV/bin/python" -m pip download --quiet --no-deps --no-build-isolation --no-binary learn2learn \
        "learn2learn==0.2.0" -d "$WORK"
    tar -xzf "$WORK"/learn2learn-0.2.0.tar.gz -C "$WORK"
    SRC="$WORK/learn2learn-0.2.0"
    find "$SRC/learn2learn" -name '*.pyx' | while read -r pyx; do
        rm -f "${pyx%.pyx}.c"
        "$VENV/bin/cython" -3 "$pyx"
    done
    # `from . import vision` pulls torchvision; make it optional.
    "$VENV/bin/python" - "$SRC/learn2learn/__init__.py" <<'PY'
import sys
path = sys.argv[1]
text = open(path).read()
old = "from . import vision\n"
new = "try:\n    from . import vision\nexcept ImportError:  # torchvision is optional for the benchmark\n    vision = None\n"
if old in text and new not in text:
    text = text.replace(old, new, 1)
open(path, "w").write(text)
PY
    "${PIP[@]}" --no-build-isolation --no-deps "$SRC"
fi

"$VENV/bin/python" - <<'PY'
import importlib
for name in ("torch", "learn2learn", "higher"):
    try:
        module = importlib.import_module(name)
        print(f"{name} {getattr(module, '__version__', '?')}: ok")
    except Exception as exc:  # report, do not hide
        print(f"{name}: FAILED ({type(exc).__name__}: {exc})")
PY
