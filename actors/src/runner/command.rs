//! The `command` runner in oneshot mode, plus the process plumbing it shares with the persistent
//! mode: process groups, capped reads, and stderr logging.
//!
//! Every process tickgate starts gets its own process group, so that killing the group takes
//! whatever the program forked (a shell script's `sleep`, a language server) down with it. A tick
//! owns its group: when the tick ends, times out or is dropped, nothing it started keeps running.
//! Processes that left the group (`setsid`) are found and killed by the sweeps of
//! [`super::reap`].
//!
//! A runner's stderr is logged, but at most [`STDERR_LOG_BYTES`] and [`STDERR_LOG_LINES`] per
//! tick: the rest is still read (so the runner never blocks on a full pipe) and only counted.

use std::collections::VecDeque;
use std::io;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex as StdMutex, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

use super::reap::{self, Marker};
use super::{tick_env, CommandSpec, RunnerError};
use crate::model::{TickInput, TickOutput};

/// Largest tick output accepted, in bytes; a runner printing more is broken, and reading on would
/// only let it exhaust tickgate's memory.
pub(super) const MAX_OUTPUT: usize = 16 << 20;
const MAX_STDERR_LINE: usize = 4096;
const STDERR_TAIL: usize = 500;
/// Bytes of a runner's stderr logged per tick; a runner writing megabytes would otherwise turn
/// into a multiple of that in the log.
pub const STDERR_LOG_BYTES: usize = 64 << 10;
/// Lines of a runner's stderr logged per tick: many short lines cost more log than their bytes.
pub const STDERR_LOG_LINES: usize = 512;
/// Runner stderr bytes read but not logged since start, for the
/// `tickgate_runner_stderr_dropped_bytes_total` metric.
pub static STDERR_DROPPED_BYTES: AtomicU64 = AtomicU64::new(0);
/// How long to wait for a killed process to be reaped before leaving it to tokio's orphan reaper.
pub(super) const REAP_GRACE: Duration = Duration::from_secs(5);

/// Runs a `command` runner's program afresh for every tick, so that ticks share no process state
/// and a tick that crashes or wedges cannot affect the next one.
pub struct Oneshot {
    spec: CommandSpec,
}

impl Oneshot {
    /// Keeps the spec; nothing is started until a tick needs it.
    pub fn new(spec: CommandSpec) -> Self {
        Self { spec }
    }

    /// Runs the program once for `input`. Whether it succeeds, fails, times out or the returned
    /// future is dropped, every process of the tick's group is dead afterwards.
    pub async fn tick(
        &self,
        input: &TickInput,
        timeout: Duration,
    ) -> Result<TickOutput, RunnerError> {
        let payload = encode_input(input)?;
        let mut command = Command::new(&self.spec.program);
        command
            .args(&self.spec.args)
            .env_clear()
            .envs(tick_env(input));
        let marker = Marker::Task(input.task_id.clone());
        let (mut child, mut group) =
            spawn_in_group(&mut command, &self.spec.program, marker.clone())?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let pgid = group.pgid;
        let budget = StdMutex::new(StderrBudget::default());

        let run = async {
            let feed = async {
                if let Some(mut stdin) = stdin {
                    // The program may legitimately ignore its input and exit; its exit status
                    // and output decide the tick, not whether it read stdin.
                    let _ = stdin.write_all(&payload).await;
                }
                Ok::<_, Failure>(())
            };
            let collect = async {
                match stdout {
                    Some(out) => read_capped(out, MAX_OUTPUT).await,
                    None => Ok(Vec::new()),
                }
            };
            let drain = async {
                let mut tail = StderrTail::default();
                if let Some(err) = stderr {
                    pump_stderr(err, &input.agent, |bytes| tail.push(bytes), &budget).await;
                }
                Ok(tail)
            };
            let exit = async {
                let status = child.wait().await.map_err(|e| Failure::Io("wait for", e))?;
                // Stragglers still holding stdout would otherwise keep the read open until the
                // timeout: the group first (its id cannot have been reused while any of them
                // lives), then whatever left the group.
                kill_group(pgid);
                reap::sweep(None, marker.clone()).await;
                Ok(status)
            };
            tokio::try_join!(feed, collect, drain, exit)
        };

        let outcome = tokio::time::timeout(timeout, run).await;
        budget
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .settle(&input.agent);
        let (stdout, tail, status) = match outcome {
            Ok(Ok(((), stdout, tail, status))) => (stdout, tail, status),
            Ok(Err(failure)) => {
                stop(&mut child, &mut group).await;
                return Err(failure.into());
            }
            Err(_) => {
                stop(&mut child, &mut group).await;
                return Err(RunnerError::Timeout(timeout));
            }
        };
        group.disarm();
        if !status.success() {
            return Err(RunnerError::Exit(format!(
                "{}; stderr: {}",
                describe_exit(status),
                tail.text()
            )));
        }
        TickOutput::parse(&stdout).map_err(RunnerError::BadOutput)
    }
}

