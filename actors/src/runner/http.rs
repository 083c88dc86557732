//! The `http` runner: the tick input goes to an endpoint as a JSON POST and the response body is
//! the tick output, for agents that live behind an HTTP service rather than as a local program.

use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use reqwest::{Client, Response, Url};

use super::{HttpSpec, RunnerError};
use crate::model::{preview, TickInput, TickOutput};

const MAX_OUTPUT: usize = 16 << 20;
const MAX_ERROR_BODY: usize = 1024;

/// Posts ticks to one endpoint. Everything that can be checked without a request (URL, headers,
/// TLS set-up) is checked once here; a broken config then fails each tick with the same clear
/// error instead of failing agent start-up.
pub struct HttpRunner {
    /// Where errors say the request went: no credentials, no query string.
    shown_url: String,
    prepared: Result<Prepared, String>,
}

struct Prepared {
    client: Client,
    url: Url,
    headers: HeaderMap,
}

impl HttpRunner {
    /// Builds the client once so connections are pooled across ticks. Redirects are not
    /// followed: a redirect to another host would carry the configured headers (API keys) along.
    pub fn new(spec: HttpSpec) -> Self {
        let shown_url = shown_url(&spec.url);
        let prepared = prepare(&spec, &shown_url);
        Self {
            shown_url,
            prepared,
        }
    }

    /// Posts `input` and returns the endpoint's answer. `timeout` bounds the whole exchange,
    /// connecting included, up to the last byte of the body.
    pub async fn tick(
        &self,
        input: &TickInput,
        timeout: Duration,
    ) -> Result<TickOutput, RunnerError> {
        let prepared = self
            .prepared
            .as_ref()
            .map_err(|e| RunnerError::Http(e.clone()))?;
        let response = prepared
            .client
            .post(prepared.url.clone())
            .headers(prepared.headers.clone())
            .timeout(timeout)
            .json(input)
            .send()
            .await
            .map_err(|e| self.transport_error(e, timeout))?;
        let status = response.status();
        if !status.is_success() {
            let body = read_body(response, MAX_ERROR_BODY)
                .await
                .map(|(body, _)| body)
                .unwrap_or_default();
            return Err(RunnerError::Http(format!(
                "POST {} answered {status}: {:?}",
                self.shown_url,
                preview(&body)
            )));
        }
        let (body, complete) = read_body(response, MAX_OUTPUT)
            .await
            .map_err(|e| self.transport_error(e, timeout))?;
        if !complete {
            return Err(RunnerError::BadOutput(format!(
                "runner output exceeds the {} MiB limit",
                MAX_OUTPUT >> 20
            )));
        }
        TickOutput::parse(&body).map_err(RunnerError::BadOutput)
    }

    fn transport_error(&self, error: reqwest::Error, timeout: Duration) -> RunnerError {
        if error.is_timeout() {
            return RunnerError::Timeout(timeout);
        }
        RunnerError::Http(format!("POST {}: {}", self.shown_url, causes(error)))
    }
}

