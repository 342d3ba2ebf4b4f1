#!/usr/bin/env bash
# Create benchmarks/.venv-peers with the peer ES libraries (EvoTorch, evosax + JAX CPU) and deeplinear.
#
# Why a separate venv: the peers are benchmark opponents, not dependencies, and evotorch would
# otherwise be free to replace the project's CPU torch with a multi-GB CUDA build. torch is
# installed first and every later step runs under a constraint that pins it.
#
# Usage: bash benchmarks/setup_peers.sh [python]      (default python: python3)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
venv="$here/.venv-peers"
python="${1:-python3}"
req="$here/requirements-peers.txt"

"$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --disable-pip-version-check)
constraint="$(mktemp)"
trap 'rm -f "$constraint"' EXIT
grep -E '^torch==' "$req" > "$constraint"

"${pip[@]}" -c "$constraint" "$(grep -E '^torch==' "$req")"
"${pip[@]}" -c "$constraint" -r "$req"
"${pip[@]}" -c "$constraint" -e "$root"

"$venv/bin/python" - <<'PY'
import importlib.metadata as md
for name in ("torch", "evotorch", "evosax", "jax", "jaxlib", "deeplinear"):
    print(f"{name:10s} {md.version(name)}")
PY