/// Why a tick's I/O with its process ended early.
enum Failure {
    TooBig,
    Io(&'static str, io::Error),
}

impl From<Failure> for RunnerError {
    fn from(failure: Failure) -> Self {
        match failure {
            Failure::TooBig => RunnerError::BadOutput(format!(
                "runner output exceeds the {} MiB limit",
                MAX_OUTPUT >> 20
            )),
            Failure::Io(what, e) => RunnerError::Exit(format!("could not {what} the runner: {e}")),
        }
    }
}

/// The tick input as the bytes a runner reads.
pub(super) fn encode_input(input: &TickInput) -> Result<Vec<u8>, RunnerError> {
    serde_json::to_vec(input)
        .map_err(|e| RunnerError::Spawn(format!("the tick input could not be encoded: {e}")))
}

/// Starts `command` with piped stdio as the leader of a new process group, returning the guard
/// that kills that group unless disarmed.
pub(super) fn spawn_in_group(
    command: &mut Command,
    program: &Path,
    marker: Marker,
) -> Result<(Child, ProcessGroup), RunnerError> {
    if tokio::runtime::Handle::try_current().is_err() {
        return Err(RunnerError::Spawn(format!(
            "{}: no tokio runtime to supervise the process",
            program.display()
        )));
    }
    command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let child = reap::spawn_leader(command)
        .map_err(|e| RunnerError::Spawn(format!("{}: {e}", program.display())))?;
    let pgid = child
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .filter(|&id| id > 1);
    Ok((child, ProcessGroup { pgid, marker }))
}

/// Kills a runner's process group when dropped, so that a cancelled tick future or a discarded
/// persistent process never leaves grandchildren behind. `kill_on_drop` alone only reaches the
/// group leader; the marker lets a sweep find what left the group.
pub(super) struct ProcessGroup {
    /// The leader's pid, which is also the group id; `None` once disarmed.
    pgid: Option<i32>,
    marker: Marker,
}

impl ProcessGroup {
    /// Sends SIGKILL to every process of the group.
    pub(super) fn kill(&self) {
        kill_group(self.pgid);
    }

    /// Stops the guard from killing on drop, once the leader has been reaped and the group
    /// handled; killing later could hit a reused group id.
    pub(super) fn disarm(&mut self) {
        if let Some(pgid) = self.pgid.take() {
            reap::forget_leader(pgid);
        }
    }

    /// Kills what left the group: the leader's descendants while it lives, and every process
    /// carrying this runner's marker.
    pub(super) async fn sweep(&self) {
        reap::sweep(self.pgid, self.marker.clone()).await;
    }

