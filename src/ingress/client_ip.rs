//! Client address resolution behind reverse proxies.
//!
//! `X-Forwarded-For` is attacker-writable: a client can send any list it
//! likes, and each proxy only appends to it. The only entries worth believing
//! are the ones appended by proxies we trust, so the list is read from the
//! right and the first address not belonging to a trusted proxy is the
//! client. Everything to its left was supplied by that client and is ignored.
//!
//! Accepted entry forms: `1.2.3.4`, `2001:db8::1`, `1.2.3.4:5678`,
//! `[2001:db8::1]:443` and `[2001:db8::1]` (some proxies append the port).
//! Anything else (`unknown`, RFC 7239 obfuscated identifiers, empty entries,
//! garbage) stops the walk, and the last trusted hop seen is returned instead:
//! an entry we cannot read means we cannot tell who wrote the entries to its
//! left, so none of them may be believed.
//!
//! IPv4-mapped IPv6 addresses (`::ffff:1.2.3.4`, what a dual-stack socket
//! reports for IPv4 peers) are treated as the IPv4 address they carry, both
//! for addresses and for CIDRs within `::ffff:0:0/96`. Other IPv6 CIDRs, even
//! `::/0`, never match an IPv4 address.

use std::net::{IpAddr, SocketAddr};

use ipnetwork::{IpNetwork, Ipv4Network};

/// Picks the address that rate limits, allow-lists and logs should attribute
/// a request to, without letting a client choose it by forging
/// `X-Forwarded-For`.
///
/// `peer` is the TCP peer address, `xff` every `X-Forwarded-For` header
/// value in the order received, `trusted` the proxies allowed to speak for
/// someone else. The result is always the (normalized) peer or one of the
/// (normalized) `xff` entries.
pub fn client_ip(peer: IpAddr, xff: &[&str], trusted: &[IpNetwork]) -> IpAddr {
    let peer = peer.to_canonical();
    if !in_any(peer, trusted) {
        return peer;
    }
    let mut last_trusted = peer;
    let entries = xff.iter().rev().flat_map(|value| value.rsplit(','));
    for entry in entries {
        let Some(ip) = parse_entry(entry) else {
            return last_trusted;
        };
        if !in_any(ip, trusted) {
            return ip;
        }
        last_trusted = ip;
    }
    last_trusted
}

/// Lets allow-lists and trusted-proxy checks share one notion of
/// membership, so that an IPv4 client seen through a dual-stack socket
/// (`::ffff:a.b.c.d`) matches IPv4 CIDRs and vice versa.
pub fn in_any(ip: IpAddr, cidrs: &[IpNetwork]) -> bool {
    let ip = ip.to_canonical();
    cidrs.iter().any(|net| match (canonical_network(*net), ip) {
        (IpNetwork::V4(net), IpAddr::V4(ip)) => net.contains(ip),
        (IpNetwork::V6(net), IpAddr::V6(ip)) => net.contains(ip),
        _ => false,
    })
}

/// Turns operator-written proxy and allow lists into networks at startup,
/// so a typo is reported with the offending entry instead of silently
/// trusting nothing (or everything).
///
/// Plain addresses are accepted as single-host networks (/32, /128);
/// IPv4-mapped IPv6 networks within `::ffff:0:0/96` are returned as the
/// IPv4 network they denote.
pub fn parse_cidrs(list: &[String]) -> Result<Vec<IpNetwork>, String> {
    list.iter()
        .map(|raw| {
            let entry = raw.trim();
            parse_cidr(entry).map(canonical_network).ok_or_else(|| {
                format!(
                    "invalid address or CIDR `{entry}`: expected e.g. `10.0.0.0/8`, `192.0.2.7` or `2001:db8::/32`"
                )
            })
        })
        .collect()
}

fn parse_cidr(entry: &str) -> Option<IpNetwork> {
    let (addr, prefix) = match entry.split_once('/') {
        Some((addr, prefix)) => (addr, Some(prefix)),
        None => (entry, None),
    };
    let addr: IpAddr = addr.parse().ok()?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix {
        None => max,
        Some(p) if !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()) => {
            p.parse::<u8>().ok()?
        }
        Some(_) => return None,
    };
    IpNetwork::new(addr, prefix).ok()
}

