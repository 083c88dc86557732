//! Arbitrary `X-Forwarded-For` values and trusted-proxy lists through
//! `client_ip`, `in_any` and `parse_cidrs`.
//!
//! Oracles: an untrusted peer is always returned as is, and the result is
//! always the peer or one of the entries the client sent, never an address
//! made up by the parser.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ipnetwork::IpNetwork;
use libfuzzer_sys::fuzz_target;
use tickgate_fuzz::client_ip::{client_ip, in_any, parse_cidrs};

fn entry_ips(values: &[&str]) -> Vec<IpAddr> {
    values
        .iter()
        .flat_map(|v| v.split(','))
        .filter_map(|entry| {
            let entry = entry.trim();
            entry
                .parse::<IpAddr>()
                .ok()
                .or_else(|| entry.parse::<SocketAddr>().ok().map(|s| s.ip()))
                .or_else(|| {
                    entry
                        .strip_prefix('[')?
                        .strip_suffix(']')?
                        .parse::<Ipv6Addr>()
                        .ok()
                        .map(IpAddr::V6)
                })
        })
        .map(|ip| ip.to_canonical())
        .collect()
}

fuzz_target!(|input: (u8, [u8; 16], Vec<String>, Vec<String>)| {
    let (mode, bytes, xff, extra_cidrs) = input;
    let peer = match mode % 3 {
        0 => IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3])),
        1 => IpAddr::V6(Ipv6Addr::from(bytes)),
        _ => IpAddr::V6(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]).to_ipv6_mapped()),
    };

    let mut trusted: Vec<IpNetwork> = parse_cidrs(&[
        "10.0.0.0/8".to_owned(),
        "::ffff:192.168.0.0/112".to_owned(),
        "fd00::/8".to_owned(),
        "127.0.0.1".to_owned(),
    ])
    .expect("static trusted list parses");
    if mode & 0x80 != 0 {
        if let Ok(extra) = parse_cidrs(&extra_cidrs) {
            trusted.extend(extra);
        }
    }

    let values: Vec<&str> = xff.iter().map(String::as_str).collect();
    let got = client_ip(peer, &values, &trusted);
    let peer = peer.to_canonical();

    if !in_any(peer, &trusted) {
        assert_eq!(got, peer, "untrusted peer must be returned unchanged");
    } else {
        assert!(
            got == peer || entry_ips(&values).contains(&got),
            "result {got} is neither the peer nor an entry"
        );
    }
});
