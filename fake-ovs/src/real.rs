//! A private, real Open vSwitch for checking the fake against: ovsdb-server and ovs-vswitchd
//! with the dummy datapath (no kernel module, no change to the host's network) in a temporary
//! directory, driven with the real `ovs-vsctl`, `ovs-ofctl` and `ovs-appctl`. Used by the
//! tests that compare fake-ovs and our ovs-ofctl syntax with OVS 3.1 (Debian's
//! openvswitch-switch, which `scripts/test.sh` installs). Without the binaries it panics with
//! a message saying what to install: such a test fails, it does not skip.

use std::path::{Path, PathBuf};
use std::process::Command;

pub fn tool(name: &str) -> PathBuf {
    let path = std::env::var("PATH").unwrap_or_default();
    for dir in path
        .split(':')
        .chain(["/usr/sbin", "/usr/bin", "/sbin", "/usr/local/sbin"])
    {
        let p = Path::new(dir).join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!("{name} not found: install Debian's openvswitch-switch (scripts/test.sh does)");
}

/// A private Open vSwitch, stopped on drop.
pub struct Sandbox {
    dir: PathBuf,
    /// Userspace (netdev) datapath on real devices instead of the dummy one.
    netdev: bool,
}

impl Sandbox {
    /// Starts a bridge `br0` (secure fail mode) with dummy ports `p1` (1) and `p2` (2).
    pub fn start(name: &str) -> Self {
        let s = Self::daemons(&format!("nsx-ovs-{name}"), false);
        #[rustfmt::skip]
        s.vsctl(&[
            "add-br", "br0", "--", "set", "bridge", "br0", "datapath_type=dummy",
            "fail-mode=secure",
            "--", "add-port", "br0", "p1", "--", "set", "interface", "p1", "type=dummy",
            "ofport_request=1",
            "--", "add-port", "br0", "p2", "--", "set", "interface", "p2", "type=dummy",
            "ofport_request=2",
        ]);
        s
    }

    /// A private Open vSwitch whose bridges use the userspace (netdev) datapath on real
    /// devices (veths, patch ports): traffic between network namespaces really flows, with
    /// no kernel module. No bridge is created.
    pub fn start_netdev(name: &str) -> Self {
        Self::daemons(&format!("nsx-ovsn-{name}"), true)
    }

    /// ovsdb-server with a fresh database and ovs-vswitchd, in a directory of their own.
    fn daemons(prefix: &str, netdev: bool) -> Self {
        let dir = std::env::temp_dir().join(format!("{prefix}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let s = Self { dir, netdev };
        let schema = "/usr/share/openvswitch/vswitch.ovsschema";
        assert!(
            Path::new(schema).is_file(),
            "vswitch.ovsschema not found: openvswitch-common is not installed"
        );
        s.run(&tool("ovsdb-tool"), &["create", &s.path("conf.db"), schema]);
        s.run(
            &tool("ovsdb-server"),
            &[
                "--detach",
                "--no-chdir",
                &format!("--pidfile={}", s.path("ovsdb-server.pid")),
                &format!("--remote=punix:{}", s.path("db.sock")),
                &format!("--log-file={}", s.path("ovsdb-server.log")),
                &s.path("conf.db"),
            ],
        );
        s.vsctl(&["--no-wait", "init"]);
        s.start_vswitchd();
        s
    }

    fn start_vswitchd(&self) {
        let pidfile = format!("--pidfile={}", self.path("ovs-vswitchd.pid"));
        let log = format!("--log-file={}", self.path("ovs-vswitchd.log"));
        let db = format!("unix:{}", self.path("db.sock"));
        let mut args = vec!["--detach", "--no-chdir", pidfile.as_str()];
        if !self.netdev {
            args.extend(["--enable-dummy=override", "--disable-system"]);
        }
        args.extend([log.as_str(), db.as_str()]);
        self.run(&tool("ovs-vswitchd"), &args);
    }

    /// Stops ovs-vswitchd and starts it again: flows and groups are gone, ports (OVSDB) stay.
    pub fn restart_vswitchd(&self) {
        let pid = std::fs::read_to_string(self.dir.join("ovs-vswitchd.pid")).unwrap();
        let target = self.path(&format!("ovs-vswitchd.{}.ctl", pid.trim()));
        self.run(&tool("ovs-appctl"), &["-t", &target, "exit"]);
        // `exit` answers before the daemon is gone (the netdev datapath takes a while).
        let proc_dir = Path::new("/proc").join(pid.trim());
        for _ in 0..200 {
            if !proc_dir.exists() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(25));
        }
        self.start_vswitchd();
        // Back when the (first) bridge answers OpenFlow again.
        let bridges = self.vsctl(&["list-br"]);
        let bridge = bridges.lines().next().unwrap_or("br0").trim().to_string();
        for _ in 0..100 {
            if self.ofctl(&["show", &bridge]).status.success() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        panic!("ovs-vswitchd did not come back");
    }

    /// The directory the daemons run in (`OVS_RUNDIR` for the tools).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn path(&self, f: &str) -> String {
        self.dir.join(f).to_string_lossy().into_owned()
    }

    pub fn command(&self, program: &Path) -> Command {
        let mut c = Command::new(program);
        for var in ["OVS_RUNDIR", "OVS_LOGDIR", "OVS_DBDIR", "OVS_SYSCONFDIR"] {
            c.env(var, &self.dir);
        }
        c
    }

    pub fn run(&self, program: &Path, args: &[&str]) -> String {
        let out = self
            .command(program)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("{program:?}: {e}"));
        assert!(
            out.status.success(),
            "{program:?} {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn vsctl(&self, args: &[&str]) -> String {
        let db = format!("--db=unix:{}", self.path("db.sock"));
        let mut a = vec![db.as_str()];
        a.extend_from_slice(args);
        self.run(&tool("ovs-vsctl"), &a)
    }

    pub fn ofctl(&self, args: &[&str]) -> std::process::Output {
        self.command(&tool("ovs-ofctl"))
            .args(args)
            .output()
            .unwrap()
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        for (daemon, pidfile) in [
            ("ovs-vswitchd", "ovs-vswitchd.pid"),
            ("ovsdb-server", "ovsdb-server.pid"),
        ] {
            if let Ok(pid) = std::fs::read_to_string(self.dir.join(pidfile)) {
                let target = self.path(&format!("{daemon}.{}.ctl", pid.trim()));
                let _ = self
                    .command(&tool("ovs-appctl"))
                    .args(["-t", &target, "exit"])
                    .output();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Sandbox {
    /// `ovs-appctl ofproto/trace br0 FLOW`: the text.
    pub fn trace(&self, flow: &str) -> String {
        let out = self
            .command(&tool("ovs-appctl"))
            .args(["ofproto/trace", "br0", flow])
            .output()
            .expect("ovs-appctl runs");
        assert!(
            out.status.success(),
            "ofproto/trace {flow}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `ovs-ofctl -O VERSION CMD br0 ARG`, which must succeed.
    pub fn ofctl_ok(&self, version: &str, cmd: &str, arg: &str) {
        let out = self.ofctl(&["-O", version, cmd, "br0", arg]);
        assert!(
            out.status.success(),
            "ovs-ofctl {cmd} {arg}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
