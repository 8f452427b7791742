//! Routes one API request to the store: `(method, path, query, body)` in, `(status, body)` out.
//!
//! Synchronous and free of HTTP types, so the batch API, the property tests and the benches
//! drive exactly the code the server runs. Authentication, limits, latency and faults happen
//! before this, in `server`.

use serde_json::{Value, json};

use crate::error::{self, ApiError, ApiResult};
use crate::kind::{COLLECTIONS, Kind};
use crate::store::firewall_placement;
use crate::store::{Ctx, DeleteFlags, Page, Store};

/// A request as the dispatcher sees it. `path` starts with `/api/`.
#[derive(Debug, Clone)]
pub struct ApiRequest<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub query: &'a [(String, String)],
    pub body: &'a [u8],
}

/// An answer: status and JSON body (`None` = empty body, as RELEASE and DELETE answer).
#[derive(Debug, Clone, PartialEq)]
pub struct ApiResponse {
    pub status: u16,
    pub body: Option<Value>,
}

impl ApiResponse {
    fn ok(v: Value) -> Self {
        Self {
            status: 200,
            body: Some(v),
        }
    }
    fn created(v: Value) -> Self {
        Self {
            status: 201,
            body: Some(v),
        }
    }
    fn empty() -> Self {
        Self {
            status: 200,
            body: None,
        }
    }
}

impl From<ApiError> for ApiResponse {
    fn from(e: ApiError) -> Self {
        Self {
            status: e.status,
            body: serde_json::to_value(&e.body).ok(),
        }
    }
}

/// Whether a method changes state (for counting writes and persisting).
pub fn is_write(method: &str) -> bool {
    !matches!(method, "GET" | "HEAD")
}

/// Whether a request asks to change state: a write method, except a query pipeline and a batch
/// whose requests all read (they change nothing, whatever method carries them).
pub fn changes_state(method: &str, path: &str, body: &[u8]) -> bool {
    if !is_write(method) {
        return false;
    }
    // A query pipeline reads, whatever method carries it.
    if method == "POST" && path.trim_end_matches('/') == "/api/v1/search/querypipeline" {
        return false;
    }
    if method != "POST" || path.trim_end_matches('/') != "/api/v1/batch" {
        return true;
    }
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return true;
    };
    let Some(requests) = v.get("requests").and_then(Value::as_array) else {
        return true;
    };
    !requests.iter().all(|r| {
        r.get("method")
            .and_then(Value::as_str)
            .is_some_and(|m| !is_write(&m.to_ascii_uppercase()))
    })
}

struct Params<'a>(&'a [(String, String)]);

impl Params<'_> {
    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
    fn flag(&self, name: &str) -> bool {
        self.get(name)
            .is_some_and(|v| v.eq_ignore_ascii_case("true"))
    }
    fn page(&self) -> ApiResult<Page> {
        let page_size =
            match self.get("page_size") {
                None => None,
                Some(s) => Some(s.parse::<usize>().map_err(|_| {
                    ApiError::validation(format!("page_size '{s}' is not a number"))
                })?),
            };
        Ok(Page {
            cursor: self.get("cursor").map(str::to_string),
            page_size,
            sort_by: self.get("sort_by").map(str::to_string),
            sort_ascending: self
                .get("sort_ascending")
                .map(|v| v.eq_ignore_ascii_case("true")),
            included_fields: self
                .get("included_fields")
                .map(|f| f.split(',').map(|s| s.trim().to_string()).collect()),
        })
    }
    fn delete_flags(&self) -> DeleteFlags {
        DeleteFlags {
            cascade: self.flag("cascade"),
            detach: self.flag("detach"),
            force: self.flag("force"),
        }
    }
}

fn parse_body(body: &[u8]) -> ApiResult<Value> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Object(Default::default()));
    }
    serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(
            error::INVALID_JSON,
            "common-services",
            format!("Unable to parse the request body as JSON: {e}"),
        )
    })
}

/// Serves one request against the store.
pub fn dispatch(store: &mut Store, ctx: &Ctx, req: &ApiRequest<'_>) -> ApiResponse {
    match route(store, ctx, req) {
        Ok(r) => r,
        Err(e) => e.into(),
    }
}

