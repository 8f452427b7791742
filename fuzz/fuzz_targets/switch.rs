//! A switch for the OpenFlow fuzz targets: the far end of a socket pair that says `prefix`
//! then the fuzzer's bytes, hangs up, and drains whatever the adapter writes (echo replies,
//! bundles, packet-outs) so that neither side blocks.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

/// Runs `adapter` on our end of a pair whose switch says `prefix`, then `data`.
pub fn saying(prefix: &[u8], data: &[u8], adapter: impl FnOnce(UnixStream)) {
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
    let _ = switch.write_all(prefix);
    let _ = switch.write_all(data);
    let _ = switch.shutdown(std::net::Shutdown::Write);
    adapter(ours);
    drop(switch);
    let _ = drainer.join();
}
