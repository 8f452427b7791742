//! The OpenFlow model of Open vSwitch that nsx-kube-proxy and the node agent program, and the
//! text of `ovs-ofctl` for it.
//!
//! - [`field`]: the fields (names, widths, how values print);
//! - [`flow`]: matches, actions, flows, groups, and how OVS 3.1 prints them (`dump-flows` in
//!   OpenFlow 1.3, `dump-groups` in OpenFlow 1.5, which shows `selection_method`);
//! - [`parse`]: `add-flow`/`add-group` text and dump lines back into the model, with errors
//!   that name the offset;
//! - [`interface`]: a pod's OVS interface: its name and the external ids the agent records;
//! - [`pipeline`]: this system's tables, registers, priorities and cookies, which the node
//!   agent and nsx-kube-proxy share.
//!
//! The printing follows OVS's normalizations for flows added over OpenFlow 1.3: `tcp` for
//! `ip,nw_proto=6`, `dl_vlan=5` for `vlan_tci=0x1005/0x1fff`, `load:0x1->NXM_NX_REG2[4..7]` for
//! a masked `set_field`, `pop_vlan` for `strip_vlan`, `set_field:4105->vlan_vid` for
//! `mod_vlan_vid:9`, `set_field:99->tcp_dst` for `mod_tp_dst:99` in a TCP flow, `IN_PORT`,
//! `NORMAL`, `CONTROLLER:65535`, the default priority 32768 left out, and match fields whose
//! prerequisites are missing dropped ([`parse::parse_flow_strict`] refuses them instead).
//! `fake-ovs/tests/ovs_syntax.rs` checks all of it against a real `ovs-vswitchd`.

pub mod bridge;
pub mod field;
pub mod flow;
pub mod interface;
pub mod parse;
pub mod pipeline;
pub mod samples;

pub use field::Field;
pub use flow::{Action, Bucket, CtZone, Flow, FlowStats, Group, GroupType, Match, Nat, Subfield};
pub use parse::{ParseError, parse_flow, parse_group};

#[cfg(test)]
mod tests {
    use super::samples::SAMPLES as CORPUS;
    use super::*;

    #[test]
    fn every_construct_prints_as_ovs_and_round_trips() {
        for (input, want) in CORPUS {
            let flow = parse_flow(input).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(&flow.to_dump_no_stats(), want, "printing {input}");
            // Our add-flow text, the dump line, and the original parse to the same flow.
            let again = parse_flow(&flow.to_string()).unwrap();
            assert_eq!(again, flow, "round trip of {input} via {flow}");
            let from_dump = parse_flow(want).unwrap();
            assert_eq!(from_dump, flow, "reading OVS's own line {want}");
        }
    }

    #[test]
    fn dump_lines_with_statistics_are_read() {
        let line = " cookie=0x10, duration=0.096s, table=0, n_packets=3, n_bytes=180, idle_timeout=5, priority=100,tcp,nw_dst=10.96.0.10,tp_dst=80 actions=group:1";
        let f = parse_flow(line).unwrap();
        assert_eq!(f.cookie, 0x10);
        assert_eq!(f.idle_timeout, 5);
        assert_eq!(f.actions, vec![Action::Group(1)]);
        let stats = FlowStats {
            duration_ms: 96,
            n_packets: 3,
            n_bytes: 180,
        };
        assert_eq!(format!(" {}", f.to_dump(&stats)), line);
    }

    #[test]
    fn groups_print_as_ovs_and_round_trip() {
        for (input, want) in super::samples::GROUP_SAMPLES {
            let g = parse_group(input).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(&g.to_string(), want);
            assert_eq!(parse_group(want).unwrap(), g);
        }
    }

    #[test]
    fn bad_text_is_refused_with_the_offset() {
        let cases = [
            ("priority=1,tcp,tp_dst=99999,actions=drop", 22, "too big"),
            (
                "priority=1,ip,nw_dst=10.0.0.0/33,actions=drop",
                21,
                "prefix length",
            ),
            ("priority=1,bogus=3,actions=drop", 11, "unknown match field"),
            ("priority=1,ip", 13, "actions="),
            (
                "priority=1,ip,actions=output:1,frobnicate",
                31,
                "unknown action",
            ),
            ("priority=1,ip,actions=drop,output:1", 22, "only action"),
            ("priority=1,ip,actions=ct(commit,zone=3", 22, "unbalanced"),
            (
                "priority=1,ip,actions=load:0x100->NXM_NX_REG0[0..7]",
                27,
                "does not fit",
            ),
            (
                "priority=1,ip,actions=move:NXM_NX_REG0[0..7]->NXM_NX_REG1[0..3]",
                27,
                "widths",
            ),
            ("priority=1,ct_state=+trk+nope,ip,actions=drop", 20, "nope"),
        ];
        for (text, offset, msg) in cases {
            let e = parse_flow(text).expect_err(text);
            assert!(
                e.message.contains(msg) || e.to_string().contains(msg),
                "{text}: {e}"
            );
            assert_eq!(e.offset, offset, "{text}: {e}");
        }
        let e = parse::parse_flow_strict("priority=1,tp_dst=80,actions=drop").unwrap_err();
        assert!(e.message.contains("needs tcp"), "{e}");
        for bad in super::samples::STRICTER_THAN_OVS {
            assert!(parse_flow(bad).is_err(), "{bad} must be refused");
        }
        for bad in super::samples::BAD_FLOWS {
            assert!(parse_flow(bad).is_err(), "{bad} must be refused");
        }
        assert!(parse_group("type=select,bucket=output:1").is_err());
        assert!(
            parse_group("group_id=1,type=fancy")
                .unwrap_err()
                .message
                .contains("type")
        );
    }
}
