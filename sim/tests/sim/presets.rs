//! The built-in worlds (`nsx-sim ncp`, `nsx-sim spine`) on the scenario engine: the NCP storm
//! converges for every seed with one replica and with two, a run is a function of its seed,
//! seed-chosen waits stay in their range, and every network and manager fault of the spine
//! does what it says.

use nsx_sim::presets::{self, SpineFaults};
use nsx_sim::scenario::run::{RunOptions, SeedReport, run};
use nsx_sim::scenario::spec::parse;

fn run_text(text: &str, seed: u64) -> SeedReport {
    let sc = presets::load("test", text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    run(&sc, seed, &RunOptions::default()).0
}

#[track_caller]
fn assert_passed(r: &SeedReport) {
    assert!(
        r.passed,
        "seed {}: step {:?}: {:?}\n{}",
        r.seed,
        r.failed_step,
        r.message,
        r.trace
            .iter()
            .rev()
            .take(60)
            .rev()
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// The simulated time of a trace line (its first field).
fn time_of(line: &str) -> u64 {
    line.split_whitespace()
        .next()
        .and_then(|t| t.parse().ok())
        .unwrap_or(u64::MAX)
}

/// Requests NSX answered in `[from, to)` ms (the trace's `nsx-manager <user> <method>` lines).
fn served_between(r: &SeedReport, from: u64, to: u64) -> Vec<&String> {
    r.trace
        .iter()
        .filter(|l| l.contains("nsx-manager") && l.contains(" -> "))
        .filter(|l| (from..to).contains(&time_of(l)))
        .collect()
}

#[test]
fn the_ncp_storm_converges_with_one_replica_for_several_seeds() {
    let text = presets::ncp(1, false);
    for seed in 1..=4 {
        let r = run_text(&text, seed);
        assert_passed(&r);
        // ns-0 grew to 7 pods, ns-2 to 6; ns-1 and its 4 pods are gone.
        assert_eq!(r.pods, 13, "seed {seed}");
        assert!(r.ncp_client.sessions_created >= 2, "the manager restarted");
    }
}

#[test]
fn the_ncp_storm_converges_with_two_replicas_and_leader_election() {
    let text = presets::ncp(2, false);
    for seed in [5, 6] {
        assert_passed(&run_text(&text, seed));
    }
}

#[test]
fn the_same_seed_replays_a_preset_byte_for_byte_and_seeds_differ() {
    for (seed, replicas) in [(7, 1), (8, 2)] {
        let text = presets::ncp(replicas, false);
        let (a, b) = (run_text(&text, seed), run_text(&text, seed));
        assert_passed(&a);
        assert_eq!(a.trace.len(), b.trace.len(), "seed {seed}");
        for (i, (x, y)) in a.trace.iter().zip(&b.trace).enumerate() {
            assert_eq!(x, y, "seed {seed}: traces differ at line {i}");
        }
        assert_eq!(a.trace_hash, b.trace_hash);
    }
    let text = presets::spine(2, 2, SpineFaults::Storm);
    let hashes: std::collections::BTreeSet<String> =
        (1..=4).map(|s| run_text(&text, s).trace_hash).collect();
    assert_eq!(hashes.len(), 4, "seeds change latency, ids and fault draws");
}

#[test]
fn a_wait_range_draws_from_the_seed_within_its_bounds() {
    let text = "name: w\nsteps:\n  - wait: 1s..3s\n";
    let times: Vec<u64> = (1..=8).map(|s| run_text(text, s).sim_time_ms).collect();
    let fixed = run_text("name: w\nsteps:\n  - wait: 1s\n", 1).sim_time_ms;
    // Setup and the apply of the default namespaces take the same time in every run.
    let setup = fixed - 1_000;
    for t in &times {
        assert!(
            (setup + 1_000..=setup + 3_000).contains(t),
            "{t} ms (setup {setup})"
        );
    }
    assert!(
        times
            .iter()
            .collect::<std::collections::BTreeSet<_>>()
            .len()
            > 4,
        "{times:?}"
    );
    assert_eq!(
        run_text(text, 3).sim_time_ms,
        times[2],
        "same seed, same wait"
    );
    let e = parse(
        std::path::Path::new("w.yaml"),
        "name: w\nsteps:\n  - wait: 3s..1s\n",
    )
    .expect_err("a backwards range");
    assert!(e.to_string().contains("runs backwards"), "{e}");
}

#[test]
fn the_spine_storm_converges_and_its_calm_run_takes_no_retry() {
    for seed in [1, 2] {
        let r = run_text(&presets::spine(3, 4, SpineFaults::Storm), seed);
        assert_passed(&r);
        assert!(r.ncp_client.retries > 0, "{:?}", r.ncp_client);
        assert!(r.ncp_client.transport_errors > 0, "{:?}", r.ncp_client);
    }
    let calm = run_text(&presets::spine(3, 4, SpineFaults::None), 1);
    assert_passed(&calm);
    assert_eq!(calm.ncp_client.retries, 0, "{:?}", calm.ncp_client);
    assert_eq!(calm.ncp_client.transport_errors, 0);
}

#[test]
fn a_partition_stops_every_request_until_healed_then_ncp_converges() {
    let steps = format!(
        "{}  - wait: 30ms\n  - fault: {{partition: [ncp, nsx-manager]}}\n  - wait: 30s\n  - heal: {{partition: [ncp, nsx-manager]}}\n",
        presets::workload(2, 3)
    );
    let r = run_text(&presets::spine_with(&steps), 5);
    assert_passed(&r);
    assert!(r.ncp_client.transport_errors > 0, "{:?}", r.ncp_client);
    let during = served_between(&r, 200, 30_000);
    assert!(during.is_empty(), "served during the partition: {during:?}");
    assert!(!served_between(&r, 30_000, u64::MAX).is_empty());
}

#[test]
fn held_messages_are_answered_after_the_release_and_lose_nothing() {
    // Shorter than NCP's request timeout (5 s): held requests wait, none fails.
    let steps = format!(
        "{}  - wait: 30ms\n  - fault: {{hold: [ncp, nsx-manager]}}\n  - wait: 3s\n  - heal: {{hold: [ncp, nsx-manager]}}\n",
        presets::workload(2, 3)
    );
    let r = run_text(&presets::spine_with(&steps), 6);
    assert_passed(&r);
    assert_eq!(r.ncp_client.transport_errors, 0, "{:?}", r.ncp_client);
    let during = served_between(&r, 200, 3_000);
    assert!(during.is_empty(), "answered while held: {during:?}");
    assert!(
        !served_between(&r, 3_000, 3_200).is_empty(),
        "answered on release"
    );
}

#[test]
fn latency_on_the_link_stretches_every_round_trip() {
    let workload = presets::workload(2, 3);
    let base = run_text(&presets::spine_with(&workload), 7);
    let steps = format!(
        "  - fault: {{latency: {{between: [ncp, nsx-manager], min: 100ms, max: 100ms}}}}\n{workload}"
    );
    let slow = run_text(&presets::spine_with(&steps), 7);
    assert_passed(&base);
    assert_passed(&slow);
    // NCP keeps at most `concurrent_connections` (10) requests in flight, and each waits a
    // 200 ms round trip: at most 10 writes per 200 ms.
    let concurrent = nsx_core::ncp::config::DEFAULT_CONCURRENT_CONNECTIONS as u64;
    assert!(
        slow.sim_time_ms >= 200 * slow.ncp_client.writes / concurrent,
        "{} ms for {} writes",
        slow.sim_time_ms,
        slow.ncp_client.writes
    );
    // And a plan's phases (a switch before its ports, ...) follow one another: at least five
    // round trips one after the other.
    assert!(
        slow.sim_time_ms >= base.sim_time_ms + 5 * 200,
        "{} vs {}",
        slow.sim_time_ms,
        base.sim_time_ms
    );
}

#[test]
fn a_manager_restart_keeps_its_data_and_ncp_logs_in_again() {
    let steps = format!(
        // NCP has logged in (about 125 ms) and is writing.
        "{}  - wait: 500ms\n  - fault: {{restart: nsx-manager}}\n",
        presets::workload(2, 3)
    );
    let r = run_text(&presets::spine_with(&steps), 8);
    assert_passed(&r);
    assert!(r.ncp_client.sessions_created >= 2, "{:?}", r.ncp_client);
    assert_eq!(
        r.trace
            .iter()
            .filter(|l| l.contains("nsx-manager  started"))
            .count(),
        2
    );
}

#[test]
fn a_crashed_manager_refuses_connections_until_it_starts_again() {
    let steps = format!(
        "{}  - wait: 60ms\n  - fault: {{crash: nsx-manager}}\n  - wait: 8s\n  - heal: {{crash: nsx-manager}}\n",
        presets::workload(2, 3)
    );
    let r = run_text(&presets::spine_with(&steps), 9);
    assert_passed(&r);
    assert!(r.ncp_client.transport_errors > 0, "{:?}", r.ncp_client);
    assert!(served_between(&r, 200, 8_000).is_empty());
}

#[test]
fn nsx_503_storms_are_retried_and_leave_no_duplicates() {
    let steps = format!(
        "  - fault: {{nsx_errors: {{status: 503, rate: 0.5}}}}\n{}  - wait: 10s\n  - heal: all\n",
        presets::workload(2, 3)
    );
    let r = run_text(&presets::spine_with(&steps), 11);
    // Converged means one NSX object per Kubernetes object: nothing duplicated.
    assert_passed(&r);
    assert!(r.ncp_client.retries > 10, "{:?}", r.ncp_client);
    assert!(r.nsx_requests.by_status.get(&503).copied().unwrap_or(0) > 10);
}

/// A burst of 400 pods in 20 namespaces against NSX's default rate limit (100 requests/s): NCP
/// keeps `concurrent_connections` requests in flight under its own rate limiter, so the burst's
/// requests go from the first to the last within 1.5 times what the limit allows for them, and
/// NSX never answers 429 (no retry at all). One request at a time, the same burst ran at about
/// a fifth of the limit.
#[test]
fn a_burst_uses_the_rate_limit_and_never_meets_it() {
    let text = format!(
        "name: burst\ndescription: a burst of pods\ncluster:\n  nodes: 3\nnsx:\n  rate_limit: 100\nsteps:\n{}  - converge: {{within: 120s}}\n  - expect: {{converged: true, api_calls: {{max: 100000}}}}\n{}  - converge: {{within: 300s}}\n  - expect: {{converged: true, api_calls: {{rate_bound_factor_max: 1.5}}}}\n",
        presets::workload(20, 0),
        presets::workload(20, 20),
    );
    let r = run_text(&text, 3);
    assert_passed(&r);
    let burst = r.marks.last().expect("the burst's mark");
    assert!(burst.total >= 800, "{burst:?}");
    assert_eq!(burst.rate_limit, 100);
    assert!(burst.busy_ms * 2 <= burst.rate_bound_ms * 3, "{burst:?}");
    assert!(
        !r.nsx_requests.by_status.contains_key(&429),
        "{:?}",
        r.nsx_requests.by_status
    );
    assert_eq!(r.ncp_client.retries, 0, "{:?}", r.ncp_client);
}
