#!/usr/bin/env bash
# tickgate on NATS JetStream (SPEC section 11, issue #14): accept throughput, p99 and CPU per
# request for 1, 2 and 3 nodes on one nats-server, against a single sled-store node measured in
# the same run, then failover time after `kill -9` of the node that owns the agent.
#
#   benches/cluster.sh                       # everything, ~5 min after the build
#   PARTS=failover benches/cluster.sh        # only the failover rounds
#   OUT=/tmp/cluster.md benches/cluster.sh   # also write the markdown report to a file
#
# Load phases. Each case starts from nothing: a fresh nats-server (`-js`, ephemeral port, temp
# store directory) for each node count, a fresh sled directory for the baseline. The nodes are the
# release binary with one `echo` agent (big `mailbox`, pinned webhook token, so every node serves
# the same URL); wrk sends fire-and-forget POSTs (the ~300-byte push body of benches/load.sh, 202
# expected), one wrk per node, the connections split between them, all for the same duration.
# The sled baseline ("sled" rows) is one node of the same binary with the same agent and the
# same total wrk settings; it runs first and last, and the NATS rows are ratios against the mean
# of the two. Per case:
#   - accepted/s: 202 answers of all wrk processes over the measured window;
#   - p99: the highest of the wrk processes' p99 latencies;
#   - CPU per request: utime+stime (/proc/<pid>/stat, with reaped children) of each node over the
#     measured window divided by the requests that node's wrk completed, and nats-server's CPU over
#     the same window divided by all requests. The owner node also runs every tick, so its figure
#     includes tick work that non-owners do not have;
#   - full cost per task: all CPU (nodes + nats-server) from the start of the warm-up until the
#     backlog is drained (a sentinel task accepted after the load has finished: per-agent order
#     holds cluster-wide, so everything accepted before it is done), divided by the tasks
#     accepted. This is the cost of accepting *and* running a task, comparable across backends
#     whatever each one's tick rate is; "drain" is how long the backlog took after the load.
#
# Failover. A fresh nats-server and two nodes with `lease = FAILOVER_LEASE` (default 2s). Each
# round waits until both nodes name the same owner in `GET /admin/agents` (and a sync trigger
# works), kills the owner with SIGKILL, and times (a) until the survivor's /admin/agents names
# the survivor as owner and (b) until a sync trigger (`?wait=10`) on the survivor answers 200.
# Then a replacement node is started (a new node_id) and the next round kills the new owner.
#
# Ground rules (as benches/load.sh): only 127.0.0.1, ephemeral ports (tickgate binds port 0 and
# prints the address; nats-server gets `-p -1` and logs its port), a fresh temp dir, every wait
# is a condition with a deadline, everything started is killed by PID in the EXIT trap, and a
# watchdog bounds the whole run. This is a 2-core machine: the nodes, nats-server and wrk share
# the same two cores, so throughput cannot grow with nodes here; per-node CPU per request is the
# figure that predicts scaling on separate machines. Results and their reading live in
# docs/benchmarks.md ("NATS JetStream cluster (#14)").
#
# Knobs (environment):
#   DURATION=10        seconds measured per load case (after WARMUP seconds of load)
#   WARMUP=2           seconds of load before each measured window
#   CONNS=32           total connections per case, split evenly between the nodes' wrk processes
#   THREADS=2          total wrk threads per case (at least 1 per wrk process)
#   NODES="1 2 3"      node counts to measure on NATS
#   LEASE=10s          lease during the load cases (the production default)
#   MAILBOX=1000000    the agent's mailbox, large so that no case measures 429s
#   DRAIN_MAX=300      seconds to wait for a backlog to drain after the load (else "not drained")
#   FAILOVER_ROUNDS=5  kill -9 rounds
#   FAILOVER_LEASE=2s  lease during the failover rounds
#   PARTS="load failover"
#   TG_BIN=path        the tickgate binary (default target/release/tickgate, built if missing)
#   NATS_BIN=path      nats-server (default: on PATH, else /usr/sbin/nats-server)
#   OUT=path           also write the markdown report there
#   KEEP_TMP=1         keep the temp dir (configs, logs, wrk output)
#   MAX_SECONDS=1800   watchdog for the whole run
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-2}
CONNS=${CONNS:-32}
THREADS=${THREADS:-2}
NODES=${NODES:-"1 2 3"}
LEASE=${LEASE:-10s}
MAILBOX=${MAILBOX:-1000000}
DRAIN_MAX=${DRAIN_MAX:-300}
FAILOVER_ROUNDS=${FAILOVER_ROUNDS:-5}
FAILOVER_LEASE=${FAILOVER_LEASE:-2s}
PARTS=${PARTS:-"load failover"}
TG_BIN=${TG_BIN:-$ROOT/target/release/tickgate}
NATS_BIN=${NATS_BIN:-$(command -v nats-server || echo /usr/sbin/nats-server)}
OUT=${OUT:-}
MAX_SECONDS=${MAX_SECONDS:-1800}

