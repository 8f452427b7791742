//! The proxy's packet-in handler: whatever the switch sends after the handshake (packet-ins
//! carrying any packet a pod could send to a Service without endpoints, echo requests, other
//! messages, then end of stream), it answers or ignores, never a panic or a hang, and every
//! answer is a well-formed packet-out.
#![no_main]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

use libfuzzer_sys::fuzz_target;
use nsx_adapters::openflow::Session;
use nsx_adapters::reject;

fuzz_target!(|data: &[u8]| {
    let Ok((ours, mut switch)) = UnixStream::pair() else {
        return;
    };
    let Ok(mut drain) = switch.try_clone() else {
        return;
    };
    let drainer = std::thread::spawn(move || {
        let mut sink = [0u8; 4096];
        while matches!(drain.read(&mut sink), Ok(n) if n > 0) {}
    });
    // An OpenFlow 1.5 hello (with its version bitmap), then what the input says.
    let hello = [6u8, 0, 0, 16, 0, 0, 0, 1, 0, 1, 0, 8, 0, 0, 0, 0x40];
    let _ = switch.write_all(&hello);
    let _ = switch.write_all(data);
    let _ = switch.shutdown(std::net::Shutdown::Write);
    if let Ok(session) = Session::over(ours) {
        let _ = session.serve_packet_ins(|_cookie, frame| {
            let r = reject::reply(frame);
            if let Some(r) = &r {
                // An answer is never longer than the quote allows plus its headers.
                assert!(r.len() <= 18 + 576, "answer of {} bytes", r.len());
            }
            r
        });
    }
    drop(switch);
    let _ = drainer.join();
});
