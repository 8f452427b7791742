//! The OpenFlow adapter's decoder: whatever the switch answers (any bytes on the management
//! socket, then end of stream), the handshake and a bundle end in success or an error,
//! never a panic or a hang.
#![no_main]

#[path = "switch.rs"]
mod switch;

use libfuzzer_sys::fuzz_target;
use nsx_adapters::openflow::Session;
use nsx_core::ovs::bridge::OfOp;
use nsx_core::ovs::parse::parse_flow;

fuzz_target!(|data: &[u8]| {
    switch::saying(&[], data, |ours| {
        if let Ok(mut session) = Session::over(ours) {
            let flow = parse_flow("table=0,priority=10,ip,nw_dst=10.4.0.5 actions=output:3")
                .expect("a valid flow");
            let _ = session.bundle(&[OfOp::AddFlow(flow)]);
        }
    });
});