ADMIN_TOKEN=bench-admin-token-0123456789abcdef
HOOK_TOKEN=bench-webhook-token-0123456789abcdef
HOOK=/webhooks/$HOOK_TOKEN
HZ=$(getconf CLK_TCK)
# The same ~300-byte GitHub-push-like body as benches/load.sh.
BODY='{"ref":"refs/heads/main","before":"9049f1265b7d61be4a8904a9a27120d2064dab3b","after":"0d1a26e67d8f5eaf1f6ba5c57fc3c7d91ac0fd1c","repository":{"full_name":"octo/hello","private":false},"pusher":{"name":"octocat","email":"octocat@example.com"},"head_commit":{"id":"0d1a26e6","message":"Fix the flaky test"}}'

log() { printf '[cluster.sh %s] %s\n' "$(date +%T)" "$*" >&2; }
die() {
	log "ERROR: $*"
	exit 1
}
now_ns() { date +%s%N; }
ms_between() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.0f", (b - a) / 1e6 }'; }

# ---------------------------------------------------------------------------------------------
# Process bookkeeping: PIDS holds what we started and have not reaped; the EXIT trap ends them.
# ---------------------------------------------------------------------------------------------
PIDS=()
WORK=
track() { PIDS+=("$1"); }
untrack() {
	local keep=() p
	for p in "${PIDS[@]}"; do [[ $p == "$1" ]] || keep+=("$p"); done
	PIDS=("${keep[@]}")
}
cleanup() {
	local rc=$? p
	trap - EXIT INT TERM
	# Children first (the watchdog's sleep), by parent PID.
	for p in "${PIDS[@]}"; do pkill -TERM -P "$p" 2>/dev/null || true; done
	for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
	for _ in $(seq 50); do
		local any=0
		for p in "${PIDS[@]}"; do kill -0 "$p" 2>/dev/null && any=1; done
		((any)) || break
		sleep 0.1
	done
	for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
	for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
	# The watchdog and its sleep, by PID, not waited for (bash would report it "Terminated").
	if [[ -n ${WATCHDOG:-} ]]; then
		pkill -KILL -P "$WATCHDOG" 2>/dev/null || true
		kill -KILL "$WATCHDOG" 2>/dev/null || true
		disown "$WATCHDOG" 2>/dev/null || true
	fi
	if [[ -n $WORK ]]; then
		if [[ -n ${KEEP_TMP:-} ]]; then log "kept $WORK"; else rm -rf "$WORK"; fi
	fi
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Waits for PATTERN in FILE while PID lives, up to TIMEOUT_S seconds.
wait_for_line() {
	local file=$1 pattern=$2 pid=$3 timeout_s=$4 deadline
	deadline=$(($(date +%s) + timeout_s))
	while :; do
		if [[ -s $file ]] && grep -q -- "$pattern" "$file"; then return 0; fi
		kill -0 "$pid" 2>/dev/null || return 1
		(($(date +%s) < deadline)) || return 1
		sleep 0.02
	done
}

# SIGTERM, wait up to 15 s, then SIGKILL. A tickgate node drains, releases its leases, exits 0.
STOP_NOTES=()
stop_pid() {
	local pid=$1 what=$2 rc=0
	[[ -n $pid ]] || return 0
	kill -TERM "$pid" 2>/dev/null || true
	for _ in $(seq 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
	if kill -0 "$pid" 2>/dev/null; then
		STOP_NOTES+=("$what ignored SIGTERM for 15 s; SIGKILLed")
		kill -KILL "$pid" 2>/dev/null || true
	fi
	wait "$pid" 2>/dev/null || rc=$?
	# nats-server exits with status 1 after a clean SIGTERM ("Server Exiting..").
	if [[ $rc != 0 && $rc != 143 && ! ($what == nats-server && $rc == 1) ]]; then STOP_NOTES+=("$what: exit status $rc after SIGTERM"); fi
	untrack "$pid"
}

# utime+stime+cutime+cstime of a process, in clock ticks.
cpu_ticks() { awk '{ s = 0; for (i = 14; i <= 17; i++) s += $i; print s }' "/proc/$1/stat" 2>/dev/null || echo 0; }

# ---------------------------------------------------------------------------------------------
# nats-server and tickgate nodes.
# ---------------------------------------------------------------------------------------------
NATS_PID=
NATS_URL=
start_nats() {
	local dir=$1 port
	mkdir -p "$dir/js"
	"$NATS_BIN" -js -a 127.0.0.1 -p -1 -sd "$dir/js" >"$dir/nats.log" 2>&1 </dev/null &
	NATS_PID=$!
	track "$NATS_PID"
	wait_for_line "$dir/nats.log" 'Server is ready' "$NATS_PID" 30 || die "nats-server did not start: $(tail -5 "$dir/nats.log")"
	port=$(sed -n 's/.*Listening for client connections on 127\.0\.0\.1:\([0-9]*\).*/\1/p' "$dir/nats.log" | head -1)
	[[ -n $port ]] || die "no client port in the nats-server log"
	NATS_URL=nats://127.0.0.1:$port
}
stop_nats() {
	stop_pid "$NATS_PID" nats-server
	NATS_PID=
}

# write_config FILE KIND LEASE: one echo agent with the pinned webhook token.
write_config() {
	local file=$1 kind=$2 lease=$3
	{
		echo '[server]'
		echo 'max_wait = "60s"'
		echo 'shutdown_grace = "2s"'
		echo
		if [[ $kind == nats ]]; then
			echo '[store]'
			echo 'kind = "nats"'
			echo "url = \"$NATS_URL\""
			echo "lease = \"$lease\""
			echo
		fi
		echo '[[agent]]'
		echo 'name = "echo"'
		echo 'runner = { kind = "echo" }'
		echo "mailbox = $MAILBOX"
		echo 'webhook = { token_env = "BENCH_WEBHOOK_TOKEN" }'
	} >"$file"
}

# start_node DIR NAME CONFIG: starts a node (its files in DIR/NAME); sets NODE_PID and NODE_BASE.
# RUST_LOG=warn: at info every request is logged and the benchmark would measure the logger.
NODE_PID=
NODE_BASE=
start_node() {
	local dir=$1/$2 name=$2 config=$3
	mkdir -p "$dir"
	env -u TICKGATE_SERVER_PUBLIC_URL -u TICKGATE_STORE_URL \
		RUST_LOG=warn TICKGATE_SERVER_LISTEN=127.0.0.1:0 TICKGATE_STORE_PATH="$dir/store" \
		TICKGATE_ADMIN_TOKEN="$ADMIN_TOKEN" BENCH_WEBHOOK_TOKEN="$HOOK_TOKEN" \
		TICKGATE_SERVER_NODE_ID="$name" \
		"$TG_BIN" serve --config "$config" >"$dir/stdout" 2>"$dir/stderr" </dev/null &
	NODE_PID=$!
	track "$NODE_PID"
	if ! wait_for_line "$dir/stdout" '^tickgate serving ' "$NODE_PID" 60; then
		tail -20 "$dir/stderr" >&2 || true
		die "node $name did not start"
	fi
	NODE_BASE=$(sed -n 's/^tickgate listening on \(http:[^ ]*\).*/\1/p' "$dir/stdout" | head -1)
	[[ -n $NODE_BASE ]] || die "node $name printed no address"
}

# The agent's owner as the node at BASE reports it ("" if it does not answer).
owner_of() {
	curl -s --max-time 5 -H "Authorization: Bearer $ADMIN_TOKEN" "$1/admin/agents" | jq -r '.agents[0].owner // empty' 2>/dev/null || true
}

# settled_owner NAME=BASE...: waits (up to 60 s) until every node names the same owner, one of
# them; prints it.
settled_owner() {
	local deadline o first all pair names=() bases=()
	for pair in "$@"; do
		names+=("${pair%%=*}")
		bases+=("${pair#*=}")
	done
	deadline=$(($(date +%s) + 60))
	while (($(date +%s) < deadline)); do
		first=
		all=1
		for b in "${bases[@]}"; do
			o=$(owner_of "$b")
			[[ -z $first ]] && first=$o
			[[ -n $o && $o == "$first" ]] || all=0
		done
		if ((all)) && [[ " ${names[*]} " == *" $first "* ]]; then
			echo "$first"
			return 0
		fi
		sleep 0.05
	done
	return 1
}

# A sync trigger; prints the HTTP status.
sync_trigger() {
	curl -s -o /dev/null -w '%{http_code}' --max-time 15 -X POST -H 'Content-Type: application/json' -d '{"sentinel":true}' "$1$HOOK?wait=10" || echo 000
}

# Accepts one task on BASE and waits until it finished (up to MAX s); per-agent order makes that
# "everything accepted before it has finished". Returns non-zero on timeout.
drain() {
	local base=$1 max=$2 id st deadline
	deadline=$(($(date +%s) + max))
	id=$(curl -s --max-time 15 -X POST -H 'Content-Type: application/json' -d '{"sentinel":true}' "$base$HOOK" | jq -r '.task_id // empty')
	[[ -n $id ]] || return 1
	while (($(date +%s) < deadline)); do
		st=$(curl -s --max-time 5 "$base/tasks/$id" | jq -r '.status // empty' 2>/dev/null || true)
		[[ $st == SUCCESS || $st == FAILURE ]] && return 0
		sleep 0.2
	done
	return 1
}

# ---------------------------------------------------------------------------------------------
# wrk: one Lua script (status codes counted per thread, one BENCHRESULT line at the end).
# ---------------------------------------------------------------------------------------------
make_lua() {
	{
		echo 'wrk.method = "POST"'
		echo "wrk.body = [[$BODY]]"
		echo 'wrk.headers["Content-Type"] = "application/json"'
		cat <<'LUA'
codes = {}
threads = {}
function setup(thread)
  table.insert(threads, thread)
end
function response(status, headers, body)
  codes[status] = (codes[status] or 0) + 1
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
    "BENCHRESULT requests=%d duration_us=%d p50_us=%.0f p99_us=%.0f non2xx=%d sockerr=%d accepted=%d codes=%s\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.status, e.connect + e.read + e.write + e.timeout, agg[202] or 0, table.concat(parts, ",")))
end
LUA
	} >"$1"
}
field() { { sed -n "s/^BENCHRESULT .*\b$2=\([^ ]*\).*/\1/p" "$1" 2>/dev/null || true; } | tail -1; }

# run_wrks PREFIX SECONDS BASE...: one wrk per base, concurrently, connections and threads split;
# outputs in PREFIX.<i>.
run_wrks() {
	local prefix=$1 secs=$2 n i pids=() threads conns
	shift 2
	n=$#
	threads=$((THREADS / n))
	((threads >= 1)) || threads=1
	conns=$((CONNS / n))
	((conns >= threads)) || conns=$threads
	i=0
	for base in "$@"; do
		i=$((i + 1))
		timeout -s INT $((secs + 30)) wrk -t"$threads" -c"$conns" -d"${secs}s" --timeout 15s --latency -s "$WORK/post.lua" "$base$HOOK" >"$prefix.$i" 2>&1 &
		pids+=($!)
		track "$!"
	done
	for p in "${pids[@]}"; do
		wait "$p" || log "a wrk exited non-zero ($prefix)"
		untrack "$p"
	done
	WRK_SPLIT="$n × wrk -t$threads -c$conns"
}

# ---------------------------------------------------------------------------------------------
# Load cases. One results line per case in $RESULTS (tab-separated):
# case nodes accepted_per_s p99_ms per_node_cpu_us nats_cpu_us total_cpu_us full_cost_us drain non202 requests accepted wrk_split
# ---------------------------------------------------------------------------------------------
load_case() {
	local key=$1 n=$2 kind dir i bases=() pids=() names=() c0=() c1=() cw=() cd nats0=0 nats1=0 natsw=0 natsd=0
	local t_drain0 drained acc_warm=0 acc=0 reqs=0 dur=0 non2xx=0 sockerr=0 p99=0 per_node="" owner="" rps full=- drain_s total_us nats_us
	kind=nats
	[[ $key == sled* ]] && kind=sled
	dir=$WORK/$key
	mkdir -p "$dir"
	log "case $key: $n node(s) on $kind"
	if [[ $kind == nats ]]; then start_nats "$dir"; fi
	write_config "$dir/tickgate.toml" "$kind" "$LEASE"
	for ((i = 1; i <= n; i++)); do
		start_node "$dir" "n$i" "$dir/tickgate.toml"
		bases+=("$NODE_BASE")
		pids+=("$NODE_PID")
		names+=("n$i=$NODE_BASE")
	done
	if [[ $kind == nats ]]; then
		owner=$(settled_owner "${names[@]}") || die "$key: the nodes never agreed on an owner"
		log "  owner: $owner"
	fi
	# Warm-up, counted in the full cost (its tasks are drained too).
	for ((i = 0; i < n; i++)); do c0[i]=$(cpu_ticks "${pids[i]}"); done
	[[ -n $NATS_PID ]] && nats0=$(cpu_ticks "$NATS_PID")
	if ((WARMUP > 0)); then
		run_wrks "$dir/warmup" "$WARMUP" "${bases[@]}"
		for ((i = 1; i <= n; i++)); do acc_warm=$((acc_warm + $(field "$dir/warmup.$i" accepted))); done
	fi
	# The measured window.
	for ((i = 0; i < n; i++)); do cw[i]=$(cpu_ticks "${pids[i]}"); done
	[[ -n $NATS_PID ]] && natsw=$(cpu_ticks "$NATS_PID")
	run_wrks "$dir/wrk" "$DURATION" "${bases[@]}"
	for ((i = 0; i < n; i++)); do c1[i]=$(cpu_ticks "${pids[i]}"); done
	[[ -n $NATS_PID ]] && nats1=$(cpu_ticks "$NATS_PID")
	local node_ticks=0
	for ((i = 1; i <= n; i++)); do
		local f=$dir/wrk.$i r a d p
		r=$(field "$f" requests)
		[[ -n $r ]] || {
			cat "$f" >&2
			die "$key: no BENCHRESULT from wrk $i"
		}
		a=$(field "$f" accepted)
		d=$(field "$f" duration_us)
		p=$(field "$f" p99_us)
		reqs=$((reqs + r))
		acc=$((acc + a))
		non2xx=$((non2xx + $(field "$f" non2xx)))
		sockerr=$((sockerr + $(field "$f" sockerr)))
		((d > dur)) && dur=$d
		p99=$(awk -v a="$p99" -v b="$p" 'BEGIN { print (b > a ? b : a) }')
		node_ticks=$((node_ticks + c1[i - 1] - cw[i - 1]))
		local us
		us=$(awk -v t=$((c1[i - 1] - cw[i - 1])) -v r="$r" -v hz="$HZ" 'BEGIN { printf "%.0f", (r > 0 ? t / hz * 1e6 / r : 0) }')
		local tag="n$i"
		[[ $kind == nats && $owner == "n$i" ]] && tag="n$i*"
		per_node="${per_node:+$per_node / }$tag $us"
	done
	rps=$(awk -v a="$acc" -v d="$dur" 'BEGIN { printf "%.0f", (d > 0 ? a / (d / 1e6) : 0) }')
	total_us=$(awk -v t=$((node_ticks + nats1 - natsw)) -v r="$reqs" -v hz="$HZ" 'BEGIN { printf "%.0f", (r > 0 ? t / hz * 1e6 / r : 0) }')
	nats_us=-
	[[ $kind == nats ]] && nats_us=$(awk -v t=$((nats1 - natsw)) -v r="$reqs" -v hz="$HZ" 'BEGIN { printf "%.0f", (r > 0 ? t / hz * 1e6 / r : 0) }')
	# Drain: everything accepted (warm-up and window) finished.
	t_drain0=$(now_ns)
	if drain "${bases[0]}" "$DRAIN_MAX"; then
		drain_s=$(awk -v ms="$(ms_between "$t_drain0" "$(now_ns)")" 'BEGIN { printf "%.1f s", ms / 1000 }')
		cd=0
		for ((i = 0; i < n; i++)); do cd=$((cd + $(cpu_ticks "${pids[i]}") - c0[i])); done
		[[ -n $NATS_PID ]] && natsd=$(($(cpu_ticks "$NATS_PID") - nats0))
		full=$(awk -v t=$((cd + natsd)) -v r=$((acc_warm + acc + 1)) -v hz="$HZ" 'BEGIN { printf "%.0f", t / hz * 1e6 / r }')
	else
		drain_s="not drained in ${DRAIN_MAX} s"
	fi
	log "  -> $rps accepted/s, p99 $(awk -v v="$p99" 'BEGIN { printf "%.1f", v / 1000 }') ms, CPU µs/req: $per_node; nats $nats_us; total $total_us; full cost $full µs/task; drain $drain_s; non-2xx $non2xx, socket errors $sockerr"
	for ((i = 0; i < n; i++)); do stop_pid "${pids[i]}" "$key n$((i + 1))"; done
	if [[ $kind == nats ]]; then stop_nats; fi
	for ((i = 1; i <= n; i++)); do
		local errs
		errs=$(grep -c -E 'ERROR|WARN|panicked' "$dir/n$i/stderr" || true)
		if ((errs > 0)); then
			STOP_NOTES+=("$key n$i: $errs WARN/ERROR log lines, e.g. $(grep -m1 -E 'ERROR|WARN|panicked' "$dir/n$i/stderr" | sed -E $'s/\x1b\\[[0-9;]*m//g' | cut -c1-200)")
		fi
	done
	printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$key" "$n" "$rps" \
		"$(awk -v v="$p99" 'BEGIN { printf "%.1f", v / 1000 }')" "$per_node" "$nats_us" "$total_us" "$full" "$drain_s" \
		"$((non2xx + sockerr))" "$reqs" "$acc" "$WRK_SPLIT" >>"$RESULTS"
}

load_part() {
	local n
	load_case sled-before 1
	for n in $NODES; do load_case "nats-$n" "$n"; done
	load_case sled-after 1
}

print_load_table() {
	awk -F'\t' '
		$1 ~ /^sled/ { s_rps += $3; s_n++; if ($8 != "-") { s_full += $8; s_fn++ } if ($7 != "") { s_tot += $7 } }
		{ rows[NR] = $0 }
		END {
			sr = s_n ? s_rps / s_n : 0; sf = s_fn ? s_full / s_fn : 0; st = s_n ? s_tot / s_n : 0
			print "| case | nodes | accepted/s | × sled | p99 ms (worst wrk) | CPU µs per request, per node (* = owner) | nats-server µs/req | all processes µs/req | × sled | full cost µs/task (accept + tick) | × sled | backlog drained after | errors | wrk |"
			print "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
			for (i = 1; i <= NR; i++) {
				split(rows[i], f, "\t")
				rr = (sr > 0) ? sprintf("%.2f", f[3] / sr) : "–"
				rt = (st > 0) ? sprintf("%.2f", f[7] / st) : "–"
				rf = (sf > 0 && f[8] != "-") ? sprintf("%.2f", f[8] / sf) : "–"
				printf "| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", f[1], f[2], f[3], rr, f[4], f[5], f[6], f[7], rt, f[8], rf, f[9], f[10], f[13]
			}
			printf "\nsled baseline (mean of before and after): %.0f accepted/s, %.0f µs/req in the window, %.0f µs per task in full.\n", sr, st, sf
		}' "$RESULTS"
}

# ---------------------------------------------------------------------------------------------
# Failover.
# ---------------------------------------------------------------------------------------------
failover_part() {
	local dir=$WORK/failover config round next=3 owner survivor t0 t_owner t_sync code deadline
	local -A base pid
	mkdir -p "$dir"
	log "failover: 2 nodes, lease $FAILOVER_LEASE, $FAILOVER_ROUNDS rounds of kill -9"
	start_nats "$dir"
	config=$dir/tickgate.toml
	write_config "$config" nats "$FAILOVER_LEASE"
	start_node "$dir" n1 "$config"
	base[n1]=$NODE_BASE pid[n1]=$NODE_PID
	start_node "$dir" n2 "$config"
	base[n2]=$NODE_BASE pid[n2]=$NODE_PID
	for ((round = 1; round <= FAILOVER_ROUNDS; round++)); do
		local pair=() k
		for k in "${!base[@]}"; do pair+=("$k=${base[$k]}"); done
		owner=$(settled_owner "${pair[@]}") || die "failover round $round: no agreed owner"
		for k in "${!base[@]}"; do [[ $k != "$owner" ]] && survivor=$k; done
		# The cluster works before the kill: a sync trigger on the non-owner.
		code=$(sync_trigger "${base[$survivor]}")
		[[ $code == 200 ]] || die "failover round $round: sync trigger before the kill answered $code"
		t0=$(now_ns)
		kill -KILL "${pid[$owner]}"
		wait "${pid[$owner]}" 2>/dev/null || true
		untrack "${pid[$owner]}"
		unset "base[$owner]" "pid[$owner]"
		t_owner=
		deadline=$(($(date +%s) + 60))
		while (($(date +%s) < deadline)); do
			if [[ $(owner_of "${base[$survivor]}") == "$survivor" ]]; then
				t_owner=$(ms_between "$t0" "$(now_ns)")
				break
			fi
			sleep 0.02
		done
		[[ -n $t_owner ]] || die "failover round $round: $survivor never took the agent over"
		t_sync=
		while (($(date +%s) < deadline)); do
			code=$(sync_trigger "${base[$survivor]}")
			if [[ $code == 200 ]]; then
				t_sync=$(ms_between "$t0" "$(now_ns)")
				break
			fi
			sleep 0.02
		done
		[[ -n $t_sync ]] || die "failover round $round: no sync trigger succeeded on $survivor"
		log "  round $round: killed $owner; $survivor owner after $t_owner ms, sync trigger 200 after $t_sync ms"
		printf '%s\t%s\t%s\t%s\n' "$round" "$owner" "$t_owner" "$t_sync" >>"$FAILOVER"
		# A replacement, so the next round has two nodes again.
		start_node "$dir" "n$next" "$config"
		base[n$next]=$NODE_BASE pid[n$next]=$NODE_PID
		next=$((next + 1))
	done
	for k in "${!pid[@]}"; do stop_pid "${pid[$k]}" "failover $k"; done
	stop_nats
}

print_failover() {
	echo "| | min | median | max |"
	echo "|---|---|---|---|"
	local col label
	for col in 3 4; do
		label="kill -9 → survivor's /admin/agents names itself owner"
		[[ $col == 4 ]] && label="kill -9 → sync trigger (?wait=10) on the survivor answers 200"
		cut -f"$col" "$FAILOVER" | sort -n | awk -v l="$label" '{ v[NR] = $1 } END { printf "| %s | %d ms | %d ms | %d ms |\n", l, v[1], (NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2), v[NR] }'
	done
	echo
	echo "Rounds (round, killed owner, ms to new owner, ms to a successful sync trigger): $(awk -F'\t' '{ printf "%s%s %s %s/%s", (NR > 1 ? "; " : ""), $1, $2, $3, $4 }' "$FAILOVER")."
}

# ---------------------------------------------------------------------------------------------
for tool in wrk curl jq; do command -v "$tool" >/dev/null || die "$tool is needed (apt-get install -y $tool)"; done
[[ -x $NATS_BIN ]] || die "nats-server not found (apt-get install -y nats-server)"
if [[ ! -x $TG_BIN ]]; then
	log "building tickgate (release)"
	(cd "$ROOT" && cargo build --release --bin tickgate --quiet) || die "tickgate does not build"
fi
WORK=$(mktemp -d "${TMPDIR:-/tmp}/tickgate-cluster.XXXXXX")
RESULTS=$WORK/results.tsv
FAILOVER=$WORK/failover.tsv
: >"$RESULTS"
: >"$FAILOVER"
make_lua "$WORK/post.lua"
# Its stderr is /dev/null, so that bash does not report its sleep "Killed" at cleanup; the
# message goes to fd 3.
(
	exec 2>/dev/null
	sleep "$MAX_SECONDS"
	echo "[cluster.sh] watchdog: $MAX_SECONDS s exceeded, stopping" >&3
	kill -TERM $$
) 3>&2 &
WATCHDOG=$!

HEADER=$(
	echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
	echo "- machine: $(nproc) CPUs, $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1); nodes, nats-server and wrk share them"
	echo "- load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
	echo "- tickgate: $TG_BIN ($("$TG_BIN" --version 2>/dev/null || echo '?')), working tree $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')"
	echo "- nats-server $("$NATS_BIN" --version 2>&1 | awk '{print $2}'), one server, \`-js\`, file storage in a temp dir; \`lease = \"$LEASE\"\` for the load cases"
	echo "- wrk: ${CONNS} connections and $THREADS threads in total per case, ${WARMUP} s warm-up + ${DURATION} s measured, body $(printf %s "$BODY" | wc -c) bytes"
)

for part in $PARTS; do
	case $part in
	load) load_part ;;
	failover) failover_part ;;
	*) die "unknown part $part" ;;
	esac
done

report() {
	echo "## tickgate on NATS JetStream (benches/cluster.sh)"
	echo
	echo "$HEADER"
	if [[ -s $RESULTS ]]; then
		echo
		print_load_table
	fi
	if [[ -s $FAILOVER ]]; then
		echo
		echo "Failover, 2 nodes, \`lease = \"$FAILOVER_LEASE\"\`, $FAILOVER_ROUNDS rounds:"
		echo
		print_failover
	fi
	if ((${#STOP_NOTES[@]})); then
		echo
		echo "Notes:"
		echo
		printf -- '- %s\n' "${STOP_NOTES[@]}"
	fi
}
if [[ -n $OUT ]]; then report | tee "$OUT"; else report; fi
