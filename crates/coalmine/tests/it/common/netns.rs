//! A network of stand-in pods: a network namespace (made with `unshare --net`, kept alive by a
//! holder process, so it goes when the holder goes — also when a test is killed, after the
//! holder's 10-minute sleep at most) joined to this one by a veth pair with a /29 of its own in
//! 10.231.0.0/17: a /30 for the pair, and spare addresses on this side for more router pods
//! ([`PodNetwork::address_here`]), which a test can cut off and reconnect like a partitioned
//! node. Addresses given to the namespace (`route_here`) are routed to it from here, as
//! kube-proxy makes a Service's cluster IP reach its pods. Nothing leaves the machine: every
//! address is on the pair. Needs root (CAP_NET_ADMIN) and iproute2.
//!
//! One pod network at a time on the machine (a file lock, held while it lives): routes to cluster
//! IPs are machine-wide, and every test cluster gives out the same first addresses of its range.

use std::io::{BufRead, BufReader};
use std::net::Ipv4Addr;
use std::process::{Child, Command, Stdio};

use super::{Proc, BIN};

pub struct PodNetwork {
    /// Dropped last: the routes are gone by then.
    _one_at_a_time: std::fs::File,
    holder: Child,
    /// The veth's end in this namespace, and its address.
    host_link: String,
    pub host_ip: Ipv4Addr,
    /// The veth's end in the pods' namespace, and its address.
    pod_link: String,
    pub pod_ip: Ipv4Addr,
    /// The first of the /29's four spare addresses.
    spare: Ipv4Addr,
}

/// How many spare addresses a pod network has on this side.
const SPARES: u32 = 4;

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("ip (iproute2)");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl PodNetwork {
    pub fn create() -> PodNetwork {
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(std::env::temp_dir().join("coalmine-test-pod-network.lock"))
            .unwrap();
        lock.lock().unwrap();
        let mut holder = Command::new("unshare")
            .args(["--net", "sh", "-c", "echo ready && exec sleep 600"])
            .stdout(Stdio::piped())
            .spawn()
            .expect("unshare (util-linux)");
        let mut line = String::new();
        BufReader::new(holder.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready", "could not make a network namespace");
        let pid = holder.id();
        // A /29 per holder: tests (and a leftover of a killed one) never share addresses.
        let slot = pid % 4096;
        let base = u32::from(Ipv4Addr::new(10, 231, 0, 0)) + slot * 8;
        let (host_ip, pod_ip) = (Ipv4Addr::from(base + 1), Ipv4Addr::from(base + 2));
        let spare = Ipv4Addr::from(base + 4);
        let (host_link, pod_link) = (format!("cmh{pid}"), format!("cmp{pid}"));
        let network = PodNetwork {
            _one_at_a_time: lock,
            holder,
            host_link,
            host_ip,
            pod_link,
            pod_ip,
            spare,
        };
        ip(&[
            "link",
            "add",
            &network.host_link,
            "type",
            "veth",
            "peer",
            "name",
            &network.pod_link,
            "netns",
            &pid.to_string(),
        ]);
        ip(&[
            "addr",
            "add",
            &format!("{host_ip}/30"),
            "dev",
            &network.host_link,
        ]);
        ip(&["link", "set", &network.host_link, "up"]);
        network.inside(&["link", "set", "lo", "up"]);
        network.inside(&[
            "addr",
            "add",
            &format!("{pod_ip}/30"),
            "dev",
            &network.pod_link,
        ]);
        network.inside(&["link", "set", &network.pod_link, "up"]);
        network
    }

    /// `ip ARGS` inside the pods' namespace.
    fn inside(&self, args: &[&str]) {
        let pid = self.holder.id().to_string();
        let out = Command::new("nsenter")
            .args(["--target", &pid, "--net", "ip"])
            .args(args)
            .output()
            .expect("nsenter (util-linux)");
        assert!(
            out.status.success(),
            "ip {} in the pods' namespace: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Gives the pods' namespace `address` (a Service's cluster IP) and routes it there from
    /// here.
    pub fn route_here(&self, address: Ipv4Addr) {
        self.inside(&[
            "addr",
            "add",
            &format!("{address}/32"),
            "dev",
            &self.pod_link,
        ]);
        ip(&[
            "route",
            "replace",
            &format!("{address}/32"),
            "via",
            &self.pod_ip.to_string(),
            "dev",
            &self.host_link,
        ]);
    }

    /// Spare address `i` (of 4) of this network, given to this side: another router pod's
    /// address, for a Service's EndpointSlice to list beside `host_ip`.
    pub fn address_here(&self, i: u32) -> Ipv4Addr {
        assert!(i < SPARES, "a pod network has {SPARES} spare addresses");
        let address = Ipv4Addr::from(u32::from(self.spare) + i);
        ip(&[
            "addr",
            "replace",
            &format!("{address}/32"),
            "dev",
            &self.host_link,
        ]);
        address
    }

    /// Cuts `address` (from [`PodNetwork::address_here`]) off, as a partition would: connecting
    /// to it fails (no route to host), while what listens on it keeps its sockets and state.
    pub fn cut_off(&self, address: Ipv4Addr) {
        // The unreachable route first: once the address is no longer local, nothing to it may
        // take the default route off the machine.
        ip(&["route", "add", "unreachable", &format!("{address}/32")]);
        ip(&[
            "addr",
            "del",
            &format!("{address}/32"),
            "dev",
            &self.host_link,
        ]);
    }

    /// Undoes [`PodNetwork::cut_off`]: what listens on `address` is reached again.
    pub fn reconnect(&self, address: Ipv4Addr) {
        ip(&[
            "addr",
            "add",
            &format!("{address}/32"),
            "dev",
            &self.host_link,
        ]);
        ip(&["route", "del", "unreachable", &format!("{address}/32")]);
    }

    /// Starts `coalmine ARGS` inside the pods' namespace.
    pub fn spawn(&self, args: &[&str]) -> Proc {
        let pid = self.holder.id().to_string();
        let mut command = Command::new("nsenter");
        command.args(["--target", &pid, "--net", BIN]).args(args);
        Proc::spawn_command(command, args)
    }
}

impl Drop for PodNetwork {
    fn drop(&mut self) {
        // The namespace goes with its holder, the veth pair (and its routes) with it.
        let _ = self.holder.kill();
        let _ = self.holder.wait();
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_link])
            .stderr(Stdio::null())
            .status();
        // A spare address still cut off: its route is not the link's.
        for i in 0..SPARES {
            let address = Ipv4Addr::from(u32::from(self.spare) + i);
            let _ = Command::new("ip")
                .args(["route", "del", "unreachable", &format!("{address}/32")])
                .stderr(Stdio::null())
                .status();
        }
    }
}
