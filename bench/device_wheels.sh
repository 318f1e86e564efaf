#!/usr/bin/env bash
# The wheels the GPU image lacks, downloaded here into .whl/ (git-ignored) for bench/h200_session.sh to install
# there: pydantic, datasets and their small dependencies, torch-optimi and torchao, for the image's Python 3.12;
# bitsandbytes unpacked into .whl/bnbsite with only its CUDA 13 libraries (the whole wheel is 43 MB).
#
#   bash bench/device_wheels.sh          # then carry .whl with the device call
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do platforms+=(--platform "$p"); done
download() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d "$1" "${@:2}"
}
download .whl pydantic==2.14.4 pydantic-core==2.50.5 annotated_types typing_inspection datasets==5.2.0 \
  "dill<0.4.2" "multiprocess<0.70.20" xxhash torch_optimi==0.3.3 torchao==0.18.0
tmp=$(mktemp -d)
download "$tmp" bitsandbytes==0.50.2
rm -rf .whl/bnbsite && mkdir -p .whl/bnbsite
(cd .whl/bnbsite && python3 -m zipfile -e "$tmp"/bitsandbytes-*.whl .)
find .whl/bnbsite/bitsandbytes -name 'libbitsandbytes_*.so' ! -name '*cuda13*' -delete
rm -rf "$tmp"
du -sh .whl
