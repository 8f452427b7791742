//! `--state FILE` as a snapshot plus a journal: the journal folds into a new snapshot once it
//! outgrows it, a torn last entry is dropped while damage before the end is refused, and every
//! write the binary answered survives a `kill -9` in the middle of a burst of writers.

mod common;

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::Client;
use fake_nsx_manager::{FakeNsxManager, ManagerConfig};
use serde_json::{Value, json};

fn fresh_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("fake-nsx-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn config(file: &Path) -> ManagerConfig {
    let mut c = ManagerConfig {
        state_file: Some(file.to_path_buf()),
        ..ManagerConfig::default()
    };
    c.store.api_service.client_api_rate_limit = 0;
    c
}

fn journal(file: &Path) -> PathBuf {
    file.with_file_name("nsx.json.journal")
}

fn len(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// A switch body of about 9 KB (30 tags of 256 characters), to grow the journal quickly.
fn big_switch(tz: &str, i: usize) -> Value {
    let tags: Vec<Value> = (0..30)
        .map(|t| json!({"scope": format!("s{t}"), "tag": format!("{i:0>256}")}))
        .collect();
    json!({"transport_zone_id": tz, "admin_state": "UP", "display_name": format!("big-{i}"), "tags": tags})
}

#[tokio::test]
async fn the_journal_folds_into_a_snapshot_once_it_outgrows_it() {
    let dir = fresh_dir("fold");
    let file = dir.join("nsx.json");
    let c = Client::on(FakeNsxManager::open(config(&file)).unwrap());
    let tz = c.boot().transport_zone;
    let first_snapshot = len(&file);
    assert!(first_snapshot > 0);
    assert_eq!(
        len(&journal(&file)),
        0,
        "a fresh state file starts with an empty journal"
    );
    // Writes only append: the snapshot stays as it was until the journal passes 1 MiB.
    let mut ids = Vec::new();
    let mut folded_at = None;
    for i in 0..400 {
        let before = len(&journal(&file));
        ids.push(
            c.post("logical-switches", big_switch(&tz, i))
                .await
                .expect(201)
                .id(),
        );
        let after = len(&journal(&file));
        if after < before {
            folded_at = Some((i, before));
            break;
        }
        assert_eq!(len(&file), first_snapshot, "write {i} rewrote the snapshot");
        assert!(after > before, "write {i} did not reach the journal");
    }
    let (i, before) = folded_at.expect("the journal never folded into a snapshot");
    // The write that folded it brought it past 1 MiB (one entry is about 10 KB).
    assert!(
        before < 1 << 20 && before + 20_000 >= 1 << 20,
        "folded with {before} bytes before the last write, not at 1 MiB"
    );
    assert!(i > 100, "folded after only {i} writes");
    assert!(
        len(&file) > first_snapshot + (i as u64 + 1) * 30 * 256,
        "the snapshot has the switches now"
    );
    // Then the journal grows again from empty, and everything comes back after a restart.
    ids.push(
        c.post("logical-switches", big_switch(&tz, 1000))
            .await
            .expect(201)
            .id(),
    );
    assert!(len(&journal(&file)) > 0 && len(&journal(&file)) < 20_000);
    drop(c);
    let c = Client::on(FakeNsxManager::open(config(&file)).unwrap());
    for id in &ids {
        c.get(&format!("logical-switches/{id}")).await.expect(200);
    }
    let found = c
        .get("search?query=display_name:big-1000")
        .await
        .expect(200)
        .body;
    assert_eq!(found["result_count"], 1, "{found}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn a_torn_last_entry_is_dropped_and_damage_before_it_is_refused() {
    let dir = fresh_dir("torn");
    let file = dir.join("nsx.json");
    let c = Client::on(FakeNsxManager::open(config(&file)).unwrap());
    let tz = c.boot().transport_zone;
    let body =
        |name: &str| json!({"transport_zone_id": tz, "admin_state": "UP", "display_name": name});
    let a = c.post("logical-switches", body("a")).await.expect(201).id();
    let b = c.post("logical-switches", body("b")).await.expect(201).id();
    drop(c);
    let whole = std::fs::read(journal(&file)).unwrap();
    // A crash half way through appending a third entry.
    let mut torn = whole.clone();
    torn.extend_from_slice(br#"0123456789abcdef {"seq":99,"user":"adm"#);
    std::fs::write(journal(&file), &torn).unwrap();
    // A damaged byte inside the first of the two whole entries: refused, naming the journal.
    let mut damaged = whole.clone();
    damaged[40] ^= 0x01;
    std::fs::write(journal(&file), &damaged).unwrap();
    let err = FakeNsxManager::open(config(&file))
        .err()
        .expect("a damaged entry with entries after it must not load");
    assert!(
        err.contains("nsx.json.journal")
            && err.contains("byte 0")
            && err.contains("entries follow"),
        "{err}"
    );
    std::fs::write(journal(&file), &torn).unwrap();
    let c = Client::on(FakeNsxManager::open(config(&file)).unwrap());
    c.get(&format!("logical-switches/{a}")).await.expect(200);
    c.get(&format!("logical-switches/{b}")).await.expect(200);
    // The load folded the journal (and dropped the torn entry) into a new snapshot.
    assert_eq!(len(&journal(&file)), 0);
    let d = c.post("logical-switches", body("d")).await.expect(201).id();
    drop(c);
    let c = Client::on(FakeNsxManager::open(config(&file)).unwrap());
    for id in [&a, &b, &d] {
        c.get(&format!("logical-switches/{id}")).await.expect(200);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

fn start(state: &Path) -> (Child, String) {
    let args = ["--rate-limit", "0", "--concurrency-limit", "0", "--state"];
    let mut args: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
    args.push(state.as_os_str());
    common::start_binary(&args)
}

/// One HTTP/1.1 request on its own connection; the status and body, or `None` when the server
/// went away before answering.
fn request(addr: &str, method: &str, path: &str, body: &str) -> Option<(u16, Value)> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let req = format!(
        "{method} {path} HTTP/1.1\r\nhost: nsx\r\nauthorization: {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        common::basic("admin", "admin"),
        body.len()
    );
    s.write_all(req.as_bytes()).ok()?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).ok()?;
    let text = String::from_utf8_lossy(&out);
    let status = text.split(' ').nth(1)?.parse().ok()?;
    let json = text.split("\r\n\r\n").nth(1).unwrap_or("");
    Some((status, serde_json::from_str(json).unwrap_or(Value::Null)))
}

#[test]
fn every_answered_write_survives_a_kill_9() {
    let dir = fresh_dir("kill9");
    let file = dir.join("nsx.json");
    let (mut child, addr) = start(&file);
    let (_, tzs) = request(&addr, "GET", "/api/v1/transport-zones", "").unwrap();
    let tz = tzs["results"][0]["id"].as_str().unwrap().to_string();
    let acked = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let (addr, tz, acked, stop) = (addr.clone(), tz.clone(), acked.clone(), stop.clone());
            std::thread::spawn(move || {
                for i in 0.. {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let body = json!({"transport_zone_id": tz, "admin_state": "UP", "display_name": format!("w{w}-{i}")});
                    match request(&addr, "POST", "/api/v1/logical-switches", &body.to_string()) {
                        Some((201, v)) => acked.lock().unwrap().push(v["id"].as_str().unwrap().to_string()),
                        Some((status, v)) => panic!("write answered {status}: {v}"),
                        None => break,
                    }
                }
            })
        })
        .collect();
    // Let the writers get going, then SIGKILL the manager in the middle of their writes.
    while acked.lock().unwrap().len() < 200 {
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    stop.store(true, Ordering::SeqCst);
    for w in writers {
        w.join().unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    let (mut child, addr) = start(&file);
    let (status, all) =
        request(&addr, "GET", "/api/v1/logical-switches?page_size=1000", "").unwrap();
    assert_eq!(status, 200);
    let have: std::collections::BTreeSet<&str> = all["results"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["id"].as_str())
        .collect();
    let lost: Vec<&String> = acked
        .iter()
        .filter(|id| !have.contains(id.as_str()))
        .collect();
    assert!(
        lost.is_empty(),
        "{} of {} answered writes lost: {lost:?}",
        lost.len(),
        acked.len()
    );
    child.kill().unwrap();
    child.wait().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}
