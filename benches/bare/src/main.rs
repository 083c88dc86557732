//! A bare actix-web 4 server for the load benchmark's ceiling: every POST gets `202` and a small
//! JSON body shaped like tickgate's fire-and-forget answer, after reading the request body (as
//! tickgate must). Nothing is parsed, stored or logged, so whatever tickgate does beyond this is
//! tickgate's cost.
//!
//! Usage: `tickgate-bench-bare 127.0.0.1:PORT` (port 0 picks a free port; the bound address is printed)

use actix_web::{web, App, HttpResponse, HttpServer};

async fn accept(body: web::Bytes) -> HttpResponse {
    // Touch the body so the compiler cannot skip reading it.
    let len = body.len();
    HttpResponse::Accepted()
        .content_type("application/json")
        .insert_header(("Location", "/tasks/00000000-0000-0000-0000-000000000000"))
        .body(format!(
            "{{\"task_id\":\"00000000-0000-0000-0000-000000000000\",\"status\":\"PENDING\",\"agent\":\"default/echo\",\"bytes\":{len}}}"
        ))
}

fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8081".to_string());
    // Same worker count as tickgate's default (one per CPU).
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    actix_web::rt::System::new().block_on(async move {
        let server = HttpServer::new(|| App::new().default_service(web::to(accept)))
            .workers(workers)
            .bind(&addr)?;
        // Printed after bind, with the real port (argv may say port 0), so the harness knows
        // where to point wrk and that the socket is open.
        for bound in server.addrs() {
            println!("bare listening on http://{bound}");
        }
        server.run().await
    })
}
