//! The search API's query language and index.
//!
//! **Query language** (the Lucene subset NSX clients send): `field:value` terms, `AND`/`OR`/`NOT`
//! (also `&&`, `||`, `!`), parentheses, `field:(a OR b)`, quoted phrases, `*` and `?`
//! wildcards, and backslash escapes (`ncp\/cluster`). Adjacent terms without an operator are
//! ORed, Lucene's default. Values match case-insensitively. A bare term matches any field.
//!
//! **Index**: every object is flattened into `(path, value)` pairs: nested objects give dotted
//! paths, array elements share their array's path, so an object's tags give `tags.scope` and
//! `tags.tag` pairs (which is why `tags.scope:X AND tags.tag:Y` matches any tag of scope X and
//! any tag of value Y, not one tag with both, exactly as NSX does). An inverted map from path to
//! value to ids answers a term in O(log n).
//!
//! **Cost**: AND iterates the smallest operand and probes the others, so a selective term
//! (one pod's tag) answers in time proportional to its own matches, not to the store's size.
//! Wildcards cost the number of distinct values of their field; OR and top-level NOT
//! materialize their result.
//!
//! **Lag**: writes become visible after `lag_ms` (`pending` holds them until then), and a
//! search returns the document as it was indexed, as the real manager's search does.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde_json::{Map, Value};

/// A parsed query.
#[derive(Debug, Clone, PartialEq)]
pub enum Query {
    /// `field:pattern`; `field` None for a bare term. The pattern is lower-cased and unescaped;
    /// `wildcard` says whether it contains unescaped `*`/`?` (kept as `\u{1}`/`\u{2}`).
    Term {
        field: Option<String>,
        pattern: String,
        wildcard: bool,
    },
    And(Vec<Query>),
    Or(Vec<Query>),
    Not(Box<Query>),
}

const STAR: char = '\u{1}';
const QMARK: char = '\u{2}';

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    LParen,
    RParen,
    And,
    Or,
    Not,
    /// A word (already unescaped, wildcards marked) and whether it ended with an unescaped ':'.
    Word {
        text: String,
        wildcard: bool,
        field: bool,
    },
}

fn tokenize(q: &str) -> Result<Vec<Tok>, String> {
    let chars: Vec<char> = q.chars().collect();
    let mut toks = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            c if c.is_whitespace() => i += 1,
            '(' => {
                toks.push(Tok::LParen);
                i += 1;
            }
            ')' => {
                toks.push(Tok::RParen);
                i += 1;
            }
            '&' if chars.get(i + 1) == Some(&'&') => {
                toks.push(Tok::And);
                i += 2;
            }
            '|' if chars.get(i + 1) == Some(&'|') => {
                toks.push(Tok::Or);
                i += 2;
            }
            '!' => {
                toks.push(Tok::Not);
                i += 1;
            }
            '"' => {
                let start = i;
                i += 1;
                let mut text = String::new();
                loop {
                    match chars.get(i) {
                        None => return Err(format!("unterminated quote at position {start}")),
                        Some('"') => {
                            i += 1;
                            break;
                        }
                        Some('\\') => {
                            if let Some(n) = chars.get(i + 1) {
                                text.push(*n);
                            }
                            i += 2;
                        }
                        Some(ch) => {
                            text.push(*ch);
                            i += 1;
                        }
                    }
                }
                toks.push(Tok::Word {
                    text,
                    wildcard: false,
                    field: false,
                });
            }
            _ => {
                let mut text = String::new();
                let mut wildcard = false;
                let mut field = false;
                while i < chars.len() {
                    let ch = chars[i];
                    if ch == '\\' {
                        match chars.get(i + 1) {
                            Some(n) => text.push(*n),
                            None => return Err("query ends with a lone backslash".into()),
                        }
                        i += 2;
                        continue;
                    }
                    if ch.is_whitespace() || ch == '(' || ch == ')' || ch == '"' {
                        break;
                    }
                    if ch == ':' {
                        field = true;
                        i += 1;
                        break;
                    }
                    if ch == '*' {
                        wildcard = true;
                        text.push(STAR);
                    } else if ch == '?' {
                        wildcard = true;
                        text.push(QMARK);
                    } else {
                        text.push(ch);
                    }
                    i += 1;
                }
                let tok = match (text.as_str(), field) {
                    ("AND", false) => Tok::And,
                    ("OR", false) => Tok::Or,
                    ("NOT", false) => Tok::Not,
                    _ => Tok::Word {
                        text,
                        wildcard,
                        field,
                    },
                };
                toks.push(tok);
            }
        }
    }
    Ok(toks)
}

