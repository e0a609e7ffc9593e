#!/usr/bin/env bash
# From a fresh machine to a result: install, start the local stack, produce a
# generated stream of learning events (2% malformed, with two injected
# anomalies), run the streaming job on it with its analytics service and live
# dashboard, check /events/status and /metrics against what was produced while
# it runs, let it drain and exit, and print what landed in Postgres, Redis and
# the dead-letter topic, and the alerts the anomalies raised.
#   EVENTS=50000 SPAN_SECONDS=7200 HTTP_PORT=8080 scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
EVENTS=${EVENTS:-20000}
SPAN_SECONDS=${SPAN_SECONDS:-3600}
HTTP_PORT=${HTTP_PORT:-8080}
URL="http://127.0.0.1:$HTTP_PORT"

echo "== installing the project"
python3 -m pip install -q --disable-pip-version-check -e '.[test]'
echo "== starting the local stack"
scripts/stack.sh up
# Two anomalies, for the alert rules to find: question_answered stops for two
# minutes at 2/3 of the span (a producer outage), and user-00042 answers ten
# questions in a row in under a second each at 1/2 of it. The span ends on a
# 5-minute boundary, so the drained job's last windows are whole.
OUTAGE_AT=$((SPAN_SECONDS * 2 / 3)); FAST_AT=$((SPAN_SECONDS / 2))
echo "== producing $EVENTS events over ${SPAN_SECONDS}s of event time (anomalies: question_answered" \
     "stops at +${OUTAGE_AT}s for 120 s; user-00042 answers implausibly fast at +${FAST_AT}s)"
counts=$(python3 -m scripts.produce --events "$EVENTS" --span_seconds "$SPAN_SECONDS" --malformed_fraction 0.02 \
         --align_end 300 --inject "rate_drop:question_answered@${OUTAGE_AT}+120" \
         --inject "fast_answers:user-00042@${FAST_AT}")
valid=$(python3 -c 'import json, sys; print(json.loads(sys.argv[1])["valid"])' "$counts")
invalid=$(python3 -c 'import json, sys; print(json.loads(sys.argv[1])["malformed"])' "$counts")
echo "   $valid valid, $invalid malformed"

echo "== running the streaming job (it exits once the topics are idle for 30 s)"
JOB_LOG=.stack/demo-job.log
mkdir -p .stack
python3 -m pipelines.streaming --until_idle 30 --early_firing 1 --http_port "$HTTP_PORT" >"$JOB_LOG" 2>&1 &
JOB=$!
trap 'kill "$JOB" 2>/dev/null || true' EXIT   # the job stops with the demo, also on an error
for _ in $(seq 600); do
  grep -m1 "analytics service listening" "$JOB_LOG" && break
  kill -0 "$JOB" 2>/dev/null || { cat "$JOB_LOG"; exit 1; }
  sleep 0.1
done
echo "== the live dashboard: $URL/ (open it in a browser while the job runs)"
echo "== the service, while the job runs"
python3 -m scripts.service_check --url "$URL" --expect-valid "$valid" --expect-invalid "$invalid"
echo "== letting the job drain and exit"
wait "$JOB"
trap - EXIT
sed -n '/streaming job finished/,$p' "$JOB_LOG"
echo "== what landed"
python3 -m scripts.summary
