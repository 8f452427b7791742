//! The simulation spine under faults: every fault kind does what it says, the workload
//! converges once faults heal with nothing duplicated, and a run is a function of its seed.

use fake_nsx_manager::FaultRule;
use nsx_sim::spine::{self, Fault, ScheduledFault, SpineConfig, SpineReport};

fn at(at_ms: u64, fault: Fault) -> ScheduledFault {
    ScheduledFault { at_ms, fault }
}

#[track_caller]
fn assert_converged(r: &SpineReport, cfg: &SpineConfig) {
    assert!(
        r.finished,
        "seed {} did not finish: {:?}\n{}",
        r.seed,
        r.error,
        r.trace.join("\n")
    );
    assert_eq!(
        r.objects.get("LogicalSwitch"),
        Some(&cfg.namespaces),
        "{:?}",
        r.objects
    );
    assert_eq!(
        r.objects.get("LogicalPort"),
        Some(&(cfg.namespaces * cfg.ports_per_namespace)),
        "{:?}",
        r.objects
    );
    assert!(r.duplicates.is_empty(), "duplicates: {:?}", r.duplicates);
    assert_eq!(r.invariants, Ok(()));
}

fn stormy(seed: u64) -> SpineConfig {
    SpineConfig {
        faults: spine::storm_faults(),
        ..SpineConfig::new(seed)
    }
}

#[test]
fn the_same_seed_replays_the_same_trace_byte_for_byte() {
    for seed in [1, 2, 3] {
        let a = spine::run(&stormy(seed));
        let b = spine::run(&stormy(seed));
        assert_converged(&a, &stormy(seed));
        assert_eq!(a.trace, b.trace, "seed {seed}: traces differ");
        assert_eq!(a.trace_hash, b.trace_hash);
        assert_eq!(a.client, b.client);
        assert_eq!(a.sim_time_ms, b.sim_time_ms);
    }
}

#[test]
fn different_seeds_give_different_runs() {
    let hashes: std::collections::BTreeSet<u64> = (10..16)
        .map(|s| spine::run(&stormy(s)).trace_hash)
        .collect();
    assert_eq!(
        hashes.len(),
        6,
        "seeds should change latency, jitter, ids and fault draws"
    );
}

#[test]
fn a_partition_fails_requests_until_repaired_then_the_controller_converges() {
    let mut cfg = SpineConfig::new(5);
    cfg.faults = vec![at(30, Fault::Partition), at(30_000, Fault::Repair)];
    let r = spine::run(&cfg);
    assert_converged(&r, &cfg);
    assert!(r.client.transport_errors > 0, "{:?}", r.client);
    assert!(
        r.sim_time_ms > 30_000,
        "the workload cannot finish before the repair: {}",
        r.sim_time_ms
    );
    // Nothing reached the manager while the link was cut.
    let during: Vec<&String> = r
        .trace
        .iter()
        .filter(|l| l.contains("nsx-manager") && l.contains(" -> "))
        .filter(|l| {
            (100..29_000).contains(&l.split_whitespace().next().unwrap().parse::<u64>().unwrap())
        })
        .collect();
    assert!(
        during.is_empty(),
        "requests served during the partition: {during:?}"
    );
}

#[test]
fn held_messages_are_delivered_when_released_without_errors() {
    let mut cfg = SpineConfig::new(6);
    cfg.faults = vec![at(30, Fault::Hold), at(5_000, Fault::Release)];
    let r = spine::run(&cfg);
    assert_converged(&r, &cfg);
    assert_eq!(
        r.client.transport_errors, 0,
        "a hold shorter than the timeout loses nothing"
    );
    assert!(r.sim_time_ms >= 5_000);
    let served_late = r.trace.iter().any(|l| {
        l.contains(" -> ") && l.split_whitespace().next().unwrap().parse::<u64>().unwrap() >= 5_000
    });
    assert!(
        served_late,
        "the held requests are answered after the release"
    );
}

#[test]
fn link_latency_stretches_every_round_trip() {
    let base = spine::run(&SpineConfig::new(7));
    let mut cfg = SpineConfig::new(7);
    cfg.faults = vec![at(0, Fault::LinkLatency { ms: 100 })];
    let slow = spine::run(&cfg);
    assert_converged(&slow, &cfg);
    assert!(
        slow.sim_time_ms >= 200 * slow.client.requests,
        "{} ms for {} requests",
        slow.sim_time_ms,
        slow.client.requests
    );
    assert!(slow.sim_time_ms > 10 * base.sim_time_ms);
}

#[test]
fn a_manager_restart_keeps_its_data_and_the_client_logs_in_again() {
    let mut cfg = SpineConfig::new(8);
    cfg.faults = vec![at(60, Fault::RestartManager)];
    let r = spine::run(&cfg);
    assert_converged(&r, &cfg);
    assert!(r.client.sessions_created >= 2, "{:?}", r.client);
    assert_eq!(
        r.trace
            .iter()
            .filter(|l| l.contains("manager started"))
            .count(),
        2
    );
}

#[test]
fn a_crashed_manager_refuses_connections_until_it_starts_again() {
    let mut cfg = SpineConfig::new(9);
    cfg.faults = vec![at(60, Fault::CrashManager), at(8_000, Fault::StartManager)];
    let r = spine::run(&cfg);
    assert_converged(&r, &cfg);
    assert!(r.client.transport_errors > 0, "{:?}", r.client);
    assert!(r.sim_time_ms > 8_000);
}

#[test]
fn nsx_503_storms_are_retried_and_leave_no_duplicates() {
    let mut cfg = SpineConfig::new(11);
    cfg.faults = vec![at(
        0,
        Fault::NsxErrors(FaultRule {
            user: None,
            method: None,
            path: None,
            status: 503,
            error_code: None,
            rate: 0.5,
            remaining: None,
            message: None,
        }),
    )];
    let r = spine::run(&cfg);
    assert_converged(&r, &cfg);
    assert!(r.client.retries > 10, "{:?}", r.client);
    assert!(r.client.by_status.get(&503).copied().unwrap_or(0) > 10);
}
