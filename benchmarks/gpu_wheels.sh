#!/usr/bin/env bash
# The wheels vistrain and its benchmarks need that the lent GPU machine's image lacks, downloaded here (where PyPI is
# reachable) into one folder to carry there; benchmarks/gpu_suite.sh installs them when it finds them missing.
#
#   bash benchmarks/gpu_wheels.sh [FOLDER]     # default .whl/ (git-ignored)
#
# The image (Python 3.12, torch 2.11 + CUDA, transformers, tokenizers, safetensors, scikit-learn, pyarrow, pandas,
# fsspec, xxhash, huggingface-hub, pyyaml, ...) has no omegaconf (vistrain's configs) and no datasets (the VLM's
# data, and nanoVLM's), nor datasets' dill and multiprocess. Each is fetched with --no-deps: nothing else comes
# along, torch above all (a torch from PyPI would be gigabytes and would replace the image's CUDA build). Versions
# are those installed beside $PYTHON (what the tests here ran with), else the newest; every requirement of the
# wheels must be carried too or be on the image (IMAGE_HAS below), or the script says which is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
folder=${1:-.whl}
PY=${PYTHON:-python3}
CARRIED=(omegaconf datasets dill multiprocess)
# what the image has of the carried wheels' requirements (the lent machines' package list, as read 2026-11-17)
IMAGE_HAS=${GPU_IMAGE_HAS-filelock fsspec huggingface-hub numpy packaging pandas pyarrow pyyaml tqdm xxhash}

specs=()
for name in "${CARRIED[@]}"; do
  version=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name" 2>/dev/null || true)
  specs+=("$name${version:+==$version}")
done
mkdir -p "$folder"
echo "gpu_wheels.sh: ${specs[*]} -> $folder/ (CPython 3.12, Linux x86-64)"
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$folder" "${specs[@]}"

# Every requirement (for Python 3.12 on Linux, no extras) of the wheels in the folder: carried, or on the image.
"$PY" - "$folder" "$IMAGE_HAS" <<'EOF'
import sys
import zipfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

folder, image = Path(sys.argv[1]), {canonicalize_name(n) for n in sys.argv[2].split()}
wheels = sorted(folder.glob("*.whl"))
carried = {parse_wheel_filename(w.name)[0] for w in wheels}
environment = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
               "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython", "extra": ""}
missing = []
for wheel in wheels:
    with zipfile.ZipFile(wheel) as z:
        metadata = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    for line in metadata.splitlines():
        if line.startswith("Requires-Dist:"):
            req = Requirement(line.split(":", 1)[1].strip())
            needed = req.marker is None or req.marker.evaluate(environment)
            if needed and canonicalize_name(req.name) not in carried | image:
                missing.append(f"{wheel.name} needs {req}")
if missing:
    sys.exit("gpu_wheels.sh: neither carried nor on the GPU image:\n  " + "\n  ".join(missing)
             + "\nadd them to CARRIED in benchmarks/gpu_wheels.sh")
print(f"gpu_wheels.sh: {len(wheels)} wheels in {folder}/, {sum(w.stat().st_size for w in wheels) / 2**20:.1f} MiB: "
      + ", ".join(w.name for w in wheels))
EOF
