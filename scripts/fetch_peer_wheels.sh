#!/usr/bin/env bash
# Download the peer implementations that `python -m benchmarks.speed --sections peers` times, titans-pytorch 0.5.5
# and nested-learning 0.2.0, with all their dependencies except torch, triton, nvidia-* and cuda-* (the GPU
# machine has its own torch + triton), as wheels for the GPU machine, which reaches no registry.
#
#   .wheels/peers/        what the benchmark needs at run time (the two packages and every dependency they import);
#                         small enough to carry (a few tens of MB): carry it and install there with
#                         `python -m pip install --no-deps --no-index .wheels/peers/*.whl`
#                         (`python -m benchmarks.speed --install-peers` runs that command first)
#   .wheels/peers-extra/  the declared dependencies that the benchmarked classes never import: nested-learning's
#                         data and training tooling (datasets with pyarrow and pandas, huggingface-hub, hydra-core,
#                         sentencepiece, langdetect, typer, zstandard) and what only they pull in (about 60 MB,
#                         more than a device call carries); install them the same way where they are wanted
#
# Resolution runs here (pip's --dry-run --report, metadata only: no torch wheel is downloaded); the wheels are then
# fetched for the target: TARGET_PY (default 3.12, the GPU machine's Python) and manylinux x86_64. A dependency
# published only as a source archive (langdetect, antlr4-python3-runtime: pure Python) is built into a wheel here.
# Markers are evaluated for this machine's Python: run it with a Python of the target's minor version to be exact.
#
#   bash scripts/fetch_peer_wheels.sh                 # PYTHON=.venv/bin/python TARGET_PY=3.12 by default
#   TARGET_PY=3.11 OUT=/tmp/peer-wheels bash scripts/fetch_peer_wheels.sh    # wheels for this CPU machine
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
TARGET_PY=${TARGET_PY:-3.12}
OUT=${OUT:-.wheels/peers}
EXTRA=${EXTRA:-${OUT}-extra}
PEERS=(titans-pytorch==0.5.5 nested-learning==0.2.0)
# declared by nested-learning, imported only by its data / training tooling, not by HOPEModel or compute_teach_signal
NOT_IMPORTED="datasets huggingface-hub hydra-core langdetect sentencepiece typer zstandard"
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64
           manylinux2014_x86_64 manylinux_2_12_x86_64 manylinux2010_x86_64 manylinux_2_5_x86_64 manylinux1_x86_64
           linux_x86_64 any)

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$OUT" "$EXTRA"

echo "resolving ${PEERS[*]} (metadata only) ..."
"$PYTHON" -m pip install --dry-run --ignore-installed --quiet --report "$tmp/report.json" "${PEERS[@]}"

# split the resolved set: skip torch / triton / nvidia-* / cuda-*; what the peers reach without NOT_IMPORTED is
# the run-time set, the rest goes to EXTRA; source-only packages are listed apart, to be built into wheels
"$PYTHON" - "$tmp" "$NOT_IMPORTED" "$TARGET_PY" <<'EOF'
import json, re, sys
from pip._vendor.packaging.requirements import Requirement
from pip._vendor.packaging.utils import canonicalize_name

tmp, not_imported, target_py = sys.argv[1], set(sys.argv[2].split()), sys.argv[3]
items = {canonicalize_name(i["metadata"]["name"]): i for i in json.load(open(f"{tmp}/report.json"))["install"]}
skip = re.compile(r"(torch|triton|nvidia-.*|cuda-.*)$")


def deps(name):
    item = items[name]
    env = {"python_version": target_py, "python_full_version": target_py + ".0"}
    for text in item["metadata"].get("requires_dist", []):
        req = Requirement(text)
        extras = item.get("requested_extras") or [""]
        if req.marker is None or any(req.marker.evaluate({**env, "extra": e}) for e in extras):
            yield canonicalize_name(req.name)


runtime, todo = set(), [n for n, i in items.items() if i.get("requested")]
while todo:
    n = todo.pop()
    if n in runtime or n in not_imported or skip.match(n) or n not in items:
        continue
    runtime.add(n)
    todo.extend(deps(n))
for group, names in (("runtime", runtime), ("extra", {n for n in items if n not in runtime and not skip.match(n)})):
    for kind in ("wheel", "sdist"):
        with open(f"{tmp}/{group}-{kind}.txt", "w") as f:
            for n in sorted(names):
                is_wheel = items[n]["download_info"]["url"].endswith(".whl")
                if is_wheel == (kind == "wheel"):
                    f.write(f"{n}=={items[n]['metadata']['version']}\n")
EOF

plat=()
for p in "${PLATFORMS[@]}"; do plat+=(--platform "$p"); done
for group in runtime extra; do
  dest=$OUT; [ "$group" = extra ] && dest=$EXTRA
  while read -r req; do  # pure-Python packages published only as source: build the wheel here
    [ -n "$req" ] && "$PYTHON" -m pip wheel --quiet --no-deps -w "$dest" "$req"
  done < "$tmp/$group-sdist.txt"
  if [ -s "$tmp/$group-wheel.txt" ]; then
    "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$TARGET_PY" "${plat[@]}" \
      -d "$dest" -r "$tmp/$group-wheel.txt"
  fi
  echo "$group: $(cat "$tmp/$group-wheel.txt" "$tmp/$group-sdist.txt" | wc -l) packages in $dest ($(du -sh "$dest" | cut -f1))"
done
echo "install on the GPU machine: python -m pip install --no-deps --no-index $OUT/*.whl"
