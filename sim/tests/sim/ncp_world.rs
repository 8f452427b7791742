//! The NCP stack under a storm of faults: it converges for every seed, with one replica and
//! with two (leader election), and the same seed replays the same run byte for byte.

use nsx_sim::ncp_world::{NcpWorldConfig, run};

#[test]
fn one_replica_converges_through_a_storm_for_several_seeds() {
    for seed in 1..=4 {
        let r = run(&NcpWorldConfig::storm(seed, 1));
        assert!(
            r.converged,
            "seed {seed}: {:?}\n{}",
            r.error,
            r.trace
                .iter()
                .rev()
                .take(40)
                .rev()
                .cloned()
                .collect::<Vec<_>>()
                .join("\n")
        );
        assert!(r.pods >= 12, "{}", r.pods);
    }
}

#[test]
fn two_replicas_with_leader_election_converge_through_a_storm() {
    for seed in [5, 6] {
        let r = run(&NcpWorldConfig::storm(seed, 2));
        assert!(
            r.converged,
            "seed {seed}: {:?}\n{}",
            r.error,
            r.trace
                .iter()
                .rev()
                .take(40)
                .rev()
                .cloned()
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

#[test]
fn the_same_seed_replays_the_whole_stack_byte_for_byte() {
    for (seed, replicas) in [(7, 1), (8, 2)] {
        let a = run(&NcpWorldConfig::storm(seed, replicas));
        let b = run(&NcpWorldConfig::storm(seed, replicas));
        assert!(a.converged, "{:?}", a.error);
        assert_eq!(a.trace.len(), b.trace.len(), "seed {seed}");
        for (i, (x, y)) in a.trace.iter().zip(&b.trace).enumerate() {
            assert_eq!(x, y, "seed {seed}: traces differ at line {i}");
        }
        assert_eq!(a.trace_hash, b.trace_hash);
    }
    let c = run(&NcpWorldConfig::storm(9, 1));
    let d = run(&NcpWorldConfig::storm(10, 1));
    assert_ne!(c.trace_hash, d.trace_hash);
}
