//! Runs the vmware-nsxlib test suite (tests/nsxlib/test_nsxlib.py) against the standalone
//! binary. It needs Python with vmware-nsxlib and pytest: `scripts/test.sh` (and CI) installs
//! them into `.venv`; NSXLIB_PYTHON names another interpreter. Without them this test fails,
//! it does not skip: a missing dependency must not pass for a green run.

use std::path::PathBuf;
use std::process::Command;

fn python() -> PathBuf {
    if let Ok(p) = std::env::var("NSXLIB_PYTHON") {
        return PathBuf::from(p);
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python")
}

#[test]
fn vmware_nsxlib_drives_the_standalone_fake() {
    let py = python();
    let probe = Command::new(&py)
        .args(["-c", "import vmware_nsxlib, pytest"])
        .output();
    match probe {
        Ok(o) if o.status.success() => {}
        other => panic!(
            "Python with vmware-nsxlib and pytest is required at {} (run scripts/test.sh, or set NSXLIB_PYTHON): {other:?}",
            py.display()
        ),
    }
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/nsxlib");
    let out = Command::new(&py)
        .args([
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:warnings",
            "-p",
            "no:cacheprovider",
        ])
        .arg(&dir)
        .env("FAKE_NSX_BIN", env!("CARGO_BIN_EXE_fake-nsx-manager"))
        .output()
        .expect("failed to start pytest");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "nsxlib tests failed:\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("10 passed"),
        "expected all 10 nsxlib tests to run:\n{stdout}"
    );
}