/// Parses a query string. The error names what is wrong and where.
pub fn parse(q: &str) -> Result<Query, String> {
    let toks = tokenize(q)?;
    if toks.is_empty() {
        return Err("the query is empty".into());
    }
    let mut p = Parser {
        toks,
        pos: 0,
        depth: 0,
    };
    let query = p.or_expr(None)?;
    if p.pos != p.toks.len() {
        return Err(format!("unexpected {:?} at token {}", p.toks[p.pos], p.pos));
    }
    Ok(query)
}

/// How deep parentheses and `NOT`s may nest. The parser and the evaluator recurse once per
/// level, so without a bound one request of a few thousand `(` or `!` overflows the stack and
/// takes the manager down. Real queries nest two or three levels; Lucene's own limit is the
/// JVM stack, which NSX turns into a 400.
pub const MAX_NESTING: usize = 64;

struct Parser {
    toks: Vec<Tok>,
    pos: usize,
    depth: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos)
    }

    fn or_expr(&mut self, field: Option<&str>) -> Result<Query, String> {
        let mut parts = vec![self.and_expr(field)?];
        loop {
            match self.peek() {
                Some(Tok::Or) => {
                    self.pos += 1;
                    parts.push(self.and_expr(field)?);
                }
                // Lucene's default operator: adjacent clauses are ORed.
                Some(Tok::Word { .. }) | Some(Tok::LParen) | Some(Tok::Not) => {
                    parts.push(self.and_expr(field)?)
                }
                _ => break,
            }
        }
        Ok(if parts.len() == 1 {
            parts.remove(0)
        } else {
            Query::Or(parts)
        })
    }

    fn and_expr(&mut self, field: Option<&str>) -> Result<Query, String> {
        let mut parts = vec![self.unary(field)?];
        while let Some(Tok::And) = self.peek() {
            self.pos += 1;
            parts.push(self.unary(field)?);
        }
        Ok(if parts.len() == 1 {
            parts.remove(0)
        } else {
            Query::And(parts)
        })
    }

    fn unary(&mut self, field: Option<&str>) -> Result<Query, String> {
        self.depth += 1;
        let q = if self.depth > MAX_NESTING {
            Err(format!(
                "the query nests parentheses and NOT deeper than {MAX_NESTING} levels (at token {})",
                self.pos
            ))
        } else {
            self.unary_at_depth(field)
        };
        self.depth -= 1;
        q
    }

    fn unary_at_depth(&mut self, field: Option<&str>) -> Result<Query, String> {
        match self.toks.get(self.pos).cloned() {
            Some(Tok::Not) => {
                self.pos += 1;
                Ok(Query::Not(Box::new(self.unary(field)?)))
            }
            Some(Tok::LParen) => {
                self.pos += 1;
                let q = self.or_expr(field)?;
                match self.peek() {
                    Some(Tok::RParen) => {
                        self.pos += 1;
                        Ok(q)
                    }
                    _ => Err(format!("missing ')' at token {}", self.pos)),
                }
            }
            Some(Tok::Word {
                text,
                wildcard,
                field: true,
            }) => {
                if wildcard {
                    return Err(format!(
                        "wildcards are not allowed in a field name ({text})"
                    ));
                }
                self.pos += 1;
                match self.toks.get(self.pos).cloned() {
                    Some(Tok::Word {
                        text: value,
                        wildcard,
                        field: false,
                    }) => {
                        self.pos += 1;
                        Ok(term(Some(&text), &value, wildcard))
                    }
                    Some(Tok::LParen) => {
                        self.pos += 1;
                        let q = self.or_expr(Some(&text))?;
                        match self.peek() {
                            Some(Tok::RParen) => {
                                self.pos += 1;
                                Ok(q)
                            }
                            _ => Err(format!("missing ')' after {text}:(")),
                        }
                    }
                    _ => Err(format!("field '{text}' has no value")),
                }
            }
            Some(Tok::Word { text, wildcard, .. }) => {
                self.pos += 1;
                Ok(term(field, &text, wildcard))
            }
            Some(t) => Err(format!("unexpected {t:?} at token {}", self.pos)),
            None => Err("the query ends where a term was expected".into()),
        }
    }
}

fn term(field: Option<&str>, value: &str, wildcard: bool) -> Query {
    Query::Term {
        field: field.map(str::to_string),
        pattern: value.to_lowercase(),
        wildcard,
    }
}

