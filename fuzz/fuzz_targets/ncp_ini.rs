//! `ncp.ini`: any text is a configuration or an error naming the line, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nsx_core::ncp::config::NcpConfig;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = NcpConfig::parse(text);
});
