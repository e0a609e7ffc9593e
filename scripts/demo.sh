#!/usr/bin/env bash
# From a fresh machine to a result: install, start the local stack, produce a
# generated stream of learning events (2% malformed), run the streaming job on
# it until idle, and print what landed in Postgres, Redis and the dead-letter topic.
#   EVENTS=50000 SPAN_SECONDS=7200 scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
EVENTS=${EVENTS:-20000}
SPAN_SECONDS=${SPAN_SECONDS:-3600}

echo "== installing the project"
python3 -m pip install -q --disable-pip-version-check -e '.[test]'
echo "== starting the local stack"
scripts/stack.sh up
echo "== producing $EVENTS events over ${SPAN_SECONDS}s of event time"
python3 -m scripts.produce --events "$EVENTS" --span_seconds "$SPAN_SECONDS" --malformed_fraction 0.02
echo "== running the streaming job until the topics are idle for 5 s"
python3 -m pipelines.streaming --until_idle 5
echo "== what landed"
python3 -m scripts.summary
