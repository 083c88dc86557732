//! The cheapest persistent runner that speaks tickgate's JSON Lines protocol: one line in, one
//! `{"response":1}` line out. The load benchmark uses it so that the persistent-runner figure is
//! tickgate's per-tick overhead rather than the cost of a shell reading its input byte by byte.

use std::io::{BufRead, Write};

fn main() {
    let stdin = std::io::stdin();
    let mut out = std::io::stdout().lock();
    let mut line = Vec::new();
    let mut input = stdin.lock();
    loop {
        line.clear();
        match input.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if out.write_all(b"{\"response\":1}\n").and_then(|()| out.flush()).is_err() {
            return;
        }
    }
}
