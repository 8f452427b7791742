//! `nsx-sim`: runs the deterministic harness.
//!
//! `run`, `check`, `dump` and `trace` work on scenario files (format in `scenario::spec`); `ncp` and `spine`
//! run the built-in storm worlds of the NCP stack and of the NSX client alone.

use std::io::IsTerminal;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use nsx_sim::spine::{self, ScheduledFault, SpineConfig};
use serde_json::json;

mod scenarios;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Deterministic simulation of the NSX-T / Kubernetes integration"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run scenario files (or every `*.yaml` in a directory) for one or many seeds.
    Run {
        #[arg(required = true)]
        paths: Vec<std::path::PathBuf>,
        #[arg(long, conflicts_with = "seeds")]
        seed: Option<u64>,
        /// A range of seeds, `A..B` (B excluded) or `A..=B`.
        #[arg(long)]
        seeds: Option<String>,
        /// Run the K-th of N disjoint slices of the (scenario, seed) pairs, `K/N`, 1-based.
        #[arg(long)]
        shard: Option<String>,
        /// Print one JSON report instead of the summary.
        #[arg(long)]
        json: bool,
        /// Also write the JSON report to this file.
        #[arg(long)]
        report: Option<std::path::PathBuf>,
        /// Parallel runs (default: the machine's cores).
        #[arg(long)]
        jobs: Option<usize>,
        /// Write snapshots that are missing or differ instead of failing.
        #[arg(long)]
        update_snapshots: bool,
        /// Print the event trace of every run.
        #[arg(long)]
        print_trace: bool,
    },
    /// Parse and validate scenario files only.
    Check {
        #[arg(required = true)]
        paths: Vec<std::path::PathBuf>,
    },
    /// Print the realized state after a run (or after step `--at`).
    Dump {
        file: std::path::PathBuf,
        #[arg(long)]
        seed: Option<u64>,
        /// Stop after this step (1-based).
        #[arg(long)]
        at: Option<usize>,
        /// The NSX objects (JSON).
        #[arg(long, conflicts_with = "ovs")]
        nsx: bool,
        /// A node's flows and groups, as `ovs-ofctl dump-flows` / `dump-groups` print them.
        #[arg(long)]
        ovs: Option<String>,
    },
    /// Trace one packet (and its reply) through the realized dataplane after a run.
    Trace {
        file: std::path::PathBuf,
        #[arg(long)]
        seed: Option<u64>,
        #[arg(long)]
        at: Option<usize>,
        /// `ns/pod` or `external/a.b.c.d`.
        #[arg(long)]
        from: String,
        /// `ns/pod`, `svc/ns/name`, `lb/ns/name` or `external/a.b.c.d`.
        #[arg(long)]
        to: String,
        #[arg(long)]
        port: u16,
        #[arg(long, default_value = "TCP")]
        protocol: String,
        #[arg(long, default_value_t = 40000)]
        source_port: u16,
    },
    /// Run the whole NCP stack (fake kube-apiserver, fake NSX manager, NCP) under a storm of
    /// faults and check it converges: every pod wired, nothing duplicated or leaked.
    Ncp {
        #[arg(long, conflicts_with = "seeds")]
        seed: Option<u64>,
        /// A range of seeds, `A..B` (B excluded) or `A..=B`.
        #[arg(long)]
        seeds: Option<String>,
        /// NCP replicas: 1, or 2 for leader election.
        #[arg(long, default_value_t = 1)]
        replicas: usize,
        /// No faults, only the workload.
        #[arg(long)]
        calm: bool,
        #[arg(long)]
        json: bool,
        #[arg(long)]
        report: Option<std::path::PathBuf>,
        #[arg(long)]
        print_trace: bool,
    },
    /// Run the NSX spine: the fake manager and the production NSX client under faults.
    Spine {
        /// One seed.
        #[arg(long, conflicts_with = "seeds")]
        seed: Option<u64>,
        /// A range of seeds, `A..B` (B excluded) or `A..=B`.
        #[arg(long)]
        seeds: Option<String>,
        /// Which fault schedule to apply.
        #[arg(long, value_enum, default_value_t = Schedule::Storm)]
        faults: Schedule,
        #[arg(long, default_value_t = 3)]
        namespaces: usize,
        #[arg(long, default_value_t = 4)]
        ports: usize,
        /// Print one JSON object instead of the summary.
        #[arg(long)]
        json: bool,
        /// Also write the JSON report to this file.
        #[arg(long)]
        report: Option<std::path::PathBuf>,
        /// Print the full event trace of each run.
        #[arg(long)]
        print_trace: bool,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Schedule {
    /// No faults.
    None,
    /// 503 storm on ports, partition, manager restart, added latency, then healing.
    Storm,
}

/// The most seeds one invocation runs: a million runs of the cheapest scenario already take
/// hours on one machine, and every seed's result is kept for the report.
const MAX_SEEDS: u64 = 1_000_000;

fn parse_seeds(seed: Option<u64>, seeds: Option<&str>) -> anyhow::Result<Vec<u64>> {
    match (seed, seeds) {
        (Some(s), _) => Ok(vec![s]),
        (None, None) => Ok(vec![1]),
        (None, Some(r)) => {
            let (a, b, inclusive) = if let Some((a, b)) = r.split_once("..=") {
                (a, b, true)
            } else if let Some((a, b)) = r.split_once("..") {
                (a, b, false)
            } else {
                bail!("--seeds takes A..B or A..=B, got {r}");
            };
            let a: u64 = a
                .trim()
                .parse()
                .with_context(|| format!("bad start in --seeds {r}"))?;
            let b: u64 = b
                .trim()
                .parse()
                .with_context(|| format!("bad end in --seeds {r}"))?;
            // Inclusive bounds in u128: `u64::MAX..=u64::MAX` is one seed, and no bound
            // overflows.
            let last = if inclusive {
                u128::from(b)
            } else if b == 0 {
                bail!("--seeds {r} is empty");
            } else {
                u128::from(b) - 1
            };
            if last < u128::from(a) {
                bail!("--seeds {r} is empty");
            }
            let count = last - u128::from(a) + 1;
            if count > MAX_SEEDS as u128 {
                bail!(
                    "--seeds {r} names {count} seeds; one run takes at most {MAX_SEEDS} \
                     (split a larger sweep into ranges, or shards of one)"
                );
            }
            Ok((a..=last as u64).collect())
        }
    }
}

fn schedule(s: Schedule) -> Vec<ScheduledFault> {
    match s {
        Schedule::None => Vec::new(),
        Schedule::Storm => spine::storm_faults(),
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("nsx-sim: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run() -> anyhow::Result<bool> {
    let cli = Cli::parse();
    let (seed, seeds, faults, namespaces, ports, json, report, print_trace) = match cli.command {
        Command::Run {
            paths,
            seed,
            seeds,
            shard,
            json,
            report,
            jobs,
            update_snapshots,
            print_trace,
        } => {
            return scenarios::run(scenarios::RunArgs {
                paths,
                seed,
                seeds: seeds.map(|s| parse_seeds(None, Some(&s))).transpose()?,
                shard,
                json,
                report,
                jobs,
                update_snapshots,
                print_trace,
            });
        }
        Command::Check { paths } => return scenarios::check(&paths),
        Command::Dump {
            file,
            seed,
            at,
            nsx,
            ovs,
        } => return scenarios::dump(&file, seed, at, nsx, ovs),
        Command::Trace {
            file,
            seed,
            at,
            from,
            to,
            port,
            protocol,
            source_port,
        } => return scenarios::trace(&file, seed, at, &from, &to, port, &protocol, source_port),
        Command::Ncp {
            seed,
            seeds,
            replicas,
            calm,
            json,
            report,
            print_trace,
        } => {
            return run_ncp(
                parse_seeds(seed, seeds.as_deref())?,
                replicas,
                calm,
                json,
                report,
                print_trace,
            );
        }
        Command::Spine {
            seed,
            seeds,
            faults,
            namespaces,
            ports,
            json,
            report,
            print_trace,
        } => (
            seed,
            seeds,
            faults,
            namespaces,
            ports,
            json,
            report,
            print_trace,
        ),
    };
    let seeds = parse_seeds(seed, seeds.as_deref())?;
    let terminal = std::io::stderr().is_terminal();
    let mut results = Vec::new();
    let (mut passed, mut failed) = (0usize, 0usize);
    for (i, s) in seeds.iter().enumerate() {
        let mut cfg = SpineConfig::new(*s);
        cfg.namespaces = namespaces;
        cfg.ports_per_namespace = ports;
        cfg.faults = schedule(faults);
        // Wall time is measured for the report only; nothing in the simulation reads it.
        let started = std::time::Instant::now();
        let r = spine::run(&cfg);
        let wall_ms = started.elapsed().as_millis() as u64;
        let ok = r.finished && r.duplicates.is_empty() && r.invariants.is_ok();
        if ok {
            passed += 1
        } else {
            failed += 1
        }
        if terminal && !json {
            eprint!("\r[{}/{}] seed {s}", i + 1, seeds.len());
        }
        if print_trace {
            for l in &r.trace {
                println!("{l}");
            }
        }
        let message = if ok {
            None
        } else {
            Some(format!(
                "{}{}{}",
                r.error.clone().unwrap_or_default(),
                if r.duplicates.is_empty() {
                    String::new()
                } else {
                    format!(" duplicates {:?}", r.duplicates)
                },
                r.invariants
                    .clone()
                    .err()
                    .map(|e| format!(" invariant: {e}"))
                    .unwrap_or_default()
            ))
        };
        results.push(json!({
            "seed": s, "passed": ok, "message": message,
            "sim_time_ms": r.sim_time_ms, "wall_ms": wall_ms,
            "nsx_requests": {"total": r.manager.total, "writes": r.manager.writes, "by_status": r.manager.by_status},
            "client": r.client, "objects": r.objects, "trace_hash": format!("{:016x}", r.trace_hash),
        }));
        if !json {
            let ratio = if wall_ms == 0 {
                "inf".to_string()
            } else {
                format!("{:.0}x", r.sim_time_ms as f64 / wall_ms as f64)
            };
            let line = format!(
                "seed {s:>4}  {}  sim {:>7} ms  wall {:>5} ms  ({ratio})  nsx requests {:>4} (writes {:>3})  retries {:>3}  trace {:016x}",
                if ok { "PASS" } else { "FAIL" },
                r.sim_time_ms,
                wall_ms,
                r.manager.total,
                r.manager.writes,
                r.client.retries,
                r.trace_hash
            );
            if terminal {
                eprint!("\r");
            }
            println!("{line}");
            if let Some(m) = &message {
                println!("  {m}");
                println!(
                    "  replay: cargo run --release -p nsx-sim -- spine --seed {s} --faults {:?} --print-trace",
                    faults
                );
            }
        }
    }
    let out = json!({"scenarios": [{"name": "nsx-spine", "file": null, "seeds": results}], "passed": passed, "failed": failed});
    if json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!("{passed} passed, {failed} failed");
    }
    if let Some(path) = report {
        std::fs::write(&path, serde_json::to_vec_pretty(&out)?)
            .with_context(|| format!("failed to write {}", path.display()))?;
    }
    Ok(failed == 0)
}

fn run_ncp(
    seeds: Vec<u64>,
    replicas: usize,
    calm: bool,
    json: bool,
    report: Option<std::path::PathBuf>,
    print_trace: bool,
) -> anyhow::Result<bool> {
    use nsx_sim::ncp_world::{NcpWorldConfig, run as run_world};
    if !(1..=2).contains(&replicas) {
        bail!("--replicas must be 1 or 2, got {replicas}");
    }
    let terminal = std::io::stderr().is_terminal();
    let (mut passed, mut failed) = (0usize, 0usize);
    let mut results = Vec::new();
    for (i, s) in seeds.iter().enumerate() {
        let cfg = if calm {
            NcpWorldConfig {
                replicas,
                ..NcpWorldConfig::new(*s)
            }
        } else {
            NcpWorldConfig::storm(*s, replicas)
        };
        if terminal && !json {
            eprint!("\r[{}/{}] seed {s}", i + 1, seeds.len());
        }
        // Wall time is measured for the report only; nothing in the simulation reads it.
        let started = std::time::Instant::now();
        let r = run_world(&cfg);
        let wall_ms = started.elapsed().as_millis() as u64;
        if r.converged {
            passed += 1
        } else {
            failed += 1
        }
        if print_trace {
            for l in &r.trace {
                println!("{l}");
            }
        }
        results.push(json!({
            "seed": s, "passed": r.converged, "message": r.error, "sim_time_ms": r.sim_time_ms, "wall_ms": wall_ms,
            "converged_at_ms": r.converged_at_ms, "pods": r.pods, "passes": r.passes,
            "nsx_requests": {"total": r.nsx.total, "writes": r.nsx.writes, "by_status": r.nsx.by_status},
            "apiserver_requests": r.apiserver_requests, "trace_hash": format!("{:016x}", r.trace_hash),
        }));
        if !json {
            if terminal {
                eprint!("\r");
            }
            let ratio = if wall_ms == 0 {
                "inf".to_string()
            } else {
                format!("{:.0}x", r.sim_time_ms as f64 / wall_ms as f64)
            };
            println!(
                "seed {s:>4}  {}  converged at {:>6} ms  sim {:>6} ms  wall {:>5} ms  ({ratio})  pods {:>3}  nsx requests {:>5} (writes {:>4})  trace {:016x}",
                if r.converged { "PASS" } else { "FAIL" },
                r.converged_at_ms.map_or("-".to_string(), |m| m.to_string()),
                r.sim_time_ms,
                wall_ms,
                r.pods,
                r.nsx.total,
                r.nsx.writes,
                r.trace_hash
            );
            if let Some(e) = &r.error {
                println!("  {e}");
                println!(
                    "  replay: cargo run --release -p nsx-sim -- ncp --seed {s} --replicas {replicas}{} --print-trace",
                    if calm { " --calm" } else { "" }
                );
            }
        }
    }
    let out = json!({"scenarios": [{"name": format!("ncp-storm-{replicas}-replica"), "file": null, "seeds": results}], "passed": passed, "failed": failed});
    if json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!("{passed} passed, {failed} failed");
    }
    if let Some(path) = report {
        std::fs::write(&path, serde_json::to_vec_pretty(&out)?)
            .with_context(|| format!("failed to write {}", path.display()))?;
    }
    Ok(failed == 0)
}
