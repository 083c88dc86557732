//! The `command` runner in persistent mode: one long-lived process per agent, fed one JSON line
//! per tick, so that programs with an expensive start (an interpreter, a loaded model) pay it once.
//!
//! Correlation: a reader task owns the process's stdout and hands a line to a tick only when that
//! tick is waiting for one (it has written its input). A line that arrives when no tick waits,
//! such as the second line of a runner answering twice, is a protocol violation: it is never
//! used, and the process is killed and restarted before the next tick. An answer that echoes a
//! `task_id` other than the tick's fails the tick and restarts the process too; runners that
//! echo `task_id` are therefore correlated exactly, even against a leftover line that arrives
//! after the next input was written, which no reader can tell from an answer otherwise.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex as StdMutex, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::sync::{Mutex, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::command::{
    describe_exit, encode_input, pump_stderr, spawn_in_group, stop, ProcessGroup, StderrBudget,
    StderrTail, MAX_OUTPUT,
};
use super::reap::Marker;
use super::{CommandSpec, RunnerError};
use crate::model::{TickInput, TickOutput};

const FIRST_RESTART_DELAY: Duration = Duration::from_millis(100);
const MAX_RESTART_DELAY: Duration = Duration::from_secs(10);
/// How long a dying process gets to let its stderr reach the log before the error is written.
const STDERR_GRACE: Duration = Duration::from_millis(500);

/// Keeps one process of a `command` runner alive across an agent's ticks and restarts it, with
/// backoff, when it dies, so that a crashing program cannot turn into a fork loop.
pub struct Persistent {
    spec: CommandSpec,
    env: BTreeMap<String, String>,
    state: Mutex<State>,
}

struct State {
    /// Boxed so that an idle runner (and the `Runner` enum holding it) stays small.
    process: Option<Box<ProcessState>>,
    /// Process deaths since the last answered tick; drives the restart delay.
    deaths: u32,
}

struct ProcessState {
    /// Declared first so that it drops first: the group is killed while the unreaped leader still
    /// reserves the group id.
    group: ProcessGroup,
    child: Child,
    stdin: ChildStdin,
    inbox: Arc<Inbox>,
    stdout_task: JoinHandle<()>,
    stderr_tail: Arc<StdMutex<StderrTail>>,
    stderr_budget: Arc<StdMutex<StderrBudget>>,
    stderr_task: JoinHandle<()>,
}

impl Drop for ProcessState {
    fn drop(&mut self) {
        // The reader would end at EOF anyway (the group is being killed); aborting it frees the
        // pipe at once even if an escaped process still held it.
        self.stdout_task.abort();
    }
}

/// Why the line exchange with the process broke off.
#[derive(Debug)]
enum Broken {
    Closed,
    Io(std::io::Error),
    TooLong,
}

/// Where the stdout reader leaves the answer for the waiting tick.
#[derive(Default)]
struct Inbox {
    state: StdMutex<InboxState>,
    arrived: Notify,
}

#[derive(Default)]
struct InboxState {
    /// A tick has written its input and waits for exactly one line.
    waiting: bool,
    answer: Option<Vec<u8>>,
    /// Lines that arrived while no tick was waiting: protocol violations, never used.
    unasked: u64,
    /// How the output ended, once it has.
    ended: Option<Broken>,
}

