//! A real `nats-server -js` for tests: started on an ephemeral 127.0.0.1 port with a temporary
//! store directory, stoppable and restartable on the same port and store (outage tests), killed
//! when dropped; plus a small blocking client (async-nats on a private current-thread runtime)
//! to publish, inspect streams and consumers, and collect what tickgate publishes.
//!
//! Without a `nats-server` binary the tests that need one skip with a printed note, unless
//! `TICKGATE_REQUIRE_NATS=1` (set by `.ci/run`), which makes a missing binary a failure.

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream;

use super::DEADLINE;

/// Where `nats-server` may be: `NATS_SERVER_BIN` (alone, when set), the `PATH`, then the
/// distribution's `/usr/sbin` (not on every user's `PATH`).
fn binary() -> Option<PathBuf> {
    if let Ok(bin) = std::env::var("NATS_SERVER_BIN") {
        return Some(PathBuf::from(bin)).filter(|p| p.is_file());
    }
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    on_path
        .into_iter()
        .chain(["/usr/sbin", "/usr/local/sbin", "/usr/local/bin", "/usr/bin"].map(PathBuf::from))
        .map(|dir| dir.join("nats-server"))
        .find(|p| p.is_file())
}

/// A running (or stopped, between [`NatsServer::stop`] and [`NatsServer::restart`]) server.
pub struct NatsServer {
    child: Option<Child>,
    bin: PathBuf,
    port: u16,
    /// JetStream's store directory (kept across restarts) and the server's log file.
    dir: tempfile::TempDir,
}

impl NatsServer {
    /// Starts a JetStream server and waits until JetStream answers. `None` (with a note on
    /// stderr) when no `nats-server` is installed, unless `TICKGATE_REQUIRE_NATS=1`.
    pub fn start() -> Option<NatsServer> {
        let Some(bin) = binary() else {
            if std::env::var("TICKGATE_REQUIRE_NATS").as_deref() == Ok("1") {
                panic!("nats-server is not installed and TICKGATE_REQUIRE_NATS=1");
            }
            eprintln!("note: nats-server not found (PATH, /usr/sbin); skipping this NATS test");
            return None;
        };
        let mut dir = tempfile::tempdir().expect("tempdir");
        for _ in 0..5 {
            let port = free_port();
            let mut server = NatsServer {
                child: None,
                bin: bin.clone(),
                port,
                dir,
            };
            if server.launch() {
                return Some(server);
            }
            // Someone took the port between our probe and the server's bind: try another.
            dir = std::mem::replace(&mut server.dir, tempfile::tempdir().expect("tempdir"));
        }
        panic!("nats-server did not start on five ephemeral ports");
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// SIGTERM, then SIGKILL if it has not exited within the deadline; waits for the exit.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + DEADLINE;
        while child.try_wait().ok().flatten().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.wait();
    }

    /// Starts it again on the same port with the same store, and waits until JetStream answers.
    pub fn restart(&mut self) {
        self.stop();
        let deadline = Instant::now() + DEADLINE;
        // The old socket may linger briefly; the port is ours, so retry until it binds.
        while !self.launch() {
            assert!(
                Instant::now() < deadline,
                "nats-server did not restart on port {}",
                self.port
            );
        }
    }

