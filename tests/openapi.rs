//! `GET /openapi.json`: the document is valid OpenAPI 3.1, describes exactly the routes the server
//! registers (the route table in `src/http/mod.rs`), refers every error answer to the one shared
//! error schema, and is what the real binary serves. A route registered outside the table fails
//! here too, so the table is the whole route list. Real answers of the common routes are checked
//! against the schemas the document gives them (the API fuzz run, `benches/schemathesis.sh`, does
//! that for generated requests to every operation).
//!
//! `tests/fixtures/openapi-3.1-schema.json` is the official JSON Schema of OpenAPI 3.1 documents
//! (`https://spec.openapis.org/oas/3.1/schema/2022-10-07`, Apache-2.0), vendored so that the check
//! runs offline.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::Env;
use serde_json::Value;
use tickgate::http::openapi;
use tickgate::http::ROUTES;

fn document() -> Value {
    serde_json::from_str(openapi::json()).expect("the document is JSON")
}

/// `{anything}` → `{}`, so that templates compare by shape.
fn normalise(path: &str) -> String {
    let mut out = String::new();
    let mut depth = 0;
    for c in path.chars() {
        match c {
            '{' => {
                depth += 1;
                if depth == 1 {
                    out.push_str("{}");
                }
            }
            '}' => depth -= 1,
            _ if depth > 0 => {}
            _ => out.push(c),
        }
    }
    out
}

/// (method, normalised path) of every operation in the document.
fn documented(doc: &Value) -> BTreeSet<(String, String)> {
    let mut ops = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in [
            "get", "put", "post", "delete", "options", "head", "patch", "trace",
        ] {
            if item.get(method).is_some() {
                ops.insert((method.to_string(), normalise(path)));
            }
        }
    }
    ops
}

#[test]
fn document_is_valid_openapi_3_1() {
    let schema: Value =
        serde_json::from_str(include_str!("fixtures/openapi-3.1-schema.json")).unwrap();
    let validator = jsonschema::validator_for(&schema).expect("the 3.1 schema compiles");
    let doc = document();
    let errors: Vec<String> = validator
        .iter_errors(&doc)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    assert!(errors.is_empty(), "not valid OpenAPI 3.1: {errors:#?}");
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3.1."),
        "{}",
        doc["openapi"]
    );
    // The validator is not vacuous: a document without `info` is refused.
    let mut broken = doc.clone();
    broken.as_object_mut().unwrap().remove("info");
    assert!(!validator.is_valid(&broken));
}

#[test]
fn document_describes_exactly_the_route_table() {
    let doc = document();
    let served: BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|r| (r.method.to_string(), normalise(r.path)))
        .collect();
    let described = documented(&doc);
    let undocumented: Vec<_> = served.difference(&described).collect();
    assert!(
        undocumented.is_empty(),
        "routes the OpenAPI document does not describe: {undocumented:?}"
    );
    let phantom: Vec<_> = described.difference(&served).collect();
    assert!(
        phantom.is_empty(),
        "documented routes that are not served: {phantom:?}"
    );
    // Every path parameter in a template is declared with the same name.
    for (path, item) in doc["paths"].as_object().unwrap() {
        let names: BTreeSet<&str> = path
            .split('/')
            .filter_map(|s| s.strip_prefix('{')?.strip_suffix('}'))
            .collect();
        for (method, op) in item.as_object().unwrap() {
            let declared: BTreeSet<&str> = op["parameters"]
                .as_array()
                .map(|ps| {
                    ps.iter()
                        .filter(|p| p["in"] == "path")
                        .filter_map(|p| p["name"].as_str())
                        .collect()
                })
                .unwrap_or_default();
            assert_eq!(names, declared, "{method} {path}: path parameters");
        }
    }
    // Operation ids are unique (clients generate function names from them).
    let mut ids = BTreeSet::new();
    for item in doc["paths"].as_object().unwrap().values() {
        for op in item.as_object().unwrap().values() {
            let id = op["operationId"].as_str().expect("operationId");
            assert!(ids.insert(id.to_string()), "duplicate operationId {id}");
        }
    }
}

