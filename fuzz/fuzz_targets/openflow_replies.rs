//! The OpenFlow adapter's decoder: whatever the switch answers (any bytes on the management
//! socket, then end of stream), the handshake and a bundle end in success or an error,
//! never a panic or a hang.
#![no_main]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

use libfuzzer_sys::fuzz_target;
use nsx_adapters::openflow::Session;
use nsx_core::ovs::bridge::OfOp;
use nsx_core::ovs::parse::parse_flow;

fuzz_target!(|data: &[u8]| {
    let Ok((ours, mut switch)) = UnixStream::pair() else {
        return;
    };
    // The switch's side: drain what the adapter writes (it may answer echo requests), and
    // say what the input says, then hang up.
    let Ok(mut drain) = switch.try_clone() else {
        return;
    };
    let drainer = std::thread::spawn(move || {
        let mut sink = [0u8; 4096];
        while matches!(drain.read(&mut sink), Ok(n) if n > 0) {}
    });
    let _ = switch.write_all(data);
    let _ = switch.shutdown(std::net::Shutdown::Write);
    if let Ok(mut session) = Session::over(ours) {
        let flow = parse_flow("table=0,priority=10,ip,nw_dst=10.4.0.5 actions=output:3")
            .expect("a valid flow");
        let _ = session.bundle(&[OfOp::AddFlow(flow)]);
    }
    drop(switch);
    let _ = drainer.join();
});