    /// Spawns the server and waits for JetStream; `false` if it exited (port taken).
    fn launch(&mut self) -> bool {
        let log = self.dir.path().join("nats.log");
        let child = Command::new(&self.bin)
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-sd",
            ])
            .arg(self.dir.path().join("js"))
            .arg("-l")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn nats-server");
        self.child = Some(child);
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                eprintln!(
                    "nats-server exited ({status}) on port {}: {}",
                    self.port,
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
                return false;
            }
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() && jetstream_ready(&self.url())
            {
                return true;
            }
            if Instant::now() > deadline {
                self.stop();
                panic!(
                    "nats-server did not become ready on port {}: {}",
                    self.port,
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A port nobody listens on right now (bound and released); the caller retries on a clash.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind an ephemeral port")
        .port()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Whether JetStream answers its account info request at `url` (one short attempt).
fn jetstream_ready(url: &str) -> bool {
    runtime().block_on(async {
        let Ok(client) = async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(1))
            .connect(url)
            .await
        else {
            return false;
        };
        // The raw request: the typed account info wants fields a 2.9 server does not send.
        let answer = tokio::time::timeout(
            Duration::from_secs(2),
            client.request("$JS.API.INFO", Vec::new().into()),
        )
        .await;
        let Ok(Ok(message)) = answer else {
            return false;
        };
        serde_json::from_slice::<serde_json::Value>(&message.payload)
            .is_ok_and(|v| v.get("error").is_none() && v.get("type").is_some())
    })
}

/// A blocking client for tests. Operations that can meet a server still starting are retried
/// until the deadline.
pub struct Nats {
    rt: tokio::runtime::Runtime,
    client: async_nats::Client,
    js: jetstream::Context,
}

impl Nats {
    /// Connects to `url`, retrying until the deadline.
    pub fn connect(url: &str) -> Nats {
        let rt = runtime();
        let deadline = Instant::now() + DEADLINE;
        let client = loop {
            match rt.block_on(async_nats::connect(url)) {
                Ok(c) => break c,
                Err(e) if Instant::now() > deadline => panic!("cannot connect to {url}: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        // The context spawns a task, so it is made inside the runtime.
        let js = {
            let _inside = rt.enter();
            jetstream::new(client.clone())
        };
        Nats { rt, client, js }
    }

    /// Creates a file-stored stream `name` over `subjects`, with JetStream's deduplication
    /// window set to `duplicate_window` (`None`: the server default of two minutes).
    pub fn create_stream(&self, name: &str, subjects: &[&str], duplicate_window: Option<Duration>) {
        self.rt
            .block_on(self.js.create_stream(jetstream::stream::Config {
                name: name.to_string(),
                subjects: subjects.iter().map(|s| s.to_string()).collect(),
                duplicate_window: duplicate_window.unwrap_or_default(),
                ..Default::default()
            }))
            .unwrap_or_else(|e| panic!("create stream {name}: {e}"));
    }

    /// The name of the stream covering `subject`, if one does.
    pub fn stream_for(&self, subject: &str) -> Option<String> {
        self.rt.block_on(self.js.stream_by_subject(subject)).ok()
    }

    /// Publishes through JetStream and waits for its ack, retrying until a stream takes it (for
    /// instance while tickgate is still creating its stream, or while NATS restarts). Returns
    /// whether JetStream reported it as a duplicate of an earlier `msg_id`.
    pub fn publish_js(&self, subject: &str, msg_id: Option<&str>, payload: &[u8]) -> bool {
        let headers: Vec<(&str, &str)> = msg_id.map(|id| ("Nats-Msg-Id", id)).into_iter().collect();
        self.publish_js_headers(subject, &headers, payload)
    }

    /// [`Nats::publish_js`] with any headers (`Nats-Msg-Id` among them when wanted).
    pub fn publish_js_headers(
        &self,
        subject: &str,
        pairs: &[(&str, &str)],
        payload: &[u8],
    ) -> bool {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let attempt = self.rt.block_on(async {
                let mut headers = async_nats::HeaderMap::new();
                for (name, value) in pairs {
                    headers.append(*name, *value);
                }
                let ack = self
                    .js
                    .publish_with_headers(subject.to_string(), headers, payload.to_vec().into())
                    .await
                    .map_err(|e| e.to_string())?;
                tokio::time::timeout(Duration::from_secs(5), ack)
                    .await
                    .map_err(|_| "no ack".to_string())?
                    .map_err(|e| e.to_string())
            });
            match attempt {
                Ok(ack) => return ack.duplicate,
                Err(e) if Instant::now() > deadline => panic!("publish to {subject}: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// Publishes `payload` with `Nats-Msg-Id: msg_id` again until JetStream no longer calls it a
    /// duplicate (the stream's deduplication window passed): the stream then holds the same id
    /// twice, as a redelivering producer would leave it, for tickgate's own deduplication.
    pub fn publish_js_again(&self, subject: &str, msg_id: &str, payload: &[u8]) {
        let deadline = Instant::now() + DEADLINE;
        while self.publish_js(subject, Some(msg_id), payload) {
            assert!(Instant::now() < deadline, "{msg_id} stayed a duplicate");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The durable consumer's info: `(num_pending, num_ack_pending, num_redelivered)`; `None`
    /// while it does not exist.
    pub fn consumer_counts(&self, stream: &str, consumer: &str) -> Option<(u64, usize, usize)> {
        self.rt.block_on(async {
            let stream = self.js.get_stream(stream).await.ok()?;
            let info = stream.consumer_info(consumer).await.ok()?;
            Some((info.num_pending, info.num_ack_pending, info.num_redelivered))
        })
    }

    /// The last message stored on `subject` in `stream`: its `Nats-Msg-Id` header and payload.
    pub fn last_message(&self, stream: &str, subject: &str) -> Option<(Option<String>, Vec<u8>)> {
        self.rt.block_on(async {
            let stream = self.js.get_stream(stream).await.ok()?;
            let m = stream.get_last_raw_message_by_subject(subject).await.ok()?;
            // Compared by name: async-nats 0.40 parses a stored `Nats-Msg-Id` into a name that
            // `HeaderMap::get("Nats-Msg-Id")` does not find.
            let id = m
                .headers
                .iter()
                .find(|(k, _)| AsRef::<str>::as_ref(*k).eq_ignore_ascii_case("Nats-Msg-Id"))
                .and_then(|(_, v)| v.first())
                .map(|v| v.as_str().to_string());
            Some((id, m.payload.to_vec()))
        })
    }

    /// Messages stored in `stream`.
    pub fn stream_messages(&self, stream: &str) -> u64 {
        self.rt.block_on(async {
            let mut s = self.js.get_stream(stream).await.expect("stream");
            s.info().await.expect("stream info").state.messages
        })
    }

    /// The underlying client, for what the helpers do not cover.
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }
}

/// A core NATS subscription collecting payloads on its own thread until dropped.
pub struct Collector {
    messages: Arc<Mutex<Vec<Vec<u8>>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Collector {
    /// Subscribes to `subject` at `url`; returns once the subscription is registered with the
    /// server, so nothing published afterwards is missed.
    pub fn subscribe(url: &str, subject: &str) -> Collector {
        let messages = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = {
            let (url, subject) = (url.to_string(), subject.to_string());
            let (messages, stop) = (messages.clone(), stop.clone());
            std::thread::spawn(move || {
                runtime().block_on(async move {
                    use futures_util::StreamExt;
                    let client = async_nats::connect(url).await.expect("connect");
                    let mut sub = client.subscribe(subject).await.expect("subscribe");
                    client.flush().await.expect("flush");
                    let _ = ready_tx.send(());
                    while !stop.load(Ordering::Relaxed) {
                        if let Ok(Some(m)) =
                            tokio::time::timeout(Duration::from_millis(50), sub.next()).await
                        {
                            messages.lock().unwrap().push(m.payload.to_vec());
                        }
                    }
                })
            })
        };
        ready_rx
            .recv_timeout(DEADLINE)
            .expect("the subscription is ready");
        Collector {
            messages,
            stop,
            thread: Some(thread),
        }
    }

    /// What arrived so far, parsed as JSON.
    pub fn json(&self) -> Vec<serde_json::Value> {
        self.messages
            .lock()
            .unwrap()
            .iter()
            .map(|m| serde_json::from_slice(m).expect("a JSON message"))
            .collect()
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