    /// Kills every process carrying this runner's marker, once the leader is gone (its pid may
    /// have been reused, so its descendants are not looked up).
    pub(super) async fn sweep_marked(&self) {
        reap::sweep(None, self.marker.clone()).await;
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        if let Some(pgid) = self.pgid.take() {
            kill_group(Some(pgid));
            reap::forget_leader(pgid);
            // The leader dies with its group and may be reaped before the sweep runs, so only
            // the marker can be trusted by then.
            reap::sweep_detached(self.marker.clone());
        }
    }
}

fn kill_group(pgid: Option<i32>) {
    // 0 and 1 would mean tickgate's own group and every process, never a runner's group.
    if let Some(pgid) = pgid.filter(|&id| id > 1) {
        // SAFETY: kill(2) has no memory-safety preconditions; ESRCH just means all are gone.
        unsafe {
            libc::kill(-pgid, libc::SIGKILL);
        }
    }
}

/// Kills the whole tree (descendants first, while the leader still links them, then the group),
/// reaps the leader (bounded by [`REAP_GRACE`]) and disarms the guard. Never waits for the
/// runner's output pipes: an escaped process holding them is killed, not waited for.
pub(super) async fn stop(child: &mut Child, group: &mut ProcessGroup) {
    group.sweep().await;
    group.kill();
    let _ = tokio::time::timeout(REAP_GRACE, child.wait()).await;
    group.disarm();
    // Whatever a dying group member started in the meantime carries the marker too.
    group.sweep_marked().await;
}

/// How a process ended, in the words of a task's `error`.
pub(super) fn describe_exit(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        (None, None) => format!("ended with {status}"),
    }
}

async fn read_capped<R: AsyncRead + Unpin>(reader: R, cap: usize) -> Result<Vec<u8>, Failure> {
    let mut out = Vec::new();
    let limit = u64::try_from(cap).unwrap_or(u64::MAX).saturating_add(1);
    reader
        .take(limit)
        .read_to_end(&mut out)
        .await
        .map_err(|e| Failure::Io("read the output of", e))?;
    if out.len() > cap {
        return Err(Failure::TooBig);
    }
    Ok(out)
}

/// Logs a runner's stderr line by line until it closes, within the tick's `budget`, handing
/// every raw chunk to `on_bytes` as well so callers can keep a tail for error messages.
pub(super) async fn pump_stderr<R: AsyncRead + Unpin>(
    mut reader: R,
    agent: &str,
    mut on_bytes: impl FnMut(&[u8]),
    budget: &StdMutex<StderrBudget>,
) {
    let mut lines = LineSplitter::default();
    let mut log = |line: &str| {
        let verdict = budget
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .admit(line.len());
        match verdict {
            Admit::Log => tracing::info!(target: "tickgate::runner", agent = %agent, "{line}"),
            Admit::LogLimitReached => tracing::warn!(
                target: "tickgate::runner",
                agent = %agent,
                "runner stderr reached the log limit of {} KiB or {STDERR_LOG_LINES} lines per tick; the rest of this tick's stderr is counted, not logged",
                STDERR_LOG_BYTES >> 10
            ),
            Admit::Drop => {}
        }
    };
    let mut buf = vec![0u8; 8192];
    loop {
        let n = match reader.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        on_bytes(&buf[..n]);
        lines.feed(&buf[..n], &mut log);
        let cut = std::mem::take(&mut lines.cut);
        if cut > 0 {
            budget
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .count_dropped(cut);
        }
    }
    lines.finish(&mut log);
}

/// What to do with one stderr line.
enum Admit {
    Log,
    /// Drop it, and say once that the limit was reached.
    LogLimitReached,
    Drop,
}

/// How much of a runner's stderr this tick may still log, and how much it did not.
#[derive(Default)]
pub(super) struct StderrBudget {
    bytes: usize,
    lines: usize,
    dropped: u64,
    limit_said: bool,
}

