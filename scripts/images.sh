#!/usr/bin/env bash
# Real containers for the tests (tests/containers/): podman set up for these machines, a Debian
# Python base image made here (no image registry is reachable), and the runtime image built from
# docker/Dockerfile. Idempotent: a second run with nothing changed takes about a second.
#
#   bash scripts/images.sh           # installs what is missing, builds what is missing or stale
#   bash scripts/images.sh --check   # only says whether the runtime image is there and current (exit 1 if not)
#
# Everything podman keeps (configuration, image storage, events) lives under
# $AICENTER_PODMAN_HOME (default: .podman/ in the repository, gitignored), never in
# /var/lib/containers. To use the same podman by hand: `source .podman/env.sh; podman images`.
# Cold (no images): about 35 s (mmdebstrap about 27 s, the build about 7 s); nothing to do: under 1 s.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
PODMAN_HOME=${AICENTER_PODMAN_HOME:-$REPO/.podman}
BASE_IMAGE=${AICENTER_BASE_IMAGE:-localhost/debian-py:bookworm}
RUNTIME_IMAGE=${AICENTER_RUNTIME_IMAGE:-localhost/aicenter-runtime:test}
SUITE=${AICENTER_DEBIAN_SUITE:-bookworm}  # bookworm: Python 3.11, like the provider's floor
MIRROR=${AICENTER_DEBIAN_MIRROR:-}        # empty: mmdebstrap's default (deb.debian.org)
DIGEST_LABEL=aicenter.source-digest
started=$(date +%s.%N)
CHECK=0
[ "${1:-}" = --check ] && CHECK=1

say() { printf 'images.sh: %s\n' "$*" >&2; }
elapsed() { python3 -c "import sys,time; print(f'{time.time()-float(sys.argv[1]):.1f} s')" "$1"; }

if [ "$CHECK" = 1 ] && { ! command -v podman >/dev/null 2>&1 || [ ! -f "$PODMAN_HOME/containers.conf" ]; }; then
  echo "podman is not set up for the tests (no $PODMAN_HOME/containers.conf): run bash scripts/images.sh" >&2
  exit 1
fi

