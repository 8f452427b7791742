//! Kubernetes label selectors: matched with kube-core's [`Selector`] (as the apiserver
//! evaluates them), and expanded into the tag criteria an NSGroup can hold.
//!
//! NCP evaluates selectors itself where NSX tag criteria cannot express them (NotIn,
//! DoesNotExist, namespace selectors joined with pod selectors), and to resolve named ports.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::core::{Selector, SelectorExt};

/// A selector ready to match many label sets: kube-core's [`Selector`], built once per
/// selector rather than once per object it is matched against.
#[derive(Debug, Clone)]
pub struct Compiled(Option<Selector>);

impl Compiled {
    /// `None` inside for a selector the apiserver refuses (an unknown operator, `In` or `NotIn`
    /// without values): only a corrupted object carries one, and it selects nothing.
    pub fn new(selector: &LabelSelector) -> Self {
        Compiled(Selector::try_from(selector.clone()).ok())
    }

    /// Whether `labels` satisfy the selector. An empty selector selects everything.
    pub fn matches(&self, labels: Option<&BTreeMap<String, String>>) -> bool {
        static NONE: BTreeMap<String, String> = BTreeMap::new();
        self.0
            .as_ref()
            .is_some_and(|s| s.matches(labels.unwrap_or(&NONE)))
    }
}

/// A conjunction of label tests: `(key, Some(value))` or `(key, None)` for "key exists".
pub type Term = Vec<(String, Option<String>)>;

/// A selector as a disjunction of conjunctions of label tests, if it has no negation:
/// `(key, Some(value))` requires the label with that value, `(key, None)` only the key.
/// `None` when it uses NotIn or DoesNotExist (or an unknown operator), or when the
/// disjunction would exceed `max_terms`.
pub fn positive_dnf(selector: &LabelSelector, max_terms: usize) -> Option<Vec<Term>> {
    let mut terms: Vec<Term> = vec![Vec::new()];
    for (k, v) in selector.match_labels.iter().flatten() {
        for t in &mut terms {
            t.push((k.clone(), Some(v.clone())));
        }
    }
    for e in selector.match_expressions.iter().flatten() {
        match e.operator.as_str() {
            "Exists" => {
                for t in &mut terms {
                    t.push((e.key.clone(), None));
                }
            }
            "In" => {
                let values = e.values.as_deref().unwrap_or(&[]);
                let mut next = Vec::new();
                for t in &terms {
                    for v in values {
                        let mut t = t.clone();
                        t.push((e.key.clone(), Some(v.clone())));
                        next.push(t);
                    }
                }
                if next.len() > max_terms {
                    return None;
                }
                terms = next;
            }
            _ => return None,
        }
    }
    for t in &mut terms {
        t.sort();
        t.dedup();
    }
    terms.sort();
    terms.dedup();
    Some(terms)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matches(selector: &LabelSelector, labels: Option<&BTreeMap<String, String>>) -> bool {
        Compiled::new(selector).matches(labels)
    }
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn req(key: &str, op: &str, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: (!values.is_empty()).then(|| values.iter().map(|v| v.to_string()).collect()),
        }
    }

    #[test]
    fn operators_follow_kubernetes() {
        let sel = LabelSelector {
            match_labels: Some(labels(&[("app", "web")])),
            match_expressions: Some(vec![
                req("tier", "In", &["a", "b"]),
                req("env", "NotIn", &["prod"]),
                req("debug", "DoesNotExist", &[]),
                req("team", "Exists", &[]),
            ]),
        };
        let ok = labels(&[("app", "web"), ("tier", "b"), ("team", "x")]);
        assert!(matches(&sel, Some(&ok)));
        let mut prod = ok.clone();
        prod.insert("env".into(), "prod".into());
        assert!(!matches(&sel, Some(&prod)));
        let mut dbg = ok.clone();
        dbg.insert("debug".into(), "1".into());
        assert!(!matches(&sel, Some(&dbg)));
        let mut c = ok.clone();
        c.insert("tier".into(), "c".into());
        assert!(!matches(&sel, Some(&c)));
        assert!(!matches(&sel, None));
        assert!(
            matches(&LabelSelector::default(), None),
            "empty selects all"
        );
        let bad = LabelSelector {
            match_expressions: Some(vec![req("a", "Gt", &["1"])]),
            ..Default::default()
        };
        assert!(!matches(&bad, Some(&labels(&[("a", "2")]))));
        // `In`/`NotIn` without values: refused by the apiserver, so it selects nothing.
        for op in ["In", "NotIn"] {
            let bare = LabelSelector {
                match_expressions: Some(vec![req("a", op, &[])]),
                ..Default::default()
            };
            assert!(!matches(&bare, Some(&labels(&[("b", "1")]))), "{op}");
        }
        let once = Compiled::new(&sel);
        assert!(once.matches(Some(&ok)) && !once.matches(Some(&prod)));
    }

    #[test]
    fn dnf_expands_in_and_refuses_negation() {
        let sel = LabelSelector {
            match_labels: Some(labels(&[("app", "web")])),
            match_expressions: Some(vec![
                req("tier", "In", &["a", "b"]),
                req("team", "Exists", &[]),
            ]),
        };
        let dnf = positive_dnf(&sel, 5).unwrap();
        assert_eq!(dnf.len(), 2);
        assert!(dnf[0].contains(&("team".into(), None)));
        assert!(dnf[1].contains(&("tier".into(), Some("b".into()))));
        assert!(positive_dnf(&sel, 1).is_none(), "too many terms");
        let neg = LabelSelector {
            match_expressions: Some(vec![req("env", "NotIn", &["prod"])]),
            ..Default::default()
        };
        assert!(positive_dnf(&neg, 5).is_none());
        assert_eq!(
            positive_dnf(&LabelSelector::default(), 5),
            Some(vec![vec![]])
        );
    }
}
