#!/usr/bin/env bash
# API fuzz: schemathesis (PyPI) generates requests from GET /openapi.json and checks each answer
# against the document: no 5xx, documented status codes, content types and body schemas.
#
# Starts the debug binary (built if needed) on 127.0.0.1 with a temporary store and a config with
# an admin token, runs schemathesis with a bounded number of examples per operation, and stops
# everything it started. Not part of CI (it takes minutes); figures go to docs/api.md.
#
#   benches/schemathesis.sh                 # 25 examples per operation
#   EXAMPLES=100 SEED=7 benches/schemathesis.sh
#
# Needs `pip install schemathesis` (4.x).
set -euo pipefail

cd "$(dirname "$0")/.."
EXAMPLES="${EXAMPLES:-25}"
SEED="${SEED:-1}"
PHASES="${PHASES:-examples,coverage,fuzzing}"
BIN="${TICKGATE_BIN:-target/debug/tickgate}"
command -v schemathesis >/dev/null || { echo "schemathesis is not installed (pip install schemathesis)" >&2; exit 2; }
[ -n "${TICKGATE_BIN:-}" ] || cargo build --quiet --bin tickgate

work="$(mktemp -d)"
server_pid=""
cleanup() {
  if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

token="fuzz-admin-token-$(date +%s%N)"
cat >"$work/tickgate.toml" <<EOF
[server]
listen = "127.0.0.1:0"
# The fuzzer presents wrong tokens all the time; without this every route would soon answer 429.
auth_failures = { per_second = 100000, burst = 100000 }
max_body_bytes = 65536
[store]
path = "store"
[admin]
token_env = "TICKGATE_ADMIN_TOKEN"
[[agent]]
name = "echo"
runner = { kind = "echo" }
[[agent]]
name = "other"
namespace = "demo"
runner = { kind = "echo" }
mailbox = 4
[[agent]]
name = "asker"
runner = { kind = "command", program = "$work/asker.sh", mode = "oneshot" }
[agent.a2a]
enabled = true
EOF
# An agent whose every tick waits for input, so that resume and cancel meet real parked tasks.
cat >"$work/asker.sh" <<'EOF'
#!/bin/sh
cat >/dev/null
echo '{"await": {"request": {"question": "go?"}}}'
EOF
chmod +x "$work/asker.sh"

(cd "$work" && TICKGATE_ADMIN_TOKEN="$token" RUST_LOG=info exec "$OLDPWD/$BIN" serve --config tickgate.toml >"$work/out.log" 2>&1) &
server_pid=$!
base=""
for _ in $(seq 300); do
  base="$(sed -n 's/^tickgate listening on \([^ ]*\).*/\1/p' "$work/out.log" | head -1)"
  [ -n "$base" ] && grep -q "^tickgate serving " "$work/out.log" && break
  kill -0 "$server_pid" 2>/dev/null || { cat "$work/out.log" >&2; exit 1; }
  sleep 0.1
done
[ -n "$base" ] || { echo "tickgate did not start" >&2; cat "$work/out.log" >&2; exit 1; }
echo "tickgate at $base; $EXAMPLES examples per operation, seed $SEED, phases $PHASES"

# Real identifiers, offered to the fuzzer beside generated ones (schemathesis dictionaries), so
# that requests reach the handlers' logic rather than stopping at 404.
url_of() { sed -n "s|^webhook for $1: POST ||p" "$work/out.log" | head -1; }
tokens=()
for agent in default/echo demo/other default/asker; do
  url="$(url_of "$agent")"
  [ -n "$url" ] || { echo "no webhook URL printed for $agent" >&2; exit 1; }
  tokens+=("\"${url##*/}\"")
done
ids=()
for url in "$(url_of default/echo)" "$(url_of default/asker)" "$(url_of default/asker)"; do
  id="$(curl -fsS -X POST -H 'content-type: application/json' -d '{"inputs":{"n":1}}' "$url" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["task_id"])')"
  ids+=("\"$id\"")
done
join() { local IFS=,; echo "$*"; }
cat >"$work/schemathesis.toml" <<EOF
headers = { Authorization = "Bearer $token" }

[dictionaries.tokens]
values = [$(join "${tokens[@]}")]
[dictionaries.namespaces]
values = ["default", "demo"]
[dictionaries.agents]
values = ["echo", "other", "asker"]
[dictionaries.ids]
values = [$(join "${ids[@]}")]

[parameters]
"path.token" = { dictionary = "tokens", probability = 0.6 }
"path.namespace" = { dictionary = "namespaces", probability = 0.7 }
"path.agent" = { dictionary = "agents", probability = 0.7 }
"path.id" = { dictionary = "ids", probability = 0.6 }
"query.task_id" = { dictionary = "ids", probability = 0.6 }

# A2A calls authenticate with the agent's webhook token, and only default/asker serves A2A.
[[operations]]
include-path = "/a2a/{namespace}/{agent}"
headers = { Authorization = "Bearer ${tokens[2]//\"/}", "A2A-Version" = "1.0" }
parameters = { "path.namespace" = "default", "path.agent" = "asker" }

# The operator feed never ends (an agents frame every second): read two frames of it.
[[operations]]
include-path = "/admin/events"
max-stream-events = 2
EOF

started=$(date +%s)
set +e
(cd "$work" && schemathesis --no-color --config-file "$work/schemathesis.toml" run "$base/openapi.json" \
  --checks not_a_server_error,response_schema_conformance,status_code_conformance,content_type_conformance \
  --max-examples "$EXAMPLES" --seed "$SEED" --phases "$PHASES" \
  --request-timeout 30 --workers 1 \
  --output-sanitize true) 2>&1 | tee "$work/schemathesis.log"
status=${PIPESTATUS[0]}
set -e
echo "schemathesis exit $status after $(( $(date +%s) - started )) s"
echo "answers by status (server access log):"
grep -o 'status=[0-9]*' "$work/out.log" | sort | uniq -c | sort -k2 | sed 's/status=//' | awk '{printf "  %s x%s\n", $2, $1}'
if grep -qE "panicked|internal error" "$work/out.log"; then
  echo "the server logged a panic or an internal error:" >&2
  grep -E "panicked|internal error" "$work/out.log" | head -20 >&2
  status=1
fi
exit "$status"