fn canonical_network(net: IpNetwork) -> IpNetwork {
    if let IpNetwork::V6(v6) = net {
        if let (Some(v4), Some(prefix)) = (v6.ip().to_ipv4_mapped(), v6.prefix().checked_sub(96)) {
            if let Ok(v4net) = Ipv4Network::new(v4, prefix) {
                return IpNetwork::V4(v4net);
            }
        }
    }
    net
}

fn parse_entry(entry: &str) -> Option<IpAddr> {
    let entry = entry.trim();
    if let Ok(ip) = entry.parse::<IpAddr>() {
        return Some(ip.to_canonical());
    }
    if let Ok(sock) = entry.parse::<SocketAddr>() {
        return Some(sock.ip().to_canonical());
    }
    let inner = entry.strip_prefix('[')?.strip_suffix(']')?;
    inner
        .parse::<std::net::Ipv6Addr>()
        .ok()
        .map(|ip| IpAddr::V6(ip).to_canonical())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    fn nets(list: &[&str]) -> Vec<IpNetwork> {
        let owned: Vec<String> = list.iter().map(|s| s.to_string()).collect();
        parse_cidrs(&owned).expect("test cidrs")
    }

    #[test]
    fn untrusted_peer_ignores_xff() {
        let trusted = nets(&["10.0.0.0/8"]);
        assert_eq!(
            client_ip(ip("203.0.113.9"), &["1.1.1.1"], &trusted),
            ip("203.0.113.9")
        );
    }

    #[test]
    fn no_trusted_proxies_means_peer() {
        assert_eq!(client_ip(ip("10.0.0.1"), &["1.1.1.1"], &[]), ip("10.0.0.1"));
    }

    #[test]
    fn right_most_untrusted_entry_is_client() {
        let trusted = nets(&["10.0.0.0/8"]);
        assert_eq!(
            client_ip(
                ip("10.0.0.1"),
                &["6.6.6.6, 198.51.100.4, 10.1.1.1"],
                &trusted
            ),
            ip("198.51.100.4")
        );
    }

    #[test]
    fn entries_span_multiple_header_values() {
        let trusted = nets(&["10.0.0.0/8"]);
        assert_eq!(
            client_ip(
                ip("10.0.0.1"),
                &["6.6.6.6", "198.51.100.4,10.2.2.2", "10.1.1.1"],
                &trusted
            ),
            ip("198.51.100.4")
        );
    }

    #[test]
    fn malformed_entry_stops_at_last_trusted_hop() {
        let trusted = nets(&["10.0.0.0/8"]);
        assert_eq!(
            client_ip(ip("10.0.0.1"), &["6.6.6.6, garbage, 10.3.3.3"], &trusted),
            ip("10.3.3.3")
        );
        assert_eq!(
            client_ip(ip("10.0.0.1"), &["6.6.6.6, unknown"], &trusted),
            ip("10.0.0.1")
        );
        assert_eq!(
            client_ip(ip("10.0.0.1"), &["6.6.6.6,,10.3.3.3"], &trusted),
            ip("10.3.3.3")
        );
        assert_eq!(client_ip(ip("10.0.0.1"), &[""], &trusted), ip("10.0.0.1"));
    }

    #[test]
    fn all_trusted_returns_left_most() {
        let trusted = nets(&["10.0.0.0/8"]);
        assert_eq!(
            client_ip(ip("10.0.0.1"), &["10.9.9.9, 10.8.8.8"], &trusted),
            ip("10.9.9.9")
        );
    }

    #[test]
    fn no_xff_from_trusted_peer_is_peer() {
        let trusted = nets(&["10.0.0.0/8"]);
        assert_eq!(client_ip(ip("10.0.0.1"), &[], &trusted), ip("10.0.0.1"));
    }

    #[test]
    fn ports_and_brackets_are_accepted() {
        let trusted = nets(&["10.0.0.0/8"]);
        assert_eq!(
            client_ip(ip("10.0.0.1"), &["198.51.100.4:5678"], &trusted),
            ip("198.51.100.4")
        );
        assert_eq!(
            client_ip(ip("10.0.0.1"), &["[2001:db8::1]:443"], &trusted),
            ip("2001:db8::1")
        );
        assert_eq!(
            client_ip(ip("10.0.0.1"), &["[2001:db8::2]"], &trusted),
            ip("2001:db8::2")
        );
        assert_eq!(
            client_ip(ip("10.0.0.1"), &["6.6.6.6, 10.5.5.5:80"], &trusted),
            ip("6.6.6.6")
        );
    }

    #[test]
    fn mapped_addresses_are_normalized() {
        let trusted = nets(&["10.0.0.0/8"]);
        assert_eq!(
            client_ip(ip("::ffff:10.0.0.1"), &["::ffff:198.51.100.4"], &trusted),
            ip("198.51.100.4")
        );
        assert_eq!(
            client_ip(ip("::ffff:203.0.113.1"), &[], &trusted),
            ip("203.0.113.1")
        );
        assert_eq!(
            client_ip(ip("10.0.0.1"), &["198.51.100.4, ::ffff:10.7.7.7"], &trusted),
            ip("198.51.100.4")
        );
    }

    #[test]
    fn mapped_cidrs_match_ipv4() {
        let mapped = nets(&["::ffff:10.0.0.0/104"]);
        assert_eq!(mapped, nets(&["10.0.0.0/8"]));
        let raw = vec![IpNetwork::V6(
            "::ffff:10.0.0.0/104".parse().expect("test network"),
        )];
        assert!(in_any(ip("10.1.2.3"), &raw));
        assert!(in_any(ip("::ffff:10.1.2.3"), &raw));
        assert!(!in_any(ip("11.1.2.3"), &raw));
        assert!(in_any(ip("::ffff:10.1.2.3"), &nets(&["10.0.0.0/8"])));
    }

    #[test]
    fn ipv6_any_does_not_cover_ipv4() {
        let v6_all = nets(&["::/0"]);
        assert!(!in_any(ip("10.0.0.1"), &v6_all));
        assert!(!in_any(ip("::ffff:10.0.0.1"), &v6_all));
        assert!(in_any(ip("2001:db8::1"), &v6_all));
    }

    #[test]
    fn parse_cidrs_accepts_plain_addresses() {
        let parsed = nets(&["192.0.2.7", "2001:db8::1", " 10.0.0.0/8 "]);
        assert_eq!(parsed[0].prefix(), 32);
        assert_eq!(parsed[1].prefix(), 128);
        assert_eq!(parsed[2].prefix(), 8);
    }

    #[test]
    fn parse_cidrs_names_the_bad_entry() {
        for bad in [
            "10.0.0.0/33",
            "nope",
            "",
            "10.0.0.0/",
            "10.0.0.0/+8",
            "1.2.3.4/8/8",
            "::1/129",
        ] {
            let err = parse_cidrs(&["10.0.0.0/8".to_string(), bad.to_string()]).expect_err(bad);
            assert!(err.contains(&format!("`{bad}`")), "{err}");
        }
    }

    fn arb_ip() -> impl Strategy<Value = IpAddr> {
        prop_oneof![
            any::<u32>().prop_map(|v| IpAddr::V4(Ipv4Addr::from(v))),
            any::<u128>().prop_map(|v| IpAddr::V6(Ipv6Addr::from(v))),
            any::<u32>().prop_map(|v| IpAddr::V6(Ipv4Addr::from(v).to_ipv6_mapped())),
        ]
    }

    fn trusted_ip() -> impl Strategy<Value = IpAddr> {
        prop_oneof![
            any::<u32>().prop_map(|v| IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | (v & 0x00ff_ffff)))),
            any::<u32>().prop_map(|v| {
                IpAddr::V6(Ipv4Addr::from(0x0a00_0000 | (v & 0x00ff_ffff)).to_ipv6_mapped())
            }),
            any::<u128>().prop_map(|v| IpAddr::V6(Ipv6Addr::from((0xfd << 120) | (v >> 8)))),
        ]
    }

    fn untrusted_ip() -> impl Strategy<Value = IpAddr> {
        arb_ip().prop_filter("untrusted", |ip| !in_any(*ip, &test_trusted()))
    }

    fn test_trusted() -> Vec<IpNetwork> {
        nets(&["10.0.0.0/8", "fd00::/8"])
    }

    fn render(ip: IpAddr, style: u8) -> String {
        match (style % 3, ip) {
            (1, IpAddr::V4(v4)) => format!("{v4}:8080"),
            (1, IpAddr::V6(v6)) => format!("[{v6}]:443"),
            (2, IpAddr::V6(v6)) => format!("[{v6}]"),
            _ => ip.to_string(),
        }
    }

    proptest! {
        #[test]
        fn forged_left_entries_never_win(
            forged in proptest::collection::vec(".{0,40}", 0..4),
            client in untrusted_ip(),
            proxies in proptest::collection::vec((trusted_ip(), any::<u8>()), 0..4),
            peer in trusted_ip(),
            client_style in any::<u8>(),
            split in any::<bool>(),
        ) {
            let mut parts: Vec<String> = forged;
            parts.push(render(client, client_style));
            parts.extend(proxies.iter().map(|(p, s)| render(*p, *s)));
            let joined = parts.join(", ");
            let values: Vec<&str> = if split {
                parts.iter().map(String::as_str).collect()
            } else {
                vec![joined.as_str()]
            };
            prop_assert_eq!(client_ip(peer, &values, &test_trusted()), client.to_canonical());
        }

        #[test]
        fn unreadable_entry_shields_everything_left_of_it(
            forged in proptest::collection::vec(arb_ip(), 0..4),
            junk in prop_oneof![Just(String::new()), Just("unknown".to_string()), "[a-z_.]{1,12}", "[0-9.:]{1,12}"],
            proxies in proptest::collection::vec((trusted_ip(), any::<u8>()), 0..4),
            peer in trusted_ip(),
        ) {
            prop_assume!(parse_entry(&junk).is_none());
            let mut parts: Vec<String> = forged.iter().map(|ip| ip.to_string()).collect();
            parts.push(junk);
            parts.extend(proxies.iter().map(|(p, s)| render(*p, *s)));
            let joined = parts.join(",");
            let expected = proxies
                .first()
                .map(|(p, _)| p.to_canonical())
                .unwrap_or(peer.to_canonical());
            prop_assert_eq!(client_ip(peer, &[joined.as_str()], &test_trusted()), expected);
        }

        #[test]
        fn result_is_peer_or_an_entry(
            peer in arb_ip(),
            values in proptest::collection::vec(
                proptest::collection::vec(
                    prop_oneof![
                        arb_ip().prop_map(|ip| ip.to_string()),
                        trusted_ip().prop_map(|ip| ip.to_string()),
                        ".{0,20}",
                    ],
                    0..4,
                ).prop_map(|v| v.join(",")),
                0..4,
            ),
        ) {
            let refs: Vec<&str> = values.iter().map(String::as_str).collect();
            let got = client_ip(peer, &refs, &test_trusted());
            let candidates: Vec<IpAddr> = values
                .iter()
                .flat_map(|v| v.split(','))
                .filter_map(parse_entry)
                .chain(std::iter::once(peer.to_canonical()))
                .collect();
            prop_assert!(candidates.contains(&got));
        }

        #[test]
        fn arbitrary_strings_never_panic(
            peer in arb_ip(),
            values in proptest::collection::vec(any::<String>(), 0..4),
            cidrs in proptest::collection::vec(any::<String>(), 0..4),
        ) {
            let refs: Vec<&str> = values.iter().map(String::as_str).collect();
            let _ = parse_cidrs(&cidrs);
            let _ = client_ip(peer, &refs, &test_trusted());
            let everything = nets(&["0.0.0.0/0", "::/0"]);
            let _ = client_ip(peer, &refs, &everything);
        }

        #[test]
        fn mapped_and_plain_agree(v in any::<u32>(), cidr_v in any::<u32>(), prefix in 0u8..=32) {
            let v4 = Ipv4Addr::from(v);
            let net = IpNetwork::new(IpAddr::V4(Ipv4Addr::from(cidr_v)), prefix)
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            let mapped_net = IpNetwork::new(IpAddr::V6(Ipv4Addr::from(cidr_v).to_ipv6_mapped()), prefix + 96)
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            let plain = in_any(IpAddr::V4(v4), &[net]);
            prop_assert_eq!(plain, in_any(IpAddr::V6(v4.to_ipv6_mapped()), &[net]));
            prop_assert_eq!(plain, in_any(IpAddr::V4(v4), &[mapped_net]));
            prop_assert_eq!(plain, in_any(IpAddr::V6(v4.to_ipv6_mapped()), &[mapped_net]));
        }
    }
}
