#!/usr/bin/env bash
# Prints the Python interpreter `make` should use, creating .venv first when needed.
#
# Inside a virtual environment, conda or Colab: that Python (Colab keeps its CUDA torch).
# Anywhere else (Debian/Ubuntu's /usr/bin/python3 refuses `pip install`: PEP 668): a .venv in the
# project, made with --system-site-packages so packages already on the machine are reused.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-python3}
inside=$("$PY" -c 'import os, sys; print(int(sys.prefix != sys.base_prefix or "CONDA_PREFIX" in os.environ or "COLAB_RELEASE_TAG" in os.environ or "google.colab" in sys.modules))')
if [ "$inside" = "1" ] || [ "${FTF_NO_VENV:-0}" = "1" ]; then
  command -v "$PY"
  exit 0
fi
if [ ! -x .venv/bin/python ]; then
  if ! "$PY" -m venv --system-site-packages .venv >&2; then
    echo "error: cannot create .venv with $PY (on Debian/Ubuntu: apt-get install python3-venv), or run make inside a virtual environment" >&2
    exit 1
  fi
  echo "created .venv (python: .venv/bin/python; activate it with: source .venv/bin/activate)" >&2
fi
echo "$PWD/.venv/bin/python"
