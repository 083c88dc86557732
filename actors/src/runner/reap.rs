//! Killing everything a runner started, including processes that left its process group.
//!
//! A process group kill misses a child that called `setsid()` (or `setpgid`): it keeps running
//! and, if it holds the runner's stdout, keeps a oneshot tick's read open until `tick_timeout`.
//! Two things close that hole without privileges:
//!
//! - **Ancestry**: while a runner's leader is alive, every process it started is its descendant;
//!   a walk of `/proc` finds them whatever their group or session.
//! - **Environment marker**: a process whose parent died is re-parented (to tickgate when it is a
//!   child subreaper, see [`become_subreaper`], else to init) and loses that ancestry. It still
//!   carries the environment it was started with, and every runner process has a marker there:
//!   `TICKGATE_TASK_ID=<task>` for a oneshot tick (unique per tick), `TICKGATE_AGENT=<agent>`
//!   without a task id for an agent's persistent process. A sweep kills every process carrying
//!   the marker, and all of their descendants.
//!
//! What is not guaranteed: a process that both escapes the ancestry (its parent died) and
//! replaces its environment (`env -i`, `execve` with a new one) cannot be attributed to a tick.
//! Under a subreaper tickgate still reaps it once it exits, so no zombie accumulates. A pid that
//! exits and is reused between the `/proc` scan and the kill could be hit; pids are not reused
//! that fast on Linux in practice.
//!
//! Zombies: when tickgate is a subreaper, orphans that exit become its zombies. tokio reaps only
//! the leaders it spawned, so a sweep reaps every zombie child that is not such a leader. A spawn
//! holds [`SPAWN_GATE`] for reading until its pid is in [`LEADERS`], and the reaping step holds it
//! for writing, so a sweep can never steal a leader's exit status from tokio, while spawns on
//! different threads never wait for each other.

use std::collections::{HashMap, HashSet};
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError, RwLock};

use tokio::process::{Child, Command};

/// Whether this process was made a child subreaper (only then are orphans its children).
static SUBREAPER: AtomicBool = AtomicBool::new(false);

/// Pids of runner leaders that tokio will reap; a sweep never reaps these.
static LEADERS: Mutex<Option<HashSet<i32>>> = Mutex::new(None);

/// Read-held from a spawn until its pid is in [`LEADERS`]; write-held while zombies are reaped.
static SPAWN_GATE: RwLock<()> = RwLock::new(());

/// tickgate's children as the kernel lists them for its main thread
/// (`/proc/self/task/<pid>/children`), kept open and re-read from offset 0, so the check after
/// every oneshot tick costs one `pread` instead of a path walk, open and close. See
/// [`has_foreign_children`] for why the main thread's list is the one that matters.
static MAIN_CHILDREN: Mutex<Option<std::fs::File>> = Mutex::new(None);

/// How many scan-and-kill passes a sweep makes at most: a process forking while it is being
/// killed can create a new descendant after a scan, which the next pass catches.
const MAX_PASSES: usize = 6;

/// Makes tickgate a child subreaper (`prctl(PR_SET_CHILD_SUBREAPER)`), so that a runner's
/// orphans become tickgate's children instead of init's: their exit is then reaped by tickgate
/// and they stay visible to the sweeps. Called once at start-up by the service; harmless to call
/// again.
pub fn become_subreaper() -> io::Result<()> {
    // SAFETY: prctl with PR_SET_CHILD_SUBREAPER takes a plain integer argument.
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    SUBREAPER.store(true, Ordering::SeqCst);
    Ok(())
}

/// The environment entry that identifies the processes of one runner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Marker {
    /// The processes of one oneshot tick: `TICKGATE_TASK_ID=<task id>`.
    Task(String),
    /// An agent's persistent process and what it started: `TICKGATE_AGENT=<agent>` and no
    /// `TICKGATE_TASK_ID` (which only oneshot processes have).
    Persistent(String),
}

