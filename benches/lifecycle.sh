#!/usr/bin/env bash
# Lifecycle-record and outbox benchmarks for tickgate (figures in docs/benchmarks.md).
#
#   TG_OLD=/path/to/old/tickgate benches/lifecycle.sh        # both parts
#   PARTS=outbox benches/lifecycle.sh                         # only the outbox part
#
# Part "accept": fire-and-forget accept rate to one echo agent, `wrk -t2 -c32`, DURATION-second
# rounds, alternating an older binary (TG_OLD, e.g. built from commit 6f280a1, before retries,
# await, listing and the outbox) with the current one (TG_NEW), so both see the same machine load.
# Part "outbox": a burst of BURST fire-and-forget triggers to an echo agent whose
# `[[agent.notify]]` endpoint is a local receiver that sleeps SLOW_MS per request, vs the same agent
# without notify; reports accept req/s of both and `tickgate_notify_outbox_depth` afterwards.
#
# Only 127.0.0.1 and port 0; one server at a time in a fresh temp dir; everything started is
# stopped by PID in the EXIT trap. Not run by the tests.
#
# Knobs: TG_NEW (default target/release/tickgate, built if missing), TG_OLD, PARTS="accept outbox",
# ROUNDS=3, DURATION=5, BURST=10000, SLOW_MS=200, CONNS=32, THREADS=2.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TG_NEW=${TG_NEW:-$ROOT/target/release/tickgate}
TG_OLD=${TG_OLD:-}
PARTS=${PARTS:-"accept outbox"}
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-5}
BURST=${BURST:-10000}
SLOW_MS=${SLOW_MS:-200}
CONNS=${CONNS:-32}
THREADS=${THREADS:-2}

log() { printf '[lifecycle.sh %s] %s\n' "$(date +%T)" "$*" >&2; }
die() {
	log "ERROR: $*"
	exit 1
}

PIDS=()
WORK=$(mktemp -d "${TMPDIR:-/tmp}/tickgate-lifecycle.XXXXXX")
cleanup() {
	local rc=$? p
	trap - EXIT INT TERM
	for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
	sleep 0.5
	for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
	for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
	rm -rf "$WORK"
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
untrack() {
	local keep=() p
	for p in "${PIDS[@]}"; do [[ $p == "$1" ]] || keep+=("$p"); done
	PIDS=("${keep[@]}")
}

command -v wrk >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; }
command -v curl >/dev/null || die "curl is required"
command -v python3 >/dev/null || die "python3 is required (slow receiver)"
if [[ ! -x $TG_NEW ]]; then (cd "$ROOT" && cargo build --release --bin tickgate --quiet); fi

BODY='{"ref":"refs/heads/main","before":"9049f1265b7d61be4a8904a9a27120d2064dab3b","after":"0d1a26e67d8f5eaf1f6ba5c57fc3c7d91ac0fd1c","repository":{"full_name":"octo/hello","private":false},"pusher":{"name":"octocat","email":"octocat@example.com"},"head_commit":{"id":"0d1a26e6","message":"Fix the flaky test"}}'

