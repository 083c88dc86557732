#!/usr/bin/env bash
# CPU per accepted request of the store's writer thread and of the whole process, for one or more
# tickgate binaries, in alternating rounds.
#
#   benches/writer_cpu.sh OLD_BIN NEW_BIN [MORE_BINS...]
#
# Why: on this shared 2-core machine a request rate moves by ±50% between minutes, but the CPU a
# request costs moves far less. The accept path is bound by the single store writer thread (one
# group commit for everything), so "writer µs per request" is the figure that says whether new
# records made acceptance dearer (issue #11's "accept rate unchanged") independent of the load.
#
# Each round starts each binary in turn on a fresh temp store with one `echo` agent, loads it with
# `wrk -t2 -c32` fire-and-forget POSTs of a ~330-byte JSON body for DURATION seconds, and reads
# utime+stime of the writer thread (`tickgate-store-`, the kernel's 15-byte thread name) and of
# the process from /proc before and after, divided by the requests wrk completed.
# Knobs: ROUNDS=3 DURATION=8 CONNS=32. Only 127.0.0.1; everything started is killed on exit.
set -euo pipefail
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-8}
CONNS=${CONNS:-32}
[ $# -ge 1 ] || {
	echo "usage: $0 BIN [BIN...]" >&2
	exit 2
}
command -v wrk >/dev/null || {
	echo "wrk is needed (apt-get install wrk)" >&2
	exit 2
}
TMP=$(mktemp -d)
PIDS=()
cleanup() {
	for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
	rm -rf "$TMP"
}
trap cleanup EXIT
TICK=$(getconf CLK_TCK)
BODY='{"ref":"refs/heads/main","before":"9049f1265b7d61be4a8904a9a27120d2064dab3b","after":"0d1a26e67d8f5eaf1f6ba5c57fc3c7d91ac0fd1c","repository":{"full_name":"octo/hello","private":false},"pusher":{"name":"octocat","email":"octocat@example.com"},"head_commit":{"id":"0d1a26e6","message":"Fix the flaky test"}}'
printf 'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\nwrk.body = [[%s]]\n' "$BODY" >"$TMP/post.lua"

# ticks of utime+stime in a /proc stat line (fields 14 and 15; the name in field 2 has no spaces here)
ticks() { awk '{print $14 + $15}' "$1" 2>/dev/null || echo 0; }

run_one() {
	local bin=$1 dir pid base path tid w0 w1 p0 p1 reqs
	dir=$(mktemp -d -p "$TMP")
	printf '[server]\nshutdown_grace = "2s"\n\n[[agent]]\nname = "echo"\nrunner = { kind = "echo" }\nmailbox = 1000000\n' >"$dir/tickgate.toml"
	env -u TICKGATE_ADMIN_TOKEN RUST_LOG=warn TICKGATE_SERVER_LISTEN=127.0.0.1:0 \
		TICKGATE_STORE_PATH="$dir/store" "$bin" serve --config "$dir/tickgate.toml" \
		>"$dir/stdout" 2>"$dir/stderr" </dev/null &
	pid=$!
	PIDS+=("$pid")
	for _ in $(seq 300); do grep -q '^tickgate serving ' "$dir/stdout" 2>/dev/null && break; sleep 0.1; done
	base=$(sed -n 's/^tickgate listening on \(http:[^ ]*\).*/\1/p' "$dir/stdout" | head -1)
	path=$(sed -n 's#^webhook for [^ ]*: POST https\?://[^/]*##p' "$dir/stdout" | head -1)
	[ -n "$base" ] && [ -n "$path" ] || {
		echo "server did not start: $(tail -3 "$dir/stderr")" >&2
		exit 1
	}
	tid=$(grep -l '^tickgate-store-' /proc/"$pid"/task/*/comm | head -1 | xargs dirname | xargs basename)
	w0=$(ticks /proc/"$pid"/task/"$tid"/stat)
	p0=$(ticks /proc/"$pid"/stat)
	wrk -t2 -c"$CONNS" -d"${DURATION}s" -s "$TMP/post.lua" "$base$path" >"$dir/wrk" 2>&1
	w1=$(ticks /proc/"$pid"/task/"$tid"/stat)
	p1=$(ticks /proc/"$pid"/stat)
	reqs=$(awk '/requests in/ {print $1}' "$dir/wrk")
	kill -TERM "$pid"
	wait "$pid" 2>/dev/null || true
	awk -v w=$((w1 - w0)) -v p=$((p1 - p0)) -v r="$reqs" -v t="$TICK" -v d="$DURATION" -v b="$bin" \
		'BEGIN { printf "%-40s %8.0f req/s  writer %6.1f µs/req  process %6.1f µs/req\n", b, r / d, w * 1e6 / t / r, p * 1e6 / t / r }'
}

for ((round = 1; round <= ROUNDS; round++)); do
	echo "round $round"
	for bin in "$@"; do run_one "$bin"; done
done