impl Marker {
    fn matches(&self, environ: &[u8]) -> bool {
        let mut entries = environ.split(|&b| b == 0);
        match self {
            Marker::Task(id) => entries.any(|e| {
                e.strip_prefix(b"TICKGATE_TASK_ID=")
                    .is_some_and(|v| v == id.as_bytes())
            }),
            Marker::Persistent(agent) => {
                let mut agent_seen = false;
                for e in entries {
                    if e.starts_with(b"TICKGATE_TASK_ID=") {
                        return false;
                    }
                    if e.strip_prefix(b"TICKGATE_AGENT=") == Some(agent.as_bytes()) {
                        agent_seen = true;
                    }
                }
                agent_seen
            }
        }
    }
}

/// Spawns `command` and records its pid as a leader tokio will reap, under the lock sweeps take,
/// so that a sweep never sees the new process without knowing it is a leader.
pub(super) fn spawn_leader(command: &mut Command) -> io::Result<Child> {
    let _spawning = SPAWN_GATE.read().unwrap_or_else(PoisonError::into_inner);
    let child = command.spawn()?;
    if let Some(pid) = child.id().and_then(|id| i32::try_from(id).ok()) {
        LEADERS
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_or_insert_with(HashSet::new)
            .insert(pid);
    }
    Ok(child)
}

/// Forgets a leader once tokio has reaped it (or will, through its orphan queue).
pub(super) fn forget_leader(pid: i32) {
    let mut leaders = LEADERS.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(set) = leaders.as_mut() {
        set.remove(&pid);
    }
}

/// One process as `/proc/<pid>/stat` describes it.
struct Proc {
    ppid: i32,
    zombie: bool,
}

fn scan() -> HashMap<i32, Proc> {
    let mut table = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return table;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // The command name is in parentheses and may itself contain spaces or parentheses.
        let Some(after) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            continue;
        };
        let mut fields = after.split_whitespace();
        let state = fields.next().unwrap_or("");
        let Some(ppid) = fields.next().and_then(|p| p.parse().ok()) else {
            continue;
        };
        table.insert(
            pid,
            Proc {
                ppid,
                zombie: state == "Z" || state == "X",
            },
        );
    }
    table
}

/// Whether tickgate has a child (live or zombie) that is not a leader tokio reaps, from the
/// `children` list of the main thread alone. A process is listed as a child of the thread that
/// created it; every process tickgate creates is a runner leader ([`spawn_leader`], from an
/// agent's thread), while an orphan handed to tickgate as subreaper, and the children of a thread
/// that exits, go to the first live thread of the process: the main thread. So a process that
/// escaped a runner's group and outlived its leader is always on the main thread's list, and a
/// leader being spawned on an agent's thread (listed before its pid is in [`LEADERS`]) never is.
/// When the kernel does not provide the list, answers `true` so that the caller does the full
/// scan.
fn has_foreign_children() -> bool {
    let mut file = MAIN_CHILDREN.lock().unwrap_or_else(PoisonError::into_inner);
    if file.is_none() {
        let path = format!("/proc/self/task/{}/children", std::process::id());
        match std::fs::File::open(path) {
            Ok(opened) => *file = Some(opened),
            Err(_) => return true,
        }
    }
    let Some(list) = file.as_ref().and_then(|f| read_from_start(f).ok()) else {
        return true;
    };
    drop(file);
    let leaders = LEADERS.lock().unwrap_or_else(PoisonError::into_inner);
    foreign_in(&list, leaders.as_ref())
}

/// The whole of a `/proc` file already open, read again from its start.
fn read_from_start(file: &std::fs::File) -> io::Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let mut out = Vec::new();
    let mut buf = [0u8; 512];
    loop {
        let n = file.read_at(&mut buf, out.len() as u64)?;
        if n == 0 {
            return Ok(out);
        }
        out.extend_from_slice(&buf[..n]);
    }
}