#[test]
fn every_error_answer_refers_to_the_shared_error_schema() {
    let doc = document();
    let error = &doc["components"]["schemas"]["ErrorBody"];
    assert_eq!(error["required"], serde_json::json!(["error"]), "{error}");
    let detail = &doc["components"]["schemas"]["ErrorDetail"];
    let mut required: Vec<&str> = detail["required"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    required.sort();
    assert_eq!(required, ["code", "message"]);
    let mut errors = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let is_admin = path.starts_with("/admin/");
            if is_admin {
                assert_eq!(
                    op["security"],
                    serde_json::json!([{ "admin_token": [] }]),
                    "{method} {path}"
                );
            }
            for (status, response) in op["responses"].as_object().unwrap() {
                let code: u16 = status.parse().expect("numeric status");
                if code < 400 {
                    continue;
                }
                // Readiness answers 503 with its own body: load balancers read why.
                let schema = &response["content"]["application/json"]["schema"]["$ref"];
                if path.starts_with("/ready") && code == 503 {
                    assert_eq!(schema, "#/components/schemas/Readiness");
                    continue;
                }
                // A2A refusals are the error shape or a JSON-RPC error: a `oneOf` holding it.
                let refers = schema == "#/components/schemas/ErrorBody"
                    || schema
                        .as_str()
                        .and_then(|r| r.strip_prefix("#/components/schemas/"))
                        .and_then(|name| doc["components"]["schemas"][name]["oneOf"].as_array())
                        .is_some_and(|alternatives| {
                            alternatives
                                .iter()
                                .any(|a| a["$ref"] == "#/components/schemas/ErrorBody")
                        });
                assert!(refers, "{method} {path} {status}: {schema}");
                if code == 429 || code == 503 {
                    assert!(
                        response["headers"].get("Retry-After").is_some(),
                        "{method} {path} {status} documents Retry-After"
                    );
                }
                errors += 1;
            }
            if is_admin {
                assert!(op["responses"].get("401").is_some(), "{method} {path}: 401");
            }
        }
    }
    assert!(errors > 50, "only {errors} error answers documented");
}

/// Every route is registered through the table: no other file (and no other part of
/// `src/http/mod.rs`) builds a resource, a scope or a method route.
#[test]
fn routes_are_registered_only_by_the_route_table() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let needles = [
        "web::resource(",
        "web::scope(",
        "web::route(",
        "web::get()",
        "web::post()",
        "web::put()",
        "web::patch()",
        "web::delete()",
        "web::method(",
        "#[get(",
        "#[post(",
        "#[route(",
        ".route(",
    ];
    let mut files = vec![root.clone()];
    let mut offenders = Vec::new();
    while let Some(dir) = files.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                files.push(path);
                continue;
            }
            if path.extension().and_then(|e| e.to_str()) != Some("rs") {
                continue;
            }
            let mut text = std::fs::read_to_string(&path).unwrap();
            if path.ends_with("http/mod.rs") {
                let start = text
                    .find("macro_rules! route_table")
                    .expect("the route table macro");
                let end = start
                    + text[start..]
                        .find("route_table! {")
                        .expect("the route table");
                text.replace_range(start..end, "");
            }
            for needle in needles {
                if text.contains(needle) {
                    offenders.push(format!("{}: {needle}", path.display()));
                }
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "routes registered outside the route table in src/http/mod.rs: {offenders:?}"
    );
}

