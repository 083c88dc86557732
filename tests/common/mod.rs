//! Test harness: starts the real `tickgate` binary on an ephemeral 127.0.0.1 port with a
//! temporary sled directory, reads the webhook URLs it prints, and kills it when dropped.

#![allow(dead_code)]

pub mod nats;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

/// How long anything in a test may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// A running tickgate.
pub struct Server {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    /// Agent id → full webhook URL, for tokens printed at this start.
    pub urls: HashMap<String, String>,
    /// Everything the process wrote to stdout and stderr so far.
    pub output: Arc<Mutex<String>>,
}

/// A test's working directory: config, scripts and the store live here.
pub struct Env {
    pub dir: tempfile::TempDir,
}

impl Env {
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes an executable POSIX sh script and returns its path. Written beside and renamed
    /// into place: a test that writes its scripts again (before a restart) may find a process of
    /// the killed server still in `execve` of the old one, and writing into a file being executed
    /// fails with "Text file busy"; a rename leaves that process the old file.
    pub fn script(&self, name: &str, body: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = self.path().join(name);
        let fresh = self.path().join(format!(".{name}.new"));
        std::fs::write(&fresh, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&fresh, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::rename(&fresh, &path).unwrap();
        path
    }

    /// Writes the config (with `{dir}` replaced by this directory) and starts the server.
    pub fn start(&self, config: &str) -> Server {
        self.start_with(config, &[])
    }

    pub fn start_with(&self, config: &str, env: &[(&str, &str)]) -> Server {
        let config_path = self.write_config(config);
        Server::start(&config_path, &self.path().join("store"), env)
    }

    pub fn write_config(&self, config: &str) -> PathBuf {
        let path = self.path().join("tickgate.toml");
        let dir = self.path().display().to_string();
        std::fs::write(&path, config.replace("{dir}", &dir)).unwrap();
        path
    }

    /// Runs the binary to completion with the given arguments.
    pub fn run(&self, args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tickgate"));
        cmd.args(args)
            .env("TICKGATE_STORE_PATH", self.path().join("store"))
            .env_remove("TICKGATE_ADMIN_TOKEN")
            .current_dir(self.path());
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().expect("run tickgate")
    }
}

impl Server {
    pub fn start(config: &Path, store: &Path, env: &[(&str, &str)]) -> Server {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tickgate"));
        cmd.arg("serve")
            .arg("--config")
            .arg(config)
            .env("TICKGATE_SERVER_LISTEN", "127.0.0.1:0")
            .env("TICKGATE_STORE_PATH", store)
            .env("RUST_LOG", "info")
            .env_remove("TICKGATE_ADMIN_TOKEN")
            .env_remove("TICKGATE_SERVER_PUBLIC_URL")
            .current_dir(config.parent().unwrap())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn tickgate");
        let output = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let stdout = child.stdout.take().unwrap();
        {
            let output = output.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    output.lock().unwrap().push_str(&format!("{line}\n"));
                    let _ = tx.send(line);
                }
            });
        }
        let stderr = child.stderr.take().unwrap();
        {
            let output = output.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    output.lock().unwrap().push_str(&format!("{line}\n"));
                }
            });
        }
        let mut base = None;
        let mut urls = HashMap::new();
        let deadline = Instant::now() + DEADLINE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(line) = rx.recv_timeout(left) else {
                let _ = child.kill();
                panic!(
                    "tickgate did not start; output:\n{}",
                    output.lock().unwrap()
                );
            };
            if let Some(rest) = line.strip_prefix("tickgate listening on ") {
                base = Some(rest.split_whitespace().next().unwrap().to_string());
            } else if let Some(rest) = line.strip_prefix("webhook for ") {
                let (agent, url) = rest.split_once(": POST ").unwrap();
                urls.insert(agent.to_string(), url.to_string());
            } else if line.starts_with("tickgate serving ") {
                break;
            }
        }
        Server {
            child,
            base: base.expect("listening line"),
            urls,
            output,
        }
    }

    pub fn url(&self, agent: &str) -> &str {
        self.urls
            .get(agent)
            .unwrap_or_else(|| panic!("no URL printed for {agent}"))
    }

    /// The same URL path on this server (ports change across restarts).
    pub fn rebase(&self, url: &str) -> String {
        let path_start = url
            .find("://")
            .and_then(|i| url[i + 3..].find('/').map(|j| i + 3 + j))
            .unwrap_or(url.len());
        format!("{}{}", self.base, &url[path_start..])
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// SIGKILL, then reap.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait for exit (with a deadline); returns the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("tickgate did not exit after SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn logs(&self) -> String {
        self.output.lock().unwrap().clone()
    }

    pub fn get(&self, path: &str) -> Response {
        send(client().get(format!("{}{path}", self.base)))
    }

    /// Polls a task until `done` holds for it.
    pub fn wait_task(&self, id: &str, done: impl Fn(&Value) -> bool) -> Value {
        let mut last = Value::Null;
        let ok = wait_until(|| {
            let r = self.get(&format!("/tasks/{id}"));
            if r.status == 200 {
                last = r.json.clone();
                done(&last)
            } else {
                false
            }
        });
        assert!(
            ok,
            "task {id} never reached the expected state; last seen {last}"
        );
        last
    }

    /// Polls a task until it is SUCCESS or FAILURE.
    pub fn finished(&self, id: &str) -> Value {
        self.wait_task(id, |t| t["status"] == "SUCCESS" || t["status"] == "FAILURE")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A response read whole.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub text: String,
    pub json: Value,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Asserts the standard error shape and returns the code.
    pub fn error_code(&self) -> String {
        let code = self.json["error"]["code"]
            .as_str()
            .unwrap_or_else(|| panic!("not an error body: {}", self.text));
        assert!(
            self.json["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "error without message: {}",
            self.text
        );
        assert_eq!(
            self.json.as_object().unwrap().len(),
            1,
            "extra fields: {}",
            self.text
        );
        code.to_string()
    }
}

pub fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(DEADLINE)
        .build()
        .unwrap()
}

