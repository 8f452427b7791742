//! The CNI plugin's input: the environment (`KEY=VALUE` lines, any bytes) up to an empty
//! line, then stdin. The answer is a result or CNI error JSON with exit code 0 or 1, never a
//! panic; a configuration that parses names a version the answer uses.
#![no_main]

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;

use libfuzzer_sys::fuzz_target;
use nsx_core::cni::client::Answered;
use nsx_core::cni::wire::WireResponse;
use nsx_core::cni::{cni_vars, fail_early, run};

fuzz_target!(|data: &[u8]| {
    let split = data
        .windows(2)
        .position(|w| w == b"\n\n")
        .unwrap_or(data.len());
    let (env, stdin) = (&data[..split], data.get(split + 2..).unwrap_or(&[]));
    let vars = env.split(|b| *b == b'\n').filter_map(|line| {
        let eq = line.iter().position(|b| *b == b'=')?;
        Some((
            OsString::from_vec(line[..eq].to_vec()),
            OsString::from_vec(line[eq + 1..].to_vec()),
        ))
    });
    let (code, out) = match cni_vars(vars) {
        Ok(vars) => {
            let mut agent = Answered(WireResponse::Added {
                ip: "10.4.0.5/24".into(),
                gateway: "10.4.0.1".into(),
                mac: "02:50:56:00:00:05".into(),
            });
            run(&vars, stdin, &mut agent)
        }
        Err(e) => fail_early(stdin, &e),
    };
    assert!(code == 0 || code == 1, "exit code {code}");
    if code == 1 || !out.is_empty() {
        let v: serde_json::Value =
            serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"));
        assert!(v["cniVersion"].is_string(), "{out}");
        if code == 1 {
            assert!(v["code"].is_u64() && v["msg"].is_string(), "{out}");
        }
    }
});
