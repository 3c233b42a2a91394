//! The core's access log (`log.access`), read for one fact: which source address a
//! user's accepted connection came from.
//!
//! - Xray: `2026/12/05 15:04:51.011036 from 127.0.0.1:32964 accepted tcp:127.0.0.1:45867 [node-1 >> direct] email: a@x`
//!   (the source may carry `tcp:`/`udp:`; IPv6 sources are bracketed);
//! - V2Ray 4: `2026/12/05 15:05:01 127.0.0.1:37422 accepted tcp:127.0.0.1:33241 [direct] email: a@x`.
//!
//! The address after `accepted` is where the user asked to go, not the inbound. Lines of
//! any other kind (`rejected`, DNS, a connection without an email, a UDP source,
//! garbage) are not connections to track: [`parse`] says `None`, never panics.

use std::net::SocketAddr;

/// One accepted TCP connection of a user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted<'a> {
    /// The client end of the core's socket (the user's, or a reverse proxy's).
    pub source: SocketAddr,
    /// The user's email, as the core wrote it (compare case-insensitively).
    pub email: &'a str,
}

/// The connection a log line records, if it records one.
pub fn parse(line: &str) -> Option<Accepted<'_>> {
    let (head, tail) = line.split_once(" accepted ")?;
    // The email is the line's last field; a tag or destination never contains it
    // after the destination.
    let (_, email) = tail.rsplit_once(" email: ")?;
    let email = email.trim();
    if email.is_empty() || email.contains(char::is_whitespace) {
        return None;
    }
    // The source is the last word before `accepted` (after `from` on Xray).
    let word = head.rsplit(' ').next()?;
    let addr = match word.split_once(':') {
        Some(("tcp", rest)) => rest,
        Some(("udp", _)) => return None,
        _ => word,
    };
    let source: SocketAddr = addr.parse().ok()?;
    Some(Accepted { source, email })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn src(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn both_cores_formats() {
        let xray = "2026/12/05 15:04:51.011036 from 127.0.0.1:32964 accepted tcp:127.0.0.1:45867 [node-1 >> direct] email: a@x";
        assert_eq!(
            parse(xray),
            Some(Accepted {
                source: src("127.0.0.1:32964"),
                email: "a@x"
            })
        );
        let v2 =
            "2026/12/05 15:05:01 127.0.0.1:37422 accepted tcp:127.0.0.1:33241 [direct] email: a@x";
        assert_eq!(parse(v2).unwrap().source, src("127.0.0.1:37422"));
        let prefixed = "2026/12/05 15:04:51 from tcp:10.0.0.7:5000 accepted udp:8.8.8.8:53 [in >> out] email: 1:5d7c…";
        assert_eq!(parse(prefixed).unwrap().source, src("10.0.0.7:5000"));
        let v6 = "2026/12/05 15:04:51.1 from tcp:[2001:db8::1]:443 accepted tcp:example.com:443 [in >> out] email: B@X ";
        let a = parse(v6).unwrap();
        assert_eq!((a.source, a.email), (src("[2001:db8::1]:443"), "B@X"));
        let bare_v6 = "2026/12/05 15:05:01 [::1]:37422 accepted tcp:[::1]:80 [direct] email: c";
        assert_eq!(parse(bare_v6).unwrap().source, src("[::1]:37422"));
    }

    #[test]
    fn other_lines_are_not_connections() {
        for line in [
            "",
            "garbage",
            "2026/12/05 15:04:51 from 127.0.0.1:1 rejected  proxy/vless/encoding: invalid request user id",
            "2026/12/05 15:04:51 from 127.0.0.1:1 accepted tcp:1.1.1.1:80 [in >> out]",
            "2026/12/05 15:04:51 from udp:127.0.0.1:1 accepted udp:1.1.1.1:53 [in >> out] email: a",
            "2026/12/05 15:04:51 from 127.0.0.1 accepted tcp:1.1.1.1:80 [in >> out] email: a",
            "2026/12/05 15:04:51 from 127.0.0.1:99999 accepted tcp:1.1.1.1:80 email: a",
            "2026/12/05 15:04:51 from 127.0.0.1:1 accepted tcp:1.1.1.1:80 [in >> out] email: ",
            "2026/12/05 15:04:51 from 127.0.0.1:1 accepted tcp:1.1.1.1:80 [in >> out] email: a b",
            "[Info] app/dns: DNS server started",
        ] {
            assert_eq!(parse(line), None, "{line}");
        }
    }

    proptest! {
        /// Hostile lines never panic; any line taken says a source that was in it.
        #[test]
        fn hostile_lines_never_panic(line in ".{0,200}") {
            if let Some(a) = parse(&line) {
                prop_assert!(line.contains(a.email));
                prop_assert!(line.contains(&a.source.port().to_string()));
            }
        }

        /// Real-shaped lines with random parts parse back to their parts.
        #[test]
        fn shaped_lines_round_trip(
            ip in any::<std::net::IpAddr>(),
            port in 1u16..,
            from in any::<bool>(),
            prefix in any::<bool>(),
            email in "[a-zA-Z0-9@.:_-]{1,40}",
            dest in "[a-z0-9.:]{1,30}",
        ) {
            let source = SocketAddr::new(ip, port);
            let line = format!(
                "2026/12/05 15:04:51.011036 {}{}{source} accepted tcp:{dest} [in >> direct] email: {email}",
                if from { "from " } else { "" },
                if prefix { "tcp:" } else { "" },
            );
            prop_assert_eq!(parse(&line), Some(Accepted { source, email: &email }));
        }
    }
}