impl StderrBudget {
    fn admit(&mut self, len: usize) -> Admit {
        if self.bytes + len <= STDERR_LOG_BYTES && self.lines < STDERR_LOG_LINES {
            self.bytes += len;
            self.lines += 1;
            return Admit::Log;
        }
        self.count_dropped(u64::try_from(len).unwrap_or(u64::MAX).saturating_add(1));
        if self.limit_said {
            Admit::Drop
        } else {
            self.limit_said = true;
            Admit::LogLimitReached
        }
    }

    fn count_dropped(&mut self, bytes: u64) {
        self.dropped = self.dropped.saturating_add(bytes);
        STDERR_DROPPED_BYTES.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Ends a tick's budget: logs how many bytes were not logged, and starts afresh.
    pub(super) fn settle(&mut self, agent: &str) {
        if self.dropped > 0 {
            tracing::warn!(
                target: "tickgate::runner",
                agent = %agent,
                dropped_bytes = self.dropped,
                "runner stderr: {} bytes not logged (limit {} KiB or {STDERR_LOG_LINES} lines per tick)",
                self.dropped,
                STDERR_LOG_BYTES >> 10
            );
        }
        *self = Self::default();
    }
}

/// Cuts a byte stream into lines of at most [`MAX_STDERR_LINE`] bytes, so that a runner writing
/// megabytes without a newline cannot make one log record (or tickgate's memory) explode.
#[derive(Default)]
struct LineSplitter {
    line: Vec<u8>,
    truncated: bool,
    /// Bytes cut off over-long lines since the caller last took this count.
    cut: u64,
}

impl LineSplitter {
    fn feed(&mut self, mut bytes: &[u8], emit: &mut impl FnMut(&str)) {
        while !bytes.is_empty() {
            let (chunk, rest, complete) = match bytes.iter().position(|&b| b == b'\n') {
                Some(i) => (&bytes[..i], &bytes[i + 1..], true),
                None => (bytes, &bytes[bytes.len()..], false),
            };
            let room = MAX_STDERR_LINE - self.line.len();
            if chunk.len() > room {
                self.line.extend_from_slice(&chunk[..room]);
                self.truncated = true;
                self.cut = self
                    .cut
                    .saturating_add(u64::try_from(chunk.len() - room).unwrap_or(u64::MAX));
            } else {
                self.line.extend_from_slice(chunk);
            }
            if complete {
                self.flush(emit);
            }
            bytes = rest;
        }
    }

    fn finish(&mut self, emit: &mut impl FnMut(&str)) {
        self.flush(emit);
    }

    fn flush(&mut self, emit: &mut impl FnMut(&str)) {
        let text = String::from_utf8_lossy(&self.line);
        let text = text.trim_end_matches('\r');
        if self.truncated {
            emit(&format!("{text} [line truncated]"));
        } else if !text.is_empty() {
            emit(text);
        }
        self.line.clear();
        self.truncated = false;
    }
}

/// The last few hundred bytes of a runner's stderr, which usually hold the reason it failed.
#[derive(Default)]
pub(super) struct StderrTail {
    bytes: VecDeque<u8>,
    cut: bool,
}

impl StderrTail {
    /// Appends output, forgetting everything but the last [`STDERR_TAIL`] bytes.
    pub(super) fn push(&mut self, bytes: &[u8]) {
        let keep = &bytes[bytes.len().saturating_sub(STDERR_TAIL)..];
        if keep.len() < bytes.len() {
            self.bytes.clear();
            self.cut = true;
        }
        self.bytes.extend(keep);
        let excess = self.bytes.len().saturating_sub(STDERR_TAIL);
        if excess > 0 {
            self.bytes.drain(..excess);
            self.cut = true;
        }
    }

