#!/usr/bin/env bash
# Builds llama.cpp's own tools (llama-server, llama-quantize, llama-imatrix) ONCE, from the same
# llama.cpp source the installed llama-cpp-python bindings were built from (their PyPI sdist carries
# vendor/llama.cpp), CPU only, into .cache/llama-tools/<bindings version>/bin (gitignored).
# finetuneflow/ship/llama_tools.py finds them there (or in $FTF_LLAMA_TOOLS=<dir>).
#
# Needs: cmake, a C++ compiler, the project's Python (PY=..., with pip). ~10+ min on 2 cores; a second
# run with the tools present does nothing. JOBS=N overrides the parallel build jobs (default 2).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
JOBS=${JOBS:-2}
TOOLS="llama-server llama-quantize llama-imatrix"
version=$("$PY" -c "from importlib.metadata import version; print(version('llama-cpp-python'))" 2>/dev/null) || {
  echo "error: llama-cpp-python is not installed for $PY (make install-llama first)" >&2; exit 1; }
root=$PWD/.cache/llama-tools/$version
bin=$root/bin
have=1
for t in $TOOLS; do [ -x "$bin/$t" ] || have=0; done
if [ "$have" = 1 ]; then echo "llama.cpp tools for llama-cpp-python $version: $bin"; exit 0; fi
command -v cmake >/dev/null || { echo "error: cmake is needed to build the llama.cpp tools (apt-get install cmake)" >&2; exit 1; }
work=$root/build-src
sdist=$root/llama_cpp_python-$version.tar.gz
rm -rf "$work"; mkdir -p "$work"
echo "building $TOOLS from llama-cpp-python $version's llama.cpp (CPU, -j$JOBS; ~10+ min once)"
if [ ! -f "$sdist" ]; then
  "$PY" -m pip download -q --no-binary :all: --no-deps "llama-cpp-python==$version" -d "$work"
  mv "$work/llama_cpp_python-$version.tar.gz" "$sdist"
fi
"$PY" -c "import sys, tarfile
kw = {'filter': 'data'} if hasattr(tarfile, 'data_filter') else {}
tarfile.open(sys.argv[1]).extractall(sys.argv[2], **kw)" "$sdist" "$work"
src=$work/llama_cpp_python-$version/vendor/llama.cpp
[ -f "$src/CMakeLists.txt" ] || { echo "error: no vendor/llama.cpp in llama-cpp-python $version's sdist" >&2; exit 1; }
cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF \
  -DGGML_CUDA=OFF -DGGML_METAL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON \
  -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF >"$work/cmake.log" 2>&1 || {
  tail -20 "$work/cmake.log" >&2; echo "error: cmake configure failed (log: $work/cmake.log)" >&2; exit 1; }
# shellcheck disable=SC2086
cmake --build "$work/build" --config Release -j "$JOBS" --target $TOOLS >"$work/build.log" 2>&1 || {
  tail -20 "$work/build.log" >&2; echo "error: building the llama.cpp tools failed (log: $work/build.log)" >&2; exit 1; }
mkdir -p "$bin.tmp"
for t in $TOOLS; do cp "$work/build/bin/$t" "$bin.tmp/$t"; done
echo "$version" >"$bin.tmp/VERSION"
rm -rf "$bin"; mv "$bin.tmp" "$bin"
rm -rf "$work" "$sdist"
echo "llama.cpp tools for llama-cpp-python $version: $bin"