fn route(store: &mut Store, ctx: &Ctx, req: &ApiRequest<'_>) -> ApiResult<ApiResponse> {
    let p = Params(req.query);
    let rest = req
        .path
        .strip_prefix("/api/v1/")
        .ok_or_else(|| not_found_url(req.path))?
        .trim_end_matches('/');
    let segs: Vec<&str> = rest.split('/').collect();
    let m = req.method;
    match (m, segs.as_slice()) {
        ("GET", ["node"]) => return Ok(ApiResponse::ok(node_info())),
        ("GET", ["reverse-proxy", "node", "health"]) => {
            return Ok(ApiResponse::ok(json!({"healthy": true})));
        }
        ("GET", ["spec", "vmware", "types", t]) => return spec_type(store, t).map(ApiResponse::ok),
        // The query pipeline (nsxlib's `search_resource_by_attribute_values` posts one):
        // `{"query_pipeline": [{"query": ...}]}`, one stage, answered like a search.
        ("POST", ["search", "querypipeline"]) => {
            let body = parse_body(req.body)?;
            let stages = body
                .get("query_pipeline")
                .and_then(Value::as_array)
                .ok_or_else(|| {
                    ApiError::validation("required property query_pipeline is missing")
                })?;
            let q = match stages.as_slice() {
                [one] => one.get("query").and_then(Value::as_str).ok_or_else(|| {
                    ApiError::validation("query_pipeline[0]: required property query is missing")
                })?,
                _ => {
                    return Err(ApiError::validation(format!(
                        "query_pipeline has {} stages; this manager answers one",
                        stages.len()
                    )));
                }
            };
            return store.search(q, &p.page()?, ctx.now_ms).map(ApiResponse::ok);
        }
        ("GET", ["search"]) | ("GET", ["search", "query"]) => {
            let q = p
                .get("query")
                .ok_or_else(|| ApiError::validation("required parameter query is missing"))?;
            return store.search(q, &p.page()?, ctx.now_ms).map(ApiResponse::ok);
        }
        ("POST", ["batch"]) => return batch(store, ctx, &p, &parse_body(req.body)?),
        ("GET", ["firewall", "excludelist"]) => return Ok(ApiResponse::ok(store.exclude_list())),
        ("POST", ["firewall", "excludelist"]) => {
            let mut body = if req.body.is_empty() {
                json!({})
            } else {
                parse_body(req.body)?
            };
            if let (Some(id), Some(b)) = (p.get("object_id"), body.as_object_mut()) {
                b.insert("object_id".into(), json!(id));
            }
            return store
                .exclude_list_action(ctx, p.get("action"), &body)
                .map(ApiResponse::ok);
        }
        ("GET", ["cluster", "api-service"]) => {
            return Ok(ApiResponse::ok(
                serde_json::to_value(&store.config.api_service).unwrap_or_default(),
            ));
        }
        ("PUT", ["cluster", "api-service"]) => {
            let v = parse_body(req.body)?;
            let mut cfg = store.config.api_service.clone();
            cfg.apply(&v)?;
            store.config.api_service = cfg;
            return Ok(ApiResponse::ok(
                serde_json::to_value(&store.config.api_service).unwrap_or_default(),
            ));
        }
        _ => {}
    }
    let (kind, tail) = match_collection(&segs).ok_or_else(|| not_found_url(req.path))?;
    collection(store, ctx, req, &p, kind, tail)
}

fn not_found_url(path: &str) -> ApiError {
    ApiError::new(
        404,
        error::NOT_FOUND,
        "common-services",
        format!("The requested URL {path} was not found."),
    )
}

fn match_collection<'a, 'b>(segs: &'b [&'a str]) -> Option<(Kind, &'b [&'a str])> {
    for (prefix, kind) in COLLECTIONS {
        let parts: Vec<&str> = prefix.split('/').collect();
        if segs.len() >= parts.len() && segs[..parts.len()] == parts[..] {
            return Some((*kind, &segs[parts.len()..]));
        }
    }
    None
}

