//! Scenario files: any text is a scenario or an error naming the file and line, never a
//! panic, a hang or a huge allocation.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let file = std::env::temp_dir().join("nsx-fuzz-scenario/fuzz.yaml");
    if let Err(e) = nsx_sim::scenario::spec::parse(&file, text) {
        assert!(e.to_string().contains("fuzz.yaml"), "{e}");
    }
});
