//! The proxy's packet-in handler: whatever the switch sends after the handshake (packet-ins
//! carrying any packet a pod could send to a Service without endpoints, echo requests, other
//! messages, then end of stream), it answers or ignores, never a panic or a hang, and no
//! answer is longer than an ICMP error may be.
#![no_main]

#[path = "switch.rs"]
mod switch;

use libfuzzer_sys::fuzz_target;
use nsx_adapters::openflow::Session;
use nsx_adapters::reject;

/// An OpenFlow 1.5 hello with its version bitmap: the fuzzer starts past the handshake.
const HELLO: [u8; 16] = [6, 0, 0, 16, 0, 0, 0, 1, 0, 1, 0, 8, 0, 0, 0, 0x40];

fuzz_target!(|data: &[u8]| {
    switch::saying(&HELLO, data, |ours| {
        if let Ok(session) = Session::over(ours) {
            let _ = session.serve_packet_ins(|_cookie, frame| {
                let r = reject::reply(frame);
                if let Some(r) = &r {
                    assert!(r.len() <= 18 + 576, "answer of {} bytes", r.len());
                }
                r
            });
        }
    });
});