/// `*` and `?` glob over chars (marked as `STAR`/`QMARK`).
fn glob(pattern: &[char], text: &[char]) -> bool {
    let (mut p, mut t) = (0, 0);
    let (mut star_p, mut star_t) = (usize::MAX, 0);
    while t < text.len() {
        if p < pattern.len() && (pattern[p] == QMARK || pattern[p] == text[t]) {
            p += 1;
            t += 1;
        } else if p < pattern.len() && pattern[p] == STAR {
            star_p = p;
            star_t = t;
            p += 1;
        } else if star_p != usize::MAX {
            p = star_p + 1;
            star_t += 1;
            t = star_t;
        } else {
            return false;
        }
    }
    while p < pattern.len() && pattern[p] == STAR {
        p += 1;
    }
    p == pattern.len()
}

/// Flattens a document into `(path, lower-cased value)` pairs.
pub fn flatten(doc: &Map<String, Value>) -> BTreeSet<(String, String)> {
    fn walk(prefix: &str, v: &Value, out: &mut BTreeSet<(String, String)>, depth: usize) {
        if depth > 6 {
            return;
        }
        match v {
            Value::Object(m) => {
                for (k, v) in m {
                    let path = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&path, v, out, depth + 1);
                }
            }
            Value::Array(items) => {
                for item in items {
                    walk(prefix, item, out, depth + 1);
                }
            }
            Value::String(s) => {
                out.insert((prefix.to_string(), s.to_lowercase()));
            }
            Value::Number(n) => {
                out.insert((prefix.to_string(), n.to_string()));
            }
            Value::Bool(b) => {
                out.insert((prefix.to_string(), b.to_string()));
            }
            Value::Null => {}
        }
    }
    let mut out = BTreeSet::new();
    walk("", &Value::Object(doc.clone()), &mut out, 0);
    out
}

#[derive(Debug, Clone)]
enum Pending {
    Upsert(Arc<Map<String, Value>>),
    Delete,
}

/// An indexed document and the `(path, value)` pairs it was indexed under.
type IndexedDoc = (Arc<Map<String, Value>>, BTreeSet<(String, String)>);

/// The search index. See the module docs for its semantics and costs.
#[derive(Debug, Clone, Default)]
pub struct SearchIndex {
    docs: BTreeMap<String, IndexedDoc>,
    terms: BTreeMap<String, BTreeMap<String, BTreeSet<String>>>,
    all: BTreeSet<String>,
    pending: BTreeMap<(i64, u64), (String, Pending)>,
    seq: u64,
}

/// A set of ids, borrowed from the index when possible.
enum Hits<'a> {
    Ref(&'a BTreeSet<String>),
    Owned(BTreeSet<String>),
    /// Everything except the inner set.
    Not(Box<Hits<'a>>),
}

static EMPTY: BTreeSet<String> = BTreeSet::new();

impl Hits<'_> {
    fn contains(&self, id: &str) -> bool {
        match self {
            Hits::Ref(s) => s.contains(id),
            Hits::Owned(s) => s.contains(id),
            Hits::Not(inner) => !inner.contains(id),
        }
    }

    /// Size for choosing the driver of an intersection (complements are never drivers).
    fn len(&self) -> usize {
        match self {
            Hits::Ref(s) => s.len(),
            Hits::Owned(s) => s.len(),
            Hits::Not(_) => usize::MAX,
        }
    }
}

impl SearchIndex {
    /// Queues a write; it becomes searchable at `now_ms + lag_ms`.
    pub fn upsert(&mut self, id: &str, doc: Map<String, Value>, now_ms: i64, lag_ms: i64) {
        self.seq += 1;
        self.pending.insert(
            (now_ms + lag_ms.max(0), self.seq),
            (id.to_string(), Pending::Upsert(Arc::new(doc))),
        );
    }

    pub fn delete(&mut self, id: &str, now_ms: i64, lag_ms: i64) {
        self.seq += 1;
        self.pending.insert(
            (now_ms + lag_ms.max(0), self.seq),
            (id.to_string(), Pending::Delete),
        );
    }

    /// Applies every queued write that is due.
    pub fn catch_up(&mut self, now_ms: i64) {
        while let Some(entry) = self.pending.first_entry() {
            if entry.key().0 > now_ms {
                break;
            }
            let (id, op) = entry.remove();
            self.remove_doc(&id);
            if let Pending::Upsert(doc) = op {
                let pairs = flatten(&doc);
                for (path, value) in &pairs {
                    self.terms
                        .entry(path.clone())
                        .or_default()
                        .entry(value.clone())
                        .or_default()
                        .insert(id.clone());
                }
                self.all.insert(id.clone());
                self.docs.insert(id, (doc, pairs));
            }
        }
    }

