#!/usr/bin/env bash
# CPU per request on the accept path, counted in instructions with callgrind (issue #16).
#
#   benches/callgrind.sh                 # ff, sync and plain: one line each + top functions
#   CASES="ff sync" N=1000 benches/callgrind.sh
#
# Why this exists: wall-clock load figures on the shared 2-core machine swing by ±50% between
# minutes (docs/benchmarks.md "Lean path (#16)"); instructions executed by the server are
# deterministic to within a few percent, so a change that cuts CPU per request shows up here
# even when req/s cannot tell. It runs the release server under `valgrind --tool=callgrind`
# with instrumentation OFF during start-up, warms it with WARM requests, switches
# instrumentation on (`callgrind_control -i on`), sends exactly N requests from CONNS keep-alive
# connections, waits until the agent's queue is empty again (so every tick, start and
# completion write is counted), switches instrumentation off and divides the instructions by N.
#
# Cases (the same body and agent as benches/load.sh's echo cases):
#   ff     POST /webhooks/{token} fire-and-forget → 202, agent runner `echo`
#   sync   the same with ?wait=10 → 200 after the tick
#   plain  benches/plain-sled (handler → one writer thread → one sled::Batch → flush → 202)
#
# Knobs: N=1000 requests measured, WARM=100, CONNS=4, CASES="ff sync plain",
#   TG_BIN=path (measure this tickgate binary; default builds target/release/tickgate),
#   SKIP_BUILD=1, TOP=25 (functions listed per case), KEEP_TMP=1 (keep the callgrind outputs,
#   read them with `callgrind_annotate --inclusive=yes FILE`).
# Caveats: valgrind runs the server's threads one at a time and ~50× slower, so group commits
# batch differently than at full speed (the store's share per request is higher than under wrk);
# the few /ready polls made while waiting for the queue to empty are counted (< 0.1%).
# Only 127.0.0.1; everything started is killed by PID on exit.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
N=${N:-1000}
WARM=${WARM:-100}
CONNS=${CONNS:-4}
CASES=${CASES:-"ff sync plain"}
TOP=${TOP:-25}
TG_BIN_GIVEN=${TG_BIN:+1}
TG_BIN=${TG_BIN:-$ROOT/target/release/tickgate}
BENCH_TARGET=$ROOT/benches/target
PLAIN_BIN=$BENCH_TARGET/release/tickgate-bench-plain-sled
BODY='{"ref":"refs/heads/main","before":"9049f1265b7d61be4a8904a9a27120d2064dab3b","after":"0d1a26e67d8f5eaf1f6ba5c57fc3c7d91ac0fd1c","repository":{"full_name":"octo/hello","private":false},"pusher":{"name":"octocat","email":"octocat@example.com"},"head_commit":{"id":"0d1a26e6","message":"Fix the flaky test"}}'

log() { printf '[callgrind.sh %s] %s\n' "$(date +%T)" "$*" >&2; }
die() {
	log "ERROR: $*"
	exit 1
}

for tool in valgrind callgrind_control callgrind_annotate python3 curl; do
	command -v "$tool" >/dev/null || die "needs $tool (apt-get install valgrind curl python3)"
done

