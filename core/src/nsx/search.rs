//! Building search queries the way NSX clients write them.
//!
//! NSX's search takes a Lucene query string. Reserved characters in a term must be escaped with
//! a backslash (`ncp\/cluster`, `k8s\-a`); clients that escape and clients that do not
//! (vmware-nsxlib 19.x sends `/` and `-` bare) both work against the real manager, and this
//! module escapes, which is the form that cannot be misread.

use super::model::Tag;

/// Escapes every Lucene reserved character of a term.
pub fn escape_term(term: &str) -> String {
    let mut out = String::with_capacity(term.len() + 4);
    for c in term.chars() {
        if matches!(
            c,
            '+' | '-'
                | '&'
                | '|'
                | '!'
                | '('
                | ')'
                | '{'
                | '}'
                | '['
                | ']'
                | '^'
                | '"'
                | '~'
                | '*'
                | '?'
                | ':'
                | '\\'
                | '/'
                | ' '
        ) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// `resource_type:X AND tags.scope:S AND tags.tag:T ...`.
///
/// Beware NSX's semantics: `tags.scope:S AND tags.tag:T` matches an object with any tag of scope
/// S and any tag of value T, not necessarily one tag with both. Callers that need the pair check
/// the tag on the objects returned.
pub fn by_tags(resource_type: Option<&str>, tags: &[Tag]) -> String {
    let mut parts = Vec::new();
    if let Some(rt) = resource_type {
        parts.push(format!("resource_type:{}", escape_term(rt)));
    }
    for t in tags {
        if !t.scope.is_empty() {
            parts.push(format!("tags.scope:{}", escape_term(&t.scope)));
        }
        if !t.tag.is_empty() {
            parts.push(format!("tags.tag:{}", escape_term(&t.tag)));
        }
    }
    parts.join(" AND ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_slash_and_dash_like_nsx_clients_do() {
        assert_eq!(escape_term("ncp/cluster"), "ncp\\/cluster");
        assert_eq!(escape_term("k8s-a"), "k8s\\-a");
        assert_eq!(
            by_tags(Some("LogicalPort"), &[Tag::new("ncp/cluster", "k8s-a")]),
            "resource_type:LogicalPort AND tags.scope:ncp\\/cluster AND tags.tag:k8s\\-a"
        );
    }
}
