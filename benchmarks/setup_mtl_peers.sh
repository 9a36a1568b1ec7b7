#!/usr/bin/env bash
# Install the multi-task weighting peers (LibMTL 1.1.5 and TorchJD) into their own virtual environment.
#
# The peers are never dependencies of mtml: they live in build/venv-mtl (build/ is git-ignored), next to torch
# (pinned: a bare `torch` requirement pulls a multi-GB CUDA build), cvxpy + ecos (Nash-MTL in both peers solves
# with cvxpy's ECOS) and mtml itself (editable, without its dependencies re-resolved).
#
#   bash benchmarks/setup_mtl_peers.sh        # then:
#   build/venv-mtl/bin/python benchmarks/weighting_speed.py
#
# LibMTL 1.1.5 installs with --no-deps (its metadata pins old torch/torchvision). Its package imports
# `load_state_dict_from_url` from `torchvision.models.utils`, which current torchvision no longer has, and the
# PyPI torchvision does not work here; this script patches the installed copy to import it from `torch.hub`
# and stubs the torchvision import the ResNet backbones need (the benchmark uses none of them). Its CAGrad
# hard-codes 3 tasks (`x.reshape(1,3)`); the patch makes those reshapes task-count agnostic (`-1`).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MTML_PEERS_VENV:-$ROOT/build/venv-mtl}"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --quiet)
"${PIP[@]}" --upgrade pip setuptools wheel
"${PIP[@]}" "torch==$TORCH_VERSION" numpy scipy cvxpy ecos
"${PIP[@]}" pydantic pyyaml typer rich safetensors matplotlib  # mtml's own dependencies
"${PIP[@]}" --no-deps -e "$ROOT"
"${PIP[@]}" torchjd qpsolvers quadprog  # quadprog: TorchJD's UPGrad projector
"${PIP[@]}" --no-deps "LibMTL==1.1.5"

# Patch LibMTL's torchvision imports in the installed copy (idempotent).
"$VENV/bin/python" - <<'PY'
import pathlib
import sysconfig

root = pathlib.Path(sysconfig.get_paths()["purelib"]) / "LibMTL"
for path in root.rglob("*.py"):
    text = path.read_text()
    new = text.replace("from torchvision.models.utils import load_state_dict_from_url",
                       "from torch.hub import load_state_dict_from_url")
    new = new.replace("import torchvision.models as models\n",
                      "try:\n    import torchvision.models as models\nexcept ImportError:  # unused by the benchmark\n"
                      "    models = None\n")
    if path.name == "CAGrad.py":
        new = new.replace("reshape(1,3)", "reshape(1,-1)").replace("reshape(3, 1)", "reshape(-1, 1)")
        new = new.replace("reshape(3,1)", "reshape(-1,1)")
    if new != text:
        path.write_text(new)
        print(f"patched {path.relative_to(root.parent)}")
PY

"$VENV/bin/python" - <<'PY'
import importlib
for name in ("torch", "torchjd", "LibMTL", "cvxpy", "mtml"):
    try:
        module = importlib.import_module(name)
        print(f"{name} {getattr(module, '__version__', '?')}: ok")
    except Exception as exc:  # report, do not hide
        print(f"{name}: FAILED ({type(exc).__name__}: {exc})")
PY
