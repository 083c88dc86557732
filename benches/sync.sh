#!/usr/bin/env bash
# Cost of `[store] sync = "fsync"` against the default "flush": the same tickgate release binary,
# one echo agent, wrk for a few seconds per case, the two modes alternated (flush, fsync, flush,
# fsync) so that the machine's drift hits both alike. Only the ratio between modes in one run
# means anything; docs/benchmarks.md ("Durability modes") has the reading.
#
#   benches/sync.sh                       # builds target/release/tickgate unless TG_BIN is set
#   DURATION=4 CONNS=32 ROUNDS=2 benches/sync.sh
#
# Short on purpose (the machine is shared): DURATION seconds per case. Everything it starts is
# stopped by PID in the EXIT trap; the store lives in a temp dir removed at the end.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DURATION=${DURATION:-4}
CONNS=${CONNS:-32}
ROUNDS=${ROUNDS:-2}
TG_BIN=${TG_BIN:-}
if [[ -z $TG_BIN ]]; then
	(cd "$ROOT" && cargo build --release --bin tickgate --quiet)
	TG_BIN=$ROOT/target/release/tickgate
fi
command -v wrk >/dev/null || {
	echo "wrk is missing (apt-get install -y wrk)" >&2
	exit 1
}

WORK=$(mktemp -d)
PID=
cleanup() {
	if [[ -n $PID ]] && kill -0 "$PID" 2>/dev/null; then
		kill -TERM "$PID" 2>/dev/null || true
		wait "$PID" 2>/dev/null || true
	fi
	rm -rf "$WORK"
}
trap cleanup EXIT

cat >"$WORK/post.lua" <<'LUA'
wrk.method = "POST"
wrk.body = '{"hello":"world","n":1}'
wrk.headers["Content-Type"] = "application/json"
LUA

# run MODE CASE QUERY -> "req/s p99"
run() {
	local mode=$1 case=$2 query=$3 dir url out rps p99
	dir=$WORK/$mode-$case-$RANDOM
	mkdir -p "$dir"
	cat >"$dir/tickgate.toml" <<-'TOML'
		[[agent]]
		name = "echo"
		runner = { kind = "echo" }
		mailbox = 1000000
	TOML
	(
		cd "$dir"
		exec env -u TICKGATE_ADMIN_TOKEN -u TICKGATE_SERVER_PUBLIC_URL RUST_LOG=warn \
			TICKGATE_SERVER_LISTEN=127.0.0.1:0 TICKGATE_STORE_PATH="$dir/store" \
			TICKGATE_STORE_SYNC="$mode" "$TG_BIN" serve --config "$dir/tickgate.toml" \
			>"$dir/stdout" 2>"$dir/stderr" </dev/null
	) &
	PID=$!
	# run() executes in a subshell (process substitution): stop this server if it exits early.
	trap '[[ -n $PID ]] && kill -TERM "$PID" 2>/dev/null; true' EXIT
	for _ in $(seq 300); do
		grep -q '^tickgate serving ' "$dir/stdout" 2>/dev/null && break
		sleep 0.1
	done
	url=$(sed -n 's/^webhook for [^ ]*: POST \(http[^ ]*\)$/\1/p' "$dir/stdout" | head -1)
	[[ -n $url ]] || {
		cat "$dir/stderr" >&2
		exit 1
	}
	out=$(wrk -t2 -c"$CONNS" -d"${DURATION}s" --latency -s "$WORK/post.lua" "$url$query")
	rps=$(awk '/^Requests\/sec:/ {print $2}' <<<"$out")
	p99=$(awk '$1 == "99%" {print $2}' <<<"$out")
	kill -TERM "$PID"
	wait "$PID" || echo "warning: tickgate ($mode) exited with $?" >&2
	PID=
	echo "$rps $p99"
}

echo "| round | case, $CONNS conns, ${DURATION}s | flush req/s (p99) | fsync req/s (p99) | fsync / flush |"
echo "|---|---|---|---|---|"
for round in $(seq "$ROUNDS"); do
	for c in "ff:" "sync:?wait=10"; do
		name=${c%%:*} query=${c#*:}
		read -r f_rps f_p99 < <(run flush "$name" "$query")
		read -r s_rps s_p99 < <(run fsync "$name" "$query")
		ratio=$(awk -v a="$s_rps" -v b="$f_rps" 'BEGIN {printf "%.2f", a / b}')
		echo "| $round | $name | $f_rps ($f_p99) | $s_rps ($s_p99) | $ratio |"
	done
done
