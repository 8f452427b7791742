//! Field-by-field comparison of a document NSX holds with the body NCP would write now.
//!
//! Written apart from NCP's own drift check (`nsx_core::ncp::plan::drift`), on purpose: the
//! two answer the same question, and a check that shares its comparison with the code under
//! test cannot see that code's blind spots. Every field of the wanted body must be in NSX's
//! document with the same value; fields the manager adds (ids, revisions, member weights) are
//! not looked at. Lists compare in order, except the ones NSX treats as sets (tags, group
//! members and criteria, IPSet addresses, rule sources, destinations, services, applied-tos),
//! which compare as multisets of the fields NCP sets. A section's rules compare in order: NSX
//! evaluates them in order.

use serde_json::{Map, Value};

/// Fields whose lists are sets to NSX: compared without regard to order.
const SETS: &[&str] = &[
    "tags",
    "members",
    "membership_criteria",
    "expressions",
    "ip_addresses",
    "virtual_server_ids",
    "sources",
    "destinations",
    "applied_tos",
    "services",
    "destination_ports",
];

/// Where the document differs from the wanted body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    /// Dotted path of the field (`rules[1].action`, `tags`).
    pub field: String,
    pub wanted: String,
    pub held: String,
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: wanted {}, NSX holds {}",
            self.field, self.wanted, self.held
        )
    }
}

/// The first field of `want` that `have` does not hold as wanted.
pub fn compare(want: &Map<String, Value>, have: &Map<String, Value>) -> Option<Mismatch> {
    compare_object(want, have, "")
}

fn join(path: &str, field: &str) -> String {
    if path.is_empty() {
        field.to_string()
    } else {
        format!("{path}.{field}")
    }
}

fn compare_object(
    want: &Map<String, Value>,
    have: &Map<String, Value>,
    path: &str,
) -> Option<Mismatch> {
    for (field, w) in want {
        // Equal as JSON (the common case once converged): nothing to look into, no path built.
        if have.get(field) == Some(w) {
            continue;
        }
        let at = join(path, field);
        let Some(h) = have.get(field) else {
            return Some(Mismatch {
                field: at,
                wanted: w.to_string(),
                held: "nothing".into(),
            });
        };
        let m = match (w, h) {
            (Value::Array(w), Value::Array(h)) if SETS.contains(&field.as_str()) => {
                compare_set(w, h, &at)
            }
            _ => compare_value(w, h, &at),
        };
        if m.is_some() {
            return m;
        }
    }
    None
}

fn compare_value(want: &Value, have: &Value, path: &str) -> Option<Mismatch> {
    match (want, have) {
        (Value::Object(w), Value::Object(h)) => compare_object(w, h, path),
        (Value::Array(w), Value::Array(h)) => {
            if w.len() != h.len() {
                return Some(Mismatch {
                    field: path.to_string(),
                    wanted: format!("{} entries", w.len()),
                    held: format!("{} entries", h.len()),
                });
            }
            w.iter()
                .zip(h)
                .enumerate()
                .find_map(|(i, (w, h))| compare_value(w, h, &format!("{path}[{i}]")))
        }
        _ if want == have => None,
        _ => Some(Mismatch {
            field: path.to_string(),
            wanted: want.to_string(),
            held: have.to_string(),
        }),
    }
}

/// The union of the fields of `values`: what of an element of the held list is compared.
fn shape_of<'a>(values: impl IntoIterator<Item = &'a Value>) -> Value {
    let mut shape = Value::Null;
    for v in values {
        merge_shape(&mut shape, v);
    }
    shape
}

fn merge_shape(shape: &mut Value, v: &Value) {
    match v {
        Value::Object(o) => {
            if !shape.is_object() {
                *shape = Value::Object(Map::new());
            }
            if let Value::Object(s) = shape {
                for (k, x) in o {
                    merge_shape(s.entry(k.clone()).or_insert(Value::Null), x);
                }
            }
        }
        Value::Array(a) => {
            let mut inner = match shape {
                Value::Array(s) => s.pop().unwrap_or(Value::Null),
                _ => Value::Null,
            };
            for x in a {
                merge_shape(&mut inner, x);
            }
            *shape = Value::Array(vec![inner]);
        }
        _ => {
            if shape.is_null() {
                *shape = Value::Bool(true);
            }
        }
    }
}

/// `have` cut down to the fields of `shape`.
fn project(have: &Value, shape: &Value) -> Value {
    match (have, shape) {
        (Value::Object(h), Value::Object(s)) => Value::Object(
            h.iter()
                .filter_map(|(k, v)| s.get(k).map(|sk| (k.clone(), project(v, sk))))
                .collect(),
        ),
        (Value::Array(h), Value::Array(s)) => {
            let inner = s.first().cloned().unwrap_or(Value::Null);
            Value::Array(h.iter().map(|x| project(x, &inner)).collect())
        }
        _ => have.clone(),
    }
}