    /// The tail as text for an error message.
    pub(super) fn text(&self) -> String {
        let (front, back) = self.bytes.as_slices();
        let joined = [front, back].concat();
        let text = String::from_utf8_lossy(&joined);
        let text = text.trim();
        match (text.is_empty(), self.cut) {
            (true, _) => "(empty)".to_string(),
            (false, true) => format!("…{text}"),
            (false, false) => text.to_string(),
        }
    }
}

/// Helpers shared by the runner tests: scripts on disk, tick inputs, and condition waits.
#[cfg(test)]
pub(super) mod test_support {
    use std::collections::BTreeMap;
    use std::os::unix::fs::PermissionsExt;
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Once;
    use std::time::{Duration, Instant};

    use serde_json::{json, Value};

    use crate::model::{Source, TickInput};

    /// A variable present in the test process that no runner may see.
    pub const SECRET_VAR: &str = "TICKGATE_TEST_SECRET";

    /// Puts [`SECRET_VAR`] into the test process environment, once.
    pub fn set_secret() {
        static SET: Once = Once::new();
        SET.call_once(|| std::env::set_var(SECRET_VAR, "must-not-leak"));
    }

    /// Writes an executable `#!/bin/sh` script. The file is written by a separate `sh` process:
    /// a write descriptor held in this process could be inherited by a concurrent test's fork and
    /// make executing the script fail with ETXTBSY.
    pub fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
        let path = dir.join(name);
        let text = format!("#!/bin/sh\n{body}\n");
        let status = std::process::Command::new("/bin/sh")
            .args(["-c", "printf '%s' \"$2\" > \"$1\"", "sh"])
            .arg(&path)
            .arg(&text)
            .status()
            .expect("run sh to write the script");
        assert!(status.success(), "writing {path:?} failed");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
            .expect("make the script executable");
        path
    }

    static NEXT_TASK: AtomicU64 = AtomicU64::new(1);

    /// A tick input carrying `inputs` and one agent variable, `AGENT_VAR=from-agent`.
    pub fn input(inputs: Value) -> TickInput {
        TickInput {
            agent: "test/runner".to_string(),
            // Unique per input: a tick's sweep kills every process marked with its task id, so
            // concurrent tests must not share one.
            task_id: format!(
                "5f0c7d9e-0000-4000-8000-{:012}",
                NEXT_TASK.fetch_add(1, Ordering::Relaxed)
            ),
            tick: 7,
            attempt: 1,
            title: None,
            inputs: inputs.into(),
            source: Source::default(),
            env: BTreeMap::from([("AGENT_VAR".to_string(), "from-agent".to_string())]),
            memory: json!({}),
            resume: None,
        }
    }

    /// Polls `cond` until it holds or `limit` passes; returns whether it held.
    pub async fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            if cond() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Whether `pid` no longer runs. A zombie counts as gone: it has died, and whether it is
    /// reaped depends on its parent (possibly this machine's init), not on the runner.
    pub fn process_gone(pid: i32) -> bool {
        // SAFETY: signal 0 only checks for existence.
        if unsafe { libc::kill(pid, 0) } != 0 {
            return true;
        }
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        match stat.rfind(')') {
            Some(i) => stat[i + 1..].trim_start().starts_with('Z'),
            None => true,
        }
    }

