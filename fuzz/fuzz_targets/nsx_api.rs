//! Every NSX request body through the dispatcher: a sequence of requests (`METHOD path`, a
//! newline, the body; requests separated by a NUL byte) against a bootstrapped manager. Each
//! answer is an HTTP status with a JSON body; a refused request changes nothing, and the
//! store's invariants hold after every request.
#![no_main]

use std::sync::OnceLock;

use fake_nsx_manager::dispatch::{ApiRequest, dispatch, parse_query};
use fake_nsx_manager::store::{Ctx, Store};
use fake_nsx_manager::{FakeNsxManager, ManagerConfig};
use libfuzzer_sys::fuzz_target;

/// The bootstrapped store every input starts from (bootstrapping once, not per input).
fn template() -> &'static Store {
    static T: OnceLock<Store> = OnceLock::new();
    T.get_or_init(|| FakeNsxManager::new(ManagerConfig::default()).with_store(Store::clone))
}

fuzz_target!(|data: &[u8]| {
    let mut store = template().clone();
    let ctx = Ctx::admin(1_767_225_600_000);
    for request in data.split(|b| *b == 0).take(16) {
        let (head, body) = match request.iter().position(|b| *b == b'\n') {
            Some(i) => (&request[..i], &request[i + 1..]),
            None => (request, &[][..]),
        };
        let Ok(head) = std::str::from_utf8(head) else {
            continue;
        };
        let (method, target) = head.split_once(' ').unwrap_or(("GET", head));
        let (path, raw_query) = target.split_once('?').unwrap_or((target, ""));
        let query = parse_query(raw_query);
        let before = store.clone();
        let answer = dispatch(
            &mut store,
            &ctx,
            &ApiRequest {
                method,
                path,
                query: &query,
                body,
            },
        );
        assert!(
            (200..600).contains(&answer.status),
            "status {} for {head}",
            answer.status
        );
        if answer.status >= 400 {
            let (a, b) = (
                serde_json::to_string(&before).ok(),
                serde_json::to_string(&store).ok(),
            );
            assert!(
                a == b,
                "{method} {path} was refused ({}) but changed the store",
                answer.status
            );
        }
        if let Err(e) = store.check_invariants() {
            panic!("after {head}: {e}");
        }
    }
});