impl Inbox {
    fn lock(&self) -> std::sync::MutexGuard<'_, InboxState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Reads the process's stdout line by line for its whole life, handing each line to the tick
/// that waits for it or counting it as unasked.
async fn read_answers(mut stdout: BufReader<ChildStdout>, inbox: Arc<Inbox>) {
    loop {
        let line = read_line(&mut stdout, MAX_OUTPUT).await;
        let mut state = inbox.lock();
        match line {
            Ok(line) if state.waiting && state.answer.is_none() => {
                state.waiting = false;
                state.answer = Some(line);
            }
            Ok(_) => state.unasked = state.unasked.saturating_add(1),
            Err(end) => {
                state.ended = Some(end);
                drop(state);
                inbox.arrived.notify_one();
                return;
            }
        }
        drop(state);
        inbox.arrived.notify_one();
    }
}

/// What the process did with a tick's input.
enum Reply {
    Line(Vec<u8>),
    Ended(Broken),
}

/// Waits for the reader to hand over this tick's line, or to report the end of the output.
async fn next_reply(inbox: &Inbox) -> Reply {
    loop {
        let arrived = inbox.arrived.notified();
        {
            let mut state = inbox.lock();
            if let Some(line) = state.answer.take() {
                return Reply::Line(line);
            }
            if let Some(end) = state.ended.take() {
                return Reply::Ended(end);
            }
        }
        arrived.await;
    }
}

impl Persistent {
    /// Keeps the spec and the process environment (`env_clear` plus exactly `base_env`); the
    /// process itself starts on the first tick, so agents that never tick cost nothing.
    pub fn new(spec: CommandSpec, base_env: BTreeMap<String, String>) -> Self {
        Self {
            spec,
            env: base_env,
            state: Mutex::new(State {
                process: None,
                deaths: 0,
            }),
        }
    }

    /// Sends `input` as one line and reads one line back. A process that died since the last
    /// tick is restarted first (after the backoff delay, which the tick timeout does not cover,
    /// so that a long delay cannot make every later tick time out); one that dies, hangs or
    /// floods during the tick is killed with its group and replaced on the next tick.
    pub async fn tick(
        &self,
        input: &TickInput,
        timeout: Duration,
    ) -> Result<TickOutput, RunnerError> {
        let mut line = encode_input(input)?;
        line.push(b'\n');
        let mut state = self.state.lock().await;
        state.forget_exited(&input.agent).await;
        state.forget_unasked(&input.agent).await;
        if state.process.is_none() {
            state.start(&self.spec, &self.env, &input.agent).await?;
        }
        let Some(process) = state.process.as_mut() else {
            return Err(RunnerError::Spawn(format!(
                "{}: the process vanished before its first tick",
                self.spec.program.display()
            )));
        };
        process
            .stderr_budget
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .settle(&input.agent);

        let deadline = Instant::now() + timeout;
        let inbox = Arc::clone(&process.inbox);
        inbox.lock().waiting = true;
        let exchange = async {
            process.stdin.write_all(&line).await.map_err(Broken::Io)?;
            process.stdin.flush().await.map_err(Broken::Io)?;
            match next_reply(&inbox).await {
                Reply::Line(answer) => Ok(answer),
                Reply::Ended(end) => Err(end),
            }
        };
        let outcome = tokio::time::timeout_at(deadline, exchange).await;
        inbox.lock().waiting = false;
        match outcome {
            Ok(Ok(answer)) => {
                let out = TickOutput::parse(&answer).map_err(RunnerError::BadOutput)?;
                if let Some(echoed) = out.extra.get("task_id") {
                    if echoed.as_str() != Some(input.task_id.as_str()) {
                        tracing::warn!(
                            target: "tickgate::runner",
                            agent = %input.agent,
                            "persistent runner answered for another task; restarting it"
                        );
                        state.discard().await;
                        return Err(RunnerError::BadOutput(format!(
                            "persistent runner answered with task_id {echoed} instead of {:?}; its output is out of step, so it will be restarted",
                            input.task_id
                        )));
                    }
                }
                state.deaths = 0;
                Ok(out)
            }
            Ok(Err(Broken::TooLong)) => {
                state.discard().await;
                Err(RunnerError::BadOutput(format!(
                    "persistent runner answered a line over the {} MiB limit; it will be restarted",
                    MAX_OUTPUT >> 20
                )))
            }
            Ok(Err(Broken::Closed)) => Err(state.died(deadline, None).await),
            Ok(Err(Broken::Io(e))) => Err(state.died(deadline, Some(e)).await),
            Err(_) => {
                state.discard().await;
                Err(RunnerError::Timeout(timeout))
            }
        }
    }

