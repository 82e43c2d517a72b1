#!/usr/bin/env bash
# Everything the tests need, then the whole test suite (python -m pytest). Extra args go to pytest.
# Installs what is missing: Debian's Chromium (the UI tests drive it with Playwright) and PostgreSQL
# (the real-scheduler test) with apt-get, the venv with the test extra, and podman with the Debian
# base image and the runtime image from docker/Dockerfile (the container tests; scripts/images.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
command -v chromium >/dev/null || missing+=(chromium)
command -v pg_ctlcluster >/dev/null || missing+=(postgresql)
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi
bash scripts/setup.sh
images_started=$SECONDS
bash scripts/images.sh
echo "scripts/images.sh took $((SECONDS - images_started)) s"
exec .venv/bin/python -m pytest "$@"
