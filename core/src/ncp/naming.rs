//! NSX names and tags for NCP's objects, within NSX's length limits.
//!
//! Names are `<cluster>-<namespace>[-<name>]` as NCP writes them. A name or tag value that would
//! exceed its limit keeps a readable prefix and ends in `-` plus 8 hex digits of a hash of the
//! whole text, so that two long names never become one by truncation.

use crate::nsx::model::Tag;

/// NSX limits (2.5: display_name 255, tag scope 128, tag value 256, 30 tags).
pub const DISPLAY_NAME_MAX: usize = 255;
pub const TAG_SCOPE_MAX: usize = 128;
pub const TAG_VALUE_MAX: usize = 256;
pub const TAGS_MAX: usize = 30;

/// Tag scopes NCP uses.
pub mod scope {
    pub const CLUSTER: &str = "ncp/cluster";
    pub const VERSION: &str = "ncp/version";
    pub const PROJECT: &str = "ncp/project";
    pub const PROJECT_UID: &str = "ncp/project_uid";
    pub const POD: &str = "ncp/pod";
    pub const POD_UID: &str = "ncp/pod_uid";
    pub const NODE_NAME: &str = "ncp/node_name";
    pub const SUBNET: &str = "ncp/subnet";
    pub const SUBNET_ID: &str = "ncp/subnet_id";
    pub const SNAT_IP: &str = "ncp/snat_ip";
    pub const EXTPOOL_ID: &str = "ncp/extpoolid";
    pub const EXTERNAL: &str = "ncp/external";
    pub const NO_SNAT: &str = "ncp/no_snat";
    pub const SHARED: &str = "ncp/shared_resource";
    pub const SERVICE: &str = "ncp/service";
    pub const SERVICE_UID: &str = "ncp/service_uid";
    pub const SERVICE_PORT: &str = "ncp/service_port";
    /// Which of a namespace's objects this is, where the resource type alone does not say
    /// (the switch port a downlink attaches to). Ours, not NCP's.
    pub const ROLE: &str = "ncp/role";
    /// The NetworkPolicy a firewall object realizes.
    pub const POLICY_UID: &str = "ncp/network_policy_uid";
    /// Which of a policy's (or the cluster's marker) sections this is.
    pub const FW_SECT_TYPE: &str = "ncp/fw_sect_type";
}

/// The `ncp/version` tag value this NCP writes.
pub const VERSION: &str = "2.4.1";

/// The tags every object of a namespace carries.
pub fn ns_tags(cluster: &str, ns: &k8s_openapi::api::core::v1::Namespace) -> Vec<Tag> {
    vec![
        tag(scope::CLUSTER, cluster),
        tag(scope::VERSION, VERSION),
        tag(scope::PROJECT, ns.metadata.name.as_deref().unwrap_or("")),
        tag(scope::PROJECT_UID, ns.metadata.uid.as_deref().unwrap_or("")),
    ]
}

/// `text` if it fits in `max` characters, else a prefix, `-`, and a hash of the whole.
pub fn fit(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_string();
    }
    let suffix = format!("-{:08x}", crate::hash::stable_hash(text) as u32);
    let keep = max.saturating_sub(suffix.len());
    let prefix: String = text.chars().take(keep).collect();
    format!("{prefix}{suffix}")
}

/// `<cluster>-<part>-<part>...`, fitted to the display name limit.
pub fn name(cluster: &str, parts: &[&str]) -> String {
    let mut s = cluster.to_string();
    for p in parts {
        s.push('-');
        s.push_str(p);
    }
    fit(&s, DISPLAY_NAME_MAX)
}

/// A tag with scope and value fitted to NSX's limits.
pub fn tag(scope: &str, value: &str) -> Tag {
    Tag::new(fit(scope, TAG_SCOPE_MAX), fit(value, TAG_VALUE_MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_names_are_kept_and_long_ones_hashed_without_collisions() {
        assert_eq!(name("k8s-a", &["shop"]), "k8s-a-shop");
        let long_a = "a".repeat(300);
        let mut long_b = "a".repeat(299);
        long_b.push('b');
        let (na, nb) = (name("k8s", &[&long_a]), name("k8s", &[&long_b]));
        assert_eq!(na.chars().count(), DISPLAY_NAME_MAX);
        assert_eq!(nb.chars().count(), DISPLAY_NAME_MAX);
        assert_ne!(na, nb, "truncation must not merge two names");
        assert_eq!(na, name("k8s", &[&long_a]), "stable");
        let t = tag(&"s".repeat(200), &"v".repeat(300));
        assert_eq!(t.scope.chars().count(), TAG_SCOPE_MAX);
        assert_eq!(t.tag.chars().count(), TAG_VALUE_MAX);
    }

    #[test]
    fn multibyte_names_are_cut_on_character_boundaries() {
        let s = "ü".repeat(300);
        let f = fit(&s, 20);
        assert_eq!(f.chars().count(), 20);
    }
}