    /// Kills the process and everything it started, and reaps it; called when the agent stops so
    /// that no runner outlives tickgate. A later tick would start a fresh process.
    pub async fn shutdown(&self) {
        let mut state = self.state.lock().await;
        if let Some(mut process) = state.process.take() {
            stop(&mut process.child, &mut process.group).await;
        }
    }
}

impl State {
    /// Kills a process that printed lines no tick asked for (more than one line for an input,
    /// or output between ticks), so that a leftover line can never answer the next tick.
    async fn forget_unasked(&mut self, agent: &str) {
        let Some(process) = self.process.as_ref() else {
            return;
        };
        let unasked = process.inbox.lock().unasked;
        if unasked == 0 {
            return;
        }
        tracing::warn!(
            target: "tickgate::runner",
            agent = %agent,
            "persistent runner printed {unasked} line(s) no tick asked for (the protocol is one output line per input line); the extra output is discarded and the process restarted"
        );
        self.discard().await;
    }

    /// Drops a process that exited between ticks, so that the tick goes to a live one.
    async fn forget_exited(&mut self, agent: &str) {
        let Some(process) = self.process.as_mut() else {
            return;
        };
        match process.child.try_wait() {
            Ok(None) => {}
            Ok(Some(status)) => {
                tracing::warn!(
                    target: "tickgate::runner",
                    agent = %agent,
                    "persistent runner {} between ticks; restarting it",
                    describe_exit(status)
                );
                self.discard().await;
            }
            Err(e) => {
                tracing::warn!(
                    target: "tickgate::runner",
                    agent = %agent,
                    "persistent runner could not be checked ({e}); restarting it"
                );
                self.discard().await;
            }
        }
    }