/// The real binary serves the same document, and every route of the table answers on it (with
/// the handler's own answer, not the router's "no such route" or 405).
#[test]
fn the_server_serves_the_document_and_every_table_route() {
    let env = Env::new();
    let server = env.start_with(
        r#"
[server]
auth_failures = { per_second = 1000, burst = 1000 }
[admin]
token_env = "TICKGATE_ADMIN_TOKEN"
[[agent]]
name = "echo"
runner = { kind = "echo" }
"#,
        &[("TICKGATE_ADMIN_TOKEN", "openapi-test-admin-token")],
    );
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let resp = client
        .get(format!("{}/openapi.json", server.base))
        .send()
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/json"));
    let served: Value = resp.json().unwrap();
    assert_eq!(served, document());

    let task = "00000000-0000-4000-8000-000000000000";
    for route in ROUTES {
        let path = route
            .path
            .replace("{token}", "not-a-token")
            .replace("{namespace}", "default")
            .replace("{agent}", "echo")
            .replace("{index}", "0")
            .replace("{id}", task);
        let url = format!("{}{path}", server.base);
        let req = match route.method {
            "get" => client.get(&url),
            "post" => client.post(&url).body(""),
            other => panic!("method {other} in the route table"),
        };
        // SSE and metrics are not JSON; only their status matters.
        let resp = req
            .bearer_auth("openapi-test-admin-token")
            .query(&[("task_id", task)])
            .send()
            .unwrap();
        let status = resp.status().as_u16();
        assert_ne!(status, 405, "{} {}", route.method, route.path);
        assert!(status < 500, "{} {}: {status}", route.method, route.path);
        if status == 404 {
            let body: Value = resp.json().unwrap();
            assert_ne!(
                body["error"]["message"], "no such route",
                "{} {} is not served",
                route.method, route.path
            );
        }
    }
    server.kill();
}

/// What is wrong with `body` as the answer `status` of `method template`, by the schema the
/// document gives that answer (JSON bodies only).
fn violations(doc: &Value, method: &str, template: &str, status: u16, body: &Value) -> Vec<String> {
    let response = &doc["paths"][template][method]["responses"][status.to_string()];
    if !response.is_object() {
        return vec![format!("the document does not list {status}")];
    }
    let schema = &response["content"]["application/json"]["schema"];
    if !schema.is_object() {
        return vec![format!("no JSON schema for {status}")];
    }
    // `$ref`s in the schema point into the document's components.
    let root = serde_json::json!({ "allOf": [schema], "components": doc["components"] });
    let validator = jsonschema::validator_for(&root).expect("the schema compiles");
    validator
        .iter_errors(body)
        .map(|e| format!("{e} at {}", e.instance_path()))
        .collect()
}

/// Asserts that a real answer matches its documented schema.
fn conforms(doc: &Value, method: &str, template: &str, resp: &common::Response) {
    let errors = violations(doc, method, template, resp.status, &resp.json);
    assert!(
        errors.is_empty(),
        "{method} {template} {}: {errors:?}\n{}",
        resp.status,
        resp.text
    );
}

