#!/usr/bin/env bash
# Run HERE (a machine with PyPI), before benchmarks/gpu_suite.sh travels to the GPU machine.
# That machine has no network and no pydantic, which lora_ops.methods needs (each method's params
# model); these wheels (~2.5 MB, pure Python except pydantic_core) go with the working tree in
# .whl/ (git-ignored) and gpu_suite.sh installs them with --no-index. Versions: the project venv's.
# Its Python is 3.12 (x86-64); pass another version as $1 if that changes.
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER="${1:-3.12}"
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl \
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0
ls -l .whl