    /// Writes not yet visible.
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    pub fn visible_len(&self) -> usize {
        self.docs.len()
    }

    fn remove_doc(&mut self, id: &str) {
        if let Some((_, pairs)) = self.docs.remove(id) {
            for (path, value) in pairs {
                if let Some(values) = self.terms.get_mut(&path) {
                    if let Some(ids) = values.get_mut(&value) {
                        ids.remove(id);
                        if ids.is_empty() {
                            values.remove(&value);
                        }
                    }
                    if values.is_empty() {
                        self.terms.remove(&path);
                    }
                }
            }
            self.all.remove(id);
        }
    }

    /// The ids matching `q`, in id order, and the indexed documents for them.
    pub fn search(&self, q: &Query) -> Vec<(String, Arc<Map<String, Value>>)> {
        let ids: Vec<String> = match self.eval(q) {
            Hits::Not(inner) => self
                .all
                .iter()
                .filter(|id| !inner.contains(id))
                .cloned()
                .collect(),
            Hits::Ref(s) => s.iter().cloned().collect(),
            Hits::Owned(s) => s.into_iter().collect(),
        };
        ids.into_iter()
            .filter_map(|id| self.docs.get(&id).map(|(d, _)| (id, d.clone())))
            .collect()
    }

    fn eval(&self, q: &Query) -> Hits<'_> {
        match q {
            Query::Term {
                field,
                pattern,
                wildcard,
            } => self.term(field.as_deref(), pattern, *wildcard),
            Query::Not(inner) => match self.eval(inner) {
                Hits::Not(x) => *x,
                other => Hits::Not(Box::new(other)),
            },
            Query::Or(parts) => {
                let mut out = BTreeSet::new();
                for p in parts {
                    match self.eval(p) {
                        Hits::Ref(s) => out.extend(s.iter().cloned()),
                        Hits::Owned(s) => out.extend(s),
                        n @ Hits::Not(_) => {
                            out.extend(self.all.iter().filter(|id| n.contains(id)).cloned())
                        }
                    }
                }
                Hits::Owned(out)
            }
            Query::And(parts) => {
                let mut hits: Vec<Hits<'_>> = parts.iter().map(|p| self.eval(p)).collect();
                hits.sort_by_key(Hits::len);
                let driver = hits.remove(0);
                let candidates: Box<dyn Iterator<Item = &String>> = match &driver {
                    Hits::Ref(s) => Box::new(s.iter()),
                    Hits::Owned(s) => Box::new(s.iter()),
                    Hits::Not(_) => Box::new(self.all.iter()),
                };
                let out: BTreeSet<String> = candidates
                    .filter(|id| driver.contains(id) && hits.iter().all(|h| h.contains(id)))
                    .cloned()
                    .collect();
                Hits::Owned(out)
            }
        }
    }

    fn term(&self, field: Option<&str>, pattern: &str, wildcard: bool) -> Hits<'_> {
        let fields: Vec<&BTreeMap<String, BTreeSet<String>>> = match field {
            Some(f) => self.terms.get(f).into_iter().collect(),
            None => self.terms.values().collect(),
        };
        if !wildcard && fields.len() <= 1 {
            return Hits::Ref(
                fields
                    .first()
                    .and_then(|values| values.get(pattern))
                    .unwrap_or(&EMPTY),
            );
        }
        let pat: Vec<char> = pattern.chars().collect();
        let mut out = BTreeSet::new();
        for values in fields {
            if wildcard {
                for (value, ids) in values {
                    let text: Vec<char> = value.chars().collect();
                    if glob(&pat, &text) {
                        out.extend(ids.iter().cloned());
                    }
                }
            } else if let Some(ids) = values.get(pattern) {
                out.extend(ids.iter().cloned());
            }
        }
        Hits::Owned(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn doc(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    fn index() -> SearchIndex {
        let mut ix = SearchIndex::default();
        ix.upsert(
            "p1",
            doc(json!({"id": "p1", "resource_type": "LogicalPort",
                "tags": [{"scope": "ncp/cluster", "tag": "k8s-a"}, {"scope": "ncp/pod", "tag": "web-1"}]})),
            0,
            0,
        );
        ix.upsert(
            "p2",
            doc(json!({"id": "p2", "resource_type": "LogicalPort",
                "tags": [{"scope": "ncp/cluster", "tag": "k8s-b"}, {"scope": "ncp/pod", "tag": "web-2"}]})),
            0,
            0,
        );
        ix.upsert(
            "s1",
            doc(
                json!({"id": "s1", "resource_type": "LogicalSwitch", "display_name": "k8s-a-shop",
                "tags": [{"scope": "ncp/cluster", "tag": "k8s-a"}]}),
            ),
            0,
            0,
        );
        ix.catch_up(0);
        ix
    }

    fn ids(ix: &SearchIndex, q: &str) -> Vec<String> {
        ix.search(&parse(q).unwrap())
            .into_iter()
            .map(|(id, _)| id)
            .collect()
    }

    #[test]
    fn escaped_and_unescaped_forms_match_alike() {
        let ix = index();
        let a = ids(
            &ix,
            r"resource_type:LogicalPort AND tags.scope:ncp\/cluster AND tags.tag:k8s\-a",
        );
        let b = ids(
            &ix,
            "resource_type:LogicalPort AND tags.scope:ncp/cluster AND tags.tag:k8s-a",
        );
        assert_eq!(a, vec!["p1"]);
        assert_eq!(a, b);
    }

    #[test]
    fn or_not_wildcards_grouping_and_case() {
        let ix = index();
        assert_eq!(ids(&ix, "resource_type:logicalport"), vec!["p1", "p2"]);
        assert_eq!(ids(&ix, "tags.tag:web\\-*"), vec!["p1", "p2"]);
        assert_eq!(ids(&ix, "tags.tag:web?1"), vec!["p1"]);
        assert_eq!(ids(&ix, "NOT resource_type:LogicalPort"), vec!["s1"]);
        assert_eq!(
            ids(&ix, "tags.tag:k8s\\-a AND NOT resource_type:LogicalSwitch"),
            vec!["p1"]
        );
        assert_eq!(ids(&ix, "id:(p1 OR s1)"), vec!["p1", "s1"]);
        assert_eq!(ids(&ix, "id:p1 id:p2"), vec!["p1", "p2"]);
        assert_eq!(ids(&ix, "display_name:\"k8s-a-shop\""), vec!["s1"]);
        assert_eq!(ids(&ix, "web-2"), vec!["p2"]);
        assert_eq!(
            ids(&ix, "(id:p1 || id:p2) && !tags.tag:web\\-2"),
            vec!["p1"]
        );
    }

    #[test]
    fn scope_and_tag_match_independently_like_nsx() {
        let ix = index();
        // p2 has a tag with scope ncp/pod and (another) tag with value k8s-b.
        assert_eq!(
            ids(&ix, "tags.scope:ncp\\/pod AND tags.tag:k8s\\-b"),
            vec!["p2"]
        );
    }

    #[test]
    fn writes_are_invisible_until_the_lag_passes_and_deletes_too() {
        let mut ix = index();
        ix.upsert(
            "p3",
            doc(json!({"id": "p3", "resource_type": "LogicalPort"})),
            100,
            500,
        );
        ix.catch_up(599);
        assert_eq!(ids(&ix, "id:p3"), Vec::<String>::new());
        ix.catch_up(600);
        assert_eq!(ids(&ix, "id:p3"), vec!["p3"]);
        ix.delete("p3", 700, 500);
        ix.catch_up(1000);
        assert_eq!(ids(&ix, "id:p3"), vec!["p3"]);
        ix.catch_up(1200);
        assert!(ids(&ix, "id:p3").is_empty());
        assert_eq!(ix.pending_len(), 0);
    }

    #[test]
    fn nesting_is_bounded_instead_of_overflowing_the_stack() {
        let deep = |n: usize| format!("{}a{}", "(".repeat(n), ")".repeat(n));
        assert!(parse(&deep(MAX_NESTING - 1)).is_ok());
        for q in [
            deep(2_100),
            "!".repeat(3_500) + "a",
            "NOT ".repeat(5_000) + "a",
            format!("tags.tag:{}a{}", "(".repeat(500), ")".repeat(500)),
        ] {
            let err = parse(&q).expect_err("a query nested thousands deep must be refused");
            assert!(err.contains("deeper than 64"), "{err}");
        }
    }

    #[test]
    fn bad_queries_are_rejected_with_a_reason() {
        for q in ["", "(id:a", "id:", "\"open", "a\\", "id:a AND", "i*d:x"] {
            assert!(parse(q).is_err(), "{q} parsed");
        }
    }
}