fn collection(
    store: &mut Store,
    ctx: &Ctx,
    req: &ApiRequest<'_>,
    p: &Params<'_>,
    kind: Kind,
    tail: &[&str],
) -> ApiResult<ApiResponse> {
    let m = req.method;
    let deny = || ApiError::method_not_allowed(m, req.path);
    match tail {
        [] => match m {
            "GET" => list(store, kind, p).map(ApiResponse::ok),
            "POST" => {
                let body = parse_body(req.body)?;
                if kind == Kind::FirewallSection {
                    let placement = firewall_placement(p.get("operation"), p.get("id"))?;
                    let with_rules = p.get("action") == Some("create_with_rules");
                    if let Some(a) = p.get("action").filter(|a| *a != "create_with_rules") {
                        return Err(ApiError::validation(format!("unknown action {a}")));
                    }
                    return store
                        .section_create(ctx, &body, &placement, with_rules)
                        .map(ApiResponse::created);
                }
                store
                    .create(ctx, kind, &body, None)
                    .map(ApiResponse::created)
            }
            _ => Err(deny()),
        },
        [id] => match m {
            "GET" => store.get(kind, id).map(ApiResponse::ok),
            "PUT" => {
                let body = parse_body(req.body)?;
                store.update(ctx, kind, id, &body).map(ApiResponse::ok)
            }
            "DELETE" => store
                .delete(ctx, kind, id, p.delete_flags())
                .map(|_| ApiResponse::empty()),
            "POST" => action(store, ctx, p, kind, id, &parse_body(req.body)?),
            _ => Err(deny()),
        },
        [id, "state"] if kind == Kind::LogicalPort && m == "GET" => {
            store.port_state(id).map(ApiResponse::ok)
        }
        [id, "status"] if kind == Kind::LbService && m == "GET" => {
            store.lb_service_status(id).map(ApiResponse::ok)
        }
        [id, "allocations"] if kind == Kind::IpPool && m == "GET" => {
            store.allocations(kind, id).map(ApiResponse::ok)
        }
        [id, "effective-logical-port-members"] if kind == Kind::NsGroup && m == "GET" => {
            store.effective_port_members(id).map(ApiResponse::ok)
        }
        [id, "effective-ip-address-members"] if kind == Kind::NsGroup && m == "GET" => {
            store.effective_ip_members(id).map(ApiResponse::ok)
        }
        [id, "routing", "advertisement"] if kind == Kind::LogicalRouter => match m {
            "GET" => store.advertisement_get(id).map(ApiResponse::ok),
            "PUT" => store
                .advertisement_put(ctx, id, &parse_body(req.body)?)
                .map(ApiResponse::ok),
            _ => Err(deny()),
        },
        [router, "nat", "rules"] if kind == Kind::LogicalRouter => match m {
            "GET" => {
                store.get(Kind::LogicalRouter, router)?;
                store
                    .list_children(router, &p.page()?, 1000)
                    .map(ApiResponse::ok)
            }
            "POST" => store
                .create(ctx, Kind::NatRule, &parse_body(req.body)?, Some(router))
                .map(ApiResponse::created),
            _ => Err(deny()),
        },
        [router, "nat", "rules", rule] if kind == Kind::LogicalRouter => {
            store.nat_rule(router, rule)?;
            match m {
                "GET" => store.get(Kind::NatRule, rule).map(ApiResponse::ok),
                "PUT" => store
                    .update(ctx, Kind::NatRule, rule, &parse_body(req.body)?)
                    .map(ApiResponse::ok),
                "DELETE" => store
                    .delete(ctx, Kind::NatRule, rule, DeleteFlags::default())
                    .map(|_| ApiResponse::empty()),
                _ => Err(deny()),
            }
        }
        [section, "rules"] if kind == Kind::FirewallSection => match m {
            "GET" => {
                store.get(Kind::FirewallSection, section)?;
                store
                    .list_children(section, &p.page()?, 1000)
                    .map(ApiResponse::ok)
            }
            "POST" => {
                let placement = firewall_placement(p.get("operation"), p.get("id"))?;
                let multiple = match p.get("action") {
                    None => false,
                    Some("create_multiple") => true,
                    Some(a) => return Err(ApiError::validation(format!("unknown action {a}"))),
                };
                store
                    .rules_create(ctx, section, &parse_body(req.body)?, &placement, multiple)
                    .map(ApiResponse::ok)
            }
            _ => Err(deny()),
        },
        [section, "rules", rule] if kind == Kind::FirewallSection => {
            store.get(Kind::FirewallSection, section)?;
            if !store.rules_of(section).iter().any(|r| r == rule) {
                return Err(ApiError::not_found(rule));
            }
            match m {
                "GET" => store.get(Kind::FirewallRule, rule).map(ApiResponse::ok),
                "PUT" => store
                    .update(ctx, Kind::FirewallRule, rule, &parse_body(req.body)?)
                    .map(ApiResponse::ok),
                "DELETE" => store
                    .delete(ctx, Kind::FirewallRule, rule, DeleteFlags::default())
                    .map(|_| ApiResponse::empty()),
                _ => Err(deny()),
            }
        }
        _ => Err(not_found_url(req.path)),
    }
}

