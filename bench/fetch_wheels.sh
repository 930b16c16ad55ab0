#!/usr/bin/env bash
# The dev extras the GPU image lacks (device tool: CPython 3.12, offline), fetched here as wheels into .whl/
# for bench/gpu_session.sh to install there (`carry: [".whl"]`; 64 MiB per call in all). Run from any
# directory, on a machine with PyPI; .whl/ is kept out of git through .git/info/exclude.
set -eu
cd "$(dirname "$0")/.."
exclude="$(git rev-parse --git-path info/exclude)"; mkdir -p "$(dirname "$exclude")"
grep -qxF /.whl/ "$exclude" 2>/dev/null || echo /.whl/ >> "$exclude"
WHEELS=(trl==1.16.0 accelerate==1.15.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 bitsandbytes==0.50.2)
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64 any; do PLATFORMS+=(--platform "$p"); done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]}" -d .whl "${WHEELS[@]}"
ls -la .whl
du -sh .whl