    /// Reads the pid a script wrote to `path`.
    pub fn read_pid(path: &Path) -> i32 {
        let text = std::fs::read_to_string(path).expect("pid file");
        text.trim().parse().expect("pid in pid file")
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::time::{Duration, Instant};

    use serde_json::json;

    use super::test_support::{input, process_gone, read_pid, script, set_secret, wait_until};
    use super::*;
    use crate::runner::CommandMode;

    fn oneshot(program: PathBuf, args: &[&str]) -> Oneshot {
        Oneshot::new(CommandSpec {
            program,
            args: args.iter().map(|a| a.to_string()).collect(),
            mode: CommandMode::Oneshot,
        })
    }

    #[actix_rt::test]
    async fn answers_from_stdin_and_env() {
        let dir = tempfile::tempdir().unwrap();
        let prog = script(
            dir.path(),
            "count.sh",
            r#"n=$(wc -c | tr -d ' ')
printf '{"response":{"bytes":%s,"task":"%s","tick":"%s","arg":"%s"}}' "$n" "$TICKGATE_TASK_ID" "$TICKGATE_TICK" "$1""#,
        );
        let tick = input(json!({"hello": "world"}));
        let expected = serde_json::to_vec(&tick).unwrap().len();
        let out = oneshot(prog, &["first arg"])
            .tick(&tick, Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(
            out.response.as_ref().map(crate::model::JsonText::to_value),
            Some(json!({"bytes": expected, "task": tick.task_id, "tick": "7", "arg": "first arg"}))
        );
    }

    #[actix_rt::test]
    async fn environment_is_clean() {
        set_secret();
        assert!(std::env::var_os(test_support::SECRET_VAR).is_some());
        let dir = tempfile::tempdir().unwrap();
        let prog = script(
            dir.path(),
            "env.sh",
            r#"cat >/dev/null
printf '{"response":{"secret":"%s","task":"%s","agent_var":"%s","agent":"%s"}}' "${TICKGATE_TEST_SECRET:-absent}" "${TICKGATE_TASK_ID:-}" "${AGENT_VAR:-}" "${TICKGATE_AGENT:-}""#,
        );
        let tick = input(json!(null));
        let out = oneshot(prog, &[])
            .tick(&tick, Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(
            out.response.as_ref().map(crate::model::JsonText::to_value),
            Some(json!({
                "secret": "absent",
                "task": tick.task_id,
                "agent_var": "from-agent",
                "agent": "test/runner",
            }))
        );
    }

    #[actix_rt::test]
    async fn nonzero_exit_reports_status_and_stderr() {
        let dir = tempfile::tempdir().unwrap();
        let prog = script(
            dir.path(),
            "fail.sh",
            "echo 'the model quota is exhausted' >&2\nexit 3",
        );
        let err = oneshot(prog, &[])
            .tick(&input(json!({})), Duration::from_secs(10))
            .await
            .unwrap_err();
        let RunnerError::Exit(msg) = err else {
            panic!("expected Exit, got {err:?}");
        };
        assert!(msg.contains("exited with status 3"), "{msg}");
        assert!(msg.contains("the model quota is exhausted"), "{msg}");
    }

    #[actix_rt::test]
    async fn death_by_signal_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let prog = script(dir.path(), "suicide.sh", "kill -9 $$");
        let err = oneshot(prog, &[])
            .tick(&input(json!({})), Duration::from_secs(10))
            .await
            .unwrap_err();
        let RunnerError::Exit(msg) = err else {
            panic!("expected Exit, got {err:?}");
        };
        assert!(msg.contains("killed by signal 9"), "{msg}");
    }

    #[actix_rt::test]
    async fn garbage_output_is_bad_output() {
        let dir = tempfile::tempdir().unwrap();
        let prog = script(dir.path(), "garbage.sh", "echo 'this is not json'");
        let err = oneshot(prog, &[])
            .tick(&input(json!({})), Duration::from_secs(10))
            .await
            .unwrap_err();
        assert!(matches!(err, RunnerError::BadOutput(_)), "{err:?}");
    }

    #[actix_rt::test]
    async fn oversized_output_is_bad_output() {
        let dir = tempfile::tempdir().unwrap();
        let prog = script(
            dir.path(),
            "flood.sh",
            "dd if=/dev/zero bs=1048576 count=17 2>/dev/null",
        );
        let err = oneshot(prog, &[])
            .tick(&input(json!({})), Duration::from_secs(20))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, RunnerError::BadOutput(m) if m.contains("16 MiB")),
            "{err:?}"
        );
    }

