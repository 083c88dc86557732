//! The operator commands (`tickgate tasks list|show|replay|cancel|resume`, `tickgate agents`):
//! thin clients of a running server's admin API, so an operator on the host (or anywhere the
//! admin API is reachable) can look and act without hand-written `curl` lines.
//!
//! Output is a table or a short report for people and the server's JSON verbatim with `--json`
//! for scripts. A server refusal is shown as the server's own message and ends with exit status
//! 1; a usage mistake (a missing token, an `--answer` that is not JSON) with 2, before any request
//! is sent. The admin token is sent only in the `Authorization` header and never printed.
//! Every string that came from the server is printed with control characters escaped, because
//! task titles, errors and responses originate from webhook senders and runners.

use std::io::{Read, Write};
use std::process::ExitCode;
use std::time::Duration;

use reqwest::{Method, Url};
use serde_json::{json, Map, Value};
use tickgate_actors::model::AgentId;

use super::{Remote, TaskAction};

/// How long one request may take; bulk replays of many tasks are the slowest answers.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// Widest title shown in the task table; `tasks show` prints it whole.
const TITLE_WIDTH: usize = 48;

/// Why an operator command failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The command line cannot be turned into a request (exit status 2).
    #[error("{0}")]
    Usage(String),
    /// No answer from the server at all.
    #[error("cannot reach {url}: {reason}")]
    Unreachable {
        /// The URL tried (never containing the token).
        url: String,
        /// The transport error and its causes.
        reason: String,
    },
    /// The server answered with an error; `message` is the server's own sentence.
    #[error("the server refused ({status} {code}): {message}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// The error body's `code`.
        code: String,
        /// The error body's `message`.
        message: String,
    },
    /// The server answered something that is not the API's JSON.
    #[error("unexpected answer from {url}: {reason}")]
    BadAnswer {
        /// The URL asked.
        url: String,
        /// What was wrong with the answer.
        reason: String,
    },
    /// A bulk replay was answered, but some tasks were refused (already reported in the output).
    #[error("{0} task(s) were refused; see above")]
    PartlyRefused(usize),
}

impl ClientError {
    /// 2 for usage mistakes (like clap's own), 1 for everything the server or network caused.
    fn exit_code(&self) -> ExitCode {
        match self {
            ClientError::Usage(_) => ExitCode::from(2),
            _ => ExitCode::FAILURE,
        }
    }
}

/// Runs `tickgate tasks …`.
pub fn tasks(remote: &Remote, action: &TaskAction) -> ExitCode {
    finish(remote, |client| async move {
        match action {
            TaskAction::List {
                agent,
                status,
                since,
                until,
                limit,
                cursor,
            } => {
                let mut query: Vec<(&str, String)> = Vec::new();
                if let Some(a) = agent {
                    query.push(("agent", parse_agent(a)?.to_string()));
                }
                if let Some(s) = status {
                    query.push(("status", s.to_ascii_uppercase()));
                }
                for (name, value) in [("since", since), ("until", until), ("cursor", cursor)] {
                    if let Some(v) = value {
                        query.push((name, v.clone()));
                    }
                }
                if let Some(l) = limit {
                    query.push(("limit", l.to_string()));
                }
                let url = client.url(&["admin", "tasks"], &query)?;
                let page = client.call(Method::GET, url, None).await?;
                Ok((render_task_table(&page), page))
            }
            TaskAction::Show { id } => {
                let url = client.url(&["tasks", id], &[])?;
                let task = client.call(Method::GET, url, None).await?;
                Ok((render_task(&task), task))
            }
            TaskAction::Replay {
                id: Some(id),
                agent: None,
                ..
            } => {
                let url = client.url(&["admin", "tasks", id, "replay"], &[])?;
                let task = client.call(Method::POST, url, Some(&json!({}))).await?;
                let text = format!(
                    "replayed {} as task {} ({})\npoll: {}\n",
                    clean(id),
                    field(&task, "task_id"),
                    field(&task, "status"),
                    field(&task, "poll_url"),
                );
                Ok((text, task))
            }
            TaskAction::Replay {
                agent: Some(agent),
                status,
                since,
                until,
                cursor,
                ..
            } => {
                let agent = parse_agent(agent)?;
                let mut body = Map::new();
                if let Some(s) = status {
                    body.insert("status".into(), Value::from(s.to_ascii_uppercase()));
                }
                for (name, value) in [("since", since), ("until", until), ("cursor", cursor)] {
                    if let Some(v) = value {
                        body.insert(name.into(), Value::from(v.clone()));
                    }
                }
                let url = client.url(
                    &["admin", "agents", agent.namespace(), agent.name(), "replay"],
                    &[],
                )?;
                let answer = client
                    .call(Method::POST, url, Some(&Value::Object(body)))
                    .await?;
                Ok((render_bulk_replay(&agent, &answer), answer))
            }
            TaskAction::Replay { .. } => Err(ClientError::Usage(
                "give either a task id or --agent NAMESPACE/NAME, not both".into(),
            )),
            TaskAction::Cancel { id } => {
                let url = client.url(&["admin", "tasks", id, "cancel"], &[])?;
                let task = client.call(Method::POST, url, Some(&json!({}))).await?;
                let text = format!("cancelled {} ({})\n", clean(id), field(&task, "status"));
                Ok((text, task))
            }
            TaskAction::Resume { id, answer } => {
                let response = read_answer(answer)?;
                let url = client.url(&["tasks", id, "resume"], &[])?;
                let body = json!({ "response": response });
                let task = client.call(Method::POST, url, Some(&body)).await?;
                let text = format!(
                    "resumed {}: {} (a continuation tick is queued)\n",
                    clean(id),
                    field(&task, "status")
                );
                Ok((text, task))
            }
        }
    })
}

