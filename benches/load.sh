#!/usr/bin/env bash
# Load benchmark harness for tickgate.
#
#   benches/load.sh          # main comparison: bare actix-web, plain sled, Go `webhook`, tickgate (~6 min)
#   benches/load.sh scale    # scale checks: 10k agents, 100k pending recovery, lookups at 1M tasks
#
# The whole issue-#16 table in one command (same-run ratios to the plain sled design and to Go
# `webhook` running the same command, fsync beside flush, CPU per request, and the same tickgate
# cases for a second binary, e.g. the commit before a change, alternated with the current one):
#
#   TG_BASE=/path/to/older/tickgate DURATION=8 OUT=/tmp/lean.md benches/load.sh
#
# Why this exists: the criterion benches in benches/enqueue.rs time functions in isolation; this
# script answers the operator's question "how many webhooks per second does the real binary take,
# and how does that compare with doing nothing (a bare actix-web handler) and with the usual tool
# (adnanh/webhook)?". Every figure comes from the same run, side by side, because on a shared
# 2-core machine absolute numbers drift by ±15% between minutes; only ratios measured together
# mean anything. Results and their reading live in docs/benchmarks.md.
#
# Ground rules the script keeps:
# - Only 127.0.0.1; every server gets a free port (tickgate and the bare server bind port 0 and
#   print the real address; Go webhook is given a probed free port).
# - One server at a time, each with a fresh temp dir (config, store, scripts), so no case inherits
#   another's backlog or store size.
# - Everything it starts is killed by the EXIT trap, by PID (never by name: other people's
#   processes share this machine), and a watchdog bounds the whole run (MAX_SECONDS).
#
# Knobs (environment):
#   DURATION=10        seconds measured per run (after WARMUP seconds that are thrown away)
#   WARMUP=2           seconds of load before each measured run (JIT-free, but warms caches/pools)
#   CONNS=32           connections for every case
#   CONNS_LIST="32 128" connection counts for the fire-and-forget cases (and the bare ceiling)
#   THREADS=2          wrk threads (the machine has 2 cores; wrk competes with the server for them)
#   SPREAD=8           agents the sync command cases spread over (each agent serializes its ticks)
#   FANOUT=100         agents the "fire-and-forget spread" case spreads over
#   MAILBOX=1000000    per-agent queue bound; large so the benchmark never measures 429s
#   OUT=path           also write the markdown results there
#   CASES=regex        run only the cases whose key matches (e.g. CASES='bare|tg-ff')
#   SKIP_BUILD=1       use the binaries already built
#   TG_BIN=path        measure this tickgate binary instead of building target/release/tickgate
#   TG_BASE=path       also run every tickgate case with this binary (right after the same case
#                      with TG_BIN), reported as "base" rows and a before/after column
#   KEEP_TMP=1         keep the temp dir (server logs, configs, wrk output) for inspection
#   MAX_SECONDS        watchdog for the whole run after the build (default 1500 main, 2700 with
#                      TG_BASE, 3600 scale)
# Scale mode only:
#   SCALE_AGENTS=10000 SCALE_PENDING=100000 SCALE_TASKS=1000000 IDLE=5
#   SCALE_PARTS="agents pending lookup"   which of the three checks to run
set -euo pipefail

MODE=${1:-main}
case $MODE in main | scale) ;; *)
	echo "usage: $0 [main|scale]" >&2
	exit 2
	;;
esac

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-2}
CONNS=${CONNS:-32}
CONNS_LIST=${CONNS_LIST:-"$CONNS 128"}
THREADS=${THREADS:-2}
SPREAD=${SPREAD:-8}
FANOUT=${FANOUT:-100}
MAILBOX=${MAILBOX:-1000000}
OUT=${OUT:-}
CASES=${CASES:-.}
SCALE_AGENTS=${SCALE_AGENTS:-10000}
SCALE_PENDING=${SCALE_PENDING:-100000}
SCALE_TASKS=${SCALE_TASKS:-1000000}
SCALE_PARTS=${SCALE_PARTS:-"agents pending lookup"}
IDLE=${IDLE:-5}
if [[ $MODE == main ]]; then MAX_SECONDS=${MAX_SECONDS:-$([[ -n ${TG_BASE:-} ]] && echo 2700 || echo 1500)}; else MAX_SECONDS=${MAX_SECONDS:-3600}; fi

# Set TG_BIN to measure another build (e.g. of a past commit); the script then does not build tickgate.
TG_BIN_GIVEN=${TG_BIN:+1}
TG_BIN=${TG_BIN:-$ROOT/target/release/tickgate}
TG_BASE=${TG_BASE:-}
# Which binary start_tickgate runs (TG_BIN, or TG_BASE for the "base-" cases).
CUR_TG_BIN=$TG_BIN
BARE_DIR=$ROOT/benches/bare
PLAIN_DIR=$ROOT/benches/plain-sled
# The two reference servers share one target dir (most of their dependencies are the same).
BENCH_TARGET=$ROOT/benches/target
BARE_BIN=$BENCH_TARGET/release/tickgate-bench-bare
PLAIN_BIN=$BENCH_TARGET/release/tickgate-bench-plain-sled
LINE_RUNNER=$BENCH_TARGET/release/line-runner

log() { printf '[load.sh %s] %s\n' "$(date +%T)" "$*" >&2; }
die() {
	log "ERROR: $*"
	exit 1
}

# ---------------------------------------------------------------------------------------------
# Process bookkeeping. PIDS holds what we started and have not reaped yet; the EXIT trap kills
# each one and its descendants (tickgate's command runners live in their own process groups, so
# a signal to tickgate alone could leave them behind if tickgate is SIGKILLed).
# ---------------------------------------------------------------------------------------------
PIDS=()
WORK=

track() { PIDS+=("$1"); }
untrack() {
	local keep=() p
	for p in "${PIDS[@]}"; do [[ $p == "$1" ]] || keep+=("$p"); done
	PIDS=("${keep[@]}")
}

# Signals a process, its children (recursively, found by parent PID before the parent dies) and
# the process groups those children lead.
kill_tree() {
	local pid=$1 sig=${2:-TERM} kids k
	kids=$(pgrep -P "$pid" 2>/dev/null || true)
	kill "-$sig" "$pid" 2>/dev/null || true
	for k in $kids; do
		kill_tree "$k" "$sig"
		kill "-$sig" -- "-$k" 2>/dev/null || true
	done
}