    #[actix_rt::test]
    async fn program_ignoring_a_large_input_still_answers() {
        let dir = tempfile::tempdir().unwrap();
        let prog = script(dir.path(), "deaf.sh", "printf '{\"response\":1}'");
        let big = "x".repeat(1 << 20);
        let out = oneshot(prog, &[])
            .tick(&input(json!({ "big": big })), Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(
            out.response.as_ref().map(crate::model::JsonText::to_value),
            Some(json!(1))
        );
    }

    #[actix_rt::test]
    async fn timeout_kills_the_whole_group() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("sleep.pid");
        let prog = script(
            dir.path(),
            "hang.sh",
            "sleep 30 &\necho $! > \"$1.tmp\" && mv \"$1.tmp\" \"$1\"\nwait",
        );
        let limit = Duration::from_millis(1500);
        let started = Instant::now();
        let err = oneshot(prog, &[pidfile.to_str().unwrap()])
            .tick(&input(json!({})), limit)
            .await
            .unwrap_err();
        assert_eq!(err, RunnerError::Timeout(limit));
        assert!(started.elapsed() < Duration::from_secs(10));
        let sleeper = read_pid(&pidfile);
        assert!(
            wait_until(Duration::from_secs(5), || process_gone(sleeper)).await,
            "the script's sleep {sleeper} survived the timeout"
        );
    }