/// Runs `tickgate agents`.
pub fn agents(remote: &Remote) -> ExitCode {
    finish(remote, |client| async move {
        let url = client.url(&["admin", "agents"], &[])?;
        let answer = client.call(Method::GET, url, None).await?;
        Ok((render_agents(&answer), answer))
    })
}

/// Builds the client, runs one command on a current-thread runtime, prints its output (the
/// human text, or the JSON with `--json`) and maps failures to an exit status.
fn finish<F, Fut>(remote: &Remote, command: F) -> ExitCode
where
    F: FnOnce(Client) -> Fut,
    Fut: std::future::Future<Output = Result<(String, Value), ClientError>>,
{
    let outcome = Client::new(remote).and_then(|client| {
        // A current-thread runtime: one request at a time needs no worker threads.
        actix_rt::System::new().block_on(command(client))
    });
    match outcome {
        Ok((text, value)) => {
            let refused = value["refused"].as_array().map_or(0, Vec::len);
            print_out(remote.json, &text, &value);
            if refused > 0 {
                report(&ClientError::PartlyRefused(refused))
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => report(&e),
    }
}

fn print_out(as_json: bool, text: &str, value: &Value) {
    let out = if as_json {
        let mut s = serde_json::to_string_pretty(value).unwrap_or_default();
        s.push('\n');
        s
    } else {
        text.to_string()
    };
    // A closed pipe (`| head`) is not an error worth a panic.
    let _ = std::io::stdout().lock().write_all(out.as_bytes());
}

fn report(e: &ClientError) -> ExitCode {
    eprintln!("tickgate: {}", clean(&e.to_string()));
    e.exit_code()
}

/// One server: its base URL, the admin token if any, and an HTTP client.
struct Client {
    base: Url,
    token: Option<String>,
    http: reqwest::Client,
}

impl Client {
    fn new(remote: &Remote) -> Result<Self, ClientError> {
        let base = Url::parse(&remote.url)
            .map_err(|e| ClientError::Usage(format!("--url {:?} is not a URL: {e}", remote.url)))?;
        if !matches!(base.scheme(), "http" | "https") || base.cannot_be_a_base() {
            return Err(ClientError::Usage(format!(
                "--url {:?} must be an http:// or https:// URL",
                remote.url
            )));
        }
        let token = remote.token.clone().filter(|t| !t.is_empty());
        if token.is_none() {
            return Err(ClientError::Usage(
                "no admin token: set TICKGATE_ADMIN_TOKEN (or pass --token) to the server's admin token".into(),
            ));
        }
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .user_agent(concat!("tickgate-cli/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ClientError::Usage(format!("cannot build an HTTP client: {e}")))?;
        Ok(Self { base, token, http })
    }

    /// The base URL with `segments` appended (each percent-encoded, so an id can never change
    /// the route) and `query` added.
    fn url(&self, segments: &[&str], query: &[(&str, String)]) -> Result<Url, ClientError> {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .map_err(|()| ClientError::Usage(format!("--url {} cannot take a path", self.base)))?
            .pop_if_empty()
            .extend(segments);
        url.set_query(None);
        if !query.is_empty() {
            let mut pairs = url.query_pairs_mut();
            for (k, v) in query {
                pairs.append_pair(k, v);
            }
        }
        Ok(url)
    }

    /// Sends one request and returns the JSON answer of a 2xx, or the server's error.
    async fn call(
        &self,
        method: Method,
        url: Url,
        body: Option<&Value>,
    ) -> Result<Value, ClientError> {
        let shown = url.to_string();
        let mut req = self.http.request(method, url);
        if let Some(token) = &self.token {
            req = req.bearer_auth(token);
        }
        if let Some(body) = body {
            req = req.json(body);
        }
        let resp = req.send().await.map_err(|e| ClientError::Unreachable {
            url: shown.clone(),
            reason: error_chain(&e.without_url()),
        })?;
        let status = resp.status();
        let text = resp.text().await.map_err(|e| ClientError::Unreachable {
            url: shown.clone(),
            reason: error_chain(&e.without_url()),
        })?;
        let parsed: Option<Value> = serde_json::from_str(&text).ok();
        if status.is_success() {
            return parsed.ok_or_else(|| ClientError::BadAnswer {
                url: shown,
                reason: format!("{status} with a body that is not JSON"),
            });
        }
        let error = parsed.as_ref().map(|v| &v["error"]);
        match (
            error.and_then(|e| e["code"].as_str()),
            error.and_then(|e| e["message"].as_str()),
        ) {
            (Some(code), Some(message)) => Err(ClientError::Refused {
                status: status.as_u16(),
                code: code.to_string(),
                message: message.to_string(),
            }),
            _ => Err(ClientError::BadAnswer {
                url: shown,
                reason: format!("{status} without the API's error body"),
            }),
        }
    }
}

/// The error and its causes in one line (reqwest's own message names only the first layer).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

fn parse_agent(raw: &str) -> Result<AgentId, ClientError> {
    raw.parse()
        .map_err(|e| ClientError::Usage(format!("--agent {raw:?}: {e}")))
}

/// `--answer`: JSON text, `@path` for a file holding it, or `@-` for standard input.
fn read_answer(raw: &str) -> Result<Value, ClientError> {
    let (text, from) = match raw.strip_prefix('@') {
        Some("-") => {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .map_err(|e| ClientError::Usage(format!("--answer @-: cannot read stdin: {e}")))?;
            (s, "standard input".to_string())
        }
        Some(path) => (
            std::fs::read_to_string(path)
                .map_err(|e| ClientError::Usage(format!("--answer @{path}: {e}")))?,
            path.to_string(),
        ),
        None => (raw.to_string(), "--answer".to_string()),
    };
    serde_json::from_str(&text)
        .map_err(|e| ClientError::Usage(format!("{from} is not valid JSON: {e}")))
}

/// Escapes control and bidirectional-formatting characters, so text from webhook senders and
/// runners cannot move the cursor, recolour the terminal or reorder what an operator reads.
fn clean(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if hidden(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Control characters (C0, DEL, C1) and the bidirectional embedding, override and isolate
/// characters.
fn hidden(c: char) -> bool {
    c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// Like [`clean`] but keeps line breaks: for pretty-printed JSON, whose own strings have theirs
/// escaped already.
fn clean_lines(s: &str) -> String {
    s.split('\n').map(clean).collect::<Vec<_>>().join("\n")
}

/// A string field for display: cleaned, `-` when absent or null.
fn field(v: &Value, key: &str) -> String {
    match &v[key] {
        Value::Null => "-".into(),
        Value::String(s) => clean(s),
        other => clean(&other.to_string()),
    }
}

fn truncate(s: &str, width: usize) -> String {
    if s.chars().count() <= width {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(width.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}

/// Left-aligned columns separated by two spaces; the header is the first row.
fn table(rows: &[Vec<String>]) -> String {
    let columns = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..columns)
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == columns {
                line.push_str(cell);
            } else {
                line.push_str(cell);
                line.extend(std::iter::repeat_n(
                    ' ',
                    widths[i] - cell.chars().count() + 2,
                ));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn render_task_table(page: &Value) -> String {
    let tasks = page["tasks"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    let mut out = if tasks.is_empty() {
        "no tasks\n".to_string()
    } else {
        let mut rows = vec![["TASK", "AGENT", "STATUS", "ATTEMPT", "CREATED", "TITLE"]
            .map(String::from)
            .to_vec()];
        rows.extend(tasks.iter().map(|t| {
            vec![
                field(t, "task_id"),
                field(t, "agent"),
                field(t, "status"),
                field(t, "attempt"),
                field(t, "created_at"),
                truncate(&field(t, "title"), TITLE_WIDTH),
            ]
        }));
        table(&rows)
    };
    if let Some(cursor) = page["next_cursor"].as_str() {
        out.push_str(&format!("more: --cursor {}\n", clean(cursor)));
    }
    out
}

fn render_task(t: &Value) -> String {
    let mut out = String::new();
    let mut line = |k: &str, v: String| {
        out.push_str(format!("{k:<13}{v}").trim_end());
        out.push('\n');
    };
    line("task", field(t, "task_id"));
    line("agent", field(t, "agent"));
    let mut status = field(t, "status");
    if !t["tick"].is_null() {
        status.push_str(&format!(
            " (tick {}, attempt {})",
            field(t, "tick"),
            field(t, "attempt")
        ));
    } else {
        status.push_str(&format!(" (attempt {})", field(t, "attempt")));
    }
    line("status", status);
    line("title", field(t, "title"));
    let source = &t["source"];
    let mut from = field(source, "method");
    if let Some(e) = source["event"].as_str() {
        from.push_str(&format!(", event {}", clean(e)));
    }
    if let Some(s) = source["schedule"].as_str() {
        from.push_str(&format!(", schedule {}", clean(s)));
    }
    line("source", from);
    line("created", field(t, "created_at"));
    line("started", field(t, "started_at"));
    line("finished", field(t, "finished_at"));
    for (key, label) in [
        ("replay_of", "replay of"),
        ("next_attempt_at", "next attempt"),
        ("error", "error"),
    ] {
        if !t[key].is_null() {
            line(label, field(t, key));
        }
    }
    let awaiting = &t["awaiting"];
    if awaiting.is_object() {
        line(
            "awaiting",
            format!(
                "since {}, expires {}",
                field(awaiting, "since"),
                field(awaiting, "expires_at")
            ),
        );
        line("  request", indent(&awaiting["request"]));
        line(
            "  answer",
            format!(
                "tickgate tasks resume {} --answer JSON",
                field(t, "task_id")
            ),
        );
    }
    if let Some(attempts) = t["attempts"].as_array().filter(|a| !a.is_empty()) {
        line("attempts", String::new());
        let mut rows = vec![["  ATTEMPT", "STARTED", "FINISHED", "ERROR"]
            .map(String::from)
            .to_vec()];
        rows.extend(attempts.iter().map(|a| {
            vec![
                format!("  {}", field(a, "attempt")),
                field(a, "started_at"),
                field(a, "finished_at"),
                field(a, "error"),
            ]
        }));
        out.push_str(&table(&rows));
    }
    // `result` is the runner's whole output; it adds to `response` only when there is none
    // (a parked or failed tick).
    let key = if t["response"].is_null() {
        "result"
    } else {
        "response"
    };
    if !t[key].is_null() {
        out.push_str(&format!("{key:<13}{}\n", indent(&t[key])));
    }
    out
}

/// Pretty JSON whose continuation lines line up under the value column of [`render_task`].
fn indent(v: &Value) -> String {
    clean_lines(&serde_json::to_string_pretty(v).unwrap_or_default())
        .replace('\n', &format!("\n{:13}", ""))
}

fn render_bulk_replay(agent: &AgentId, answer: &Value) -> String {
    let mut out = format!(
        "replayed {} task(s) of {agent}\n",
        field(answer, "replayed")
    );
    for id in answer["task_ids"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "  new task {}\n",
            clean(id.as_str().unwrap_or_default())
        ));
    }
    for r in answer["refused"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "  refused {}: {}\n",
            field(r, "task_id"),
            field(r, "error")
        ));
    }
    if let Some(cursor) = answer["next_cursor"].as_str() {
        out.push_str(&format!("more: --cursor {}\n", clean(cursor)));
    }
    out
}

fn render_agents(answer: &Value) -> String {
    let agents = answer["agents"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    if agents.is_empty() {
        return "no agents\n".into();
    }
    let mut rows = vec![["AGENT", "BREAKER", "QUEUED", "TICKS", "NEXT SCHEDULED"]
        .map(String::from)
        .to_vec()];
    rows.extend(agents.iter().map(|a| {
        // RFC 3339 UTC strings of one format sort by time.
        let next = a["schedules"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s["next_at"].as_str())
            .min()
            .map_or_else(|| "-".to_string(), clean);
        vec![
            field(a, "id"),
            field(a, "breaker"),
            format!("{}/{}", field(a, "queued"), field(a, "mailbox")),
            field(a, "ticks"),
            next,
        ]
    }));
    table(&rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn answers_are_json_text_or_files() {
        assert_eq!(read_answer(r#"{"ok":true}"#).unwrap(), json!({"ok": true}));
        assert_eq!(read_answer("42").unwrap(), json!(42));
        assert!(matches!(read_answer("{oops"), Err(ClientError::Usage(_))));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.json");
        std::fs::write(&path, r#"["x"]"#).unwrap();
        assert_eq!(
            read_answer(&format!("@{}", path.display())).unwrap(),
            json!(["x"])
        );
        assert!(matches!(
            read_answer("@/nonexistent/answer.json"),
            Err(ClientError::Usage(_))
        ));
    }

    #[test]
    fn ids_cannot_escape_their_path_segment() {
        let remote = Remote {
            url: "http://127.0.0.1:9/".into(),
            token: Some("t".into()),
            json: false,
        };
        let client = Client::new(&remote).unwrap();
        let url = client
            .url(&["admin", "tasks", "../agents?x=1", "cancel"], &[])
            .unwrap();
        assert_eq!(
            url.as_str(),
            "http://127.0.0.1:9/admin/tasks/..%2Fagents%3Fx=1/cancel"
        );
        let url = client
            .url(&["admin", "tasks"], &[("agent", "a/b&c".into())])
            .unwrap();
        assert_eq!(
            url.as_str(),
            "http://127.0.0.1:9/admin/tasks?agent=a%2Fb%26c"
        );
    }

    #[test]
    fn a_missing_token_is_a_usage_error() {
        let remote = Remote {
            url: "http://127.0.0.1:9".into(),
            token: None,
            json: false,
        };
        assert!(matches!(Client::new(&remote), Err(ClientError::Usage(_))));
    }

    proptest! {
        #[test]
        fn cleaned_text_has_no_control_characters(s in any::<String>()) {
            let c = clean(&s);
            prop_assert!(!c.chars().any(hidden));
            // Text without such characters is left alone.
            if !s.chars().any(hidden) {
                prop_assert_eq!(c, s);
            }
        }

        #[test]
        fn tables_align_any_cells(cells in proptest::collection::vec(("[a-z]{0,12}", "[a-z]{0,12}"), 1..8)) {
            let mut rows = vec![vec!["A".to_string(), "B".to_string()]];
            rows.extend(cells.iter().map(|(a, b)| vec![a.clone(), b.clone()]));
            let out = table(&rows);
            let width = rows.iter().map(|r| r[0].len()).max().unwrap();
            for (line, row) in out.lines().zip(&rows) {
                if !row[1].is_empty() {
                    prop_assert_eq!(&line[width + 2..], row[1].as_str());
                }
            }
        }
    }
}
