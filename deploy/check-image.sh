#!/usr/bin/env bash
# Build the image and check it behaves as the Dockerfile says: runs as uid 10001 on a read-only
# root filesystem, refuses to start without provider keys (one line, exit 2), answers /health and
# /ready, turns healthy by its own HEALTHCHECK, and drains and exits 0 on `docker stop`.
#
#   bash deploy/check-image.sh            # needs a running Docker engine
#
# Host networking only (works where the engine runs without a bridge). IMG names the image.
set -euo pipefail
cd "$(dirname "$0")/.."
IMG=${IMG:-pipeswitch:check}
NAME=pipeswitch-check-$$
PORT=${PORT:-18080}
RUN=(docker run --network host --read-only --tmpfs /tmp -v "$NAME-cache:/var/cache/pipeswitch")

cleanup() {
  docker rm -f "$NAME" "$NAME-call" >/dev/null 2>&1 || true
  docker volume rm "$NAME-cache" >/dev/null 2>&1 || true
}
trap cleanup EXIT

echo "== build"
start=$(date +%s)
docker build --network host -t "$IMG" . >/tmp/check-image-build.log 2>&1 \
  || { tail -30 /tmp/check-image-build.log; exit 1; }
echo "built in $(($(date +%s) - start)) s; $(docker image inspect "$IMG" --format '{{.Size}}' | awk '{printf "%.0f MB", $1/1e6}')"

echo "== user and root filesystem"
who=$("${RUN[@]}" --rm --entrypoint id "$IMG" -u)
[ "$who" = 10001 ] || { echo "runs as uid $who, not 10001"; exit 1; }
if "${RUN[@]}" --rm --entrypoint sh "$IMG" -c 'touch /opt/pipeswitch/x' 2>/dev/null; then
  echo "root filesystem is writable"; exit 1
fi
"${RUN[@]}" --rm --entrypoint sh "$IMG" -c 'touch /tmp/x /var/cache/pipeswitch/x'
echo "uid 10001; / read-only; /tmp and the cache volume writable"

echo "== no keys: one line, exit 2"
set +e
out=$("${RUN[@]}" --rm -e PIPESWITCH_PORT="$PORT" "$IMG" serve 2>&1)
rc=$?
set -e
[ "$rc" -eq 2 ] || { echo "exit $rc without keys:"; echo "$out"; exit 1; }
echo "$out" | grep -q "PIPESWITCH_DEEPGRAM_API_KEY" || { echo "no key named:"; echo "$out"; exit 1; }
echo "exit 2: $(echo "$out" | tail -n1)"

echo "== serve, health check, drain"
"${RUN[@]}" -d --name "$NAME" -e PIPESWITCH_PORT="$PORT" \
  -e PIPESWITCH_DEEPGRAM_API_KEY=dg-test -e PIPESWITCH_GROQ_API_KEY=gq-test \
  -e PIPESWITCH_DRAIN_TIMEOUT_SECS=5 "$IMG" serve >/dev/null
for _ in $(seq 1 120); do
  curl -fsS "http://127.0.0.1:$PORT/ready" >/dev/null 2>&1 && break
  sleep 0.5
done
curl -fsS "http://127.0.0.1:$PORT/health" && echo
curl -fsS "http://127.0.0.1:$PORT/ready" && echo
curl -fsS "http://127.0.0.1:$PORT/metrics" | grep -c '^pipeswitch_' | sed 's/^/metric samples: /'
for _ in $(seq 1 60); do
  health=$(docker inspect "$NAME" --format '{{.State.Health.Status}}')
  [ "$health" = healthy ] && break
  sleep 1
done
[ "$health" = healthy ] || { echo "health: $health"; docker logs "$NAME" | tail; exit 1; }
echo "docker health: $health"
if docker logs "$NAME" 2>&1 | grep -E "dg-test|gq-test"; then echo "a key reached the log"; exit 1; fi
start=$(date +%s)
docker stop -t 40 "$NAME" >/dev/null
rc=$(docker inspect "$NAME" --format '{{.State.ExitCode}}')
[ "$rc" -eq 0 ] || { echo "exit $rc after docker stop"; docker logs "$NAME" | tail; exit 1; }
echo "docker stop: exit 0 in $(($(date +%s) - start)) s; logs are JSON: $(docker logs "$NAME" 2>&1 | head -n1 | cut -c1-80)"
if [ -x .venv/bin/pipeswitch ]; then
  echo "== one emulated call into the container (emulators and Piper inside, caller from the host)"
  "${RUN[@]}" -d --name "$NAME-call" -e PIPESWITCH_PORT="$PORT" "$IMG" serve --providers emulated >/dev/null
  for _ in $(seq 1 120); do
    curl -fsS "http://127.0.0.1:$PORT/ready" >/dev/null 2>&1 && break
    sleep 0.5
  done
  .venv/bin/pipeswitch call --url "ws://127.0.0.1:$PORT/fs/{uuid}?domain=default&rate=8000" \
    --wav tests/fixtures/question_8k.wav >/tmp/check-image-call.json
  docker stop -t 40 "$NAME-call" >/dev/null
  docker rm "$NAME-call" >/dev/null
  .venv/bin/python - <<'PYEOF'
import json
d = json.load(open("/tmp/check-image-call.json"))
answered = [t for t in d["turns"] if t.get("latency_ms") is not None]
assert d["connected"] and d["greeting_ms"] is not None and answered, d
print(f"greeting {d['greeting_ms']:.0f} ms after the upgrade; {len(answered)} turn(s) answered, "
      f"first in {answered[0]['latency_ms']:.0f} ms; close {d['close']['server_code']}")
PYEOF
fi
echo "image checks passed"
