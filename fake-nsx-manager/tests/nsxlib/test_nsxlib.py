"""vmware-nsxlib (the Python NSX client NCP is built on) against the standalone fake.

Run by .ci/run: builds `fake-nsx-manager`, starts it on a free loopback port and drives it
through nsxlib's own resource classes. FAKE_NSX_BIN names the binary.
"""

import os
import re
import subprocess

import pytest
from vmware_nsxlib import v3
from vmware_nsxlib.v3 import config, exceptions, nsx_constants

CLUSTER_TAG = [{"scope": "ncp/cluster", "tag": "k8s-a"}]


@pytest.fixture(scope="module")
def manager():
    binary = os.environ.get("FAKE_NSX_BIN", "target/debug/fake-nsx-manager")
    proc = subprocess.Popen(
        [binary, "--listen", "127.0.0.1:0", "--rate-limit", "0", "--seed", "11"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    line = proc.stdout.readline()
    match = re.search(r"http://\S+", line)
    assert match, f"the fake did not announce its address: {line!r}"
    yield match.group(0)
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def nsxlib(manager):
    cfg = config.NsxLibConfig(
        nsx_api_managers=[manager],
        username="admin",
        password="admin",
        insecure=True,
        max_attempts=3,
        http_timeout=5,
        http_read_timeout=10,
    )
    return v3.NsxLib(cfg)


def by_tag(lib, resource_type, tags=CLUSTER_TAG):
    return lib.search_by_tags(tags=tags, resource_type=resource_type)["results"]


def test_version_health_and_bootstrap_objects(nsxlib):
    assert nsxlib.get_version().startswith("2.4")
    tzs = by_tag(nsxlib, "TransportZone")
    assert len(tzs) == 1 and tzs[0]["transport_type"] == "OVERLAY"
    t0s = [r for r in by_tag(nsxlib, "LogicalRouter") if r["router_type"] == "TIER0"]
    assert len(t0s) == 1
    nodes = nsxlib.search_by_tags(tags=[{"scope": "ncp/node_name", "tag": "node-1"}], resource_type="LogicalPort")
    assert nodes["result_count"] == 1


def test_logical_switch_crud_and_stale_revision(nsxlib):
    tz = by_tag(nsxlib, "TransportZone")[0]["id"]
    ls = nsxlib.logical_switch.create("k8s-a-shop", tz, CLUSTER_TAG)
    assert ls["_revision"] == 0 and ls["replication_mode"] == "MTEP"
    got = nsxlib.logical_switch.get(ls["id"])
    assert got["display_name"] == "k8s-a-shop"
    updated = nsxlib.logical_switch.update(ls["id"], name="k8s-a-shop2")
    assert updated["_revision"] == 1
    stale = dict(got)
    stale["display_name"] = "lost update"
    with pytest.raises(exceptions.StaleRevision):
        nsxlib.client.update("logical-switches/%s" % ls["id"], stale)
    nsxlib.logical_switch.delete(ls["id"])
    with pytest.raises(exceptions.ResourceNotFound):
        nsxlib.logical_switch.get(ls["id"])


def test_container_port_with_allocated_addresses(nsxlib):
    tz = by_tag(nsxlib, "TransportZone")[0]["id"]
    pool = nsxlib.ip_pool.create(
        "10.30.0.0/24",
        allocation_ranges=[{"start": "10.30.0.2", "end": "10.30.0.254"}],
        display_name="k8s-a-ns",
        gateway_ip="10.30.0.1",
        tags=CLUSTER_TAG,
    )
    ls = nsxlib.logical_switch.create("k8s-a-ns", tz, CLUSTER_TAG, ip_pool_id=pool["id"])
    node_vif = nsxlib.search_by_tags(tags=[{"scope": "ncp/node_name", "tag": "node-1"}], resource_type="LogicalPort")["results"][0]["attachment"]["id"]
    port = nsxlib.logical_port.create(
        ls["id"],
        "container-1",
        tags=CLUSTER_TAG + [{"scope": "ncp/pod", "tag": "web-1"}],
        parent_vif_id=node_vif,
        traffic_tag=101,
        vif_type=nsx_constants.VIF_TYPE_CHILD,
        app_id="shop/web-1",
        allocate_addresses="Both",
    )
    assert port["attachment"]["context"]["traffic_tag"] == 101
    state = nsxlib.client.get("logical-ports/%s/state" % port["id"])
    binding = state["realized_bindings"][0]["binding"]
    assert binding["ip_address"] == "10.30.0.2"
    assert binding["mac_address"].startswith("02:50:56")
    found = nsxlib.search_by_tags(tags=[{"scope": "ncp/pod", "tag": "web-1"}], resource_type="LogicalPort")
    assert [r["id"] for r in found["results"]] == [port["id"]]
    nsxlib.logical_port.delete(port["id"])
    nsxlib.logical_switch.delete(ls["id"])
    nsxlib.ip_pool.delete(pool["id"])


def test_tier1_router_linked_to_tier0_with_downlink_and_snat(nsxlib):
    tz = by_tag(nsxlib, "TransportZone")[0]["id"]
    t0 = [r for r in by_tag(nsxlib, "LogicalRouter") if r["router_type"] == "TIER0"][0]["id"]
    t1 = nsxlib.logical_router.create("k8s-a-shop", CLUSTER_TAG)
    assert t1["router_type"] == "TIER1"
    nsxlib.router.add_router_link_port(t1["id"], t0, tags=CLUSTER_TAG)
    t1_ports = nsxlib.client.get("logical-router-ports?logical_router_id=%s" % t1["id"])["results"]
    assert [p["resource_type"] for p in t1_ports] == ["LogicalRouterLinkPortOnTIER1"]
    t0_port = nsxlib.client.get("logical-router-ports/%s" % t1_ports[0]["linked_logical_router_port_id"]["target_id"])
    assert t0_port["linked_logical_router_port_id"] == t1_ports[0]["id"]
    ls = nsxlib.logical_switch.create("k8s-a-shop", tz, CLUSTER_TAG)
    lsp = nsxlib.logical_port.create(ls["id"], None, attachment_type=None, tags=CLUSTER_TAG)
    nsxlib.logical_router_port.create(
        t1["id"], "downlink", CLUSTER_TAG, nsx_constants.LROUTERPORT_DOWNLINK, lsp["id"],
        [{"ip_addresses": ["10.31.0.1"], "prefix_length": 24}],
    )
    dl = nsxlib.logical_router_port.get_by_lswitch_id(ls["id"])
    assert dl["resource_type"] == "LogicalRouterDownLinkPort"
    nsxlib.router.update_advertisement(t1["id"], advertise_route_nat=True, advertise_route_connected=True)
    adv = nsxlib.client.get("logical-routers/%s/routing/advertisement" % t1["id"])
    assert adv["advertise_nsx_connected_routes"] is True and adv["_revision"] == 1
    rule = nsxlib.logical_router.add_nat_rule(t0, "SNAT", "192.0.2.10", source_net="10.31.0.0/24", tags=CLUSTER_TAG)
    assert rule["rule_priority"] == 1024
    nsxlib.logical_router.delete_nat_rule(t0, rule["id"])
    nsxlib.logical_router_port.delete(dl["id"])
    nsxlib.router.remove_router_link_port(t1["id"], t0)
    nsxlib.logical_port.delete(lsp["id"])
    nsxlib.logical_switch.delete(ls["id"])
    nsxlib.logical_router.delete(t1["id"])


def test_ip_pool_allocate_and_release(nsxlib):
    pool = nsxlib.ip_pool.create("192.0.2.0/29", allocation_ranges=[{"start": "192.0.2.2", "end": "192.0.2.3"}], tags=CLUSTER_TAG)
    a = nsxlib.ip_pool.allocate(pool["id"])
    b = nsxlib.ip_pool.allocate(pool["id"])
    assert {a["allocation_id"], b["allocation_id"]} == {"192.0.2.2", "192.0.2.3"}
    with pytest.raises(exceptions.ManagerError):
        nsxlib.ip_pool.allocate(pool["id"])
    nsxlib.ip_pool.release(pool["id"], a["allocation_id"])
    assert nsxlib.ip_pool.get(pool["id"])["pool_usage"]["allocated_ids"] == 1
    nsxlib.ip_pool.delete(pool["id"], force=True)


def test_nsgroups_ipsets_and_firewall_sections_with_rules(nsxlib):
    expr = nsxlib.ns_group.get_port_tag_expression("ncp/project", "shop")
    group = nsxlib.ns_group.create("k8s-a-shop", "pods of shop", CLUSTER_TAG, membership_criteria=[expr])
    ipset = nsxlib.ip_set.create("k8s-a-block", ip_addresses=["203.0.113.0/24"], tags=CLUSTER_TAG)
    nsxlib.ip_set.update(ipset["id"], ip_addresses=["203.0.113.0/24", "198.18.0.1"])
    nsxlib.ns_group.add_members(group["id"], nsx_constants.IP_SET, [ipset["id"]])
    assert len(nsxlib.ns_group.read(group["id"])["members"]) == 1
    section = nsxlib.firewall_section.create_empty(
        "k8s-a-shop-np", "allow", applied_tos=[group["id"]],
        tags=CLUSTER_TAG, operation=nsx_constants.FW_INSERT_TOP,
    )
    rule = nsxlib.firewall_section.get_rule_dict(
        "ir-allow", sources=[nsxlib.firewall_section.get_ip_cidr_reference("10.0.0.0/8", nsx_constants.IPV4)],
        destinations=[nsxlib.firewall_section.get_nsgroup_reference(group["id"])], action=nsx_constants.FW_ACTION_ALLOW,
    )
    added = nsxlib.firewall_section.add_rule(rule, section["id"])
    more = nsxlib.firewall_section.add_rules([dict(rule, display_name="ir-2"), dict(rule, display_name="ir-3")], section["id"])
    assert len(more["rules"]) == 2
    rules = nsxlib.firewall_section.get_rules(section["id"])["results"]
    assert [r["display_name"] for r in rules] == ["ir-allow", "ir-2", "ir-3"]
    assert nsxlib.firewall_section.read(section["id"])["rule_count"] == 3
    nsxlib.firewall_section.delete_rule(section["id"], added["id"])
    with_rules = nsxlib.firewall_section.create_with_rules(
        "k8s-a-shop-isolation", "deny", applied_tos=[nsxlib.firewall_section.get_nsgroup_reference(group["id"])],
        tags=CLUSTER_TAG, rules=[nsxlib.firewall_section.get_rule_dict("deny-all", action=nsx_constants.FW_ACTION_DROP)],
    )
    assert with_rules["rule_count"] == 1
    sections = [s["display_name"] for s in nsxlib.firewall_section.list()]
    assert sections[0] == "k8s-a-shop-np" and sections[-1] == "Default Layer3 Section"
    nsxlib.firewall_section.delete(with_rules["id"])
    nsxlib.firewall_section.delete(section["id"])
    nsxlib.ns_group.remove_member(group["id"], nsx_constants.IP_SET, ipset["id"])
    nsxlib.ns_group.delete(group["id"])
    nsxlib.ip_set.delete(ipset["id"])


def test_load_balancer_service_virtual_server_and_pool(nsxlib):
    # A load balancer needs its tier-1 on an edge cluster, found as NCP finds it.
    edges = nsxlib.edge_cluster.get_id_by_name_or_id("edge-cluster-1")
    assert nsxlib.edge_cluster.get_transport_nodes(edges) == ["edge-node-1", "edge-node-2"]
    bare = nsxlib.logical_router.create("k8s-a-no-edges", CLUSTER_TAG)
    t1 = nsxlib.logical_router.create("k8s-a-lb", CLUSTER_TAG, edge_cluster_uuid=edges)
    assert t1["edge_cluster_id"] == edges
    profiles = nsxlib.load_balancer.application_profile.list()["results"]
    tcp = [p for p in profiles if p["resource_type"] == "LbFastTcpProfile"][0]["id"]
    pool = nsxlib.load_balancer.pool.create(display_name="k8s-a-shop-web", tags=CLUSTER_TAG, members=[{"ip_address": "10.4.0.10", "port": "8080"}])
    nsxlib.load_balancer.pool.update_pool_with_members(
        pool["id"], [{"ip_address": "10.4.0.10", "port": "8080"}, {"ip_address": "10.4.0.11", "port": "8080"}]
    )
    assert len(nsxlib.load_balancer.pool.get(pool["id"])["members"]) == 2
    vs = nsxlib.load_balancer.virtual_server.create(
        display_name="k8s-a-shop-web-80", tags=CLUSTER_TAG, ip_address="198.51.100.5", port="80",
        ip_protocol="TCP", application_profile_id=tcp, pool_id=pool["id"],
    )
    with pytest.raises(exceptions.ManagerError):
        nsxlib.load_balancer.service.create(
            display_name="k8s-a-lb", tags=CLUSTER_TAG, size="SMALL",
            attachment={"target_type": "LogicalRouter", "target_id": bare["id"]}, virtual_server_ids=[vs["id"]],
        )
    nsxlib.logical_router.delete(bare["id"])
    svc = nsxlib.load_balancer.service.create(
        display_name="k8s-a-lb", tags=CLUSTER_TAG, size="SMALL",
        attachment={"target_type": "LogicalRouter", "target_id": t1["id"]}, virtual_server_ids=[vs["id"]],
    )
    assert svc["virtual_server_ids"] == [vs["id"]]
    status = nsxlib.load_balancer.service.get_status(svc["id"])
    assert status["service_status"] == "UP"
    assert [v["status"] for v in status["virtual_servers"]] == ["UP"]
    assert sorted(m["status"] for m in status["pools"][0]["members"]) == ["UP", "UP"]
    with pytest.raises(exceptions.ManagerError):
        nsxlib.load_balancer.pool.delete(pool["id"])
    nsxlib.load_balancer.service.delete(svc["id"])
    nsxlib.load_balancer.virtual_server.delete(vs["id"])
    nsxlib.load_balancer.pool.delete(pool["id"])
    nsxlib.logical_router.delete(t1["id"])


def test_search_all_query_pipeline_and_firewall_exclude_list(nsxlib):
    tz = by_tag(nsxlib, "TransportZone")[0]["id"]
    tags = [{"scope": "test", "tag": "paging"}]
    made = [nsxlib.logical_switch.create("page-%d" % i, tz, tags)["id"] for i in range(5)]
    # search_all_* read the cursor of every page and stop once it reaches the count.
    found = nsxlib.search_all_by_tags(tags=tags, resource_type="LogicalSwitch")
    assert sorted(r["id"] for r in found) == sorted(made)
    one = nsxlib.search_all_resource_by_attributes("LogicalSwitch", display_name="page-1")
    assert [r["id"] for r in one] == [made[1]]
    # The query pipeline (POST search/querypipeline), as nsxlib builds it.
    two = nsxlib.search_resource_by_attribute_values("LogicalSwitch", "display_name", ["page-2", "page-3"])
    assert sorted(r["display_name"] for r in two["results"]) == ["page-2", "page-3"]
    assert int(two["cursor"]) >= two["result_count"] == 2
    every = nsxlib.search_all_resource_by_attribute_values("LogicalSwitch", "display_name", ["page-4"])
    assert [r["id"] for r in every] == [made[4]]
    # The distributed firewall's exclude list: empty, a port added, removed.
    fw = nsxlib.firewall_section
    assert fw.get_excludelist()["members"] == []
    port = nsxlib.logical_port.create(made[0], "vif-excluded", tags=CLUSTER_TAG)["id"]
    fw.add_member_to_fw_exclude_list(port, "LogicalPort")
    members = fw.get_excludelist()["members"]
    assert [(m["target_id"], m["target_type"]) for m in members] == [(port, "LogicalPort")]
    with pytest.raises(exceptions.ManagerError):
        fw.add_member_to_fw_exclude_list("no-such-port", "LogicalPort")
    fw.remove_member_from_fw_exclude_list(port, "LogicalPort")
    assert fw.get_excludelist()["members"] == []


def test_the_calls_ncp_makes_at_start_up(nsxlib):
    # ncp.ini names the admin's objects by name or id; NCP resolves them and lists what it
    # owns (every collection below is one NCP lists when it starts).
    tz = nsxlib.transport_zone.get_id_by_name_or_id("overlay-tz")
    assert nsxlib.transport_zone.get_transport_type(tz) == "OVERLAY"
    t0s = nsxlib.logical_router.list(router_type="TIER0")["results"]
    assert [r["display_name"] for r in t0s] == ["t0"]
    assert nsxlib.logical_router.get_id_by_name_or_id("t0") == t0s[0]["id"]
    blocks = [b for b in nsxlib.ip_block.list()["results"] if b["display_name"] == "k8s-a-pods"]
    assert len(blocks) == 1 and blocks[0]["cidr"] == "10.4.0.0/16"
    pools = {p["display_name"]: p for p in nsxlib.ip_pool.list()["results"]}
    assert {"k8s-a-snat", "k8s-a-lb"} <= set(pools)
    assert nsxlib.ip_pool.get_id_by_name_or_id("k8s-a-snat") == pools["k8s-a-snat"]["id"]
    for resource in [
        "logical-switches", "logical-ports", "logical-routers", "logical-router-ports",
        "ns-groups", "ip-sets", "firewall/sections", "pools/ip-subnets",
        "loadbalancer/services", "loadbalancer/virtual-servers", "loadbalancer/pools",
        "loadbalancer/persistence-profiles", "loadbalancer/application-profiles",
    ]:
        page = nsxlib.client.list(resource)
        assert page["result_count"] == len(page["results"]), resource
    t0_nat = nsxlib.logical_router.list_nat_rules(t0s[0]["id"])
    assert "results" in t0_nat


def test_the_calls_ncp_makes_per_object(nsxlib):
    tz = nsxlib.transport_zone.get_id_by_name_or_id("overlay-tz")
    t0 = nsxlib.logical_router.get_id_by_name_or_id("t0")
    block = nsxlib.ip_block.get_id_by_name_or_id("k8s-a-pods")
    # A namespace: a subnet carved from the block, a pool on it, a switch, a tier-1 with its
    # link and downlink, advertisement, SNAT (through one batch call, as NCP sends them).
    subnet = nsxlib.ip_block_subnet.create(block, 256)
    assert subnet["cidr"].endswith("/24") and subnet["block_id"] == block
    assert [s["id"] for s in nsxlib.ip_block_subnet.list(block)["results"]].count(subnet["id"]) == 1
    pool = nsxlib.ip_pool.create(
        subnet["cidr"], display_name="k8s-a-ns2", tags=CLUSTER_TAG,
        allocation_ranges=subnet["allocation_ranges"],
    )
    ls = nsxlib.logical_switch.create("k8s-a-ns2", tz, CLUSTER_TAG, ip_pool_id=pool["id"])
    nsxlib.logical_switch.update(ls["id"], tags=CLUSTER_TAG + [{"scope": "ncp/project", "tag": "ns2"}])
    t1 = nsxlib.logical_router.create("k8s-a-ns2", CLUSTER_TAG)
    nsxlib.logical_router.update(t1["id"], tags=CLUSTER_TAG + [{"scope": "ncp/project", "tag": "ns2"}])
    batch = nsxlib.client.create("batch", {"continue_on_error": False, "atomic": True, "requests": [
        {"method": "POST", "uri": "/v1/logical-routers/%s/nat/rules" % t0,
         "body": {"action": "SNAT", "translated_network": "192.0.2.50",
                  "match_source_network": subnet["cidr"], "tags": CLUSTER_TAG}},
    ]})
    assert [r["code"] for r in batch["results"]] == [201], batch
    rules = [r for r in nsxlib.logical_router.list_nat_rules(t0)["results"] if r.get("translated_network") == "192.0.2.50"]
    assert len(rules) == 1
    # A pod's port, updated in place (tags and admin state), as NCP does on a label change.
    port = nsxlib.logical_port.create(ls["id"], "vif-ns2", tags=CLUSTER_TAG, allocate_addresses="Both")
    updated = nsxlib.logical_port.update(
        port["id"], "vif-ns2", tags=CLUSTER_TAG + [{"scope": "ncp/pod", "tag": "p"}], admin_state=False,
    )
    assert updated["admin_state"] == "DOWN" and updated["_revision"] == 1
    # A policy's group, replaced in place; its section's rules replaced in one call.
    group = nsxlib.ns_group.create("k8s-a-ns2", "pods", CLUSTER_TAG)
    nsxlib.ns_group.update(group["id"], membership_criteria=[nsxlib.ns_group.get_port_tag_expression("ncp/project", "ns2")])
    assert len(nsxlib.ns_group.read(group["id"])["membership_criteria"]) == 1
    section = nsxlib.firewall_section.create_empty("k8s-a-ns2", "np", [group["id"]], tags=CLUSTER_TAG)
    rule = nsxlib.firewall_section.get_rule_dict("r1", action=nsx_constants.FW_ACTION_ALLOW)
    replaced = nsxlib.firewall_section.update(section["id"], rules=[rule, dict(rule, display_name="r2")])
    assert [r["display_name"] for r in replaced["rules"]] == ["r1", "r2"]
    # Session affinity's persistence profile: created, its timeout changed, deleted.
    profile = nsxlib.load_balancer.persistence_profile.create(
        display_name="k8s-a-ns2-web", tags=CLUSTER_TAG, resource_type="LbSourceIpPersistenceProfile", timeout=600,
    )
    assert profile["timeout"] == 600
    nsxlib.load_balancer.persistence_profile.update(
        profile["id"], resource_type="LbSourceIpPersistenceProfile", timeout=900,
    )
    assert nsxlib.load_balancer.persistence_profile.get(profile["id"])["timeout"] == 900
    nsxlib.load_balancer.persistence_profile.delete(profile["id"])
    # Everything goes, children first, with the flags NCP sends.
    nsxlib.firewall_section.delete(section["id"])
    nsxlib.ns_group.delete(group["id"])
    nsxlib.logical_port.delete(port["id"])
    nsxlib.logical_router.delete_nat_rule(t0, rules[0]["id"])
    nsxlib.logical_router.delete(t1["id"], force=True)
    nsxlib.logical_switch.delete(ls["id"])
    nsxlib.ip_pool.delete(pool["id"], force=True)
    nsxlib.ip_block_subnet.delete(subnet["id"])
    with pytest.raises(exceptions.ResourceNotFound):
        nsxlib.ip_block_subnet.get(subnet["id"])