    #[actix_rt::test]
    async fn dropping_the_tick_kills_the_whole_group() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("sleep.pid");
        let prog = script(
            dir.path(),
            "hang.sh",
            "sleep 30 &\necho $! > \"$1.tmp\" && mv \"$1.tmp\" \"$1\"\nwait",
        );
        let runner = oneshot(prog, &[pidfile.to_str().unwrap()]);
        let tick_input = input(json!({}));
        let mut tick = Box::pin(runner.tick(&tick_input, Duration::from_secs(30)));
        let started = tokio::select! {
            out = &mut tick => panic!("the tick ended on its own: {out:?}"),
            seen = wait_until(Duration::from_secs(10), || pidfile.exists()) => seen,
        };
        assert!(started, "the script never wrote its pid file");
        drop(tick);
        let sleeper = read_pid(&pidfile);
        assert!(
            wait_until(Duration::from_secs(5), || process_gone(sleeper)).await,
            "the script's sleep {sleeper} survived the dropped tick"
        );
    }

    #[actix_rt::test]
    async fn a_setsid_child_holding_stdout_dies_at_the_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("escaped.pid");
        let prog = script(
            dir.path(),
            "escape.sh",
            "setsid sh -c 'echo $$ > \"$1.tmp\" && mv \"$1.tmp\" \"$1\"; exec sleep 30' sh \"$1\" &\nwait",
        );
        let limit = Duration::from_millis(1500);
        let err = oneshot(prog, &[pidfile.to_str().unwrap()])
            .tick(&input(json!({})), limit)
            .await
            .unwrap_err();
        assert_eq!(err, RunnerError::Timeout(limit));
        let escaped = read_pid(&pidfile);
        assert!(
            wait_until(Duration::from_secs(5), || process_gone(escaped)).await,
            "the setsid child {escaped} survived the timeout"
        );
    }

    #[actix_rt::test]
    async fn a_setsid_orphan_holding_stdout_is_killed_when_the_leader_exits() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("escaped.pid");
        let prog = script(
            dir.path(),
            "escape.sh",
            "setsid sh -c 'echo $$ > \"$1.tmp\" && mv \"$1.tmp\" \"$1\"; exec sleep 30' sh \"$1\" &\nwhile [ ! -e \"$1\" ]; do sleep 0.05; done\nprintf '{\"response\":1}'",
        );
        let started = Instant::now();
        let out = oneshot(prog, &[pidfile.to_str().unwrap()])
            .tick(&input(json!({})), Duration::from_secs(20))
            .await
            .unwrap();
        assert_eq!(
            out.response.as_ref().map(crate::model::JsonText::to_value),
            Some(json!(1))
        );
        assert!(started.elapsed() < Duration::from_secs(15));
        let escaped = read_pid(&pidfile);
        assert!(
            wait_until(Duration::from_secs(5), || process_gone(escaped)).await,
            "the setsid orphan {escaped} survived its tick"
        );
    }

    #[actix_rt::test]
    async fn stderr_is_logged_up_to_the_budget_and_counted_after() {
        let dir = tempfile::tempdir().unwrap();
        let prog = script(
            dir.path(),
            "noisy.sh",
            "head -c 1000000 /dev/zero | tr '\\0' 'e' | fold -w 100 >&2\nprintf '{\"response\":1}'",
        );
        let before = STDERR_DROPPED_BYTES.load(Ordering::Relaxed);
        let out = oneshot(prog, &[])
            .tick(&input(json!({})), Duration::from_secs(20))
            .await
            .unwrap();
        assert_eq!(
            out.response.as_ref().map(crate::model::JsonText::to_value),
            Some(json!(1))
        );
        let dropped = STDERR_DROPPED_BYTES.load(Ordering::Relaxed) - before;
        // 10,000 lines of 100 bytes (+ newline); at most 512 lines were logged.
        assert!(dropped >= 1_010_000 - 512 * 101, "{dropped}");
    }

    #[test]
    fn the_budget_admits_bytes_and_lines_up_to_the_limits() {
        let mut budget = StderrBudget::default();
        assert!(matches!(budget.admit(STDERR_LOG_BYTES), Admit::Log));
        assert!(matches!(budget.admit(1), Admit::LogLimitReached));
        assert!(matches!(budget.admit(1), Admit::Drop));
        assert_eq!(budget.dropped, 4);
        budget.settle("test/runner");
        assert_eq!(budget.dropped, 0);
        for _ in 0..STDERR_LOG_LINES {
            assert!(matches!(budget.admit(0), Admit::Log));
        }
        assert!(matches!(budget.admit(0), Admit::LogLimitReached));
    }

    #[actix_rt::test]
    async fn missing_or_unexecutable_program_is_spawn_error() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("does-not-exist");
        let err = oneshot(missing.clone(), &[])
            .tick(&input(json!({})), Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, RunnerError::Spawn(m) if m.contains(missing.to_str().unwrap())),
            "{err:?}"
        );

        let plain = dir.path().join("plain.txt");
        std::fs::write(&plain, "not a program").unwrap();
        let err = oneshot(plain, &[])
            .tick(&input(json!({})), Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, RunnerError::Spawn(m) if m.contains("ermission denied")),
            "{err:?}"
        );
    }

    #[test]
    fn stderr_lines_are_split_and_capped() {
        let mut splitter = LineSplitter::default();
        let mut seen = Vec::new();
        let mut emit = |line: &str| seen.push(line.to_string());
        splitter.feed(b"first\r\nsec", &mut emit);
        splitter.feed(b"ond\n\n", &mut emit);
        splitter.feed(&vec![b'a'; MAX_STDERR_LINE + 10], &mut emit);
        splitter.feed(b"aaa\nlast", &mut emit);
        splitter.finish(&mut emit);
        assert_eq!(seen.len(), 4, "{seen:?}");
        assert_eq!(seen[0], "first");
        assert_eq!(seen[1], "second");
        assert!(seen[2].ends_with(" [line truncated]"));
        assert_eq!(seen[2].len(), MAX_STDERR_LINE + " [line truncated]".len());
        assert_eq!(seen[3], "last");
    }

    #[test]
    fn stderr_tail_keeps_the_end() {
        let mut tail = StderrTail::default();
        assert_eq!(tail.text(), "(empty)");
        tail.push(b"early noise\n");
        assert_eq!(tail.text(), "early noise");
        tail.push(&vec![b'x'; STDERR_TAIL]);
        tail.push(b"\nthe real reason\n");
        let text = tail.text();
        assert!(
            text.starts_with('…') && text.ends_with("the real reason"),
            "{text}"
        );
        assert!(!text.contains("early"));
    }
}
