//! A network namespace joined to ours by a veth pair: a client inside it reaches a core
//! in ours from a non-loopback address, which the core's online-user API needs (it
//! never lists a loopback client, XRAY-FACTS). Made with `ip` as root, and removed when
//! dropped — a failing test's too. Names carry this process's id and a counter, so
//! parallel tests (and test runs) do not collide; so does the /30 in 10.0.0.0/8.

use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use crate::support::cores::skipped;

pub struct Netns {
    /// The namespace's name (`ip netns exec NAME …`).
    pub name: String,
    /// Our end's address: what a server in our namespace listens on.
    pub host_ip: Ipv4Addr,
    /// The namespace's end: where a client inside it comes from (and listens).
    pub ns_ip: Ipv4Addr,
    host_if: String,
    made_ns: bool,
    made_link: bool,
}

/// A fresh namespace when the machine can make one (root, `ip`). When it cannot: under
/// `CI=true` this panics (CI runs the tests as root); elsewhere it says SKIPPED loudly
/// and returns `None`, as `require_peer` does.
pub fn require_netns() -> Option<Netns> {
    let test = std::thread::current()
        .name()
        .unwrap_or("this test")
        .to_string();
    let why = if unsafe { libc::geteuid() } != 0 {
        Some("needs root to make a network namespace".to_string())
    } else {
        match Command::new("ip")
            .arg("-V")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
        {
            Ok(s) if s.success() => None,
            Ok(s) => Some(format!("`ip -V` failed: {s}")),
            Err(e) => Some(format!("no `ip` command (iproute2): {e}")),
        }
    };
    match why {
        None => Some(Netns::create().unwrap_or_else(|e| panic!("{test}: {e}"))),
        Some(why) if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("{test} {why} and CI=true")
        }
        Some(why) => {
            skipped(&test, &why);
            None
        }
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}: {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Netns {
    fn create() -> Result<Netns, String> {
        static N: AtomicU32 = AtomicU32::new(0);
        let pid = std::process::id();
        let n = N.fetch_add(1, Ordering::SeqCst);
        // 22 bits of /30s in 10.0.0.0/8: 14 of the pid, 8 of the counter.
        let index = ((pid & 0x3fff) << 8) | (n & 0xff);
        let base = (10u32 << 24) | (index << 2);
        let mut ns = Netns {
            name: format!("connector-{pid}-{n}"),
            host_ip: Ipv4Addr::from(base + 1),
            ns_ip: Ipv4Addr::from(base + 2),
            // Interface names are at most 15 bytes.
            host_if: format!("cn{pid}h{n}"),
            made_ns: false,
            made_link: false,
        };
        let peer_if = format!("cn{pid}n{n}");
        let (host, inner) = (format!("{}/30", ns.host_ip), format!("{}/30", ns.ns_ip));
        // Each step recorded as it succeeds: a failure part-way removes what was made.
        ip(&["netns", "add", &ns.name])?;
        ns.made_ns = true;
        ip(&[
            "link",
            "add",
            &ns.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &peer_if,
        ])?;
        ns.made_link = true;
        ip(&["link", "set", &peer_if, "netns", &ns.name])?;
        ip(&["addr", "add", &host, "dev", &ns.host_if])?;
        ip(&["link", "set", &ns.host_if, "up"])?;
        let inside = |args: &[&str]| {
            let mut a = vec!["netns", "exec", ns.name.as_str(), "ip"];
            a.extend_from_slice(args);
            ip(&a)
        };
        inside(&["addr", "add", &inner, "dev", &peer_if])?;
        inside(&["link", "set", &peer_if, "up"])?;
        inside(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting one end of a veth pair deletes both; the namespace's end goes with the
        // namespace too, so either order leaves nothing behind.
        if self.made_link
            && let Err(e) = ip(&["link", "del", &self.host_if])
        {
            eprintln!("removing veth {}: {e}", self.host_if);
        }
        if self.made_ns
            && let Err(e) = ip(&["netns", "del", &self.name])
        {
            eprintln!("removing network namespace {}: {e}", self.name);
        }
    }
}
