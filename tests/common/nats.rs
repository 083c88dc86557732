//! A real `nats-server -js` for tests: an ephemeral 127.0.0.1 port and a temporary store
//! directory, stopped (and restartable on the same port and directory) by the test.

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::DEADLINE;

/// A running nats-server with JetStream.
pub struct NatsServer {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
    bin: PathBuf,
}

/// Where Debian's package puts the binary, or whatever `PATH` has.
fn binary() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("nats-server"))
            .find(|p| p.is_file())
    });
    on_path.or_else(|| {
        let sbin = PathBuf::from("/usr/sbin/nats-server");
        sbin.is_file().then_some(sbin)
    })
}

impl NatsServer {
    /// Starts a server, or `None` (with a note) when nats-server is not installed; with
    /// `TICKGATE_REQUIRE_NATS=1` (as CI sets it) a missing server fails the test instead.
    pub fn start() -> Option<NatsServer> {
        let Some(bin) = binary() else {
            assert!(
                std::env::var("TICKGATE_REQUIRE_NATS").as_deref() != Ok("1"),
                "nats-server is required (TICKGATE_REQUIRE_NATS=1) but not installed"
            );
            eprintln!("nats-server not installed; skipping this NATS test");
            return None;
        };
        Some(retry_start(bin))
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Stops the server (SIGKILL) and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port with the same store directory.
    pub fn restart(&mut self) {
        self.stop();
        let deadline = Instant::now() + DEADLINE;
        while !self.spawn() {
            assert!(Instant::now() < deadline, "nats-server did not restart");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn spawn(&mut self) -> bool {
        let child = Command::new(&self.bin)
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-sd",
            ])
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn nats-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(Ok(Some(_))) = self.child.as_mut().map(|c| c.try_wait()) {
                // Exited: the port was taken meanwhile.
                self.child = None;
                return false;
            }
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.stop();
        false
    }
}

fn retry_start(bin: PathBuf) -> NatsServer {
    for _ in 0..5 {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let mut server = NatsServer {
            child: None,
            port,
            dir: tempfile::tempdir().expect("tempdir"),
            bin: bin.clone(),
        };
        if server.spawn() {
            return server;
        }
    }
    panic!("nats-server did not start on any of five ports");
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}
