//! The converge check compares content, not only which objects exist: one changed tag, one
//! reordered firewall rule and one missing NSGroup criterion each make a converged cluster
//! fail the check, with the object and the field named. NCP then puts each back at its next
//! resync, and the check passes again.

use std::path::Path;

use nsx_sim::scenario::run::{RunOptions, run};
use nsx_sim::scenario::spec::parse;
use nsx_sim::scenario::world::World;
use serde_json::Value;

const CLUSTER: &str = r#"
name: content
steps:
  - apply: |
      apiVersion: v1
      kind: Namespace
      metadata: {name: x, labels: {ns: x}}
      ---
      apiVersion: v1
      kind: Pod
      metadata: {name: a, namespace: x, labels: {pod: a}}
      spec: {containers: [{name: c, image: x, ports: [{containerPort: 80}, {containerPort: 443}]}]}
      ---
      apiVersion: v1
      kind: Pod
      metadata: {name: b, namespace: x, labels: {pod: b}}
      spec: {containers: [{name: c, image: x, ports: [{containerPort: 80}, {containerPort: 443}]}]}
      ---
      apiVersion: networking.k8s.io/v1
      kind: NetworkPolicy
      metadata: {name: p, namespace: x}
      spec:
        podSelector: {matchLabels: {pod: a}}
        ingress:
          - from: [{podSelector: {matchLabels: {pod: b}}}]
            ports: [{port: 80}]
          - from: [{podSelector: {matchLabels: {pod: b}}}]
            ports: [{port: 443}]
  - converge: {within: 60s}
"#;

/// A converged world of the cluster above.
fn converged_world() -> World {
    let sc = parse(Path::new("content.yaml"), CLUSTER).expect("scenario parses");
    let (report, w) = run(&sc, 1, &RunOptions::default());
    assert!(report.passed, "{:?}", report.message);
    let w = w.expect("a world");
    w.converged().expect("converged before the edit");
    w
}

fn call(w: &World, method: &str, path: &str, body: Option<&Value>) -> Value {
    let r = w.nsx.as_admin(method, path, &[], body);
    assert!(r.is_success(), "{method} {path}: {} {}", r.status, r.body);
    r.body
}

/// Runs the simulation past NCP's periodic resync (300 s), which repairs what others changed.
fn past_resync(w: &mut World) {
    let until = w.now_ms() + 310_000;
    while w.now_ms() < until {
        w.step().expect("the simulation runs");
        w.endpoints_controller();
    }
    if let Err(e) = w.converged() {
        for l in w.trace.lines().iter().rev().take(40) {
            eprintln!("{l}");
        }
        panic!("NCP did not put it back at its resync: {e}");
    }
}

/// The first object of `collection` whose display name contains `name`.
fn find(w: &World, collection: &str, name: &str) -> Value {
    let list = call(w, "GET", &format!("/api/v1/{collection}"), None);
    list["results"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|d| d["display_name"].as_str().is_some_and(|n| n.contains(name)))
        .cloned()
        .unwrap_or_else(|| panic!("no {collection} named like {name}"))
}

#[test]
fn one_changed_tag_fails_converge() {
    let mut w = converged_world();
    let mut port = find(&w, "logical-ports", "k8s-a-x-a");
    for t in port["tags"].as_array_mut().expect("tags") {
        if t["scope"] == "pod" {
            t["tag"] = "c".into();
        }
    }
    let id = port["id"].as_str().expect("id").to_string();
    call(
        &w,
        "PUT",
        &format!("/api/v1/logical-ports/{id}"),
        Some(&port),
    );
    let e = w.converged().expect_err("a changed tag is not converged");
    assert!(e.contains("PodPort") && e.contains("tags"), "{e}");
    assert!(
        e.contains(r#""tag":"a""#) && e.contains(r#""tag":"c""#),
        "{e}"
    );
    past_resync(&mut w);
}

#[test]
fn one_reordered_rule_fails_converge() {
    let mut w = converged_world();
    let section = find(&w, "firewall/sections", "k8s-a-x-p");
    let id = section["id"].as_str().expect("id").to_string();
    let rules = call(
        &w,
        "GET",
        &format!("/api/v1/firewall/sections/{id}/rules"),
        None,
    );
    let mut rules = rules["results"].as_array().cloned().expect("rules");
    assert_eq!(rules.len(), 2, "the allow section has two rules");
    rules.reverse();
    let mut body = section.clone();
    body["rules"] = Value::Array(rules);
    let r = w.nsx.as_admin(
        "POST",
        &format!("/api/v1/firewall/sections/{id}"),
        &[("action", "update_with_rules")],
        Some(&body),
    );
    assert!(r.is_success(), "{} {}", r.status, r.body);
    let e = w
        .converged()
        .expect_err("a reordered rule is not converged");
    assert!(e.contains("AllowSection") && e.contains("rules[0]"), "{e}");
    past_resync(&mut w);
}

#[test]
fn one_missing_group_criterion_fails_converge() {
    let mut w = converged_world();
    // A group of the policy's, selected by tag criteria (the pods it applies to).
    let list = call(&w, "GET", "/api/v1/ns-groups", None);
    let mut group = list["results"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|g| {
            g["display_name"]
                .as_str()
                .is_some_and(|n| n.starts_with("k8s-a-x-p"))
                && g["membership_criteria"]
                    .as_array()
                    .is_some_and(|c| !c.is_empty())
        })
        .cloned()
        .expect("a policy group with criteria");
    group["membership_criteria"] = Value::Array(vec![]);
    let id = group["id"].as_str().expect("id").to_string();
    call(&w, "PUT", &format!("/api/v1/ns-groups/{id}"), Some(&group));
    let e = w
        .converged()
        .expect_err("a missing criterion is not converged");
    assert!(
        e.contains("PolicyGroup") && e.contains("membership_criteria"),
        "{e}"
    );
    past_resync(&mut w);
}

/// The policy oracle sees a dataplane that disagrees with the Kubernetes rules: an admin
/// empties the NSGroup a policy's rule admits, so the pod it admits is blocked; the step
/// `expect: {policy_oracle: false}` holds, `true` fails with the cell named, and once NCP has
/// put the group back both the converge and the oracle pass.
#[test]
fn the_policy_oracle_catches_a_dataplane_that_disagrees() {
    let edited = format!(
        "{CLUSTER}{}",
        r#"  - fault: {admin_edit: {resource_type: NSGroup, name_contains: k8s-a-x-p-in0-0, set: {membership_criteria: []}}}
  - expect: {policy_oracle: false}
  - converge: {within: 60s}
  - expect: {policy_oracle: true, converged: true}
"#
    );
    let sc = parse(Path::new("oracle.yaml"), &edited).expect("scenario parses");
    let (report, _) = run(&sc, 1, &RunOptions::default());
    assert!(report.passed, "{:?}", report.message);

    let wrong = format!(
        "{CLUSTER}{}",
        r#"  - fault: {admin_edit: {resource_type: NSGroup, name_contains: k8s-a-x-p-in0-0, set: {membership_criteria: []}}}
  - expect: {policy_oracle: true}
"#
    );
    let sc = parse(Path::new("oracle.yaml"), &wrong).expect("scenario parses");
    let (report, _) = run(&sc, 1, &RunOptions::default());
    assert!(!report.passed);
    let m = report.message.unwrap_or_default();
    assert!(
        m.contains("TCP 80:") && m.contains("x/b") && m.contains(".!"),
        "{m}"
    );
    assert!(
        !m.contains("TCP 443:"),
        "443 is still blocked as the rules say: {m}"
    );
}
