#!/usr/bin/env bash
# Build (and push) the portal and trainer images.
#
#   images/build.sh [--registry REGISTRY] [--tag TAG] [--push] [portal] [trainer]
#
# Defaults: both images, tag = the version in pyproject.toml, registry = $REGISTRY or
# registry.example.com/llamaboard. The engine is $CONTAINER_ENGINE (docker, or podman).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here/.."

usage() { sed -n '2,8s/^# \{0,1\}//p' "$here/build.sh"; }

registry="${REGISTRY:-registry.example.com/llamaboard}"
tag=""
push=0
engine="${CONTAINER_ENGINE:-docker}"
targets=()
while (($#)); do
  case "$1" in
    --registry) registry="$2"; shift 2 ;;
    --tag) tag="$2"; shift 2 ;;
    --push) push=1; shift ;;
    -h|--help) usage; exit 0 ;;
    portal|trainer) targets+=("$1"); shift ;;
    *) echo "build.sh: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
  esac
done
((${#targets[@]})) || targets=(portal trainer)
[[ -n "$tag" ]] || tag="$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml)"

# the trainer must run the LLaMA-Factory the portal's form and checks were written against
pin="$(grep -o '"llamafactory==[^"]*"' pyproject.toml | tr -d '"')"
if ! grep -qxF "$pin" images/trainer/requirements.txt; then
  echo "build.sh: images/trainer/requirements.txt must pin $pin, as pyproject.toml does" >&2
  exit 1
fi

revision="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
for target in "${targets[@]}"; do
  image="$registry/$target:$tag"
  if [[ "$target" == portal ]]; then context=.; else context=images/trainer; fi
  echo "build.sh: building $image"
  "$engine" build -f "images/$target/Dockerfile" -t "$image" \
    --label "org.opencontainers.image.version=$tag" \
    --label "org.opencontainers.image.revision=$revision" \
    "$context"
  if ((push)); then
    "$engine" push "$image"
  fi
done
