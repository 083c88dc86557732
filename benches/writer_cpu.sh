#!/usr/bin/env bash
# CPU per accepted request of the store's writer thread and of the whole process, for one or more
# tickgate binaries, in alternating rounds; then the same split over every group of threads.
#
#   benches/writer_cpu.sh OLD_BIN NEW_BIN [MORE_BINS...]
#   QS='?wait=30' benches/writer_cpu.sh BIN          # sync requests instead of fire-and-forget
#   benches/writer_cpu.sh plain BIN                  # `plain`: benches/plain-sled (built by load.sh)
#
# Why: on this shared 2-core machine a request rate moves by ±50% between minutes, but the CPU a
# request costs moves far less. The accept path is bound by the single store writer thread (one
# group commit for everything), so "writer µs per request" is the figure that says whether new
# records made acceptance dearer (issue #11's "accept rate unchanged") independent of the load.
#
# Each round starts each binary in turn on a fresh temp store with one `echo` agent, loads it with
# `wrk -t2 -c32` fire-and-forget POSTs of a ~330-byte JSON body for DURATION seconds, and reads
# utime+stime of the writer thread (`tickgate-store-`, the kernel's 15-byte thread name) and of
# the process from /proc before and after, divided by the requests wrk completed. The second line
# splits the process by thread group (the thread name without its number: the writer, sled's
# `sled-io` pool, the `actix-rt` workers and arbiters, the main thread) with each group's context
# switches per request, and gives tickgate's group commits per request (its flush metric).
# Knobs: ROUNDS=3 DURATION=8 CONNS=32 QS=. Only 127.0.0.1; everything started is killed on exit.
set -euo pipefail
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-8}
CONNS=${CONNS:-32}
QS=${QS:-}
PLAIN=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/target/release/tickgate-bench-plain-sled
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

# One line per thread: group (name without its number; the main thread is `main`), ticks of
# utime+stime, context switches.
threads() {
	local pid=$1 t name
	for t in /proc/"$pid"/task/*; do
		name=$(tr -d ' ' <"$t/comm" | sed 's/[0-9]*$//')
		[ "$(basename "$t")" = "$pid" ] && name=main
		printf '%s %s %s %s\n' "$(basename "$t")" "$name" "$(ticks "$t/stat")" \
			"$(awk '/ctxt_switches/ {n += $2} END {print n + 0}' "$t/status" 2>/dev/null || echo 0)"
	done
}

# tickgate's group commits so far (0 for the plain design, which has no metrics).
commits() {
	curl -s "$1/metrics" 2>/dev/null | awk '/^tickgate_store_flush_duration_seconds_count/ {print $2; f = 1} END {if (!f) print 0}'
}

run_one() {
	local bin=$1 dir pid base path tid w0 w1 p0 p1 reqs c0 c1
	dir=$(mktemp -d -p "$TMP")
	if [ "$bin" = plain ]; then
		run_plain "$dir"
		return
	fi
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
	threads "$pid" >"$dir/before"
	c0=$(commits "$base")
	wrk -t2 -c"$CONNS" -d"${DURATION}s" -s "$TMP/post.lua" "$base$path$QS" >"$dir/wrk" 2>&1
	c1=$(commits "$base")
	threads "$pid" >"$dir/after"
	w1=$(ticks /proc/"$pid"/task/"$tid"/stat)
	p1=$(ticks /proc/"$pid"/stat)
	reqs=$(awk '/requests in/ {print $1}' "$dir/wrk")
	kill -TERM "$pid"
	wait "$pid" 2>/dev/null || true
	awk -v w=$((w1 - w0)) -v p=$((p1 - p0)) -v r="$reqs" -v t="$TICK" -v d="$DURATION" -v b="$bin" \
		'BEGIN { printf "%-40s %8.0f req/s  writer %6.1f µs/req  process %6.1f µs/req\n", b, r / d, w * 1e6 / t / r, p * 1e6 / t / r }'
	by_thread "$dir" "$reqs" "$c0" "$c1"
}

# The plain sled design, for the same split (its writer thread is `plain-sled-writ`).
run_plain() {
	local dir=$1 pid base reqs p0 p1
	[ -x "$PLAIN" ] || {
		echo "build the plain design first: benches/load.sh builds it (or cargo build --release in benches/)" >&2
		exit 2
	}
	"$PLAIN" 127.0.0.1:0 "$dir/store" flush >"$dir/stdout" 2>"$dir/stderr" &
	pid=$!
	PIDS+=("$pid")
	for _ in $(seq 300); do grep -q listening "$dir/stdout" 2>/dev/null && break; sleep 0.1; done
	base=$(sed -n 's/^plain-sled listening on //p' "$dir/stdout")
	[ -n "$base" ] || {
		echo "plain design did not start: $(tail -3 "$dir/stderr")" >&2
		exit 1
	}
	wrk -t2 -c"$CONNS" -d2s -s "$TMP/post.lua" "$base/webhooks/bench" >/dev/null 2>&1
	p0=$(ticks /proc/"$pid"/stat)
	threads "$pid" >"$dir/before"
	wrk -t2 -c"$CONNS" -d"${DURATION}s" -s "$TMP/post.lua" "$base/webhooks/bench" >"$dir/wrk" 2>&1
	threads "$pid" >"$dir/after"
	p1=$(ticks /proc/"$pid"/stat)
	reqs=$(awk '/requests in/ {print $1}' "$dir/wrk")
	kill -TERM "$pid"
	wait "$pid" 2>/dev/null || true
	awk -v p=$((p1 - p0)) -v r="$reqs" -v t="$TICK" -v d="$DURATION" \
		'BEGIN { printf "%-40s %8.0f req/s  process %6.1f µs/req\n", "plain sled", r / d, p * 1e6 / t / r }'
	by_thread "$dir" "$reqs" 0 0
}

# "  by thread: <group> <µs/req> (<context switches/req>) ...; commits/req".
by_thread() {
	local dir=$1 reqs=$2 c0=$3 c1=$4
	join <(sort "$dir/before") <(sort "$dir/after") |
		awk -v r="$reqs" -v t="$TICK" -v c=$((c1 - c0)) '
			{ cpu[$2] += $6 - $3; sw[$2] += $7 - $4 }
			END {
				line = "  by thread:"
				for (g in cpu) if (cpu[g] > 0 || sw[g] / r >= 0.005)
					line = line sprintf(" %s %.1f (%.2f)", g, cpu[g] * 1e6 / t / r, sw[g] / r)
				if (c > 0) line = line sprintf("; commits/req %.3f", c / r)
				print line
			}'
}

for ((round = 1; round <= ROUNDS; round++)); do
	echo "round $round"
	for bin in "$@"; do run_one "$bin"; done
done