# make_lua FILE PATH STOP_AFTER DONE_PREFIX: POSTs BODY to PATH; with STOP_AFTER > 0 each thread
# stops after that many responses and drops DONE_PREFIX<thread>, so the shell can end wrk early.
make_lua() {
	local body_lua=${BODY//\"/\\\"}
	cat >"$1" <<EOF
wrk.method = "POST"
wrk.body = "$body_lua"
wrk.headers["Content-Type"] = "application/json"
path = "$2"
stop_after = $3
done_prefix = "$4"
threads = {}
function setup(thread) table.insert(threads, thread); thread:set("id", #threads) end
n = 0
non2xx = 0
function request() return wrk.format(nil, path) end
function response(status, headers, body)
  n = n + 1
  if status < 200 or status >= 300 then non2xx = non2xx + 1 end
  if stop_after > 0 and n == stop_after then
    local f = io.open(done_prefix .. id, "w"); if f then f:close() end
    wrk.thread:stop()
  end
end
function done(summary, latency, requests)
  local bad = 0
  for _, t in ipairs(threads) do bad = bad + (t:get("non2xx") or 0) end
  io.write(string.format("BENCHRESULT requests=%d duration_us=%d non2xx=%d sockerr=%d\n",
    summary.requests, summary.duration, bad,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
EOF
}
field() { sed -n "s/^BENCHRESULT .*\b$2=\([^ ]*\).*/\1/p" "$1" | tail -1; }
rps_of() { awk -v r="$(field "$1" requests)" -v d="$(field "$1" duration_us)" 'BEGIN { printf "%.0f", (d > 0 ? r / (d / 1e6) : 0) }'; }

# start_tg BIN DIR: starts tickgate on DIR/tickgate.toml; sets TG_PID, BASE, HOOK (webhook path).
start_tg() {
	local bin=$1 dir=$2
	(
		cd "$dir"
		exec env -u TICKGATE_ADMIN_TOKEN -u TICKGATE_SERVER_PUBLIC_URL RUST_LOG=warn \
			TICKGATE_SERVER_LISTEN=127.0.0.1:0 TICKGATE_STORE_PATH="$dir/store" \
			"$bin" serve --config "$dir/tickgate.toml" >"$dir/stdout" 2>"$dir/stderr" </dev/null
	) &
	TG_PID=$!
	PIDS+=("$TG_PID")
	for _ in $(seq 600); do
		grep -q '^tickgate serving ' "$dir/stdout" 2>/dev/null && break
		kill -0 "$TG_PID" 2>/dev/null || die "tickgate exited: $(tail -5 "$dir/stderr")"
		sleep 0.05
	done
	grep -q '^tickgate serving ' "$dir/stdout" || die "tickgate did not start in 30 s"
	BASE=$(sed -n 's/^tickgate listening on \(http:[^ ]*\).*/\1/p' "$dir/stdout" | head -1)
	HOOK=$(sed -n 's#^webhook for [^ ]*: POST https\?://[^/]*##p' "$dir/stdout" | head -1)
}
stop_pid() {
	local pid=$1
	kill -TERM "$pid" 2>/dev/null || true
	for _ in $(seq 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
	kill -KILL "$pid" 2>/dev/null || true
	wait "$pid" 2>/dev/null || true
	untrack "$pid"
}

echo_config() {
	printf '[server]\nshutdown_grace = "1s"\n\n[[agent]]\nname = "echo"\nrunner = { kind = "echo" }\nmailbox = 1000000\n' >"$1"
}

median() { sort -n | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else printf "%.0f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
spread() { sort -n | awk 'NR == 1 { lo = $1 } { hi = $1 } END { printf "%s–%s", lo, hi }'; }

accept_part() {
	[[ -n $TG_OLD && -x $TG_OLD ]] || die "part accept needs TG_OLD=<older tickgate binary>"
	local r v bin dir out rps order
	: >"$WORK/accept.tsv"
	for ((r = 1; r <= ROUNDS; r++)); do
		# Alternate which variant goes first so a drift in machine load hits both alike.
		if ((r % 2)); then order="old new"; else order="new old"; fi
		for v in $order; do
			if [[ $v == old ]]; then bin=$TG_OLD; else bin=$TG_NEW; fi
			dir=$WORK/accept-$v-$r
			mkdir -p "$dir"
			echo_config "$dir/tickgate.toml"
			start_tg "$bin" "$dir"
			make_lua "$dir/ff.lua" "$HOOK" 0 "$dir/x."
			wrk -t"$THREADS" -c"$CONNS" -d1s -s "$dir/ff.lua" "$BASE" >/dev/null 2>&1 || true
			out=$dir/wrk.txt
			timeout -s INT $((DURATION + 30)) wrk -t"$THREADS" -c"$CONNS" -d"${DURATION}s" --timeout 15s -s "$dir/ff.lua" "$BASE" >"$out" 2>&1 || true
			rps=$(rps_of "$out")
			printf '%s\t%s\t%s\t%s\n' "$v" "$r" "$rps" "$(field "$out" non2xx)" >>"$WORK/accept.tsv"
			log "accept round $r $v: $rps req/s (non-2xx $(field "$out" non2xx))"
			stop_pid "$TG_PID"
		done
	done
	local mo mn
	mo=$(awk -F'\t' '$1 == "old" { print $3 }' "$WORK/accept.tsv" | median)
	mn=$(awk -F'\t' '$1 == "new" { print $3 }' "$WORK/accept.tsv" | median)
	echo "accept (fire-and-forget → echo, wrk -t$THREADS -c$CONNS, ${DURATION}s × $ROUNDS alternating):"
	echo "  old ($TG_OLD): median $mo req/s, range $(awk -F'\t' '$1 == "old" { print $3 }' "$WORK/accept.tsv" | spread)"
	echo "  new ($TG_NEW): median $mn req/s, range $(awk -F'\t' '$1 == "new" { print $3 }' "$WORK/accept.tsv" | spread)"
	echo "  new / old = $(awk -v a="$mn" -v b="$mo" 'BEGIN { printf "%.2f", a / b }')"
}

# A receiver that answers 200 after SLOW_MS, one request at a time.
start_receiver() {
	cat >"$WORK/slow.py" <<EOF
import http.server, sys, time
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        time.sleep($SLOW_MS / 1000)
        self.send_response(200); self.send_header("Content-Length", "0"); self.end_headers()
    def log_message(self, *a): pass
s = http.server.HTTPServer(("127.0.0.1", 0), H)
print(s.server_address[1], flush=True)
s.serve_forever()
EOF
	python3 "$WORK/slow.py" >"$WORK/slow.port" 2>"$WORK/slow.err" &
	RECV_PID=$!
	PIDS+=("$RECV_PID")
	for _ in $(seq 100); do [[ -s $WORK/slow.port ]] && break; sleep 0.05; done
	RECV_PORT=$(head -1 "$WORK/slow.port")
	[[ -n $RECV_PORT ]] || die "slow receiver did not start"
}

depth() { curl -s --max-time 10 "$BASE/metrics" | awk '$1 == "tickgate_notify_outbox_depth" { print $2 }'; }
queued() { curl -s --max-time 10 "$BASE/metrics" | awk '$1 ~ /^tickgate_queue_depth/ { s += $2 } END { print s + 0 }'; }

burst() {
	local dir=$1 label=$2 per t0 t1 n out rps q
	per=$(((BURST + THREADS - 1) / THREADS))
	make_lua "$dir/burst.lua" "$HOOK" "$per" "$dir/done."
	out=$dir/burst.txt
	wrk -t"$THREADS" -c"$CONNS" -d120s --timeout 15s -s "$dir/burst.lua" "$BASE" >"$out" 2>&1 &
	local wpid=$!
	PIDS+=("$wpid")
	for _ in $(seq 12000); do
		n=$(find "$dir" -maxdepth 1 -name 'done.*' | wc -l)
		((n >= THREADS)) && break
		kill -0 "$wpid" 2>/dev/null || break
		sleep 0.01
	done
	kill -INT "$wpid" 2>/dev/null || true
	wait "$wpid" 2>/dev/null || true
	untrack "$wpid"
	rps=$(rps_of "$out")
	# Let the echo ticks finish (so every task.succeeded callback is planned), then read the depth.
	for _ in $(seq 600); do
		q=$(queued)
		[[ $q == 0 ]] && break
		sleep 0.1
	done
	echo "  $label: $(field "$out" requests) triggers at $rps req/s (non-2xx $(field "$out" non2xx)); outbox depth right after the backlog drained: $(depth)"
}

outbox_part() {
	local r dir v order
	start_receiver
	echo "outbox (burst of $BURST fire-and-forget triggers, wrk -t$THREADS -c$CONNS, receiver sleeps ${SLOW_MS} ms per request):"
	for ((r = 1; r <= ROUNDS; r++)); do
		if ((r % 2)); then order="notify plain"; else order="plain notify"; fi
		for v in $order; do
			dir=$WORK/outbox-$v-$r
			mkdir -p "$dir"
			echo_config "$dir/tickgate.toml"
			if [[ $v == notify ]]; then
				printf 'whsec_%s\n' "$(printf 'bench-secret-bench-secret-12345' | base64)" >"$dir/secret"
				cat >>"$dir/tickgate.toml" <<EOF

[[agent.notify]]
url = "http://127.0.0.1:$RECV_PORT/hook"
secret_file = "$dir/secret"
events = ["task.succeeded", "task.failed"]
allow_private = true
EOF
			fi
			start_tg "$TG_NEW" "$dir"
			burst "$dir" "round $r, $v"
			stop_pid "$TG_PID"
		done
	done
	stop_pid "$RECV_PID"
}

for part in $PARTS; do
	case $part in
	accept) accept_part ;;
	outbox) outbox_part ;;
	*) die "unknown part $part" ;;
	esac
done
