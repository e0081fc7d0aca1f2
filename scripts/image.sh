#!/usr/bin/env bash
# Builds the SIE image, tagged sie-server:latest and sie-server:<version>. Extra arguments go to `docker build`.
#
# On a machine with Docker and a reachable registry this is a plain `docker build` of the Dockerfile (official
# python:3.11-slim base, torch from the PyTorch CPU index). Where no registry is reachable and pip's TLS is intercepted
# (this project's CI machines), it instead
#   - starts dockerd on its default socket if none answers (no systemd there; no bridge, so no private address range),
#   - builds a Debian bookworm base with debootstrap and `docker import`s it (once: kept as local/debian-py:bookworm),
#   - passes pip's CA bundle as a BuildKit secret (it lands in no layer), and the local torch wheel in the context.
# SIE_IMAGE_LOCAL=1 forces the second way, =0 the first; by default it is chosen by whether pip names a find-links
# folder holding the torch wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGE=${SIE_IMAGE:-sie-server}
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
BASE=local/debian-py:bookworm
CACHE=.cache/image
WHEELS=docker/wheels
PY=${PY:-python3}

# A pip setting as `pip config list` reports it, from the environment or any configuration file (first wins).
pip_setting() { "$PY" -m pip config list 2>/dev/null | sed -n "s/^[^.]*\.$1='\(.*\)'\$/\1/p" | head -1; }

start_dockerd() {
  docker info >/dev/null 2>&1 && return 0
  command -v dockerd >/dev/null || { echo "error: no Docker engine answers and dockerd is not installed" >&2; exit 1; }
  echo "starting dockerd (log: $CACHE/dockerd.log)"
  nohup dockerd --bridge=none --iptables=false --ip-masq=false --ip6tables=false >"$CACHE/dockerd.log" 2>&1 &
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && return 0; sleep 1; done
  echo "error: dockerd did not answer within 60 s; see $CACHE/dockerd.log" >&2; exit 1
}

debian_mirror() {
  # The host's own Debian mirror: deb822 sources first, then the classic list.
  local uri
  uri=$(grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' | grep -v security | head -1)
  [ -n "$uri" ] || uri=$(grep -hs '^deb ' /etc/apt/sources.list | awk '{print $2}' | grep -v security | head -1)
  echo "${uri:-http://deb.debian.org/debian}"
}

build_base() {
  docker image inspect "$BASE" >/dev/null 2>&1 && return 0
  command -v debootstrap >/dev/null || { echo "error: debootstrap is not installed" >&2; exit 1; }
  local rootfs="$CACHE/rootfs"
  rm -rf "$rootfs"
  echo "building $BASE with debootstrap from $(debian_mirror)"
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$rootfs" "$(debian_mirror)" \
    >"$CACHE/debootstrap.log" 2>&1 || { tail -20 "$CACHE/debootstrap.log" >&2; exit 1; }
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" -c . | docker import -c 'CMD ["/bin/bash"]' - "$BASE" >/dev/null
  rm -rf "$rootfs"
}

torch_wheel() {
  local dir
  dir=$(pip_setting find-links)
  ls "${dir:-/nonexistent}"/torch-2.13.0+cpu-cp311-*.whl 2>/dev/null | head -1 || true
}

mkdir -p "$CACHE"
start_dockerd
wheel=$(torch_wheel)
local_mode=${SIE_IMAGE_LOCAL:-$([ -n "$wheel" ] && echo 1 || echo 0)}
args=(-t "$IMAGE:latest" -t "$IMAGE:$VERSION")
if [ "$local_mode" = 1 ]; then
  [ -n "$wheel" ] || { echo "error: SIE_IMAGE_LOCAL=1 but pip names no folder holding the torch 2.13.0 CPU wheel" >&2; exit 1; }
  build_base
  # The wheel goes into the build context's docker/wheels (ignored by git), where the Dockerfile looks first.
  mkdir -p "$WHEELS"
  [ -f "$WHEELS/$(basename "$wheel")" ] || cp -l "$wheel" "$WHEELS/" 2>/dev/null || cp "$wheel" "$WHEELS/"
  args+=(--network host --build-arg "BASE_IMAGE=$BASE" --build-arg "TORCH_WHEELS=$WHEELS")
  ca=$(pip_setting cert)
  if [ -n "$ca" ]; then args+=(--secret "id=pip-ca,src=$ca"); fi
fi
# BuildKit (for the secret and bind mounts): a client with the buildx plugin, else the engine's own client, whose
# builder is built in (Debian's docker.io 20.10 ships no buildx; a newer client found first on PATH may lack it).
builder=docker
if ! docker buildx version >/dev/null 2>&1 && [ -x /usr/bin/docker ]; then builder=/usr/bin/docker; fi
DOCKER_BUILDKIT=1 "$builder" build "${args[@]}" "$@" .
echo "built $IMAGE:latest and $IMAGE:$VERSION ($(docker image inspect -f '{{.Size}}' "$IMAGE:latest" | awk '{printf "%.2f GB", $1/1e9}'))"
