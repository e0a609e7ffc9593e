#!/usr/bin/env bash
# Runs every test: unit tests (TestPipeline/TestStream) and integration tests
# against the real Kafka, Redis and Postgres that scripts/stack.sh starts.
# Extra arguments go to pytest (e.g. scripts/test.sh -k aggregate).
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== installing the project and its test dependencies"
python3 -m pip install -q --disable-pip-version-check -e '.[test]'
echo "== the dashboard test's headless browser (Debian's chromium, installed when missing)"
bash scripts/install_browser.sh
echo "== starting the local stack"
scripts/stack.sh up
echo "== running the tests"
python3 -m pytest "$@"
