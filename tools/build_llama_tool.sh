#!/usr/bin/env bash
# Build one of llama.cpp's own command-line tools (llama-perplexity, ...) from the llama.cpp that
# llama-cpp-python VERSION vendors, so the tool and edgekd's runtime are the same llama.cpp.
#   tools/build_llama_tool.sh PYTHON VERSION TOOL OUT_DIR
# CMAKE_ARGS (from the environment) selects the instruction sets, as for the wheel (see the Makefile).
# The binary lands in OUT_DIR only when the whole build succeeded.
set -euo pipefail
python=$1 version=$2 tool=$3 out=$4
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$python" -m pip download -q --no-deps --no-binary :all: -d "$work" "llama-cpp-python==$version"
tar xzf "$work/llama_cpp_python-$version.tar.gz" -C "$work"
src="$work/llama_cpp_python-$version/vendor/llama.cpp"
# shellcheck disable=SC2086
cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=OFF ${CMAKE_ARGS:-} > "$work/cmake.log"
cmake --build "$work/build" --target "$tool" -j "$(nproc)" > "$work/build.log" || { tail -30 "$work/build.log" >&2; exit 1; }
mkdir -p "$out"
cp "$work/build/bin/$tool" "$out/"
echo "$out/$tool"