fn list(store: &Store, kind: Kind, p: &Params<'_>) -> ApiResult<Value> {
    let page = p.page()?;
    let eq = |field: &'static str| {
        let want = p.get(field).map(str::to_string);
        move |o: &crate::store::Obj| want.as_deref().is_none_or(|w| o.str(field) == Some(w))
    };
    match kind {
        Kind::FirewallSection => {
            let docs = store
                .section_order()
                .iter()
                .map(|id| store.render(id))
                .filter(|d| {
                    p.get("type")
                        .is_none_or(|t| d.get("section_type").and_then(Value::as_str) == Some(t))
                })
                .collect();
            crate::store::paginate(docs, &page, kind.max_page_size())
        }
        Kind::LogicalPort => {
            let ls = eq("logical_switch_id");
            let att = p.get("attachment_id").map(str::to_string);
            let att_type = p.get("attachment_type").map(str::to_string);
            let parent = p.get("parent_vif_id").map(str::to_string);
            let containers_only = p.flag("container_ports_only");
            store.list(
                kind,
                |o| {
                    let a = o.doc.get("attachment");
                    let a_str = |k: &str| a.and_then(|a| a.get(k)).and_then(Value::as_str);
                    let ctx_str = |k: &str| {
                        a.and_then(|a| a.get("context"))
                            .and_then(|c| c.get(k))
                            .and_then(Value::as_str)
                    };
                    ls(o)
                        && att.as_deref().is_none_or(|w| a_str("id") == Some(w))
                        && att_type
                            .as_deref()
                            .is_none_or(|w| a_str("attachment_type") == Some(w))
                        && parent
                            .as_deref()
                            .is_none_or(|w| ctx_str("parent_vif_id") == Some(w))
                        && (!containers_only || ctx_str("vif_type") == Some("CHILD"))
                },
                &page,
            )
        }
        Kind::LogicalRouter => store.list(kind, eq("router_type"), &page),
        Kind::LogicalSwitch => store.list(kind, eq("transport_zone_id"), &page),
        Kind::IpBlockSubnet => store.list(kind, eq("block_id"), &page),
        Kind::LogicalRouterPort => {
            let lr = eq("logical_router_id");
            let ls = p.get("logical_switch_id").map(str::to_string);
            store.list(
                kind,
                |o| {
                    lr(o)
                        && ls.as_deref().is_none_or(|w| {
                            o.doc
                                .get("linked_logical_switch_port_id")
                                .and_then(|r| r.get("target_id"))
                                .and_then(Value::as_str)
                                .and_then(|port| store.object(port))
                                .and_then(|port| port.str("logical_switch_id"))
                                == Some(w)
                        })
                },
                &page,
            )
        }
        _ => store.list(kind, |_| true, &page),
    }
}

fn action(
    store: &mut Store,
    ctx: &Ctx,
    p: &Params<'_>,
    kind: Kind,
    id: &str,
    body: &Value,
) -> ApiResult<ApiResponse> {
    let act = p.get("action").unwrap_or("");
    match (kind, act) {
        (Kind::IpPool | Kind::IpBlockSubnet, "ALLOCATE") => {
            store.allocate(ctx, kind, id, body).map(ApiResponse::ok)
        }
        (Kind::IpPool | Kind::IpBlockSubnet, "RELEASE") => store
            .release(ctx, kind, id, body)
            .map(|_| ApiResponse::empty()),
        (Kind::NsGroup, "ADD_MEMBERS") => store
            .nsgroup_members(ctx, id, true, body)
            .map(ApiResponse::ok),
        (Kind::NsGroup, "REMOVE_MEMBERS") => store
            .nsgroup_members(ctx, id, false, body)
            .map(ApiResponse::ok),
        (Kind::IpSet, "add_ip") => store.ipset_modify(ctx, id, true, body).map(ApiResponse::ok),
        (Kind::IpSet, "remove_ip") => store
            .ipset_modify(ctx, id, false, body)
            .map(ApiResponse::ok),
        (Kind::LbPool, "ADD_MEMBERS" | "REMOVE_MEMBERS" | "UPDATE_MEMBERS") => store
            .lb_pool_members(ctx, id, act, body)
            .map(ApiResponse::ok),
        (Kind::FirewallSection, "update_with_rules") => store
            .section_update_with_rules(ctx, id, body)
            .map(ApiResponse::ok),
        (Kind::FirewallSection, "list_with_rules") => {
            store.section_list_with_rules(id).map(ApiResponse::ok)
        }
        (Kind::FirewallSection, "revise") => {
            let placement = firewall_placement(p.get("operation"), p.get("id"))?;
            store
                .section_revise(ctx, id, body, &placement)
                .map(ApiResponse::ok)
        }
        (_, "") => Err(ApiError::method_not_allowed(
            "POST",
            &format!("{id} without an action"),
        )),
        (_, a) => Err(ApiError::validation(format!(
            "action {a} is not supported on a {kind:?}"
        ))),
    }
}