    async fn start(
        &mut self,
        spec: &CommandSpec,
        env: &BTreeMap<String, String>,
        agent: &str,
    ) -> Result<(), RunnerError> {
        if self.deaths > 0 {
            tokio::time::sleep(restart_delay(self.deaths)).await;
        }
        let mut command = Command::new(&spec.program);
        command.args(&spec.args).env_clear().envs(env);
        // The marker is what the process carries: its `TICKGATE_AGENT`.
        let marker = Marker::Persistent(
            env.get("TICKGATE_AGENT")
                .cloned()
                .unwrap_or_else(|| agent.to_string()),
        );
        let (mut child, group) = match spawn_in_group(&mut command, &spec.program, marker) {
            Ok(started) => started,
            Err(e) => {
                self.deaths = self.deaths.saturating_add(1);
                return Err(e);
            }
        };
        let (Some(stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            self.deaths = self.deaths.saturating_add(1);
            return Err(RunnerError::Spawn(format!(
                "{}: started without its stdio pipes",
                spec.program.display()
            )));
        };
        let stderr_tail = Arc::new(StdMutex::new(StderrTail::default()));
        let stderr_budget = Arc::new(StdMutex::new(StderrBudget::default()));
        let tail = Arc::clone(&stderr_tail);
        let budget = Arc::clone(&stderr_budget);
        let agent_name = agent.to_string();
        // tickgate runs runners inside actix arbiters, which are tokio runtimes, so a plain
        // `tokio::spawn` works there (and `spawn_in_group` has checked that a runtime exists).
        // The task outlives no one: it ends at EOF, which the tree kill guarantees.
        let stderr_task = tokio::spawn(async move {
            pump_stderr(
                stderr,
                &agent_name,
                |bytes| {
                    tail.lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push(bytes)
                },
                &budget,
            )
            .await;
            budget
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .settle(&agent_name);
        });
        let inbox = Arc::new(Inbox::default());
        let stdout_task = tokio::spawn(read_answers(BufReader::new(stdout), Arc::clone(&inbox)));
        tracing::info!(
            target: "tickgate::runner",
            agent = %agent,
            pid = child.id(),
            "persistent runner started"
        );
        self.process = Some(Box::new(ProcessState {
            group,
            child,
            stdin,
            inbox,
            stdout_task,
            stderr_tail,
            stderr_budget,
            stderr_task,
        }));
        Ok(())
    }

    /// Kills and reaps the current process, counting it as a death for the restart backoff.
    async fn discard(&mut self) {
        if let Some(mut process) = self.process.take() {
            stop(&mut process.child, &mut process.group).await;
        }
        self.deaths = self.deaths.saturating_add(1);
    }

    /// Handles a process that stopped answering mid-tick: collects its real exit status (waiting
    /// until the tick's deadline at most), kills what is left of its group, and describes it.
    async fn died(
        &mut self,
        deadline: Instant,
        write_error: Option<std::io::Error>,
    ) -> RunnerError {
        self.deaths = self.deaths.saturating_add(1);
        let Some(mut process) = self.process.take() else {
            return RunnerError::Exit("persistent runner exited".to_string());
        };
        let how = match tokio::time::timeout_at(deadline, process.child.wait()).await {
            Ok(Ok(status)) => {
                process.group.kill();
                process.group.disarm();
                process.group.sweep_marked().await;
                describe_exit(status)
            }
            _ => {
                stop(&mut process.child, &mut process.group).await;
                match write_error {
                    Some(e) => format!("stopped reading its input ({e}) and was killed"),
                    None => "closed its output and was killed".to_string(),
                }
            }
        };
        let _ = tokio::time::timeout(STDERR_GRACE, &mut process.stderr_task).await;
        let tail = process
            .stderr_tail
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .text();
        RunnerError::Exit(format!(
            "persistent runner exited before answering ({how}); stderr: {tail}"
        ))
    }
}

/// The pause before the restart that follows the `deaths`-th consecutive death.
fn restart_delay(deaths: u32) -> Duration {
    if deaths == 0 {
        return Duration::ZERO;
    }
    let factor = 1u32.checked_shl(deaths - 1).unwrap_or(u32::MAX);
    FIRST_RESTART_DELAY
        .saturating_mul(factor)
        .min(MAX_RESTART_DELAY)
}

/// Reads one `\n`-terminated line (without the `\n`), refusing to buffer more than `cap` bytes.
async fn read_line<R: AsyncBufRead + Unpin>(reader: &mut R, cap: usize) -> Result<Vec<u8>, Broken> {
    let mut line = Vec::new();
    loop {
        let buf = reader.fill_buf().await.map_err(Broken::Io)?;
        if buf.is_empty() {
            return Err(Broken::Closed);
        }
        let (take, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (i, true),
            None => (buf.len(), false),
        };
        if line.len() + take > cap {
            return Err(Broken::TooLong);
        }
        line.extend_from_slice(&buf[..take]);
        reader.consume(if done { take + 1 } else { take });
        if done {
            return Ok(line);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicU64, Ordering};

    use serde_json::{json, Value};

    use super::super::command::test_support::{
        input, process_gone, script, set_secret, wait_until,
    };
    use super::*;
    use crate::runner::CommandMode;

    const SERVE: &str = r#"while IFS= read -r line; do
  case "$line" in
    *'"hang"'*) sleep 30 ;;
    *'"flood"'*) dd if=/dev/zero bs=1048576 count=17 2>/dev/null ;;
  esac
  printf '{"response":{"pid":%s}}\n' "$$"
done"#;

    static NEXT_AGENT: AtomicU64 = AtomicU64::new(1);

    fn persistent(program: PathBuf, args: &[&str]) -> Persistent {
        let spec = CommandSpec {
            program,
            args: args.iter().map(|a| a.to_string()).collect(),
            mode: CommandMode::Persistent,
        };
        let env = BTreeMap::from([
            ("AGENT_VAR".to_string(), "from-agent".to_string()),
            // Unique per runner: a sweep kills every process marked with this agent.
            (
                "TICKGATE_AGENT".to_string(),
                format!("test/runner-{}", NEXT_AGENT.fetch_add(1, Ordering::Relaxed)),
            ),
        ]);
        Persistent::new(spec, env)
    }

    async fn pid_of(runner: &Persistent, inputs: Value) -> i32 {
        let out = runner
            .tick(&input(inputs), Duration::from_secs(10))
            .await
            .unwrap();
        let pid = out
            .response
            .as_ref()
            .and_then(|r| r.to_value()["pid"].as_i64());
        i32::try_from(pid.expect("a pid in the response")).unwrap()
    }

