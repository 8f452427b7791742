//! Our `ovs-ofctl` syntax against a real Open vSwitch 3.1: a private ovsdb-server and
//! ovs-vswitchd with the dummy datapath (no kernel module, no root network changes) in a
//! temporary directory. Every sample flow and group is added with the real `ovs-ofctl`, the
//! real dump must equal our printing line for line, every real dump line must parse back to
//! the same flow, and the text we refuse must be refused by OVS too.
//!
//! This test needs `ovs-vswitchd`, `ovsdb-server`, `ovsdb-tool`, `ovs-vsctl` and `ovs-ofctl`
//! (Debian's openvswitch-switch; `scripts/test.sh` installs it). Without them it fails: it
//! does not skip.

use std::path::{Path, PathBuf};
use std::process::Command;

use nsx_core::ovs::samples::{BAD_FLOWS, GROUP_SAMPLES, SAMPLES};
use nsx_core::ovs::{parse_flow, parse_group};

fn tool(name: &str) -> PathBuf {
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
struct Sandbox {
    dir: PathBuf,
}

impl Sandbox {
    fn start(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("nsx-ovs-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let s = Self { dir };
        let schema = ["/usr/share/openvswitch/vswitch.ovsschema"]
            .into_iter()
            .find(|p| Path::new(p).is_file())
            .expect("vswitch.ovsschema not found: openvswitch-common is not installed");
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
        s.run(
            &tool("ovs-vswitchd"),
            &[
                "--detach",
                "--no-chdir",
                &format!("--pidfile={}", s.path("ovs-vswitchd.pid")),
                "--enable-dummy=override",
                "--disable-system",
                &format!("--log-file={}", s.path("ovs-vswitchd.log")),
                &format!("unix:{}", s.path("db.sock")),
            ],
        );
        s.vsctl(&[
            "add-br",
            "br0",
            "--",
            "set",
            "bridge",
            "br0",
            "datapath_type=dummy",
            "fail-mode=secure",
            "--",
            "add-port",
            "br0",
            "p1",
            "--",
            "set",
            "interface",
            "p1",
            "type=dummy",
            "ofport_request=1",
            "--",
            "add-port",
            "br0",
            "p2",
            "--",
            "set",
            "interface",
            "p2",
            "type=dummy",
            "ofport_request=2",
        ]);
        s
    }

    fn path(&self, f: &str) -> String {
        self.dir.join(f).to_string_lossy().into_owned()
    }

    fn command(&self, program: &Path) -> Command {
        let mut c = Command::new(program);
        for var in ["OVS_RUNDIR", "OVS_LOGDIR", "OVS_DBDIR", "OVS_SYSCONFDIR"] {
            c.env(var, &self.dir);
        }
        c
    }

    fn run(&self, program: &Path, args: &[&str]) -> String {
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

    fn vsctl(&self, args: &[&str]) -> String {
        let db = format!("--db=unix:{}", self.path("db.sock"));
        let mut a = vec![db.as_str()];
        a.extend_from_slice(args);
        self.run(&tool("ovs-vsctl"), &a)
    }

    fn ofctl(&self, args: &[&str]) -> std::process::Output {
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

fn dump_lines(text: &str) -> Vec<String> {
    let mut v: Vec<String> = text
        .lines()
        .filter(|l| l.starts_with(' '))
        .map(|l| l.trim().to_string())
        .collect();
    v.sort();
    v
}

#[test]
fn flows_print_and_parse_exactly_as_a_real_ovs_does() {
    let ovs = Sandbox::start("flows");
    // Flows may name groups: they must exist first (OVS answers OFPBAC_BAD_OUT_GROUP).
    for (input, _) in GROUP_SAMPLES {
        let out = ovs.ofctl(&["-O", "OpenFlow15", "add-group", "br0", input]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for (input, _) in SAMPLES {
        let out = ovs.ofctl(&["-O", "OpenFlow13", "add-flow", "br0", input]);
        assert!(
            out.status.success(),
            "OVS refused {input}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = ovs.ofctl(&["-O", "OpenFlow13", "dump-flows", "--no-stats", "br0"]);
    let real = dump_lines(&String::from_utf8_lossy(&out.stdout));
    let mut ours: Vec<String> = SAMPLES
        .iter()
        .map(|(input, _)| parse_flow(input).unwrap().to_dump_no_stats())
        .collect();
    ours.sort();
    assert_eq!(ours, real, "our printing differs from OVS 3.1's");
    // The lines with statistics, as OVS prints them, read back to the flows.
    let out = ovs.ofctl(&["-O", "OpenFlow13", "dump-flows", "br0"]);
    for line in String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with(' '))
    {
        let f = parse_flow(line).unwrap_or_else(|e| panic!("{line}: {e}"));
        assert!(real.contains(&f.to_dump_no_stats()), "{line}");
    }
}

#[test]
fn groups_print_as_a_real_ovs_does() {
    let ovs = Sandbox::start("groups");
    for (input, _) in GROUP_SAMPLES {
        let out = ovs.ofctl(&["-O", "OpenFlow15", "add-group", "br0", input]);
        assert!(
            out.status.success(),
            "OVS refused {input}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = ovs.ofctl(&["-O", "OpenFlow15", "dump-groups", "br0"]);
    let real = dump_lines(&String::from_utf8_lossy(&out.stdout));
    let mut ours: Vec<String> = GROUP_SAMPLES
        .iter()
        .map(|(input, _)| parse_group(input).unwrap().to_string())
        .collect();
    ours.sort();
    assert_eq!(ours, real);
}

#[test]
fn what_we_refuse_a_real_ovs_refuses() {
    let ovs = Sandbox::start("bad");
    for bad in BAD_FLOWS {
        assert!(parse_flow(bad).is_err(), "we accept {bad}");
        let out = ovs.ofctl(&["-O", "OpenFlow13", "add-flow", "br0", bad]);
        assert!(!out.status.success(), "OVS accepts {bad}, we refuse it");
    }
}
