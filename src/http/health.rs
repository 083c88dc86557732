//! Liveness.

use actix_web::HttpResponse;
use serde_json::json;

/// 200 while the process serves requests; says nothing about agents or the store.
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({ "ok": true }))
}