/// One text per value, with set-like lists sorted, so that equal sets read the same.
fn canonical(v: &Value, field: &str) -> String {
    match v {
        Value::Object(o) => {
            let inner: Vec<String> = o
                .iter()
                .map(|(k, x)| format!("{k:?}:{}", canonical(x, k)))
                .collect();
            format!("{{{}}}", inner.join(","))
        }
        Value::Array(a) => {
            let mut inner: Vec<String> = a.iter().map(|x| canonical(x, "")).collect();
            if SETS.contains(&field) {
                inner.sort();
            }
            format!("[{}]", inner.join(","))
        }
        _ => v.to_string(),
    }
}

fn compare_set(want: &[Value], have: &[Value], path: &str) -> Option<Mismatch> {
    let shape = shape_of(want);
    let mut w: Vec<String> = want.iter().map(|x| canonical(x, "")).collect();
    let mut h: Vec<String> = have
        .iter()
        .map(|x| canonical(&project(x, &shape), ""))
        .collect();
    w.sort();
    h.sort();
    if w == h {
        return None;
    }
    // Say what is missing and what is extra, not the whole list.
    let (mut missing, mut extra) = (Vec::new(), Vec::new());
    let (mut i, mut j) = (0, 0);
    while i < w.len() || j < h.len() {
        match (w.get(i), h.get(j)) {
            (Some(a), Some(b)) if a == b => {
                i += 1;
                j += 1;
            }
            (Some(a), Some(b)) if a < b => {
                missing.push(a.clone());
                i += 1;
            }
            (Some(a), None) => {
                missing.push(a.clone());
                i += 1;
            }
            (_, Some(b)) => {
                extra.push(b.clone());
                j += 1;
            }
            (None, None) => break,
        }
    }
    Some(Mismatch {
        field: path.to_string(),
        wanted: format!("also [{}]", missing.join(", ")),
        held: format!("also [{}]", extra.join(", ")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(o) => o,
            _ => panic!("not an object"),
        }
    }

    #[test]
    fn fields_the_manager_adds_are_not_looked_at() {
        let want = obj(
            json!({"display_name": "a", "members": [{"ip_address": "10.0.0.1", "port": "80"}]}),
        );
        let have = obj(json!({"display_name": "a", "id": "x", "_revision": 3,
            "members": [{"ip_address": "10.0.0.1", "port": "80", "weight": 1, "admin_state": "ENABLED"}]}));
        assert_eq!(compare(&want, &have), None);
    }

    #[test]
    fn sets_ignore_order_and_ordered_lists_do_not() {
        let want = obj(
            json!({"tags": [{"scope": "a", "tag": "1"}, {"scope": "b", "tag": "2"}],
            "rules": [{"action": "ALLOW"}, {"action": "DROP"}]}),
        );
        let have = obj(
            json!({"tags": [{"scope": "b", "tag": "2"}, {"scope": "a", "tag": "1"}],
            "rules": [{"action": "ALLOW", "id": "r1"}, {"action": "DROP", "id": "r2"}]}),
        );
        assert_eq!(compare(&want, &have), None);
        let swapped = obj(
            json!({"tags": [{"scope": "a", "tag": "1"}, {"scope": "b", "tag": "2"}],
            "rules": [{"action": "DROP"}, {"action": "ALLOW"}]}),
        );
        let m = compare(&want, &swapped).expect("reordered rules differ");
        assert_eq!(m.field, "rules[0].action");
    }

    #[test]
    fn a_missing_set_member_is_named() {
        let want = obj(json!({"tags": [{"scope": "a", "tag": "1"}, {"scope": "pod", "tag": "b"}]}));
        let have = obj(json!({"tags": [{"scope": "a", "tag": "1"}, {"scope": "pod", "tag": "c"}]}));
        let m = compare(&want, &have).expect("a tag differs");
        assert_eq!(m.field, "tags");
        assert!(m.wanted.contains(r#""tag":"b""#), "{m}");
        assert!(m.held.contains(r#""tag":"c""#), "{m}");
        let fewer = obj(json!({"tags": [{"scope": "a", "tag": "1"}]}));
        assert!(compare(&want, &fewer).is_some());
        let twice = obj(
            json!({"tags": [{"scope": "a", "tag": "1"}, {"scope": "a", "tag": "1"}, {"scope": "pod", "tag": "b"}]}),
        );
        assert!(compare(&want, &twice).is_some(), "a multiset, not a set");
    }

    #[test]
    fn nested_sets_and_missing_fields() {
        let want = obj(
            json!({"membership_criteria": [{"resource_type": "NSGroupComplexExpression",
            "expressions": [{"scope": "a", "tag": "1"}, {"scope": "b", "tag": "2"}]}]}),
        );
        let have = obj(
            json!({"membership_criteria": [{"resource_type": "NSGroupComplexExpression",
            "expressions": [{"scope": "b", "tag": "2", "target_type": "LogicalPort"}, {"scope": "a", "tag": "1"}]}]}),
        );
        assert_eq!(compare(&want, &have), None);
        let want = obj(json!({"attachment": {"context": {"traffic_tag": 5}}}));
        let have = obj(json!({"attachment": {"context": {}}}));
        let m = compare(&want, &have).expect("missing field");
        assert_eq!(m.field, "attachment.context.traffic_tag");
        assert_eq!(m.held, "nothing");
    }
}