fn prepare(spec: &HttpSpec, shown_url: &str) -> Result<Prepared, String> {
    let url = Url::parse(&spec.url).map_err(|e| format!("invalid URL {shown_url:?}: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!("URL {shown_url:?} is not http or https"));
    }
    let mut headers = HeaderMap::new();
    for (name, value) in &spec.headers {
        let header = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| format!("{name:?} is not a valid HTTP header name"))?;
        let mut value = HeaderValue::from_str(value).map_err(|_| {
            format!("the value of header {name:?} is not a valid HTTP header value")
        })?;
        value.set_sensitive(true);
        headers.insert(header, value);
    }
    let client = Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("tickgate/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| format!("HTTP client could not be set up: {}", causes(e)))?;
    Ok(Prepared {
        client,
        url,
        headers,
    })
}

/// How a configured URL appears in errors and logs: [`safe_url`] of it, or the text as given
/// when it does not parse (then `prepare` refuses it with its own error).
pub(super) fn shown_url(raw: &str) -> String {
    match Url::parse(raw) {
        Ok(url) => safe_url(&url),
        Err(_) => raw.to_string(),
    }
}

/// The URL without user info, query or fragment, any of which may hold a secret.
pub(super) fn safe_url(url: &Url) -> String {
    let mut shown = url.clone();
    let _ = shown.set_username("");
    let _ = shown.set_password(None);
    shown.set_query(None);
    shown.set_fragment(None);
    shown.to_string()
}

/// The error and its causes on one line, without the URL reqwest would repeat (query included).
pub(super) fn causes(error: reqwest::Error) -> String {
    let error = error.without_url();
    let mut text = error.to_string();
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Reads at most `cap` bytes of the body; the flag says whether that was all of it.
pub(super) async fn read_body(
    mut response: Response,
    cap: usize,
) -> Result<(Vec<u8>, bool), reqwest::Error> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        let room = cap - body.len();
        if chunk.len() > room {
            body.extend_from_slice(&chunk[..room]);
            return Ok((body, false));
        }
        body.extend_from_slice(&chunk);
    }
    Ok((body, true))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::sync::mpsc;
    use std::thread;
    use std::time::Instant;

    use serde_json::json;

    use super::super::command::test_support::input;
    use super::*;

    const KEY: &str = "sk-very-secret-key";

    /// Serves one connection on a fresh port: reads a whole request, then answers `response`
    /// (or nothing, holding the connection until the client gives up, when it is `None`). The
    /// request text comes back through the receiver.
    fn serve_once(response: Option<String>) -> (String, mpsc::Receiver<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!(
            "http://{}/tick?code=query-secret",
            listener.local_addr().unwrap()
        );
        let (sent, received) = mpsc::channel();
        thread::spawn(move || {
            let Ok((mut stream, _)) = listener.accept() else {
                return;
            };
            let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
            let request = read_request(&mut stream);
            let _ = sent.send(request);
            match response {
                Some(text) => {
                    let _ = stream.write_all(text.as_bytes());
                }
                None => {
                    let mut sink = [0u8; 1024];
                    while matches!(stream.read(&mut sink), Ok(n) if n > 0) {}
                }
            }
        });
        (url, received)
    }

    fn read_request(stream: &mut TcpStream) -> String {
        let mut data = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let text = String::from_utf8_lossy(&data).into_owned();
            if let Some(end) = text.find("\r\n\r\n") {
                let length = text[..end]
                    .lines()
                    .find_map(|l| {
                        let (name, value) = l.split_once(':')?;
                        name.eq_ignore_ascii_case("content-length")
                            .then(|| value.trim().parse::<usize>().ok())?
                    })
                    .unwrap_or(0);
                if data.len() >= end + 4 + length {
                    return text;
                }
            }
            match stream.read(&mut buf) {
                Ok(n) if n > 0 => data.extend_from_slice(&buf[..n]),
                _ => return String::from_utf8_lossy(&data).into_owned(),
            }
        }
    }

    fn reply(status: &str, body: &str) -> String {
        format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    }

    /// A loopback port that refuses connections for as long as the returned socket lives: bound
    /// but not listening. Freeing a listener's port instead would let a concurrent test's server
    /// be handed the same port, and this test's request would land there.
    fn refusing_port() -> (OwnedFd, u16) {
        // SAFETY: plain socket calls on a descriptor this function owns, with correctly sized
        // sockaddr_in buffers.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
            let socket = OwnedFd::from_raw_fd(fd);
            let mut addr: libc::sockaddr_in = std::mem::zeroed();
            addr.sin_family = libc::AF_INET as libc::sa_family_t;
            addr.sin_addr.s_addr = u32::from(std::net::Ipv4Addr::LOCALHOST).to_be();
            let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            let ptr = &mut addr as *mut libc::sockaddr_in as *mut libc::sockaddr;
            assert_eq!(libc::bind(fd, ptr, len), 0, "bind");
            let mut got = len;
            assert_eq!(libc::getsockname(fd, ptr, &mut got), 0, "getsockname");
            (socket, u16::from_be(addr.sin_port))
        }
    }

    fn runner(url: String) -> HttpRunner {
        HttpRunner::new(HttpSpec {
            url,
            headers: BTreeMap::from([("X-Api-Key".to_string(), KEY.to_string())]),
        })
    }

    #[actix_rt::test]
    async fn a_json_object_answer_is_the_output() {
        let (url, request) = serve_once(Some(reply("200 OK", r#"{"response":"hi","steps":2}"#)));
        let tick = input(json!({"q": 1}));
        let out = runner(url)
            .tick(&tick, Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(
            out.response.as_ref().map(crate::model::JsonText::to_value),
            Some(json!("hi"))
        );
        assert_eq!(out.steps, Some(2));
        let request = request.recv_timeout(Duration::from_secs(5)).unwrap();
        assert!(
            request.starts_with("POST /tick?code=query-secret HTTP/1.1\r\n"),
            "{request}"
        );
        let lower = request.to_ascii_lowercase();
        assert!(lower.contains(&format!("x-api-key: {KEY}")), "{request}");
        assert!(
            lower.contains("content-type: application/json"),
            "{request}"
        );
        assert!(request.contains(&tick.task_id), "{request}");
    }

    #[actix_rt::test]
    async fn an_error_status_is_an_http_error_without_secrets() {
        let (url, _request) = serve_once(Some(reply("500 Internal Server Error", "database down")));
        let err = runner(url)
            .tick(&input(json!({})), Duration::from_secs(10))
            .await
            .unwrap_err();
        let RunnerError::Http(msg) = &err else {
            panic!("expected Http, got {err:?}");
        };
        assert!(msg.contains("answered 500 Internal Server Error"), "{msg}");
        assert!(msg.contains("database down"), "{msg}");
        assert!(msg.contains("/tick"), "{msg}");
        assert!(!msg.contains(KEY) && !msg.contains("query-secret"), "{msg}");
    }

    #[actix_rt::test]
    async fn a_non_object_answer_is_bad_output() {
        let (url, _request) = serve_once(Some(reply("200 OK", "[1,2,3]")));
        let err = runner(url)
            .tick(&input(json!({})), Duration::from_secs(10))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, RunnerError::BadOutput(m) if m.contains("an array")),
            "{err:?}"
        );
    }

    #[actix_rt::test]
    async fn a_silent_endpoint_times_out() {
        let (url, _request) = serve_once(None);
        let limit = Duration::from_millis(500);
        let started = Instant::now();
        let err = runner(url)
            .tick(&input(json!({})), limit)
            .await
            .unwrap_err();
        assert_eq!(err, RunnerError::Timeout(limit));
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[actix_rt::test]
    async fn an_unreachable_endpoint_is_an_http_error() {
        let (_socket, port) = refusing_port();
        let url = format!("http://127.0.0.1:{port}/tick");
        let err = runner(url)
            .tick(&input(json!({})), Duration::from_secs(10))
            .await
            .unwrap_err();
        let RunnerError::Http(msg) = &err else {
            panic!("expected Http, got {err:?}");
        };
        assert!(msg.starts_with("POST http://127.0.0.1:"), "{msg}");
        assert!(!msg.contains(KEY), "{msg}");
    }

    #[actix_rt::test]
    async fn a_bad_header_fails_ticks_without_showing_its_value() {
        let runner = HttpRunner::new(HttpSpec {
            url: "http://127.0.0.1:9/tick".to_string(),
            headers: BTreeMap::from([("X-Api-Key".to_string(), format!("{KEY}\n"))]),
        });
        let err = runner
            .tick(&input(json!({})), Duration::from_secs(5))
            .await
            .unwrap_err();
        let RunnerError::Http(msg) = &err else {
            panic!("expected Http, got {err:?}");
        };
        assert!(msg.contains("X-Api-Key"), "{msg}");
        assert!(!msg.contains(KEY), "{msg}");
    }

    #[test]
    fn shown_urls_drop_credentials_and_queries() {
        let url = Url::parse("https://user:pw@example.com:8443/hook?key=abc#frag").unwrap();
        assert_eq!(safe_url(&url), "https://example.com:8443/hook");
    }
}
