//! The plain durable design the load benchmark measures tickgate against (issue #16): every
//! POST's raw body goes to ONE writer thread, which takes everything queued, stores it as one
//! `sled::Batch` (key = a big-endian sequence number, value = the body as received), calls
//! `flush` once for the batch, and only then lets the handlers answer `202` with a small JSON
//! body. Nothing is parsed, indexed or copied beyond what sled needs; this is the floor for
//! "acknowledge only what is on disk" on sled 0.34, the same storage engine tickgate uses.
//!
//! Usage: `tickgate-bench-plain-sled 127.0.0.1:PORT STORE_DIR [flush|fsync]` (port 0 picks a
//! free port; the bound address is printed). `fsync` adds an `fdatasync` of sled's data file
//! after each flush, as tickgate's `[store] sync = "fsync"` does.

use std::fs::File;
use std::path::PathBuf;
use std::sync::mpsc;

use actix_web::{web, App, HttpResponse, HttpServer};
use tokio::sync::oneshot;

/// One body waiting for its group commit, and whom to tell once it is durable.
struct Pending {
    body: web::Bytes,
    done: oneshot::Sender<u64>,
}

async fn accept(body: web::Bytes, writer: web::Data<mpsc::Sender<Pending>>) -> HttpResponse {
    let (done, durable) = oneshot::channel();
    if writer.send(Pending { body, done }).is_err() {
        return HttpResponse::ServiceUnavailable().finish();
    }
    match durable.await {
        Ok(seq) => HttpResponse::Accepted()
            .content_type("application/json")
            .insert_header(("Location", format!("/tasks/{seq:020}")))
            .body(format!(
                "{{\"task_id\":\"{seq:020}\",\"status\":\"PENDING\",\"agent\":\"default/echo\"}}"
            )),
        Err(_) => HttpResponse::ServiceUnavailable().finish(),
    }
}

/// The writer thread: block for the first body, take whatever else is queued, one batch, one
/// flush (plus `fdatasync` in fsync mode), then answer every handler of the batch.
fn writer(db: sled::Db, data_file: Option<File>, rx: mpsc::Receiver<Pending>) {
    let mut seq: u64 = 0;
    let mut waiting: Vec<(u64, oneshot::Sender<u64>)> = Vec::new();
    while let Ok(first) = rx.recv() {
        let mut batch = sled::Batch::default();
        let mut next = Some(first);
        while let Some(p) = next {
            seq += 1;
            batch.insert(&seq.to_be_bytes(), p.body.as_ref());
            waiting.push((seq, p.done));
            next = rx.try_recv().ok();
        }
        db.apply_batch(batch).expect("apply batch");
        db.flush().expect("flush");
        if let Some(f) = &data_file {
            f.sync_data().expect("fdatasync");
        }
        for (seq, done) in waiting.drain(..) {
            let _ = done.send(seq);
        }
    }
}

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:8082".to_string());
    let dir = PathBuf::from(
        args.next()
            .unwrap_or_else(|| "plain-sled-store".to_string()),
    );
    let fsync = match args.next().as_deref() {
        None | Some("flush") => false,
        Some("fsync") => true,
        Some(other) => {
            eprintln!("unknown sync mode {other:?} (flush or fsync)");
            std::process::exit(2);
        }
    };
    let db = sled::open(&dir).map_err(std::io::Error::other)?;
    let data_file = if fsync {
        Some(File::open(dir.join("db"))?)
    } else {
        None
    };
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("plain-sled-writer".into())
        .spawn(move || writer(db, data_file, rx))?;
    // Same worker count as tickgate's default (one per CPU).
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let tx = web::Data::new(tx);
    actix_web::rt::System::new().block_on(async move {
        let server = HttpServer::new(move || {
            App::new()
                .app_data(tx.clone())
                .default_service(web::to(accept))
        })
        .workers(workers)
        .bind(&addr)?;
        for bound in server.addrs() {
            println!("plain-sled listening on http://{bound}");
        }
        server.run().await
    })
}