/// `GET /api/v1/node`: the identity clients read the version from (below 3.0 they use the
/// 2.4 search path).
pub fn node_info() -> Value {
    json!({
        "node_version": "2.4.1.0.0.13716579",
        "product_version": "2.4.1.0.0.13716579",
        "kernel_version": "4.14.93",
        "hostname": "nsx-manager",
        "fully_qualified_domain_name": "nsx-manager",
        "resource_type": "NodeProperties",
        "system_time": 0,
        "timezone": "UTC",
        "motd": "",
    })
}

/// `GET /api/v1/spec/vmware/types/{Tag|ManagedResource}`: the JSON schema clients read the tag
/// limits from.
fn spec_type(store: &Store, t: &str) -> ApiResult<Value> {
    let c = &store.config;
    match t {
        "Tag" => Ok(json!({
            "id": "Tag", "module_id": "Common", "type": "object", "title": "Arbitrary key-value pairs that may be attached to an entity",
            "properties": {
                "scope": {"type": "string", "maxLength": c.tag_scope_max, "required": false, "default": ""},
                "tag": {"type": "string", "maxLength": c.tag_value_max, "required": false, "default": ""}
            }
        })),
        "ManagedResource" => Ok(json!({
            "id": "ManagedResource", "module_id": "Common", "type": "object",
            "properties": {
                "tags": {"type": "array", "maxItems": c.tags_max, "items": {"$ref": "Tag"}, "required": false},
                "display_name": {"type": "string", "maxLength": 255},
                "description": {"type": "string", "maxLength": 1024}
            }
        })),
        other => Err(ApiError::not_found(other)),
    }
}

/// `POST /api/v1/batch[?atomic=true]`.
fn batch(store: &mut Store, ctx: &Ctx, p: &Params<'_>, body: &Value) -> ApiResult<ApiResponse> {
    let requests = body
        .get("requests")
        .and_then(Value::as_array)
        .ok_or_else(|| ApiError::validation("required property requests is missing"))?;
    let continue_on_error = body
        .get("continue_on_error")
        .and_then(Value::as_bool)
        .unwrap_or(true);
    let atomic = p.flag("atomic");
    let snapshot = atomic.then(|| store.clone());
    let mut results = Vec::new();
    let mut has_errors = false;
    for r in requests {
        let method = r
            .get("method")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_ascii_uppercase();
        let uri = r.get("uri").and_then(Value::as_str).unwrap_or("");
        let full = if uri.starts_with("/api/") {
            uri.to_string()
        } else {
            format!("/api{uri}")
        };
        let (path, query) = split_query(&full);
        let body_bytes = match r.get("body") {
            Some(b) if !b.is_null() => serde_json::to_vec(b).unwrap_or_default(),
            _ => Vec::new(),
        };
        let resp = if path.starts_with("/api/v1/batch")
            || !matches!(method.as_str(), "GET" | "POST" | "PUT" | "DELETE")
        {
            ApiError::validation(format!("batch request {method} {uri} is not allowed")).into()
        } else {
            dispatch(
                store,
                ctx,
                &ApiRequest {
                    method: &method,
                    path: &path,
                    query: &query,
                    body: &body_bytes,
                },
            )
        };
        let failed = resp.status >= 400;
        results.push(json!({"code": resp.status, "body": resp.body.unwrap_or(Value::Null), "headers": {"Content-Type": "application/json"}}));
        if failed {
            has_errors = true;
            if !continue_on_error || atomic {
                break;
            }
        }
    }
    let rolled_back = match snapshot {
        Some(s) if has_errors => {
            *store = s;
            true
        }
        _ => false,
    };
    Ok(ApiResponse::ok(
        json!({"results": results, "has_errors": has_errors, "rolled_back": rolled_back}),
    ))
}

/// Splits `path?query` and percent-decodes the query pairs.
pub fn split_query(uri: &str) -> (String, Vec<(String, String)>) {
    match uri.split_once('?') {
        None => (uri.to_string(), Vec::new()),
        Some((path, q)) => (path.to_string(), parse_query(q)),
    }
}

pub fn parse_query(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

/// Decodes `%XX` and `+` (as a space, the form encoding).
pub fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                    }
                    None => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
