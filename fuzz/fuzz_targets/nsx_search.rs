//! The NSX search query (`GET /api/v1/search?query=`): any text is parsed into a query or
//! refused with a reason, never a panic or a stack overflow; a parsed query evaluates over a
//! small index.
#![no_main]

use fake_nsx_manager::search::{SearchIndex, parse};
use libfuzzer_sys::fuzz_target;
use serde_json::json;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(query) = parse(text) else {
        return;
    };
    let mut index = SearchIndex::default();
    for (id, doc) in [
        (
            "a",
            json!({"resource_type": "LogicalSwitch", "display_name": "web-1",
                     "tags": [{"scope": "ncp/cluster", "tag": "k8s-a"}]}),
        ),
        (
            "b",
            json!({"resource_type": "LogicalPort", "display_name": "p",
                     "tags": [{"scope": "ncp/pod_uid", "tag": "u-1"}]}),
        ),
    ] {
        if let serde_json::Value::Object(m) = doc {
            index.upsert(id, m, 0, 0);
        }
    }
    index.catch_up(0);
    let hits = index.search(&query);
    assert!(hits.len() <= 2);
});