    #[actix_rt::test]
    async fn ticks_share_one_process() {
        let dir = tempfile::tempdir().unwrap();
        let runner = persistent(script(dir.path(), "serve.sh", SERVE), &[]);
        let first = pid_of(&runner, json!({"n": 1})).await;
        let second = pid_of(&runner, json!({"n": 2})).await;
        assert_eq!(first, second);
        runner.shutdown().await;
        assert!(wait_until(Duration::from_secs(5), || process_gone(first)).await);
    }

    #[actix_rt::test]
    async fn environment_is_exactly_the_base_env() {
        set_secret();
        let dir = tempfile::tempdir().unwrap();
        let prog = script(
            dir.path(),
            "env.sh",
            r#"read -r line
printf '{"response":{"secret":"%s","agent_var":"%s","agent":"%s","task":"%s"}}\n' "${TICKGATE_TEST_SECRET:-absent}" "${AGENT_VAR:-}" "${TICKGATE_AGENT:-}" "${TICKGATE_TASK_ID:-absent}"
cat >/dev/null"#,
        );
        let runner = persistent(prog, &[]);
        let out = runner
            .tick(&input(json!({})), Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(
            out.response.as_ref().map(crate::model::JsonText::to_value),
            Some(json!({
                "secret": "absent",
                "agent_var": "from-agent",
                "agent": runner.env["TICKGATE_AGENT"],
                "task": "absent",
            }))
        );
        runner.shutdown().await;
    }

    #[actix_rt::test]
    async fn a_process_killed_between_ticks_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let runner = persistent(script(dir.path(), "serve.sh", SERVE), &[]);
        let first = pid_of(&runner, json!({})).await;
        // SAFETY: plain kill(2) of the runner's own child.
        assert_eq!(unsafe { libc::kill(first, libc::SIGKILL) }, 0);
        assert!(wait_until(Duration::from_secs(5), || process_gone(first)).await);
        let second = pid_of(&runner, json!({})).await;
        assert_ne!(first, second);
        runner.shutdown().await;
    }

    #[actix_rt::test]
    async fn a_hung_tick_times_out_and_the_next_one_works() {
        let dir = tempfile::tempdir().unwrap();
        let runner = persistent(script(dir.path(), "serve.sh", SERVE), &[]);
        let first = pid_of(&runner, json!({})).await;
        let limit = Duration::from_millis(500);
        let started = std::time::Instant::now();
        let err = runner
            .tick(&input(json!({"hang": true})), limit)
            .await
            .unwrap_err();
        assert_eq!(err, RunnerError::Timeout(limit));
        assert!(started.elapsed() < Duration::from_secs(10));
        assert!(wait_until(Duration::from_secs(5), || process_gone(first)).await);
        let second = pid_of(&runner, json!({})).await;
        assert_ne!(first, second);
        runner.shutdown().await;
    }

    #[actix_rt::test]
    async fn a_process_dying_mid_tick_is_an_exit_then_recovers() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("died-once");
        let prog = script(
            dir.path(),
            "die-once.sh",
            &format!(
                "if [ ! -e \"$1\" ]; then\n  : > \"$1\"\n  read -r line\n  echo 'dying on purpose' >&2\n  exit 3\nfi\n{SERVE}"
            ),
        );
        let runner = persistent(prog, &[marker.to_str().unwrap()]);
        let err = runner
            .tick(&input(json!({})), Duration::from_secs(10))
            .await
            .unwrap_err();
        let RunnerError::Exit(msg) = err else {
            panic!("expected Exit, got {err:?}");
        };
        assert!(msg.starts_with("persistent runner exited"), "{msg}");
        assert!(msg.contains("exited with status 3"), "{msg}");
        assert!(msg.contains("dying on purpose"), "{msg}");
        pid_of(&runner, json!({})).await;
        runner.shutdown().await;
    }

