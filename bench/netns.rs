//! A test API server behind a network namespace, so it can be black-holed:
//! packets to it vanish (no RST, no ICMP), as when a master's host loses
//! its network or a firewall drops its traffic.
//!
//! The namespace is joined by a veth pair; a socket bound from a thread
//! that has entered the namespace stays there, so the server runs in this
//! process like the others. The black hole is a route in the namespace that
//! discards every reply to the host: SYNs get no SYN-ACK and established
//! connections stall, with no module or firewall tool needed.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::process::Command;

/// A network namespace with one veth link to the host.
pub struct NetNs {
    name: String,
    host_if: String,
    host_ip: Ipv4Addr,
    /// The namespace's address, where its server listens.
    pub ip: Ipv4Addr,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).output().map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

impl NetNs {
    /// Creates the namespace and its link; an error says why this machine
    /// does not allow it (not root, no `ip`, no netns support).
    pub fn create() -> Result<NetNs, String> {
        let id = std::process::id() % 10_000;
        let octet = (std::process::id() % 200 + 20) as u8;
        let ns = NetNs {
            name: format!("apilb-bench-{id}"),
            host_if: format!("apb{id}h"),
            host_ip: Ipv4Addr::new(10, 213, octet, 1),
            ip: Ipv4Addr::new(10, 213, octet, 2),
        };
        let peer = format!("apb{id}n");
        let setup = || -> Result<(), String> {
            ip(&["netns", "add", &ns.name])?;
            ip(&["link", "add", &ns.host_if, "type", "veth", "peer", "name", &peer])?;
            ip(&["link", "set", &peer, "netns", &ns.name])?;
            ip(&["addr", "add", &format!("{}/30", ns.host_ip), "dev", &ns.host_if])?;
            ip(&["link", "set", &ns.host_if, "up"])?;
            ip(&["-n", &ns.name, "addr", "add", &format!("{}/30", ns.ip), "dev", &peer])?;
            ip(&["-n", &ns.name, "link", "set", &peer, "up"])?;
            ip(&["-n", &ns.name, "link", "set", "lo", "up"])
        };
        // On failure, Drop removes what was made.
        setup().map(|()| ns)
    }

    /// A listener on the namespace's address (any free port).
    pub fn bind(&self) -> std::io::Result<TcpListener> {
        let path = format!("/run/netns/{}", self.name);
        let addr = SocketAddr::from((self.ip, 0));
        // setns(2) moves only the calling thread; this one exits after.
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path)?;
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)?;
            TcpListener::bind(addr)
        })
        .join()
        .map_err(|_| std::io::Error::other("the namespace thread panicked"))?
    }

    /// Starts or ends the black hole.
    pub fn blackhole(&self, on: bool) -> Result<(), String> {
        let verb = if on { "add" } else { "del" };
        ip(&["-n", &self.name, "route", verb, "blackhole", &format!("{}/32", self.host_ip)])
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting the namespace deletes the veth pair with it.
        let _ = ip(&["netns", "del", &self.name]);
        let _ = ip(&["link", "del", &self.host_if]);
    }
}