cleanup() {
	local rc=$? p
	trap - EXIT INT TERM
	for p in "${PIDS[@]}"; do kill_tree "$p" TERM; done
	# Give servers a moment to exit cleanly, then make sure.
	sleep 0.5
	for p in "${PIDS[@]}"; do kill -0 "$p" 2>/dev/null && kill_tree "$p" KILL; done
	for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
	if [[ -n $WORK ]]; then
		# Markers release any blocked scale-test runner that outlived its server.
		find "$WORK" -name 'release.marker.path' -exec sh -c 'touch "$(cat "$1")"' _ {} \; 2>/dev/null || true
		if [[ -n ${KEEP_TMP:-} ]]; then log "kept $WORK"; else rm -rf "$WORK"; fi
	fi
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------------------------------------
# Tools and binaries.
# ---------------------------------------------------------------------------------------------
install_tools() {
	local missing=()
	command -v wrk >/dev/null || missing+=(wrk)
	command -v webhook >/dev/null || missing+=(webhook)
	command -v curl >/dev/null || missing+=(curl)
	command -v jq >/dev/null || missing+=(jq)
	command -v pgrep >/dev/null || missing+=(procps)
	if ((${#missing[@]})); then
		log "installing ${missing[*]} with apt-get"
		apt-get update -qq
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
	fi
}

build() {
	if [[ -n ${SKIP_BUILD:-} ]]; then
		log "SKIP_BUILD set: using existing binaries"
	else
		# The bare server has its own [workspace] and target dir so that building it never touches
		# the main workspace's lock file or target dir.
		if [[ -z $TG_BIN_GIVEN ]]; then
			log "building tickgate (release)"
			(cd "$ROOT" && timeout 1800 cargo build --release --bin tickgate --quiet) ||
				die "tickgate does not build (someone mid-edit?); retry later, or set TG_BIN to a binary built elsewhere"
		fi
		log "building the bare actix-web server and the plain sled reference (release)"
		(cd "$BARE_DIR" && CARGO_TARGET_DIR=$BENCH_TARGET timeout 1800 cargo build --release --quiet)
		(cd "$PLAIN_DIR" && CARGO_TARGET_DIR=$BENCH_TARGET timeout 1800 cargo build --release --quiet)
	fi
	[[ -x $TG_BIN ]] || die "missing $TG_BIN"
	[[ -z $TG_BASE || -x $TG_BASE ]] || die "missing TG_BASE $TG_BASE"
	[[ -x $BARE_BIN ]] || die "missing $BARE_BIN"
	[[ -x $PLAIN_BIN ]] || die "missing $PLAIN_BIN"
	[[ -x $LINE_RUNNER ]] || die "missing $LINE_RUNNER"
}

# ---------------------------------------------------------------------------------------------
# Servers. Each start_* sets SERVER_PID and SERVER_BASE (http://127.0.0.1:PORT); tickgate also
# sets PATHS to the webhook paths it printed, in agent order.
# ---------------------------------------------------------------------------------------------
SERVER_PID=
SERVER_BASE=
SERVER_KIND=
PATHS=()
START_NS=
READY_NS=

now_ns() { date +%s%N; }

# Polls the end of a file for a line, because "tickgate serving N agents" is the last line
# tickgate prints at start-up and the file can be 10k lines long: reading only its tail keeps the
# poll from stealing CPU from the start-up being timed. Fails if the process dies or time runs out.
wait_for_tail() {
	local file=$1 pattern=$2 pid=$3 timeout_s=$4 deadline
	deadline=$(($(date +%s) + timeout_s))
	while :; do
		if [[ -s $file ]] && tail -c 512 "$file" | grep -q -- "$pattern"; then return 0; fi
		kill -0 "$pid" 2>/dev/null || return 1
		(($(date +%s) < deadline)) || return 1
		sleep 0.01
	done
}

start_bare() {
	local dir=$1
	SERVER_KIND=bare
	"$BARE_BIN" 127.0.0.1:0 >"$dir/stdout" 2>"$dir/stderr" &
	SERVER_PID=$!
	track "$SERVER_PID"
	wait_for_tail "$dir/stdout" '^bare listening on ' "$SERVER_PID" 30 || die "bare server did not start: $(cat "$dir/stderr")"
	SERVER_BASE=$(sed -n 's/^bare listening on //p' "$dir/stdout" | head -1)
}

# The plain durable design (benches/plain-sled): handler -> one writer thread -> one sled batch
# of the raw bodies -> one flush per batch (plus fdatasync in fsync mode) -> 202.
start_plain() {
	local dir=$1 mode=$2
	SERVER_KIND=plain
	"$PLAIN_BIN" 127.0.0.1:0 "$dir/store" "$mode" >"$dir/stdout" 2>"$dir/stderr" &
	SERVER_PID=$!
	track "$SERVER_PID"
	wait_for_tail "$dir/stdout" '^plain-sled listening on ' "$SERVER_PID" 30 || die "plain sled server did not start: $(cat "$dir/stderr")"
	SERVER_BASE=$(sed -n 's/^plain-sled listening on //p' "$dir/stdout" | head -1)
}

# Go webhook cannot bind port 0 and report it, so probe for a free port and retry if it was
# taken in between.
free_port() {
	local p
	for _ in $(seq 50); do
		p=$((20000 + RANDOM % 40000))
		if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
			echo "$p"
			return 0
		fi
	done
	return 1
}

start_webhook() {
	local dir=$1 port code
	SERVER_KIND=webhook
	for _ in 1 2 3 4 5; do
		port=$(free_port) || die "no free port"
		# Quiet by default (no -verbose): logging every request would cost it, as it would cost us.
		webhook -hooks "$dir/hooks.json" -ip 127.0.0.1 -port "$port" -http-methods POST >"$dir/stdout" 2>"$dir/stderr" &
		SERVER_PID=$!
		track "$SERVER_PID"
		for _ in $(seq 300); do
			code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/" || true)
			[[ $code != 000 ]] && break
			kill -0 "$SERVER_PID" 2>/dev/null || break
			sleep 0.02
		done
		if kill -0 "$SERVER_PID" 2>/dev/null && [[ $code != 000 ]]; then
			SERVER_BASE=http://127.0.0.1:$port
			return 0
		fi
		stop_server
	done
	die "webhook did not start: $(cat "$dir/stderr")"
}

# Starts tickgate from $dir/tickgate.toml with its store in $dir/store (created on first start).
# RUST_LOG=warn: at info, tickgate logs every request, and the benchmark would mostly measure the
# logger. The admin token and public_url are removed so the environment of whoever runs this
# cannot change what is measured.
start_tickgate() {
	local dir=$1 timeout_s=${2:-60}
	SERVER_KIND=tickgate
	START_NS=$(now_ns)
	(
		cd "$dir"
		exec env -u TICKGATE_ADMIN_TOKEN -u TICKGATE_SERVER_PUBLIC_URL \
			RUST_LOG=warn TICKGATE_SERVER_LISTEN=127.0.0.1:0 TICKGATE_STORE_PATH="$dir/store" \
			TICKGATE_STORE_SYNC="${TG_SYNC:-flush}" \
			"$CUR_TG_BIN" serve --config "$dir/tickgate.toml" >"$dir/stdout" 2>>"$dir/stderr" </dev/null
	) &
	SERVER_PID=$!
	track "$SERVER_PID"
	if ! wait_for_tail "$dir/stdout" '^tickgate serving ' "$SERVER_PID" "$timeout_s"; then
		log "tickgate did not start within ${timeout_s}s; stdout tail / stderr:"
		tail -5 "$dir/stdout" >&2 || true
		tail -20 "$dir/stderr" >&2 || true
		die "tickgate failed to start"
	fi
	READY_NS=$(now_ns)
	SERVER_BASE=$(sed -n 's/^tickgate listening on \(http:[^ ]*\).*/\1/p' "$dir/stdout" | head -1)
	# "webhook for NS/NAME: POST http://127.0.0.1:PORT/webhooks/TOKEN" -> "/webhooks/TOKEN".
	mapfile -t PATHS < <(sed -n 's#^webhook for [^ ]*: POST https\?://[^/]*##p' "$dir/stdout")
}

# Whether a process still runs. Orphans are re-parented to PID 1, which in some containers never
# reaps them, so a dead runner can linger as a zombie that `kill -0` still finds: not alive.
alive() {
	local st
	st=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null || true)
	[[ -n $st && $st != Z ]]
}

# SIGTERM and wait (tickgate drains, flushes and exits 0); SIGKILL after a bound. Sets
# STOP_NOTE when the server did not stop cleanly, because that is a finding worth reporting.
STOP_NOTE=
stop_server() {
	local pid=$SERVER_PID rc=0 kids k
	STOP_NOTE=
	[[ -n $pid ]] || return 0
	if ! kill -0 "$pid" 2>/dev/null; then
		wait "$pid" 2>/dev/null || rc=$?
		STOP_NOTE="server had exited by itself (status $rc)"
	else
		# SIGTERM to the server alone: tickgate must stop its own runners while draining. Its
		# children are noted first and cleaned up afterwards only if they outlived it.
		kids=$(pgrep -P "$pid" 2>/dev/null || true)
		kill -TERM "$pid" 2>/dev/null || true
		for _ in $(seq 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
		if kill -0 "$pid" 2>/dev/null; then
			STOP_NOTE="ignored SIGTERM for 15 s; SIGKILLed"
			kill_tree "$pid" KILL
		fi
		wait "$pid" 2>/dev/null || rc=$?
		# A persistent runner exits on its own once its stdin closes; allow it a second.
		for _ in $(seq 10); do
			local any=0
			for k in $kids; do if alive "$k"; then any=1; fi; done
			((any)) || break
			sleep 0.1
		done
		for k in $kids; do
			if alive "$k"; then
				# Go webhook's background /bin/true may still be finishing: not a finding.
				if [[ $SERVER_KIND == tickgate ]]; then STOP_NOTE="${STOP_NOTE:+$STOP_NOTE; }child $k outlived the server"; fi
				kill_tree "$k" KILL
				kill -KILL -- "-$k" 2>/dev/null || true
			fi
		done
		# 143 = killed by our SIGTERM (bare server and Go webhook do not catch it); tickgate should exit 0.
		if [[ -z $STOP_NOTE && $rc != 0 && $rc != 143 ]]; then STOP_NOTE="exit status $rc after SIGTERM"; fi
	fi
	untrack "$pid"
	SERVER_PID=
}

# Records an unclean stop in the notes (a finding for the report).
note_stop() {
	if [[ -n $STOP_NOTE ]]; then echo "$1: $STOP_NOTE" >>"$NOTES"; fi
}

kill9_server() {
	local pid=$SERVER_PID
	kill -KILL "$pid" 2>/dev/null || true
	wait "$pid" 2>/dev/null || true
	untrack "$pid"
	SERVER_PID=
}

rss_kb() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }

# Sum of queued tasks over all agents, from GET /ready (works while draining too: body is kept).
backlog() { curl -s --max-time 5 "$SERVER_BASE/ready" | jq '[.agents[].queued] | add // 0' 2>/dev/null || echo '?'; }

# ---------------------------------------------------------------------------------------------
# wrk. One Lua script shape for every case, so client-side cost is identical across cases:
# request() picks the next path round-robin (spreading over agents), response() counts status
# codes (the evidence for 429/503s), and done() prints one machine-readable BENCHRESULT line.
# With stop_after > 0 a thread stops after that many 2xx and drops a marker file; the shell
# watches the markers and interrupts wrk (wrk itself would sleep out its whole -d).
# ---------------------------------------------------------------------------------------------

# A ~300-byte JSON body shaped like a GitHub push event.
BODY='{"ref":"refs/heads/main","before":"9049f1265b7d61be4a8904a9a27120d2064dab3b","after":"0d1a26e67d8f5eaf1f6ba5c57fc3c7d91ac0fd1c","repository":{"full_name":"octo/hello","private":false},"pusher":{"name":"octocat","email":"octocat@example.com"},"head_commit":{"id":"0d1a26e6","message":"Fix the flaky test"}}'

# make_lua FILE METHOD STOP_AFTER DONE_PREFIX PATH...
make_lua() {
	local file=$1 method=$2 stop_after=$3 done_prefix=$4 p
	shift 4
	{
		echo "-- generated by benches/load.sh"
		echo "wrk.method = \"$method\""
		if [[ $method == POST ]]; then
			echo "wrk.body = [[$BODY]]"
			echo 'wrk.headers["Content-Type"] = "application/json"'
		fi
		echo "paths = {"
		for p in "$@"; do echo "  \"$p\","; done
		echo "}"
		echo "stop_after = $stop_after"
		echo "done_prefix = \"$done_prefix\""
		cat <<'LUA'
counter = 0
ok = 0
codes = {}
threads = {}
function setup(thread)
  table.insert(threads, thread)
  thread:set("id", #threads)
end
function request()
  counter = counter + 1
  return wrk.format(nil, paths[(counter % #paths) + 1])
end
function response(status, headers, body)
  codes[status] = (codes[status] or 0) + 1
  if stop_after > 0 and status >= 200 and status < 300 then
    ok = ok + 1
    if ok == stop_after then
      local f = io.open(done_prefix .. id, "w")
      if f then f:close() end
      wrk.thread:stop()
    end
  end
end
function done(summary, latency, requests)
  local agg = {}
  for _, t in ipairs(threads) do
    local c = t:get("codes")
    if c then for k, v in pairs(c) do agg[k] = (agg[k] or 0) + v end end
  end
  local parts = {}
  for k, v in pairs(agg) do table.insert(parts, k .. ":" .. v) end
  table.sort(parts)
  local e = summary.errors
  io.write(string.format(
    "BENCHRESULT requests=%d duration_us=%d p50_us=%.0f p99_us=%.0f non2xx=%d connect=%d read=%d write=%d timeout=%d codes=%s\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.status, e.connect, e.read, e.write, e.timeout, table.concat(parts, ",")))
end
LUA
	} >"$file"
}

# run_wrk OUTFILE CONNS SECONDS LUA  -> wrk output in OUTFILE; runs in the background so the
# EXIT trap can reach it, and under a hard bound in case a server stops answering.
run_wrk() {
	local out=$1 conns=$2 secs=$3 lua=$4 pid rc=0
	timeout -s INT $((secs + 30)) wrk -t"$THREADS" -c"$conns" -d"${secs}s" --timeout 15s --latency -s "$lua" "$SERVER_BASE" >"$out" 2>&1 &
	pid=$!
	track "$pid"
	wait "$pid" || rc=$?
	untrack "$pid"
	return "$rc"
}

# wrk until every thread has reached its stop_after quota (marker files DONE_PREFIX1..N) or
# MAX seconds passed; then SIGINT, which makes wrk print its summary and run done().
run_wrk_until() {
	local out=$1 conns=$2 max=$3 lua=$4 done_prefix=$5 pid rc=0 deadline n
	wrk -t"$THREADS" -c"$conns" -d"${max}s" --timeout 15s --latency -s "$lua" "$SERVER_BASE" >"$out" 2>&1 &
	pid=$!
	track "$pid"
	deadline=$(($(date +%s) + max + 5))
	while kill -0 "$pid" 2>/dev/null; do
		n=$(find "$(dirname "$done_prefix")" -maxdepth 1 -name "$(basename "$done_prefix")*" | wc -l)
		if ((n >= THREADS)) || (($(date +%s) > deadline)); then
			kill -INT "$pid" 2>/dev/null || true
			break
		fi
		sleep 0.2
	done
	for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
	kill -KILL "$pid" 2>/dev/null || true
	wait "$pid" || rc=$?
	untrack "$pid"
	return 0
}

# Reads one field of the BENCHRESULT line of a wrk output file ("" when absent); num() gives 0.
field() { { sed -n "s/^BENCHRESULT .*\b$2=\([^ ]*\).*/\1/p" "$1" 2>/dev/null || true; } | tail -1; }
num() {
	local v
	v=$(field "$1" "$2")
	echo "${v:-0}"
}

# ---------------------------------------------------------------------------------------------
# Temp dir, machine facts.
# ---------------------------------------------------------------------------------------------
WORK=$(mktemp -d "${TMPDIR:-/tmp}/tickgate-load.XXXXXX")
RESULTS=$WORK/results.tsv
: >"$RESULTS"
NOTES=$WORK/notes.txt
: >"$NOTES"

machine_header() {
	local model
	model=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)
	echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
	echo "- machine: $(nproc) CPUs, ${model:-unknown model}, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo) RAM"
	echo "- load average at start: $(cut -d' ' -f1-3 /proc/loadavg) (shared machine: other builds and tests may run concurrently)"
	if [[ -n $TG_BIN_GIVEN ]]; then
		echo "- tickgate: the given binary $TG_BIN ($("$TG_BIN" --version 2>/dev/null || echo '?'))"
	else
		echo "- tickgate: working tree of $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$ROOT" diff --quiet 2>/dev/null || echo ' + uncommitted changes')"
	fi
	if [[ -n $TG_BASE ]]; then echo "- base (rows marked [base], column × base): $TG_BASE ($("$TG_BASE" --version 2>/dev/null || echo '?'))"; fi
	echo "- wrk $(wrk -v 2>&1 | head -1 | awk '{print $2}'), $THREADS threads, body $(printf %s "$BODY" | wc -c) bytes JSON; webhook $(webhook -version | awk '{print $3}')"
	echo "- server and wrk share the same $(nproc) cores"
}

# ---------------------------------------------------------------------------------------------
# Main comparison.
# ---------------------------------------------------------------------------------------------

# Writes a tickgate config: COUNT agents named PREFIX000.. with the given runner.
# shutdown_grace is short so each case ends quickly; max_wait covers ?wait=10.
write_tg_config() {
	local file=$1 count=$2 prefix=$3 runner=$4 i
	{
		echo '[server]'
		echo 'max_wait = "60s"'
		echo 'shutdown_grace = "2s"'
		echo
		for ((i = 0; i < count; i++)); do
			printf '[[agent]]\nname = "%s%05d"\nrunner = %s\nmailbox = %d\n\n' "$prefix" "$i" "$runner" "$MAILBOX"
		done
	} >"$file"
}

# A persistent runner: one process per agent, one JSON line in, one out. The cheapest possible
# command agent (benches/bare/src/bin/line-runner.rs), so the figure is tickgate's overhead, not
# the agent's; the sh variant shows what a shell loop costs (sh's `read` takes a byte per syscall).
write_persistent_script() {
	printf '#!/bin/sh\nwhile read -r l; do echo '"'"'{"response":1}'"'"'; done\n' >"$1"
	chmod +x "$1"
}
# A oneshot runner doing /bin/true-like work: one exec of a tiny binary that prints the smallest
# valid tick output, `printf '{}'` (it ignores its stdin, which tickgate allows).
ONESHOT_RUNNER='{ kind = "command", program = "/usr/bin/printf", args = ["{}"], mode = "oneshot" }'

# Starts tickgate in DIR on COUNT agents named PREFIXnnnnn running RUNNER; sets CASE_PATHS.
start_tg_case() {
	local dir=$1 count=$2 prefix=$3 runner=$4
	write_tg_config "$dir/tickgate.toml" "$count" "$prefix" "$runner"
	start_tickgate "$dir"
	CASE_PATHS=("${PATHS[@]}")
}

# Prepares the server for case KEY in DIR and starts it; sets CASE_PATHS.
CASE_PATHS=()
start_case_server() {
	local key=$1 dir=$2 p
	CASE_PATHS=()
	case $key in
	bare)
		start_bare "$dir"
		CASE_PATHS=(/webhooks/bench)
		;;
	plain)
		start_plain "$dir" flush
		CASE_PATHS=(/webhooks/bench)
		;;
	plain-fsync)
		start_plain "$dir" fsync
		CASE_PATHS=(/webhooks/bench)
		;;
	go-ff | go-sync | go-sync-printf)
		# ff: webhook answers at once and runs the command in the background (its default).
		# sync: include-command-output-in-response makes it wait for the command to finish.
		# sync-printf: the very command tickgate's oneshot case runs (`/usr/bin/printf {}`), so
		# that case is compared with Go doing the same exec synchronously.
		cat >"$dir/hooks.json" <<-'JSON'
			[
			  {"id": "ff", "execute-command": "/bin/true", "command-working-directory": "/tmp"},
			  {"id": "sync", "execute-command": "/bin/true", "command-working-directory": "/tmp",
			   "include-command-output-in-response": true},
			  {"id": "sync-printf", "execute-command": "/usr/bin/printf", "command-working-directory": "/tmp",
			   "pass-arguments-to-command": [{"source": "string", "name": "{}"}],
			   "include-command-output-in-response": true}
			]
		JSON
		start_webhook "$dir"
		case $key in
		go-ff) CASE_PATHS=(/hooks/ff) ;;
		go-sync) CASE_PATHS=(/hooks/sync) ;;
		*) CASE_PATHS=(/hooks/sync-printf) ;;
		esac
		;;
	tg-ff-echo | tg-sync-echo | tg-ff-echo-fsync | tg-sync-echo-fsync) start_tg_case "$dir" 1 echo '{ kind = "echo" }' ;;
	tg-ff-fanout) start_tg_case "$dir" "$FANOUT" echo '{ kind = "echo" }' ;;
	tg-sync-echo-spread) start_tg_case "$dir" "$SPREAD" echo '{ kind = "echo" }' ;;
	tg-sync-persistent)
		start_tg_case "$dir" "$SPREAD" p "{ kind = \"command\", program = \"$LINE_RUNNER\", mode = \"persistent\" }"
		;;
	tg-sync-persistent-sh)
		write_persistent_script "$dir/persistent.sh"
		start_tg_case "$dir" "$SPREAD" p "{ kind = \"command\", program = \"$dir/persistent.sh\", mode = \"persistent\" }"
		;;
	tg-sync-oneshot) start_tg_case "$dir" "$SPREAD" o "$ONESHOT_RUNNER" ;;
	*) die "unknown case $key" ;;
	esac
	# Sync tickgate cases wait up to 10 s for the tick; a 202 then means "timed out".
	if [[ $key == tg-sync-* ]]; then
		for p in "${!CASE_PATHS[@]}"; do CASE_PATHS[p]="${CASE_PATHS[p]}?wait=10"; done
	fi
	((${#CASE_PATHS[@]})) || die "$key: no URL to drive (did tickgate print its webhook lines?)"
}

# Columns of results.tsv, one line per measured run.
# key label kind conns rps p50_ms p99_ms non2xx sockerr requests codes backlog flag
RUN_NO=0
# CPU time (user + system, in clock ticks) of a process and of its reaped children: a tickgate
# oneshot tick's process and Go webhook's commands are billed to the server that ran them.
cpu_ticks() { awk '{ s = 0; for (i = 14; i <= 17; i++) s += $i; print s }' "/proc/$1/stat" 2>/dev/null || echo 0; }

# run_case KEY LABEL KIND CONNS. A KEY starting with "base-" runs the same case with TG_BASE.
run_case() {
	local key=$1 label=$2 kind=$3 conns=$4 dir lua out rps p50 p99 non2xx sockerr requests codes dur backlog=- flag=ok errs case_key cpu0 cpu1 cpu_us=-
	[[ $key =~ $CASES ]] || return 0
	case_key=${key#base-}
	CUR_TG_BIN=$TG_BIN
	[[ $key == base-* ]] && CUR_TG_BIN=$TG_BASE
	TG_SYNC=flush
	[[ $case_key == *-fsync ]] && TG_SYNC=fsync
	RUN_NO=$((RUN_NO + 1))
	dir=$WORK/run$(printf %02d "$RUN_NO")-$key-c$conns
	mkdir -p "$dir"
	log "case $key, $conns connections"
	start_case_server "$case_key" "$dir"
	lua=$dir/load.lua
	make_lua "$lua" POST 0 "$dir/done." "${CASE_PATHS[@]}"
	if ((WARMUP > 0)); then run_wrk "$dir/warmup.txt" "$conns" "$WARMUP" "$lua" || true; fi
	out=$dir/wrk.txt
	cpu0=$(cpu_ticks "$SERVER_PID")
	run_wrk "$out" "$conns" "$DURATION" "$lua" || log "wrk exited non-zero for $key (see $out)"
	cpu1=$(cpu_ticks "$SERVER_PID")
	requests=$(field "$out" requests)
	if [[ -z $requests ]]; then
		log "no BENCHRESULT from wrk for $key:"
		cat "$out" >&2
		requests=0
	fi
	dur=$(field "$out" duration_us)
	# Server CPU per request, in µs: the measured run's CPU time over its requests. Requests wrk
	# sent but that were not answered yet are few against tens of thousands.
	if ((requests > 0)); then
		cpu_us=$(awk -v a="$cpu0" -v b="$cpu1" -v r="$requests" -v hz="$(getconf CLK_TCK)" 'BEGIN { printf "%.0f", (b - a) / hz * 1e6 / r }')
	fi
	rps=$(awk -v r="$requests" -v d="${dur:-0}" 'BEGIN { printf "%.0f", (d > 0 ? r / (d / 1e6) : 0) }')
	p50=$(awk -v v="$(field "$out" p50_us)" 'BEGIN { printf "%.2f", v / 1000 }')
	p99=$(awk -v v="$(field "$out" p99_us)" 'BEGIN { printf "%.2f", v / 1000 }')
	non2xx=$(num "$out" non2xx)
	sockerr=$(($(num "$out" connect) + $(num "$out" read) + $(num "$out" write) + $(num "$out" timeout)))
	codes=$(field "$out" codes)
	if [[ $case_key == tg-* ]]; then
		kill -0 "$SERVER_PID" 2>/dev/null && backlog=$(backlog)
	fi
	# More than 1% of answers not 2xx (or transport errors) means the run measured refusals, not
	# work: the figure stays in the table but is marked INVALID.
	if ((requests == 0)); then
		flag="INVALID: no responses"
	elif (((non2xx + sockerr) * 100 > requests)); then
		flag="INVALID: $(awk -v b=$((non2xx + sockerr)) -v r="$requests" 'BEGIN { printf "%.1f", 100 * b / r }')% errors"
	elif ((non2xx + sockerr > 0)); then
		flag="ok ($((non2xx + sockerr)) errors)"
	fi
	if [[ $case_key == tg-sync-* && ,$codes, == *,202:* ]]; then
		flag="$flag; 202 = wait timed out"
	fi
	stop_server
	if [[ -n $STOP_NOTE ]]; then flag="$flag; $STOP_NOTE"; fi
	note_stop "$key c$conns"
	if [[ -f $dir/stderr ]]; then
		errs=$(grep -c -E 'ERROR|WARN|panicked' "$dir/stderr" || true)
		if ((errs > 0)); then
			flag="$flag; $errs warn/error log lines"
			{
				echo "$key c$conns: $errs WARN/ERROR lines in the server log, first distinct ones:"
				grep -E 'ERROR|WARN|panicked' "$dir/stderr" | sed -E $'s/\x1b\\[[0-9;]*m//g; s/^[^ ]+ +//' | sort | uniq -c | sort -rn | head -5 | sed 's/^/    /'
			} >>"$NOTES"
		fi
	fi
	if [[ $key == base-* ]]; then label="$label [base]"; fi
	printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$key" "$label" "$kind" "$conns" "$rps" "$p50" "$p99" "$non2xx" "$sockerr" "$requests" "${codes:--}" "$backlog" "$flag" "$cpu_us" >>"$RESULTS"
	log "  -> $rps req/s, p50 $p50 ms, p99 $p99 ms, non-2xx $non2xx, socket errors $sockerr, codes ${codes:--}, backlog $backlog, CPU $cpu_us µs/req"
	# Let lingering work (webhook's background /bin/true, page-cache writeback) settle so it is not
	# billed to the next case.
	sleep 1
}

print_main_table() {
	echo "| case | conns | req/s | p50 ms | p99 ms | non-2xx | CPU µs/req | × bare (a) | × plain sled (p) | × Go same mode (b) | × base | status codes | backlog after | validity |"
	echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
	awk -F'\t' '
		function ratio(a, ref) { return ((ref in rps) && rps[ref] > 0) ? sprintf("%.2f", a / rps[ref]) : "–" }
		{ rows[NR] = $0; rps[$1 "|" $4] = $5 }
		END {
			for (i = 1; i <= NR; i++) {
				split(rows[i], f, "\t")
				key = f[1]; kind = f[3]; c = f[4]
				k = key; sub(/^base-/, "", k)
				ra = (key == "bare") ? "1.00" : ratio(f[5], "bare|" c)
				# The plain sled design in the same durability mode as the case.
				rp = "–"
				if (kind == "ff" || kind == "sync" || kind == "oneshot") rp = ratio(f[5], (k ~ /-fsync$/ ? "plain-fsync|" : "plain|") c)
				if (key == "plain" || key == "plain-fsync") rp = "1.00"
				# Go: fire-and-forget vs Go fire-and-forget, sync vs Go sync of /bin/true, oneshot vs
				# Go running the same printf synchronously.
				ref = (kind == "ff") ? "go-ff" : (kind == "sync") ? "go-sync" : (kind == "oneshot") ? "go-sync-printf" : ""
				rb = (ref != "" && k !~ /^go-/) ? ratio(f[5], ref "|" c) : "–"
				rbase = (key != k || !(("base-" key "|" c) in rps)) ? "–" : ratio(f[5], "base-" key "|" c)
				printf "| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", f[2], c, f[5], f[6], f[7], f[8] (f[9] > 0 ? " (+" f[9] " socket)" : ""), f[14], ra, rp, rb, rbase, f[11], f[12], f[13]
			}
		}' "$RESULTS"
	echo
	echo "Issue #16 targets (same-run ratios; \"base\" is TG_BASE when given):"
	echo
	echo "| target | this binary | base |"
	echo "|---|---|---|"
	awk -F'\t' -v c="$CONNS" '
		function r(k, ref) { return ((k "|" c) in rps && (ref "|" c) in rps && rps[ref "|" c] > 0) ? sprintf("%.2f× (%s vs %s)", rps[k "|" c] / rps[ref "|" c], rps[k "|" c], rps[ref "|" c]) : "–" }
		function p(k) { return ((k "|" c) in p99) ? p99[k "|" c] " ms" : "–" }
		function cpu(k) { return ((k "|" c) in cpus) ? cpus[k "|" c] " µs" : "–" }
		{ rps[$1 "|" $4] = $5; p99[$1 "|" $4] = $7; cpus[$1 "|" $4] = $14 }
		END {
			printf "| fire-and-forget → echo ≥ 0.7× plain sled (%s conns) | %s | %s |\n", c, r("tg-ff-echo", "plain"), r("base-tg-ff-echo", "plain")
			printf "| fire-and-forget → echo p99 ≤ 10 ms | %s | %s |\n", p("tg-ff-echo"), p("base-tg-ff-echo")
			printf "| sync → echo ≥ 0.5× plain sled | %s | %s |\n", r("tg-sync-echo", "plain"), r("base-tg-sync-echo", "plain")
			printf "| oneshot sync ≥ 1.0× Go sync of the same command | %s | %s |\n", r("tg-sync-oneshot", "go-sync-printf"), r("base-tg-sync-oneshot", "go-sync-printf")
			printf "| oneshot sync vs Go sync of /bin/true (the old reference) | %s | %s |\n", r("tg-sync-oneshot", "go-sync"), r("base-tg-sync-oneshot", "go-sync")
			printf "| persistent sync (line-runner) unchanged or better: × plain sled | %s | %s |\n", r("tg-sync-persistent", "plain"), r("base-tg-sync-persistent", "plain")
			printf "| fsync: fire-and-forget → echo × plain sled with fdatasync | %s | %s |\n", r("tg-ff-echo-fsync", "plain-fsync"), r("base-tg-ff-echo-fsync", "plain-fsync")
			printf "| fsync: sync → echo × plain sled with fdatasync | %s | %s |\n", r("tg-sync-echo-fsync", "plain-fsync"), r("base-tg-sync-echo-fsync", "plain-fsync")
			printf "| CPU per request, fire-and-forget → echo (plain sled: %s) | %s | %s |\n", cpu("plain"), cpu("tg-ff-echo"), cpu("base-tg-ff-echo")
			printf "| CPU per request, sync → echo | %s | %s |\n", cpu("tg-sync-echo"), cpu("base-tg-sync-echo")
			printf "| CPU per request, sync → oneshot (Go same command: %s) | %s | %s |\n", cpu("go-sync-printf"), cpu("tg-sync-oneshot"), cpu("base-tg-sync-oneshot")
		}' "$RESULTS"
}

# Runs a tickgate case with TG_BIN, then (when TG_BASE is set) the same case with TG_BASE, so
# that before/after pairs are measured back to back.
tg_case() {
	run_case "$@"
	if [[ -n $TG_BASE ]]; then run_case "base-$1" "${@:2}"; fi
}

main_bench() {
	local c
	log "main comparison: DURATION=${DURATION}s WARMUP=${WARMUP}s CONNS=$CONNS CONNS_LIST='$CONNS_LIST' THREADS=$THREADS${TG_BASE:+ TG_BASE=$TG_BASE}"
	# Order: ceiling first, then the references (plain sled, the Go tool), then tickgate;
	# fire-and-forget cases at every count in CONNS_LIST, sync cases at CONNS (their throughput is
	# bounded by ticks, not connections).
	for c in $CONNS_LIST; do run_case bare "(a) bare actix-web, 202 + small JSON" ceiling "$c"; done
	for c in $CONNS_LIST; do run_case plain "(p) plain sled: writer thread, one batch + flush per group" ref "$c"; done
	run_case plain-fsync "(p) plain sled, flush + fdatasync per group" ref "$CONNS"
	for c in $CONNS_LIST; do run_case go-ff "(b) Go webhook, fire-and-forget /bin/true" ff "$c"; done
	run_case go-sync "(b) Go webhook, sync /bin/true (include-command-output)" sync "$CONNS"
	run_case go-sync-printf "(b) Go webhook, sync printf '{}' (the oneshot case's command)" sync "$CONNS"
	for c in $CONNS_LIST; do tg_case tg-ff-echo "(c) tickgate fire-and-forget → echo, 1 agent" ff "$c"; done
	for c in $CONNS_LIST; do tg_case tg-ff-fanout "(c) tickgate fire-and-forget → echo, $FANOUT agents" ff "$c"; done
	tg_case tg-ff-echo-fsync "(c) tickgate fire-and-forget → echo, 1 agent, sync = \"fsync\"" ff "$CONNS"
	tg_case tg-sync-echo "(c) tickgate sync ?wait=10 → echo, 1 agent" sync "$CONNS"
	tg_case tg-sync-echo-spread "(c) tickgate sync ?wait=10 → echo, $SPREAD agents" sync "$CONNS"
	tg_case tg-sync-echo-fsync "(c) tickgate sync ?wait=10 → echo, 1 agent, sync = \"fsync\"" sync "$CONNS"
	tg_case tg-sync-persistent "(c) tickgate sync → persistent command (line-runner), $SPREAD agents" sync "$CONNS"
	tg_case tg-sync-persistent-sh "(c) tickgate sync → persistent command (sh read loop), $SPREAD agents" sync "$CONNS"
	tg_case tg-sync-oneshot "(c) tickgate sync → oneshot command (printf '{}'), $SPREAD agents" oneshot "$CONNS"
}

# ---------------------------------------------------------------------------------------------
# Scale checks. Each prints "| check | figure | target |" rows into SCALE_ROWS.
# ---------------------------------------------------------------------------------------------
SCALE_ROWS=$WORK/scale.md
: >"$SCALE_ROWS"
row() { printf '| %s | %s | %s |\n' "$1" "$2" "$3" >>"$SCALE_ROWS"; }
ms_since() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.0f", (b - a) / 1e6 }'; }
mb() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }

# (i) Start-up with many agents: every agent gets a token (written to the store and printed) on
# the first start, so first start and restart are timed separately.
scale_agents() {
	local dir=$WORK/scale-agents n=$SCALE_AGENTS t_first t_second rss0 rss1 printed
	mkdir -p "$dir"
	log "scale (i): $n echo agents"
	write_tg_config "$dir/tickgate.toml" "$n" a '{ kind = "echo" }'
	start_tickgate "$dir" 300
	t_first=$(ms_since "$START_NS" "$READY_NS")
	rss0=$(rss_kb "$SERVER_PID")
	printed=${#PATHS[@]}
	sleep "$IDLE"
	rss1=$(rss_kb "$SERVER_PID")
	# One request per agent would be a different test; one request proves the server answers.
	curl -s -o /dev/null --max-time 10 -X POST -H 'Content-Type: application/json' -d '{}' "$SERVER_BASE${PATHS[0]}" || true
	stop_server
	note_stop "scale agents"
	row "$n agents: first start (creates $printed tokens) → \"tickgate serving\"" "$t_first ms" "< 2000 ms"
	row "$n agents: RSS right after start / after ${IDLE}s idle" "$(mb "$rss0") MB / $(mb "$rss1") MB" "< 200 MB"
	start_tickgate "$dir" 300
	t_second=$(ms_since "$START_NS" "$READY_NS")
	rss0=$(rss_kb "$SERVER_PID")
	sleep "$IDLE"
	rss1=$(rss_kb "$SERVER_PID")
	stop_server
	note_stop "scale agents restart"
	row "$n agents: restart (tokens exist) → \"tickgate serving\"" "$t_second ms" "< 2000 ms"
	row "$n agents: RSS after restart / after ${IDLE}s idle" "$(mb "$rss0") MB / $(mb "$rss1") MB" "< 200 MB"
	log "  -> first start $t_first ms, restart $t_second ms, RSS $(mb "$rss1") MB"
}

# (ii) Recovery of many PENDING tasks. The agent's persistent runner blocks its first tick until a
# marker file exists (or tickgate is gone, so it never outlives the server), so every other task
# stays PENDING on disk. After kill -9 the restart must re-queue them all before it prints
# "tickgate serving".
scale_pending() {
	local dir=$WORK/scale-pending n=$SCALE_PENDING marker per lua q_before q_after acked t_rec rss rate
	mkdir -p "$dir"
	marker=$dir/release
	echo "$marker" >"$dir/release.marker.path"
	log "scale (ii): $n pending tasks, kill -9, restart"
	cat >"$dir/blocker.sh" <<-EOF
		#!/bin/sh
		# Hold the first tick until released or until tickgate (our parent) is gone.
		while [ ! -e "$marker" ] && kill -0 "\$PPID" 2>/dev/null; do sleep 0.2; done
		while read -r l; do echo '{"response":1}'; done
	EOF
	chmod +x "$dir/blocker.sh"
	cat >"$dir/tickgate.toml" <<-EOF
		[server]
		shutdown_grace = "1s"

		[[agent]]
		name = "blocker"
		runner = { kind = "command", program = "$dir/blocker.sh", mode = "persistent" }
		tick_timeout = "1h"
		mailbox = $((n * 2))
	EOF
	start_tickgate "$dir"
	per=$(((n + THREADS - 1) / THREADS))
	lua=$dir/fill.lua
	make_lua "$lua" POST "$per" "$dir/filled." "${PATHS[0]}"
	local t0 t1
	t0=$(now_ns)
	run_wrk_until "$dir/fill.txt" 128 600 "$lua" "$dir/filled."
	t1=$(now_ns)
	acked=$(sed -n 's/^BENCHRESULT .*codes=\(.*\)$/\1/p' "$dir/fill.txt" | tr ',' '\n' | awk -F: '$1 >= 200 && $1 < 300 { s += $2 } END { print s + 0 }')
	rate=$(awk -v a="$acked" -v d="$(ms_since "$t0" "$t1")" 'BEGIN { printf "%.0f", a / (d / 1000) }')
	q_before=$(backlog)
	log "  filled: $acked accepted (~$rate/s), queued $q_before; kill -9"
	kill9_server
	start_tickgate "$dir" 600
	t_rec=$(ms_since "$START_NS" "$READY_NS")
	rss=$(rss_kb "$SERVER_PID")
	q_after=$(backlog)
	stop_server
	note_stop "scale pending"
	touch "$marker"
	row "PENDING tasks accepted (2xx) before kill -9 (fill rate, wrk codes)" "$acked (~$rate/s; $(field "$dir/fill.txt" codes))" "$n"
	row "queued per /ready before kill -9 → after restart" "$q_before → $q_after" "no loss"
	row "restart with $acked PENDING → \"tickgate serving\"" "$t_rec ms (RSS $(mb "$rss") MB)" "< 5000 ms"
	log "  -> recovery $t_rec ms, queued $q_before -> $q_after"
}

# (iii) GET /tasks/{id} on an almost empty store vs one holding SCALE_TASKS finished tasks. The
# store is filled through the real API (fire-and-forget to echo agents, which finish them).
lookup_run() {
	local dir=$1 id=$2 label=$3 lua out rps p50 p99 non2xx
	lua=$dir/lookup.lua
	make_lua "$lua" GET 0 "$dir/x." "/tasks/$id"
	out=$dir/lookup.txt
	if ((WARMUP > 0)); then run_wrk "$dir/lookup-warmup.txt" "$CONNS" "$WARMUP" "$lua" || true; fi
	run_wrk "$out" "$CONNS" "$DURATION" "$lua" || true
	rps=$(awk -v r="$(field "$out" requests)" -v d="$(field "$out" duration_us)" 'BEGIN { printf "%.0f", (d > 0 ? r / (d / 1e6) : 0) }')
	p50=$(awk -v v="$(field "$out" p50_us)" 'BEGIN { printf "%.2f", v / 1000 }')
	p99=$(awk -v v="$(field "$out" p99_us)" 'BEGIN { printf "%.2f", v / 1000 }')
	non2xx=$(field "$out" non2xx)
	LOOKUP_RESULT="$rps req/s, p50 $p50 ms, p99 $p99 ms, non-2xx ${non2xx:-?}"
	LOOKUP_RPS=$rps
	LOOKUP_P99=$p99
	log "  $label: $LOOKUP_RESULT"
}

# Waits until every agent has worked through its queue, without relying on any endpoint but the
# spec's task lookup: one more task per agent, and since an agent runs its tasks in acceptance
# order, all of them finished means everything accepted before them has too.
drain_via_sentinels() {
	local max=$1 deadline p id st ids=()
	deadline=$(($(date +%s) + max))
	for p in "${PATHS[@]}"; do ids+=("$(first_task_id "$p")"); done
	for id in "${ids[@]}"; do
		while :; do
			st=$(curl -s --max-time 5 "$SERVER_BASE/tasks/$id" | jq -r '.status // empty' 2>/dev/null || true)
			[[ $st == SUCCESS || $st == FAILURE ]] && break
			(($(date +%s) < deadline)) || return 1
			sleep 0.5
		done
	done
}

first_task_id() {
	curl -s --max-time 10 -X POST -H 'Content-Type: application/json' -d "$BODY" "$SERVER_BASE$1" | jq -r .task_id
}

scale_lookup() {
	local dir n=$SCALE_TASKS id per lua t0 t1 acked rate drain_ms empty_rps empty_p99 size total
	log "scale (iii): lookups, empty store vs $n finished tasks"
	dir=$WORK/scale-lookup-empty
	mkdir -p "$dir"
	write_tg_config "$dir/tickgate.toml" "$SPREAD" l '{ kind = "echo" }'
	start_tickgate "$dir"
	id=$(first_task_id "${PATHS[0]}")
	drain_via_sentinels 30 || true
	lookup_run "$dir" "$id" "empty store"
	empty_rps=$LOOKUP_RPS
	empty_p99=$LOOKUP_P99
	row "GET /tasks/{id}, store with 1 task ($CONNS conns)" "$LOOKUP_RESULT" "–"
	stop_server

	dir=$WORK/scale-lookup-full
	mkdir -p "$dir"
	write_tg_config "$dir/tickgate.toml" "$SPREAD" l '{ kind = "echo" }'
	start_tickgate "$dir"
	id=$(first_task_id "${PATHS[0]}")
	per=$(((n + THREADS - 1) / THREADS))
	lua=$dir/fill.lua
	make_lua "$lua" POST "$per" "$dir/filled." "${PATHS[@]}"
	t0=$(now_ns)
	run_wrk_until "$dir/fill.txt" 128 1200 "$lua" "$dir/filled."
	t1=$(now_ns)
	acked=$(sed -n 's/^BENCHRESULT .*codes=\(.*\)$/\1/p' "$dir/fill.txt" | tr ',' '\n' | awk -F: '$1 >= 200 && $1 < 300 { s += $2 } END { print s + 0 }')
	rate=$(awk -v a="$acked" -v d="$(ms_since "$t0" "$t1")" 'BEGIN { printf "%.0f", a / (d / 1000) }')
	log "  filled $acked tasks at ~$rate/s; waiting for the echo ticks to finish them"
	if drain_via_sentinels 1200; then
		drain_ms="backlog drained $(ms_since "$t1" "$(now_ns)") ms after"
	else
		drain_ms="backlog NOT drained after 1200 s ($(backlog) queued)"
		log "  $drain_ms"
	fi
	size=$(du -sh "$dir/store" | cut -f1)
	row "fill: $acked tasks accepted over $SPREAD echo agents at 128 conns (codes)" "~$rate/s ($(field "$dir/fill.txt" codes)); $drain_ms; store $size" "–"
	# The known task, the fill, and one sentinel per agent.
	total=$((acked + 1 + ${#PATHS[@]}))
	lookup_run "$dir" "$id" "$total tasks"
	row "GET /tasks/{id}, store with $total tasks ($CONNS conns)" "$LOOKUP_RESULT" "within 2× empty"
	row "lookup at $total tasks vs empty" "req/s ×$(awk -v a="$LOOKUP_RPS" -v b="$empty_rps" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }'), p99 ×$(awk -v a="$LOOKUP_P99" -v b="$empty_p99" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }')" "p99 ≤ 2×, req/s ≥ 0.5×"
	stop_server
	note_stop "scale lookup"
}

scale_bench() {
	local part
	for part in $SCALE_PARTS; do
		case $part in
		agents) scale_agents ;;
		pending) scale_pending ;;
		lookup) scale_lookup ;;
		*) die "unknown scale part $part" ;;
		esac
	done
}

# ---------------------------------------------------------------------------------------------
install_tools
build
HEADER=$(machine_header)
# The watchdog: if anything hangs despite the per-step bounds, end the run (the EXIT trap then
# kills what is left).
(
	sleep "$MAX_SECONDS"
	echo "[load.sh] watchdog: $MAX_SECONDS s exceeded, stopping" >&2
	kill -TERM $$
) &
track $!

report() {
	echo "## tickgate load benchmark ($MODE)"
	echo
	echo "$HEADER"
	echo
	if [[ $MODE == main ]]; then
		echo "DURATION=${DURATION}s per run after ${WARMUP}s warm-up; sync cases at $CONNS connections; fire-and-forget at $CONNS_LIST."
		echo
		print_main_table
	else
		echo "| check | measured | target |"
		echo "|---|---|---|"
		cat "$SCALE_ROWS"
	fi
	if [[ -s $NOTES ]]; then
		echo
		echo "Notes from the servers' logs and shutdowns:"
		echo
		echo '```'
		cat "$NOTES"
		echo '```'
	fi
}

if [[ $MODE == main ]]; then main_bench; else scale_bench; fi

if [[ -n $OUT ]]; then
	report | tee "$OUT"
else
	report
fi