    #[actix_rt::test]
    async fn an_overlong_line_is_bad_output_then_recovers() {
        let dir = tempfile::tempdir().unwrap();
        let runner = persistent(script(dir.path(), "serve.sh", SERVE), &[]);
        let first = pid_of(&runner, json!({})).await;
        let err = runner
            .tick(&input(json!({"flood": true})), Duration::from_secs(20))
            .await
            .unwrap_err();
        assert!(matches!(err, RunnerError::BadOutput(_)), "{err:?}");
        let second = pid_of(&runner, json!({})).await;
        assert_ne!(first, second);
        runner.shutdown().await;
    }

    #[actix_rt::test]
    async fn a_second_line_for_one_input_is_never_an_answer() {
        let dir = tempfile::tempdir().unwrap();
        let prog = script(
            dir.path(),
            "twice.sh",
            r#"n=0
while IFS= read -r line; do
  n=$((n+1))
  printf '{"response":{"pid":%s,"n":%s}}\n{"response":"leftover"}\n' "$$" "$n"
done"#,
        );
        let runner = persistent(prog, &[]);
        for _ in 0..3 {
            let out = runner
                .tick(&input(json!({})), Duration::from_secs(10))
                .await
                .unwrap();
            // Each answer comes from a fresh process, as its first answer: the leftover of the
            // previous input was never used.
            assert_eq!(
                out.response.as_ref().unwrap().to_value()["n"],
                json!(1),
                "{out:?}"
            );
        }
        runner.shutdown().await;
    }

    #[actix_rt::test]
    async fn an_answer_echoing_another_task_id_fails_and_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let prog = script(
            dir.path(),
            "echoing.sh",
            r#"while IFS= read -r line; do
  id=$(printf '%s' "$line" | sed 's/.*"task_id":"\([^"]*\)".*/\1/')
  case "$line" in
    *'"stale"'*) id="some-other-task" ;;
  esac
  printf '{"task_id":"%s","response":{"pid":%s}}\n' "$id" "$$"
done"#,
        );
        let runner = persistent(prog, &[]);
        let first = pid_of(&runner, json!({})).await;
        let err = runner
            .tick(&input(json!({"stale": true})), Duration::from_secs(10))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, RunnerError::BadOutput(m) if m.contains("some-other-task")),
            "{err:?}"
        );
        assert!(wait_until(Duration::from_secs(5), || process_gone(first)).await);
        let second = pid_of(&runner, json!({})).await;
        assert_ne!(first, second);
        runner.shutdown().await;
    }

    #[actix_rt::test]
    async fn a_missing_program_is_a_spawn_error() {
        let dir = tempfile::tempdir().unwrap();
        let runner = persistent(dir.path().join("nope"), &[]);
        let err = runner
            .tick(&input(json!({})), Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(err, RunnerError::Spawn(_)), "{err:?}");
    }

    #[test]
    fn restart_delay_doubles_up_to_the_cap() {
        assert_eq!(restart_delay(0), Duration::ZERO);
        assert_eq!(restart_delay(1), Duration::from_millis(100));
        assert_eq!(restart_delay(2), Duration::from_millis(200));
        assert_eq!(restart_delay(4), Duration::from_millis(800));
        assert_eq!(restart_delay(8), Duration::from_secs(10));
        assert_eq!(restart_delay(u32::MAX), Duration::from_secs(10));
    }

    #[actix_rt::test]
    async fn read_line_splits_and_caps() {
        let mut reader = BufReader::with_capacity(4, &b"{\"a\":1}\n{}\npartial"[..]);
        assert_eq!(
            read_line(&mut reader, 100).await.ok(),
            Some(b"{\"a\":1}".to_vec())
        );
        assert_eq!(read_line(&mut reader, 100).await.ok(), Some(b"{}".to_vec()));
        assert!(matches!(
            read_line(&mut reader, 100).await,
            Err(Broken::Closed)
        ));
        let mut long = BufReader::new(&b"0123456789\n"[..]);
        assert!(matches!(
            read_line(&mut long, 5).await,
            Err(Broken::TooLong)
        ));
    }
}
