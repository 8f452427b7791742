//! IP blocks, block subnets, IP pools, and the ALLOCATE/RELEASE actions.
//!
//! A block subnet is carved at the lowest free address aligned to its size; an IP pool hands
//! out the lowest free address of its ranges, never a subnet's gateway. Addresses are owned:
//! by a logical port (`allocate_addresses`) or by the API (`?action=ALLOCATE`), and a RELEASE
//! through the API cannot take a port's address away.

use serde_json::{Map, Value, json};

use super::network::ranges_of;
use super::{Ctx, DeleteFlags, Obj, Store};
use crate::error::{self, ApiError, ApiResult};
use crate::ipam::{self, Cidr, Range};
use crate::kind::Kind;

const API_OWNER: &str = "api";

impl Store {
    pub(super) fn block_write(
        &mut self,
        own: Option<&str>,
        doc: &mut Map<String, Value>,
    ) -> ApiResult<()> {
        let text = doc.get("cidr").and_then(Value::as_str).unwrap_or("");
        let cidr =
            Cidr::parse_strict(text).map_err(|e| ApiError::validation(format!("cidr: {e}")))?;
        doc.insert("cidr".into(), json!(cidr.to_string()));
        if let Some(id) = own {
            let old = self
                .objects
                .get(id)
                .and_then(|o| o.str("cidr"))
                .unwrap_or("");
            let has_subnets = self.block_subnets.get(id).is_some_and(|s| !s.is_empty());
            if old != cidr.to_string() && has_subnets {
                return Err(ApiError::in_use(
                    "id-allocation-service",
                    format!("The cidr of IP block {id} can not change while it has subnets."),
                ));
            }
        }
        Ok(())
    }

    pub(super) fn block_delete(&mut self, id: &str) -> ApiResult<()> {
        let n = self.block_subnets.get(id).map_or(0, |s| s.len());
        if n > 0 {
            return Err(ApiError::in_use(
                "id-allocation-service",
                format!("IP block {id} has {n} subnet(s); delete them first."),
            ));
        }
        self.block_subnets.remove(id);
        self.remove(id);
        Ok(())
    }

    pub(super) fn block_subnet_create(
        &mut self,
        id: &str,
        doc: &mut Map<String, Value>,
    ) -> ApiResult<()> {
        let block_id = doc
            .get("block_id")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let block = self.expect_ref("block_id", &block_id, &[Kind::IpBlock])?;
        let block_cidr =
            Cidr::parse_strict(block.str("cidr").unwrap_or("")).map_err(ApiError::validation)?;
        let size = doc.get("size").and_then(Value::as_i64).unwrap_or(0);
        if size < 1 || (size as u64) > block_cidr.size() || (size as u64).count_ones() != 1 {
            return Err(ApiError::validation(format!(
                "size {size} must be a power of 2 no larger than the block ({})",
                block_cidr.size()
            )));
        }
        let prefix = 32 - (size as u64).trailing_zeros() as u8;
        let taken: Vec<Cidr> = self
            .block_subnets
            .get(&block_id)
            .into_iter()
            .flatten()
            .filter_map(|s| {
                self.objects
                    .get(s)?
                    .str("cidr")
                    .and_then(|c| Cidr::parse_strict(c).ok())
            })
            .collect();
        let mut candidate = u64::from(block_cidr.first());
        let end = u64::from(block_cidr.last());
        let found = loop {
            if candidate + size as u64 - 1 > end {
                break None;
            }
            let c = Cidr {
                network: candidate as u32,
                prefix,
            };
            match taken.iter().find(|t| t.overlaps(&c)) {
                None => break Some(c),
                // Jump past the overlapping subnet, staying aligned.
                Some(t) => {
                    let next = u64::from(t.last()) + 1;
                    candidate = next.div_ceil(size as u64) * size as u64;
                }
            }
        };
        let cidr = found.ok_or_else(|| {
            ApiError::new(
                409,
                error::BLOCK_EXHAUSTED,
                "id-allocation-service",
                format!("IP block {block_id} has no free subnet of size {size}."),
            )
        })?;
        let (start, stop) = if size >= 4 {
            (cidr.first() + 1, cidr.last() - 1)
        } else {
            (cidr.first(), cidr.last())
        };
        doc.insert("cidr".into(), json!(cidr.to_string()));
        doc.insert(
            "allocation_ranges".into(),
            json!([{"start": ipam::ip_to_string(start), "end": ipam::ip_to_string(stop)}]),
        );
        doc.remove("start_ip");
        self.block_subnets
            .entry(block_id)
            .or_default()
            .insert(id.to_string());
        Ok(())
    }

