#!/usr/bin/env bash
# A Docker engine for `make container-test`, set up on this machine when it is missing:
#   - docker.io (dockerd) and debootstrap from apt (`apt-get update` once first), as root;
#   - dockerd started in the background when nothing answers (log: $DOCKERD_LOG);
#   - the compose v2 CLI plugin, built once from the Go module proxy, when `docker compose`
#     is missing (Debian 12 has only compose 1.29, which cannot `!reset` a GPU reservation).
# Idempotent: with everything in place it changes nothing.
set -euo pipefail

COMPOSE_VERSION="${COMPOSE_VERSION:-v2.29.7}"
DOCKERD_LOG="${DOCKERD_LOG:-/var/log/streamproc-dockerd.log}"
PLUGIN_DIR="${DOCKER_CONFIG:-$HOME/.docker}/cli-plugins"

log() { printf 'docker_engine.sh: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

missing=()
command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
if ((${#missing[@]})); then
  [[ $EUID -eq 0 ]] || die "needs root to install ${missing[*]}"
  log "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if ! docker info >/dev/null 2>&1; then
  [[ $EUID -eq 0 ]] || die "no Docker engine answers, and starting dockerd needs root"
  log "starting dockerd (log: $DOCKERD_LOG)"
  setsid nohup dockerd >"$DOCKERD_LOG" 2>&1 </dev/null &
  for _ in $(seq 60); do
    docker info >/dev/null 2>&1 && break
    sleep 0.5
  done
  docker info >/dev/null 2>&1 || { tail -n 20 "$DOCKERD_LOG" >&2; die "dockerd did not answer in 30 s"; }
fi

if ! docker compose version >/dev/null 2>&1; then
  command -v go >/dev/null 2>&1 || die "docker compose v2 is missing, and building it needs Go"
  log "building docker compose $COMPOSE_VERSION from the Go module proxy (a few minutes, once)"
  gobin="$(mktemp -d)"
  trap 'rm -rf "$gobin"' EXIT
  GOBIN="$gobin" go install "github.com/docker/compose/v2/cmd@$COMPOSE_VERSION"
  mkdir -p "$PLUGIN_DIR"
  install -m 0755 "$gobin/cmd" "$PLUGIN_DIR/docker-compose"
fi
docker compose version >&2