/// Whether a `children` list (pids separated by spaces) names a process that is not a leader.
fn foreign_in(list: &[u8], leaders: Option<&HashSet<i32>>) -> bool {
    list.split(|b| b.is_ascii_whitespace())
        .filter(|pid| !pid.is_empty())
        .any(|pid| {
            let leader = std::str::from_utf8(pid)
                .ok()
                .and_then(|pid| pid.parse::<i32>().ok())
                .is_some_and(|pid| leaders.is_some_and(|set| set.contains(&pid)));
            !leader
        })
}

fn descendants(table: &HashMap<i32, Proc>, roots: &[i32]) -> HashSet<i32> {
    let mut children: HashMap<i32, Vec<i32>> = HashMap::new();
    for (&pid, p) in table {
        children.entry(p.ppid).or_default().push(pid);
    }
    let mut found = HashSet::new();
    let mut stack: Vec<i32> = roots.to_vec();
    while let Some(pid) = stack.pop() {
        for &child in children.get(&pid).map(Vec::as_slice).unwrap_or(&[]) {
            if found.insert(child) {
                stack.push(child);
            }
        }
    }
    found
}

/// Kills every live process started by the runner whose leader is `root` (its descendants, while
/// it lives) or marked with `marker` (and their descendants), never tickgate itself nor another
/// runner's leader; then reaps whatever zombie children are not tokio's. Returns how many
/// processes were sent SIGKILL. Blocking (reads `/proc`): call it off the async threads.
pub(super) fn kill_tree(root: Option<i32>, marker: &Marker) -> usize {
    let me = std::process::id() as i32;
    let subreaper = SUBREAPER.load(Ordering::SeqCst);
    if subreaper && root.is_none() && !has_foreign_children() {
        // The common case after a tick: every orphan would be a child of tickgate, and there is
        // none, so the (much dearer) walk of the whole process table is skipped.
        return 0;
    }
    let mut killed = HashSet::new();
    for _ in 0..MAX_PASSES {
        let table = scan();
        let leaders: HashSet<i32> = LEADERS
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .unwrap_or_default();
        if subreaper {
            reap_zombies(&table, me);
        }
        let mut targets = match root {
            Some(root) if table.contains_key(&root) => descendants(&table, &[root]),
            _ => HashSet::new(),
        };
        let marked: Vec<i32> = table
            .iter()
            .filter(|(&pid, p)| {
                pid != me
                    && !p.zombie
                    // Under a subreaper every orphan is tickgate's child; otherwise an orphan
                    // can sit anywhere, so every process readable by tickgate is a candidate.
                    && (!subreaper || p.ppid == me)
                    && (Some(pid) == root || !leaders.contains(&pid))
            })
            .map(|(&pid, _)| pid)
            .filter(|&pid| {
                std::fs::read(format!("/proc/{pid}/environ")).is_ok_and(|env| marker.matches(&env))
            })
            .collect();
        targets.extend(descendants(&table, &marked));
        targets.extend(marked);
        targets.remove(&me);
        targets.retain(|pid| table.get(pid).is_some_and(|p| !p.zombie) && !killed.contains(pid));
        if targets.is_empty() {
            break;
        }
        for &pid in &targets {
            // SAFETY: kill(2) has no memory-safety preconditions; ESRCH means it is gone.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
        killed.extend(targets);
    }
    if subreaper && !killed.is_empty() {
        reap_zombies(&scan(), me);
    }
    killed.len()
}

/// Runs [`kill_tree`] on tokio's blocking pool (runners only run inside a tokio runtime). The
/// common end of a oneshot tick (no leader to walk from, tickgate a subreaper without foreign
/// children) is decided here from a few in-memory `/proc/self` reads, without the round trip to
/// the blocking pool: that hop was one of the thread crossings of every oneshot tick.
pub(super) async fn sweep(root: Option<i32>, marker: Marker) -> usize {
    if root.is_none() && SUBREAPER.load(Ordering::SeqCst) && !has_foreign_children() {
        return 0;
    }
    tokio::task::spawn_blocking(move || kill_tree(root, &marker))
        .await
        .unwrap_or_default()
}

/// Starts a sweep without waiting for it, for drop paths that cannot await.
/// Only the marker is used: the leader may be reaped, and its pid reused, before this runs.
pub(super) fn sweep_detached(marker: Marker) {
    if let Ok(handle) = tokio::runtime::Handle::try_current() {
        handle.spawn_blocking(move || kill_tree(None, &marker));
    } else {
        kill_tree(None, &marker);
    }
}

/// Reaps tickgate's zombie children that are not leaders. A zombie's pid cannot be reused, and
/// with the gate held for writing every spawned leader is already in [`LEADERS`].
fn reap_zombies(table: &HashMap<i32, Proc>, me: i32) {
    if !table.values().any(|p| p.ppid == me && p.zombie) {
        return;
    }
    let _reaping = SPAWN_GATE.write().unwrap_or_else(PoisonError::into_inner);
    let leaders = LEADERS
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone()
        .unwrap_or_default();
    for (&pid, p) in table {
        if p.ppid == me && p.zombie && !leaders.contains(&pid) {
            let mut status = 0;
            // SAFETY: waitpid on one specific pid, not tokio's; WNOHANG never blocks.
            unsafe {
                libc::waitpid(pid, &mut status, libc::WNOHANG);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_match_exact_entries() {
        let env = b"PATH=/bin\0TICKGATE_AGENT=a/b\0TICKGATE_TASK_ID=t1\0";
        assert!(Marker::Task("t1".into()).matches(env));
        assert!(!Marker::Task("t".into()).matches(env));
        assert!(!Marker::Persistent("a/b".into()).matches(env));
        let persistent = b"PATH=/bin\0TICKGATE_AGENT=a/b\0";
        assert!(Marker::Persistent("a/b".into()).matches(persistent));
        assert!(!Marker::Persistent("a/bc".into()).matches(persistent));
        assert!(!Marker::Task("t1".into()).matches(persistent));
        assert!(!Marker::Persistent("a/b".into()).matches(b""));
    }

    #[test]
    fn descendants_follow_parent_links() {
        let table = HashMap::from([
            (
                10,
                Proc {
                    ppid: 1,
                    zombie: false,
                },
            ),
            (
                11,
                Proc {
                    ppid: 10,
                    zombie: false,
                },
            ),
            (
                12,
                Proc {
                    ppid: 11,
                    zombie: false,
                },
            ),
            (
                13,
                Proc {
                    ppid: 1,
                    zombie: false,
                },
            ),
        ]);
        let found = descendants(&table, &[10]);
        assert_eq!(found, HashSet::from([11, 12]));
    }

    #[test]
    fn a_children_list_is_foreign_when_it_names_anything_but_a_leader() {
        let leaders = HashSet::from([7, 12]);
        assert!(!foreign_in(b"", Some(&leaders)));
        assert!(!foreign_in(b"7 12 ", Some(&leaders)));
        assert!(foreign_in(b"7 8 ", Some(&leaders)));
        assert!(foreign_in(b"7", None));
        // Something unparsable is never taken for a leader.
        assert!(foreign_in(b"7 x", Some(&leaders)));
    }

    #[test]
    fn a_child_whose_creating_thread_exited_is_on_the_main_threads_list() {
        // Created on a thread that then ends: the kernel hands the child to the main thread,
        // where the check looks (and a non-leader is foreign). Read twice: the kept file is
        // read again from its start.
        let mut child = std::thread::spawn(|| {
            std::process::Command::new("/bin/sleep")
                .arg("30")
                .spawn()
                .expect("spawn sleep")
        })
        .join()
        .expect("spawning thread");
        assert!(has_foreign_children());
        assert!(has_foreign_children());
        child.kill().expect("kill sleep");
        child.wait().expect("reap sleep");
    }

    #[test]
    fn the_scan_sees_this_process() {
        let table = scan();
        let me = std::process::id() as i32;
        assert!(table.contains_key(&me));
        assert!(!table[&me].zombie);
    }
}
