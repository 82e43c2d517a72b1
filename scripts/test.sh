#!/usr/bin/env bash
# Everything the tests need, then both test tiers: the fast one (python -m pytest), then the integration
# one (python -m pytest -m integration). Extra args go to pytest, in both runs; exits non-zero if either fails.
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
# A tier with nothing left after the caller's filters (-k, paths) exits 5: no failure unless both tiers ran nothing.
codes=()
tier() {
  local name=$1 started=$SECONDS code=0
  shift
  echo "== $name tier: python -m pytest $*"
  .venv/bin/python -m pytest "$@" || code=$?
  echo "== $name tier took $((SECONDS - started)) s (exit $code)"
  codes+=("$code")
}
tier fast "$@"
tier integration -m integration "$@"
for code in "${codes[@]}"; do
  if [ "$code" -ne 0 ] && [ "$code" -ne 5 ]; then exit "$code"; fi
done
if [ "${codes[0]}" -eq 5 ] && [ "${codes[1]}" -eq 5 ]; then exit 5; fi
exit 0
