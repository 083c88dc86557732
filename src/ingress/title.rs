//! Provider-aware task titles and event types. A task list that says "pull_request opened:
//! octo/hello#7" or "Project created: WhatsApp Provider" is what an operator scans for; the
//! event type also goes to the runner in `source.event`.

use tickgate_actors::model::{scalar_text, AgentId, Members};

/// The derived title and, when a provider is recognised, its event type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Derived {
    /// Used when the caller gave no `title`.
    pub title: String,
    /// The provider's event type (`X-GitHub-Event`, Linear's `type`, Stripe's `type`).
    pub event: Option<String>,
}

/// Reads the provider from its headers (or, for Stripe and Linear, the body's shape) and builds
/// a title from the payload. Form deliveries keep the event under `inputs.payload`.
/// `inputs` are the payload's top-level members, read from its text without a tree (#16).
pub fn derive(
    headers: &dyn Fn(&str) -> Option<String>,
    inputs: &Members<'_>,
    agent: &AgentId,
) -> Derived {
    let payload = inputs
        .get("payload")
        .map(Members::of)
        .filter(Members::is_object);
    let body = payload.as_ref().unwrap_or(inputs);
    // A string (non-empty) or a number at `path`, as text.
    let text = |body: &Members<'_>, path: &[&str]| body.path(path).and_then(scalar_text);
    if let Some(event) = headers("x-github-event") {
        let mut title = event.clone();
        if let Some(action) = text(body, &["action"]) {
            title = format!("{title} {action}");
        }
        let number = text(body, &["pull_request", "number"])
            .or_else(|| text(body, &["issue", "number"]))
            .or_else(|| text(body, &["number"]));
        if let Some(repo) = text(body, &["repository", "full_name"]) {
            title = match number {
                Some(n) => format!("{title}: {repo}#{n}"),
                None => format!("{title}: {repo}"),
            };
        }
        return Derived {
            title,
            event: Some(event),
        };
    }
    let linear = headers("linear-delivery").is_some()
        || headers("linear-event").is_some()
        || body.get("webhookTimestamp").is_some();
    if linear {
        if let Some(kind) = text(body, &["type"]).or_else(|| headers("linear-event")) {
            let action = text(body, &["action"]).map(|a| match a.as_str() {
                "create" => "created".to_string(),
                "update" => "updated".to_string(),
                "remove" => "removed".to_string(),
                other => other.to_string(),
            });
            let name = text(body, &["data", "name"]).or_else(|| text(body, &["data", "title"]));
            let mut title = match action {
                Some(a) => format!("{kind} {a}"),
                None => kind.clone(),
            };
            if let Some(name) = name {
                title = format!("{title}: {name}");
            }
            return Derived {
                title,
                event: Some(kind),
            };
        }
    }
    let stripe = headers("stripe-signature").is_some()
        || text(body, &["object"]).as_deref() == Some("event");
    if stripe {
        if let Some(kind) = text(body, &["type"]) {
            return Derived {
                title: format!("Stripe {kind}"),
                event: Some(kind),
            };
        }
    }
    let event = headers("webhook-id").and_then(|_| text(body, &["type"]));
    Derived {
        title: format!("Webhook trigger — {agent}"),
        event,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};
    use tickgate_actors::model::JsonText;

    /// [`super::derive`] on the members of `inputs`, as a trigger's payload gives them.
    fn derive(
        headers: &dyn Fn(&str) -> Option<String>,
        inputs: &Value,
        agent: &AgentId,
    ) -> Derived {
        super::derive(headers, &JsonText::from(inputs).members(), agent)
    }

    fn agent() -> AgentId {
        "github/ci".parse().unwrap()
    }

    fn with(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn github_pull_request() {
        let d = derive(
            &with(&[("x-github-event", "pull_request")]),
            &json!({"action": "opened", "number": 7, "repository": {"full_name": "owner/repo"}}),
            &agent(),
        );
        assert_eq!(d.title, "pull_request opened: owner/repo#7");
        assert_eq!(d.event.as_deref(), Some("pull_request"));
    }

    #[test]
    fn github_form_payload_push() {
        let d = derive(
            &with(&[("x-github-event", "push")]),
            &json!({"payload": {"repository": {"full_name": "o/r"}}}),
            &agent(),
        );
        assert_eq!(d.title, "push: o/r");
    }

    #[test]
    fn linear_project_created() {
        let d = derive(
            &with(&[("linear-delivery", "x")]),
            &json!({"type": "Project", "action": "create", "data": {"name": "WhatsApp Provider"}}),
            &agent(),
        );
        assert_eq!(d.title, "Project created: WhatsApp Provider");
        assert_eq!(d.event.as_deref(), Some("Project"));
    }

    #[test]
    fn stripe_and_fallback() {
        let d = derive(
            &with(&[]),
            &json!({"object": "event", "type": "invoice.paid"}),
            &agent(),
        );
        assert_eq!(d.title, "Stripe invoice.paid");
        assert_eq!(d.event.as_deref(), Some("invoice.paid"));
        let d = derive(&with(&[]), &json!({"a": 1}), &agent());
        assert_eq!(d.title, "Webhook trigger — github/ci");
        assert_eq!(d.event, None);
    }
}