/// What schemathesis checks in `benches/schemathesis.sh`, for the common answers and in CI: real
/// answers (successes and errors, admin and public) match the schemas the document gives them.
#[test]
fn real_answers_match_the_documented_schemas() {
    let env = Env::new();
    let server = env.start_with(
        r#"
[admin]
token_env = "TICKGATE_ADMIN_TOKEN"
[[agent]]
name = "echo"
runner = { kind = "echo" }
"#,
        &[("TICKGATE_ADMIN_TOKEN", "openapi-test-admin-token")],
    );
    let doc = document();
    // The check is not vacuous: a wrong error body or task record is refused.
    let bad_error = serde_json::json!({ "error": "not_found" });
    assert!(!violations(&doc, "get", "/tasks/{id}", 404, &bad_error).is_empty());
    let bad_task = serde_json::json!({ "task_id": "x", "status": "DONE" });
    assert!(!violations(&doc, "get", "/tasks/{id}", 200, &bad_task).is_empty());
    assert!(!violations(&doc, "get", "/tasks/{id}", 418, &bad_task).is_empty());
    let admin = |req: reqwest::blocking::RequestBuilder| {
        common::send(req.bearer_auth("openapi-test-admin-token"))
    };
    let client = common::client();
    let base = &server.base;

    let accepted = common::post_json(server.url("default/echo"), &serde_json::json!({"n": 1}));
    assert_eq!(accepted.status, 202, "{}", accepted.text);
    conforms(&doc, "post", "/webhooks/{token}", &accepted);
    let id = accepted.json["task_id"].as_str().unwrap().to_string();
    server.finished(&id);
    let waited = common::send(
        client
            .post(format!("{}?wait=10", server.url("default/echo")))
            .json(&serde_json::json!({"n": 2})),
    );
    assert_eq!(waited.status, 200, "{}", waited.text);
    conforms(&doc, "post", "/webhooks/{token}", &waited);
    let ping = common::send(client.get(server.url("default/echo")));
    conforms(&doc, "get", "/webhooks/{token}", &ping);

    conforms(
        &doc,
        "get",
        "/tasks/{id}",
        &server.get(&format!("/tasks/{id}")),
    );
    conforms(&doc, "get", "/tasks/{id}", &server.get("/tasks/nope"));
    conforms(
        &doc,
        "get",
        "/api/task_status",
        &server.get(&format!("/api/task_status?task_id={id}")),
    );
    conforms(
        &doc,
        "get",
        "/api/task_status",
        &server.get("/api/task_status"),
    );
    conforms(&doc, "get", "/healthz", &server.get("/healthz"));
    conforms(&doc, "get", "/ready", &server.get("/ready"));
    conforms(
        &doc,
        "get",
        "/ready/{namespace}/{agent}",
        &server.get("/ready/default/echo"),
    );
    conforms(
        &doc,
        "get",
        "/ready/{namespace}/{agent}",
        &server.get("/ready/default/nope"),
    );

    let admin_get = |path: &str| admin(client.get(format!("{base}{path}")));
    let admin_post = |path: &str| admin(client.post(format!("{base}{path}")));
    conforms(&doc, "get", "/admin/agents", &admin_get("/admin/agents"));
    conforms(&doc, "get", "/admin/agents", &server.get("/admin/agents"));
    conforms(&doc, "get", "/admin/tasks", &admin_get("/admin/tasks"));
    conforms(
        &doc,
        "get",
        "/admin/tasks",
        &admin_get("/admin/tasks?status=nope"),
    );
    conforms(
        &doc,
        "get",
        "/admin/tasks/{id}",
        &admin_get(&format!("/admin/tasks/{id}")),
    );
    conforms(&doc, "get", "/admin/stats", &admin_get("/admin/stats"));
    conforms(
        &doc,
        "get",
        "/admin/deliveries",
        &admin_get("/admin/deliveries"),
    );
    conforms(
        &doc,
        "post",
        "/admin/tasks/{id}/cancel",
        &admin_post(&format!("/admin/tasks/{id}/cancel")),
    );
    let replayed = admin_post(&format!("/admin/tasks/{id}/replay"));
    assert_eq!(replayed.status, 202, "{}", replayed.text);
    conforms(&doc, "post", "/admin/tasks/{id}/replay", &replayed);
    conforms(
        &doc,
        "post",
        "/admin/agents/{namespace}/{agent}/replay",
        &admin_post("/admin/agents/default/echo/replay"),
    );
    conforms(
        &doc,
        "post",
        "/admin/agents/{namespace}/{agent}/breaker/reset",
        &admin_post("/admin/agents/default/echo/breaker/reset"),
    );
    conforms(
        &doc,
        "post",
        "/admin/agents/{namespace}/{agent}/restart",
        &admin_post("/admin/agents/default/echo/restart"),
    );
    conforms(
        &doc,
        "post",
        "/admin/agents/{namespace}/{agent}/token",
        &admin_post("/admin/agents/default/echo/token"),
    );
    conforms(
        &doc,
        "post",
        "/tasks/{id}/resume",
        &common::send(
            client
                .post(format!("{base}/tasks/{id}/resume"))
                .bearer_auth("openapi-test-admin-token")
                .json(&serde_json::json!({"response": 1})),
        ),
    );
    server.kill();
}
