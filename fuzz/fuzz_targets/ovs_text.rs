//! ovs-ofctl flow and group text: any text parses or is refused with a position, and a
//! parsed flow or group prints as text that parses back to the same thing (and prints the
//! same again).
#![no_main]

use libfuzzer_sys::fuzz_target;
use nsx_core::ovs::parse::{parse_flow, parse_group};

fuzz_target!(|data: &[u8]| {
    let Some((&kind, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    if kind % 2 == 0 {
        if let Ok(flow) = parse_flow(text) {
            let printed = flow.to_string();
            let again = parse_flow(&printed)
                .unwrap_or_else(|e| panic!("{text:?} printed as {printed:?}, which fails: {e}"));
            assert_eq!(flow, again, "{text:?} printed as {printed:?}");
            assert_eq!(printed, again.to_string());
        }
    } else if let Ok(group) = parse_group(text) {
        let printed = group.to_string();
        let again = parse_group(&printed)
            .unwrap_or_else(|e| panic!("{text:?} printed as {printed:?}, which fails: {e}"));
        assert_eq!(group, again, "{text:?} printed as {printed:?}");
        assert_eq!(printed, again.to_string());
    }
});
