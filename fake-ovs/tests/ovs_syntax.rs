//! Our `ovs-ofctl` syntax against a real Open vSwitch 3.1: a private ovsdb-server and
//! ovs-vswitchd with the dummy datapath (no kernel module, no root network changes) in a
//! temporary directory. Every sample flow and group is added with the real `ovs-ofctl`, the
//! real dump must equal our printing line for line, every real dump line must parse back to
//! the same flow, and the text we refuse must be refused by OVS too.
//!
//! This test needs `ovs-vswitchd`, `ovsdb-server`, `ovsdb-tool`, `ovs-vsctl` and `ovs-ofctl`
//! (Debian's openvswitch-switch; `scripts/test.sh` installs it). Without them it fails: it
//! does not skip.

use fake_ovs::real::Sandbox;
use nsx_core::ovs::samples::{BAD_FLOWS, GROUP_SAMPLES, SAMPLES};
use nsx_core::ovs::{parse_flow, parse_group};

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