pub fn send(req: reqwest::blocking::RequestBuilder) -> Response {
    let resp = req.send().expect("request");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = resp.text().unwrap_or_default();
    let json = serde_json::from_str(&text).unwrap_or(Value::Null);
    Response {
        status,
        headers,
        text,
        json,
    }
}

/// POSTs JSON.
pub fn post_json(url: &str, body: &Value) -> Response {
    send(client().post(url).json(body))
}

/// Polls `cond` every 20 ms until it holds or the deadline passes.
pub fn wait_until(mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + DEADLINE;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// HMAC-SHA256 of `msg` under `key`: the primitive of every signature scheme the tests sign with,
/// computed here independently of tickgate's own code.
pub fn hmac_bytes(key: &[u8], msg: &[u8]) -> Vec<u8> {
    use hmac::{Hmac, Mac};
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(key).unwrap();
    mac.update(msg);
    mac.finalize().into_bytes().to_vec()
}

/// Lower-case hex, as GitHub, Linear, Slack and Stripe signatures are written.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Unix seconds now, for timestamped signature schemes.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// The `webhook-signature` value a Standard Webhooks sender computes for `id`, `timestamp` and
/// `body` under a `whsec_` secret, computed here independently of tickgate's own code.
pub fn standard_webhook_signature(secret: &str, id: &str, timestamp: &str, body: &[u8]) -> String {
    use base64::Engine;
    let key = base64::engine::general_purpose::STANDARD
        .decode(secret.strip_prefix("whsec_").expect("a whsec_ secret"))
        .expect("base64 after whsec_");
    let signed = [id.as_bytes(), b".", timestamp.as_bytes(), b".", body].concat();
    format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(hmac_bytes(&key, &signed))
    )
}

/// A request's headers, names lowercased, in arrival order.
pub type Headers = Vec<(String, String)>;

/// Reads one HTTP/1.1 request from a test receiver's connection: its headers (names lowercased)
/// and its body (by `Content-Length`). For the callback receivers in `notify.rs` and
/// `lifecycle_e2e.rs`, which answer on the same stream afterwards.
pub fn read_request(stream: &std::net::TcpStream) -> std::io::Result<(Headers, Vec<u8>)> {
    use std::io::Read;
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        reader.read_line(&mut h)?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    let len: usize = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; len];
    reader.read_exact(&mut body)?;
    Ok((headers, body))
}
