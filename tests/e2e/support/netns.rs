//! A network namespace of its own for one keyrotd replica: a real network partition without netem or
//! a firewall. The namespace is joined to the host by veth pairs ("links"), each a private /24 of its
//! own (`10.213.X.0/24`, `10.214.X.0/24`, ...: host side `.1`, namespace side `.2`), set up with
//! ip(8) and torn down when the [`Netns`] is dropped. The tests run as root.
//!
//! The host's services listen on loopback, which a namespace cannot reach; a [`super::gate::Gate`] on
//! a link's host address relays to each. Taking a link's host end down ([`Netns::cut`]) drops every
//! packet on it, in flight and new, both ways: the replica sees timeouts, as in a real partition,
//! while its other links keep working. [`Netns::heal`] brings it back.

use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

static CREATED: AtomicU32 = AtomicU32::new(0);

/// One veth pair between the host and the namespace.
pub struct Link {
    host_if: String,
    pub host_ip: IpAddr,
    pub ns_ip: IpAddr,
}

pub struct Netns {
    pub name: String,
    links: Vec<Link>,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("ip(8) runs (package iproute2)");
    assert!(
        out.status.success(),
        "ip {}: {} (the partition test needs root and network namespaces)",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

impl Netns {
    /// A new namespace with loopback up and `links` veth pairs to the host.
    pub fn new(links: usize) -> Netns {
        let n = CREATED.fetch_add(1, Ordering::SeqCst);
        // A /24 per link, numbered by process and instance so that test processes running at once
        // do not collide.
        let x = (std::process::id().wrapping_mul(7).wrapping_add(n) % 250) + 1;
        let name = format!("krtest-{}-{n}", std::process::id());
        ip(&["netns", "add", &name]);
        let mut ns = Netns {
            name,
            links: Vec::new(),
        };
        ns.exec_ip(&["link", "set", "lo", "up"]);
        for i in 0..links {
            let host_if = format!("kr{x}h{i}");
            let ns_if = format!("kr{x}n{i}");
            let net = 213 + i as u8;
            let host_ip = Ipv4Addr::new(10, net, x as u8, 1);
            let ns_ip = Ipv4Addr::new(10, net, x as u8, 2);
            ip(&[
                "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if,
            ]);
            // Registered at once, so that a failure below still deletes the pair.
            ns.links.push(Link {
                host_if: host_if.clone(),
                host_ip: host_ip.into(),
                ns_ip: ns_ip.into(),
            });
            ip(&["link", "set", &ns_if, "netns", &ns.name]);
            ip(&["addr", "add", &format!("{host_ip}/24"), "dev", &host_if]);
            ip(&["link", "set", &host_if, "up"]);
            ns.exec_ip(&["addr", "add", &format!("{ns_ip}/24"), "dev", &ns_if]);
            ns.exec_ip(&["link", "set", &ns_if, "up"]);
        }
        ns
    }

    fn exec_ip(&self, args: &[&str]) {
        let mut all = vec!["netns", "exec", &self.name, "ip"];
        all.extend_from_slice(args);
        ip(&all);
    }

    pub fn link(&self, i: usize) -> &Link {
        &self.links[i]
    }

    /// `program` run inside the namespace (`ip netns exec NAME program`: the same process id).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Link `i` drops everything from now on.
    pub fn cut(&self, i: usize) {
        ip(&["link", "set", &self.links[i].host_if, "down"]);
    }

    /// Link `i` carries traffic again.
    pub fn heal(&self, i: usize) {
        ip(&["link", "set", &self.links[i].host_if, "up"]);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for l in &self.links {
            let _ = Command::new("ip")
                .args(["link", "del", &l.host_if])
                .output();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}