WORK=$(mktemp -d /tmp/tickgate-callgrind.XXXXXX)
SERVER_PID=
cleanup() {
	local rc=$?
	trap - EXIT INT TERM
	if [[ -n $SERVER_PID ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
		kill -KILL "$SERVER_PID" 2>/dev/null || true
		wait "$SERVER_PID" 2>/dev/null || true
	fi
	if [[ -n ${KEEP_TMP:-} ]]; then log "kept $WORK"; else rm -rf "$WORK"; fi
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if [[ -z ${SKIP_BUILD:-} ]]; then
	if [[ -z $TG_BIN_GIVEN && $CASES == *[fs]* ]]; then
		log "building tickgate (release)"
		(cd "$ROOT" && cargo build --release --bin tickgate --quiet)
	fi
	if [[ $CASES == *plain* ]]; then
		log "building benches/plain-sled (release)"
		(cd "$ROOT/benches/plain-sled" && CARGO_TARGET_DIR=$BENCH_TARGET cargo build --release --quiet)
	fi
fi

# The client: exactly COUNT requests over CONNS keep-alive connections; fails on any non-2xx.
cat >"$WORK/client.py" <<'PY'
import http.client, sys, threading
from urllib.parse import urlsplit
base, path, count, conns, body = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5].encode()
u = urlsplit(base)
lock = threading.Lock()
left = [count]
bad = []
def worker():
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=120)
    while True:
        with lock:
            if left[0] == 0:
                break
            left[0] -= 1
        c.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        r = c.getresponse()
        r.read()
        if not 200 <= r.status < 300:
            bad.append(r.status)
    c.close()
ts = [threading.Thread(target=worker) for _ in range(conns)]
for t in ts: t.start()
for t in ts: t.join()
if bad:
    sys.exit(f"{len(bad)} non-2xx answers, e.g. {bad[:5]}")
PY

wait_for_line() { # FILE REGEX SECONDS
	local deadline=$(($(date +%s) + $3))
	until grep -q "$2" "$1" 2>/dev/null; do
		kill -0 "$SERVER_PID" 2>/dev/null || die "server exited: $(tail -5 "$WORK"/*/stderr 2>/dev/null)"
		(($(date +%s) < deadline)) || die "no '$2' in $1 within $3 s"
		sleep 0.5
	done
}

# Tasks still queued or running (tickgate); 0 for the plain server, which has no queue.
backlog() {
	[[ $1 == plain ]] && {
		echo 0
		return
	}
	curl -s --max-time 30 "$BASE/ready" | python3 -c 'import json,sys; a = json.load(sys.stdin)["agents"]; print(sum(x["queued"] for x in (a.values() if isinstance(a, dict) else a)))' 2>/dev/null || echo '?'
}
wait_idle() {
	local deadline=$(($(date +%s) + 600)) q
	while :; do
		q=$(backlog "$1")
		[[ $q == 0 ]] && return 0
		(($(date +%s) < deadline)) || die "queue did not empty (backlog $q)"
		sleep 1
	done
}

run_case() {
	local key=$1 dir=$WORK/$1 path out total per
	mkdir -p "$dir"
	out=$dir/callgrind.out
	local vg=(valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$out")
	case $key in
	ff | sync)
		printf '[server]\nmax_wait = "60s"\nshutdown_grace = "2s"\n\n[[agent]]\nname = "echo00000"\nrunner = { kind = "echo" }\nmailbox = 1000000\n' >"$dir/tickgate.toml"
		(
			cd "$dir"
			exec env -u TICKGATE_ADMIN_TOKEN -u TICKGATE_SERVER_PUBLIC_URL RUST_LOG=warn \
				TICKGATE_SERVER_LISTEN=127.0.0.1:0 TICKGATE_STORE_PATH="$dir/store" TICKGATE_STORE_SYNC=flush \
				"${vg[@]}" "$TG_BIN" serve --config "$dir/tickgate.toml" >"$dir/stdout" 2>"$dir/stderr" </dev/null
		) &
		SERVER_PID=$!
		wait_for_line "$dir/stdout" '^tickgate serving ' 300
		BASE=$(sed -n 's/^tickgate listening on \(http:[^ ]*\).*/\1/p' "$dir/stdout" | head -1)
		path=$(sed -n 's#^webhook for [^ ]*: POST https\?://[^/]*##p' "$dir/stdout" | head -1)
		[[ $key == sync ]] && path="$path?wait=10"
		;;
	plain)
		"${vg[@]}" "$PLAIN_BIN" 127.0.0.1:0 "$dir/store" flush >"$dir/stdout" 2>"$dir/stderr" &
		SERVER_PID=$!
		wait_for_line "$dir/stdout" '^plain-sled listening on ' 300
		BASE=$(sed -n 's/^plain-sled listening on //p' "$dir/stdout" | head -1)
		path=/webhooks/bench
		;;
	esac
	[[ -n $BASE && -n $path ]] || die "$key: no address or path in $dir/stdout"
	python3 "$WORK/client.py" "$BASE" "$path" "$WARM" "$CONNS" "$BODY" || die "$key: warm-up failed"
	wait_idle "$key"
	callgrind_control -i on "$SERVER_PID" >/dev/null
	python3 "$WORK/client.py" "$BASE" "$path" "$N" "$CONNS" "$BODY" || die "$key: measured run failed"
	wait_idle "$key"
	callgrind_control -i off "$SERVER_PID" >/dev/null
	kill -TERM "$SERVER_PID"
	wait "$SERVER_PID" || true
	SERVER_PID=
	callgrind_annotate --inclusive=yes --threshold=100 "$out" >"$dir/annotate.txt" 2>/dev/null
	total=$(awk '/PROGRAM TOTALS/ { gsub(",", "", $1); print $1; exit }' "$dir/annotate.txt")
	[[ -n $total ]] || die "$key: no PROGRAM TOTALS in the callgrind output"
	per=$((total / N))
	printf '%s: %d requests, %d instructions, %d instructions per request\n' "$key" "$N" "$total" "$per"
	echo "top $TOP functions by inclusive instructions per request ($key):"
	awk -v n="$N" -v top="$TOP" '
			/^ *[0-9,]+ +\(/ && shown < top {
				ir = $1; gsub(",", "", ir); $1 = ""; $2 = "";
				sub(/^ +/, ""); sub(/ \[[^]]*\]$/, "");
				printf "  %10.0f  %s\n", ir / n, substr($0, 1, 150); shown++
			}' "$dir/annotate.txt"
	echo
}

for c in $CASES; do
	case $c in ff | sync | plain) run_case "$c" ;; *) die "unknown case $c" ;; esac
done