# -- tools -----------------------------------------------------------------------------
missing=()
for pair in podman:podman buildah:buildah mmdebstrap:mmdebstrap newuidmap:uidmap fuse-overlayfs:fuse-overlayfs runc:runc; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
done
if [ ${#missing[@]} -gt 0 ] && [ "$CHECK" = 0 ]; then
  say "installing ${missing[*]} with apt-get"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# -- podman configuration for these machines ----------------------------------------------
# runc (crun fails on the hybrid cgroup mount), cgroupfs (no systemd), events to a file, and
# default ulimits no higher than this machine's hard limits (podman's defaults exceed them).
mkdir -p "$PODMAN_HOME/storage" "$PODMAN_HOME/run" "$PODMAN_HOME/tmp"
# (No CAP_SYS_RESOURCE here: a limit above what runc itself holds fails with "error setting rlimit".)
cap() { local v; v=$(ulimit -H "$1"); [ "$v" = unlimited ] || [ "$v" -gt "$2" ] && v=$2; echo "$v"; }
nofile=$(cap -n 20000); nproc=$(cap -u 32768)
cat >"$PODMAN_HOME/containers.conf.new.$$" <<EOF
# Written by scripts/images.sh: podman for the tests (tests/containers/podman.py).
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "$PODMAN_HOME/events.log"
tmp_dir = "$PODMAN_HOME/tmp"
EOF
cat >"$PODMAN_HOME/storage.conf.new.$$" <<EOF
# Written by scripts/images.sh: image storage of the tests' podman, apart from the system's.
[storage]
driver = "overlay"
graphroot = "$PODMAN_HOME/storage"
runroot = "$PODMAN_HOME/run"
EOF
cat >"$PODMAN_HOME/env.sh.new.$$" <<EOF
# source this to use the tests' podman by hand (written by scripts/images.sh)
export CONTAINERS_CONF="$PODMAN_HOME/containers.conf"
export CONTAINERS_STORAGE_CONF="$PODMAN_HOME/storage.conf"
EOF
for name in containers.conf storage.conf env.sh; do
  # one temporary per process: the test fixtures of two pytest workers may check at the same time
  if cmp -s "$PODMAN_HOME/$name.new.$$" "$PODMAN_HOME/$name"; then rm -f "$PODMAN_HOME/$name.new.$$"; else mv -f "$PODMAN_HOME/$name.new.$$" "$PODMAN_HOME/$name"; fi
done
export CONTAINERS_CONF="$PODMAN_HOME/containers.conf" CONTAINERS_STORAGE_CONF="$PODMAN_HOME/storage.conf"

work=$(mktemp -d "$PODMAN_HOME/tmp/images.XXXXXX")
trap 'rm -rf "$work"' EXIT

# -- the base image: Debian's Python, made with mmdebstrap ---------------------------------
if [ "$CHECK" = 1 ] && ! podman image exists "$BASE_IMAGE"; then
  echo "the base image $BASE_IMAGE is missing: run bash scripts/images.sh" >&2
  exit 1
fi
if ! podman image exists "$BASE_IMAGE"; then
  t=$(date +%s.%N)
  say "making $BASE_IMAGE with mmdebstrap ($SUITE)"
  # An imported tarball has no PATH: set it, and let pip install into the system Python (PEP 668).
  mmdebstrap --quiet --variant=minbase \
    --include=python3,python3-venv,python3-pip,python-is-python3,ca-certificates \
    "$SUITE" "$work/base.tar" ${MIRROR:+"$MIRROR"}
  podman import --quiet \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV PIP_BREAK_SYSTEM_PACKAGES=1' \
    "$work/base.tar" "$BASE_IMAGE" >/dev/null
  rm -f "$work/base.tar"
  say "$BASE_IMAGE made in $(elapsed "$t")"
fi

# -- the runtime image from docker/Dockerfile -------------------------------------------------
# The build context holds only what the Dockerfile copies (not .venv, not this folder's image
# storage). The image is labelled with a digest of that context and of the base image, so
# tests/containers can tell an image that is older than the code (and a rebuild is skipped
# when nothing changed).
context="$work/context"
mkdir -p "$context"
tar -C "$REPO" --exclude='__pycache__' --exclude='*.pyc' -cf - airflow_aicenter docker | tar -C "$context" -xf -
base_id=$(podman image inspect --format '{{.Id}}' "$BASE_IMAGE")
digest=$( { (cd "$context" && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum); echo "base $base_id"; } | sha256sum | cut -d' ' -f1)
current=""
if podman image exists "$RUNTIME_IMAGE"; then
  current=$(podman image inspect --format "{{ index .Labels \"$DIGEST_LABEL\" }}" "$RUNTIME_IMAGE" 2>/dev/null || true)
fi
if [ "$CHECK" = 1 ]; then
  if [ -z "$current" ]; then
    echo "the runtime image $RUNTIME_IMAGE is missing: run bash scripts/images.sh" >&2; exit 1
  elif [ "$current" != "$digest" ]; then
    echo "the runtime image $RUNTIME_IMAGE is older than airflow_aicenter/ or docker/: run bash scripts/images.sh" >&2; exit 1
  fi
  exit 0
fi
if [ "$current" != "$digest" ]; then
  t=$(date +%s.%N)
  say "building $RUNTIME_IMAGE from docker/Dockerfile"
  # --network=host: the bridge network leaves iptables chains behind. The host's CA bundle is
  # mounted for the build only (the package index is reached through a TLS-intercepting
  # proxy); it is never copied into the image.
  ca=()
  [ -f /etc/ssl/certs/ca-certificates.crt ] && ca=(-v /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro)
  podman build --quiet --network=host "${ca[@]}" --layers \
    --build-arg PYTHON_IMAGE="$BASE_IMAGE" --label "$DIGEST_LABEL=$digest" \
    -f "$context/docker/Dockerfile" -t "$RUNTIME_IMAGE" "$context" >/dev/null
  podman image prune -f >/dev/null 2>&1 || true  # the previous build's image, now untagged
  say "$RUNTIME_IMAGE built in $(elapsed "$t")"
fi
printf '%s\n' "$digest" >"$PODMAN_HOME/runtime-image.digest"
say "images ready ($BASE_IMAGE, $RUNTIME_IMAGE) in $(elapsed "$started")"