    pub(super) fn block_subnet_delete(&mut self, id: &str, current: &Obj) -> ApiResult<()> {
        let n = self.ip_alloc.get(id).map_or(0, |a| a.len());
        if n > 0 {
            return Err(ApiError::in_use(
                "id-allocation-service",
                format!("IP block subnet {id} has {n} allocated address(es); release them first."),
            ));
        }
        if let Some(block) = current.str("block_id")
            && let Some(s) = self.block_subnets.get_mut(block)
        {
            s.remove(id);
        }
        self.ip_alloc.remove(id);
        self.remove(id);
        Ok(())
    }

    pub(super) fn pool_write(
        &mut self,
        own: Option<&str>,
        doc: &mut Map<String, Value>,
    ) -> ApiResult<()> {
        let subnets = super::bounded_list(doc, "subnets", 5)?;
        for s in &subnets {
            let cidr_text = s.get("cidr").and_then(Value::as_str).unwrap_or("");
            let cidr = Cidr::parse_strict(cidr_text)
                .map_err(|e| ApiError::validation(format!("subnets.cidr: {e}")))?;
            let ranges = s
                .get("allocation_ranges")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            if ranges.is_empty() {
                return Err(ApiError::validation(
                    "subnets.allocation_ranges is required",
                ));
            }
            for r in &ranges {
                let start = ipam::parse_ip(r.get("start").and_then(Value::as_str).unwrap_or(""))
                    .map_err(|e| ApiError::validation(format!("allocation_ranges.start: {e}")))?;
                let end = ipam::parse_ip(r.get("end").and_then(Value::as_str).unwrap_or(""))
                    .map_err(|e| ApiError::validation(format!("allocation_ranges.end: {e}")))?;
                if start > end || !cidr.contains(start) || !cidr.contains(end) {
                    return Err(ApiError::validation(format!(
                        "allocation range {}-{} is not inside {cidr}",
                        ipam::ip_to_string(start),
                        ipam::ip_to_string(end)
                    )));
                }
            }
            if let Some(gw) = s.get("gateway_ip").and_then(Value::as_str) {
                let g = ipam::parse_ip(gw)
                    .map_err(|e| ApiError::validation(format!("gateway_ip: {e}")))?;
                if !cidr.contains(g) {
                    return Err(ApiError::validation(format!(
                        "gateway_ip {gw} is not inside {cidr}"
                    )));
                }
            }
            for dns in s
                .get("dns_nameservers")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                ipam::parse_ip(dns.as_str().unwrap_or(""))
                    .map_err(|e| ApiError::validation(format!("dns_nameservers: {e}")))?;
            }
        }
        if let Some(id) = own {
            let (ranges, _) = pool_ranges(doc);
            for ip in self.ip_alloc.get(id).into_iter().flat_map(|a| a.keys()) {
                if !ranges.iter().any(|r| r.start <= *ip && *ip <= r.end) {
                    return Err(ApiError::in_use(
                        "id-allocation-service",
                        format!(
                            "Allocated address {} would fall outside the pool's ranges.",
                            ipam::ip_to_string(*ip)
                        ),
                    ));
                }
            }
        }
        doc.remove("pool_usage");
        if let Some(id) = own {
            // The ranges may change: scan from the start next time.
            self.ip_hint.remove(id);
        }
        Ok(())
    }

    pub(super) fn pool_delete(&mut self, id: &str, flags: DeleteFlags) -> ApiResult<()> {
        if let Some(ls) = self
            .ids_of(Kind::LogicalSwitch)
            .find(|s| self.objects[*s].str("ip_pool_id") == Some(id))
        {
            return Err(ApiError::in_use(
                "id-allocation-service",
                format!("IP pool {id} is used by logical switch {ls}."),
            ));
        }
        let n = self.ip_alloc.get(id).map_or(0, |a| a.len());
        if n > 0 && !flags.force {
            return Err(ApiError::in_use(
                "id-allocation-service",
                format!(
                    "IP pool {id} has {n} allocated address(es). Release them or use force=true."
                ),
            ));
        }
        for a in self.port_alloc.values_mut() {
            if a.pool_id.as_deref() == Some(id) {
                a.pool_id = None;
                a.ip = None;
            }
        }
        self.port_alloc
            .retain(|_, a| a.ip.is_some() || a.mac.is_some());
        self.ip_alloc.remove(id);
        self.ip_hint.remove(id);
        self.alloc_meta.remove(id);
        self.remove(id);
        Ok(())
    }

    pub(super) fn pool_usage(&self, id: &str) -> Value {
        let (ranges, _) = self
            .objects
            .get(id)
            .map(|o| pool_ranges(&o.doc))
            .unwrap_or_default();
        let total: u64 = ranges.iter().map(Range::len).sum();
        let allocated = self.ip_alloc.get(id).map_or(0, |a| a.len()) as u64;
        json!({"total_ids": total, "allocated_ids": allocated, "free_ids": total.saturating_sub(allocated)})
    }

    pub(super) fn pool_first_free(&self, pool_id: &str) -> Option<u32> {
        let obj = self.objects.get(pool_id)?;
        let (ranges, gateways) = pool_ranges(&obj.doc);
        let empty = Default::default();
        let hint = self.ip_hint.get(pool_id).copied().unwrap_or(0);
        ipam::first_free(
            &from_hint(&ranges, hint),
            self.ip_alloc.get(pool_id).unwrap_or(&empty),
            &gateways,
        )
    }

    /// A released address may be below the hint: move the hint down to it.
    pub(super) fn lower_hint(&mut self, pool: &str, ip: u32) {
        if let Some(h) = self.ip_hint.get_mut(pool) {
            *h = (*h).min(ip);
        }
    }

    fn alloc_ranges(&self, kind: Kind, id: &str) -> ApiResult<(Vec<Range>, Vec<u32>)> {
        let obj = self.expect(kind, id)?;
        Ok(match kind {
            Kind::IpPool => pool_ranges(&obj.doc),
            _ => (ranges_of(obj.doc.get("allocation_ranges")), Vec::new()),
        })
    }

    /// `POST /pools/ip-pools/{id}?action=ALLOCATE` (and the block-subnet form).
    pub fn allocate(&mut self, ctx: &Ctx, kind: Kind, id: &str, body: &Value) -> ApiResult<Value> {
        let obj = self.expect(kind, id)?.clone();
        self.check_writable(ctx, &obj)?;
        let (ranges, reserved) = self.alloc_ranges(kind, id)?;
        if let Some(t) = body.get("tags").filter(|t| !t.is_null()) {
            let ok = t.as_array().is_some_and(|a| {
                a.iter().all(|x| {
                    x.is_object()
                        && x.get("scope").is_none_or(Value::is_string)
                        && x.get("tag").is_none_or(Value::is_string)
                })
            });
            if !ok {
                return Err(ApiError::validation("tags must be a list of {scope, tag}"));
            }
        }
        let wanted = body
            .get("allocation_id")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty());
        let empty = Default::default();
        let allocated = self.ip_alloc.get(id).unwrap_or(&empty);
        let addr = match wanted {
            Some(text) => {
                let ip = ipam::parse_ip(text).map_err(ApiError::validation)?;
                if !ranges.iter().any(|r| r.start <= ip && ip <= r.end) {
                    return Err(ApiError::bad_request(
                        error::NOT_IN_POOL,
                        "id-allocation-service",
                        format!("Address {text} is not in the ranges of {id}."),
                    ));
                }
                if allocated.contains_key(&ip) || reserved.contains(&ip) {
                    return Err(ApiError::bad_request(
                        error::ALREADY_ALLOCATED,
                        "id-allocation-service",
                        format!("Address {text} is already allocated in {id}."),
                    ));
                }
                ip
            }
            None => {
                let hint = self.ip_hint.get(id).copied().unwrap_or(0);
                let from: Vec<Range> = ranges
                    .iter()
                    .filter(|r| r.end >= hint)
                    .map(|r| Range {
                        start: r.start.max(hint),
                        end: r.end,
                    })
                    .collect();
                ipam::first_free(&from, allocated, &reserved)
            }
            .ok_or_else(|| {
                ApiError::bad_request(
                    error::POOL_EXHAUSTED,
                    "id-allocation-service",
                    format!("IP pool {id} is exhausted."),
                )
            })?,
        };
        self.ip_alloc
            .entry(id.to_string())
            .or_default()
            .insert(addr, API_OWNER.into());
        let mut meta = serde_json::Map::new();
        if let Some(n) = body.get("display_name").and_then(Value::as_str) {
            meta.insert("display_name".into(), json!(n));
        }
        if let Some(t) = body.get("tags").filter(|t| !t.is_null()) {
            meta.insert("tags".into(), t.clone());
        }
        if !meta.is_empty() {
            self.alloc_meta
                .entry(id.to_string())
                .or_default()
                .insert(addr, Value::Object(meta));
        }
        self.touch(id.to_string());
        Ok(json!({"allocation_id": ipam::ip_to_string(addr)}))
    }

    /// `POST /pools/ip-pools/{id}?action=RELEASE`: answers 200 with an empty body.
    pub fn release(&mut self, ctx: &Ctx, kind: Kind, id: &str, body: &Value) -> ApiResult<()> {
        let obj = self.expect(kind, id)?.clone();
        self.check_writable(ctx, &obj)?;
        let text = body
            .get("allocation_id")
            .and_then(Value::as_str)
            .ok_or_else(|| ApiError::validation("required property allocation_id is missing"))?;
        let ip = ipam::parse_ip(text).map_err(ApiError::validation)?;
        match self.ip_alloc.get(id).and_then(|a| a.get(&ip)) {
            None => Err(ApiError::bad_request(
                error::NOT_IN_POOL,
                "id-allocation-service",
                format!("Address {text} is not allocated in {id}."),
            )),
            Some(owner) if owner != API_OWNER => Err(ApiError::in_use(
                "id-allocation-service",
                format!("Address {text} is allocated to logical port {owner}."),
            )),
            Some(_) => {
                if let Some(a) = self.ip_alloc.get_mut(id) {
                    a.remove(&ip);
                }
                self.lower_hint(id, ip);
                if let Some(m) = self.alloc_meta.get_mut(id) {
                    m.remove(&ip);
                }
                self.touch(id.to_string());
                Ok(())
            }
        }
    }

    /// `GET /pools/ip-pools/{id}/allocations`.
    pub fn allocations(&self, kind: Kind, id: &str) -> ApiResult<Value> {
        self.expect(kind, id)?;
        let results: Vec<Value> = self
            .ip_alloc
            .get(id)
            .into_iter()
            .flat_map(|a| a.keys())
            .map(|ip| {
                let mut r = json!({"allocation_id": ipam::ip_to_string(*ip)});
                if let Some(Value::Object(meta)) = self.alloc_meta.get(id).and_then(|m| m.get(ip)) {
                    for (k, v) in meta {
                        r[k] = v.clone();
                    }
                }
                r
            })
            .collect();
        Ok(json!({"result_count": results.len(), "results": results}))
    }

    pub(super) fn check_allocation_invariants(&self) -> Result<(), String> {
        for (owner, allocs) in &self.ip_alloc {
            let obj = self
                .objects
                .get(owner)
                .ok_or(format!("allocations for missing {owner}"))?;
            let (ranges, _) = match obj.kind {
                Kind::IpPool => pool_ranges(&obj.doc),
                Kind::IpBlockSubnet => (ranges_of(obj.doc.get("allocation_ranges")), Vec::new()),
                k => return Err(format!("allocations on a {k:?}")),
            };
            for (ip, who) in allocs {
                if !ranges.iter().any(|r| r.start <= *ip && *ip <= r.end) {
                    return Err(format!(
                        "{owner}: {} allocated outside the ranges",
                        ipam::ip_to_string(*ip)
                    ));
                }
                if who != API_OWNER {
                    let a = self
                        .port_alloc
                        .get(who)
                        .ok_or(format!("{owner}: owner {who} has no port allocation"))?;
                    if a.ip != Some(*ip) || a.pool_id.as_deref() != Some(owner.as_str()) {
                        return Err(format!(
                            "{owner}: port {who} does not hold {}",
                            ipam::ip_to_string(*ip)
                        ));
                    }
                }
            }
        }
        for (pool, metas) in &self.alloc_meta {
            for ip in metas.keys() {
                if self
                    .ip_alloc
                    .get(pool)
                    .and_then(|a| a.get(ip))
                    .map(String::as_str)
                    != Some(API_OWNER)
                {
                    return Err(format!(
                        "pool {pool}: allocation tags for {}, which is not an API allocation",
                        ipam::ip_to_string(*ip)
                    ));
                }
            }
        }
        for (pool, hint) in &self.ip_hint {
            let Some(obj) = self.objects.get(pool) else {
                return Err(format!("free hint for missing pool {pool}"));
            };
            let (ranges, gateways) = pool_ranges(&obj.doc);
            let empty = Default::default();
            let allocated = self.ip_alloc.get(pool).unwrap_or(&empty);
            if let Some(free) = ipam::first_free(&ranges, allocated, &gateways)
                && free < *hint
            {
                return Err(format!(
                    "pool {pool}: {} is free below the hint {}",
                    ipam::ip_to_string(free),
                    ipam::ip_to_string(*hint)
                ));
            }
        }
        let mut macs = std::collections::BTreeSet::new();
        for (port, a) in &self.port_alloc {
            if self.objects.get(port).map(|o| o.kind) != Some(Kind::LogicalPort) {
                return Err(format!("allocation for missing port {port}"));
            }
            if let (Some(pool), Some(ip)) = (&a.pool_id, a.ip)
                && self.ip_alloc.get(pool).and_then(|m| m.get(&ip)) != Some(port)
            {
                return Err(format!(
                    "port {port}: {} not recorded in pool {pool}",
                    ipam::ip_to_string(ip)
                ));
            }
            if let Some(m) = &a.mac
                && !macs.insert(m.clone())
            {
                return Err(format!("MAC {m} given twice"));
            }
        }
        for (block, subnets) in &self.block_subnets {
            let mut cidrs: Vec<Cidr> = Vec::new();
            for s in subnets {
                let o = self
                    .objects
                    .get(s)
                    .ok_or(format!("block {block}: subnet {s} missing"))?;
                let c = Cidr::parse_strict(o.str("cidr").unwrap_or(""))
                    .map_err(|e| format!("{s}: {e}"))?;
                if cidrs.iter().any(|x| x.overlaps(&c)) {
                    return Err(format!("block {block}: subnet {c} overlaps another"));
                }
                cidrs.push(c);
            }
        }
        Ok(())
    }
}

/// The parts of `ranges` at or above `hint`.
fn from_hint(ranges: &[Range], hint: u32) -> Vec<Range> {
    ranges
        .iter()
        .filter(|r| r.end >= hint)
        .map(|r| Range {
            start: r.start.max(hint),
            end: r.end,
        })
        .collect()
}

/// All allocation ranges of a pool's subnets, and the gateways (never handed out).
fn pool_ranges(doc: &Map<String, Value>) -> (Vec<Range>, Vec<u32>) {
    let mut ranges = Vec::new();
    let mut gateways = Vec::new();
    for s in doc
        .get("subnets")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        ranges.extend(ranges_of(s.get("allocation_ranges")));
        if let Some(g) = s
            .get("gateway_ip")
            .and_then(Value::as_str)
            .and_then(|g| ipam::parse_ip(g).ok())
        {
            gateways.push(g);
        }
    }
    (ranges, gateways)
}
