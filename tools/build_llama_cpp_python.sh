#!/usr/bin/env bash
# Build a llama-cpp-python wheel from its source release, with edgekd's patches applied.
#   tools/build_llama_cpp_python.sh PYTHON VERSION WHEEL_DIR [PATCH ...]
# CMAKE_ARGS (from the environment) selects the instruction sets; see the Makefile.
# The wheel lands in WHEEL_DIR only when the whole build succeeded.
set -euo pipefail
python=$1 version=$2 wheels=$3
shift 3
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$python" -m pip download -q --no-deps --no-binary :all: -d "$work" "llama-cpp-python==$version"
tar xzf "$work/llama_cpp_python-$version.tar.gz" -C "$work"
for p in "$@"; do
    # --forward: never apply a patch twice; a patch that does not apply stops the build
    patch -d "$work" -p1 --forward --quiet < "$p" || { echo "patch $p does not apply to llama-cpp-python $version" >&2; exit 1; }
    echo "applied $(basename "$p")"
done
CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) "$python" -m pip wheel -q --no-deps --no-cache-dir -w "$work/dist" "$work/llama_cpp_python-$version"
mkdir -p "$wheels"
mv "$work"/dist/llama_cpp_python-*.whl "$wheels"/
