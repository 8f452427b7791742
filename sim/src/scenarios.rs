//! The scenario commands of `nsx-sim`: run, check, dump, trace.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Context, bail};
use nsx_sim::scenario::names::{Endpoint, parse_ip, protocol};
use nsx_sim::scenario::run::{
    DetailWhen, Injection, RunOptions, SeedReport, run as run_one, running_step,
};
use nsx_sim::scenario::spec::{Scenario, load};
use serde_json::json;

pub struct RunArgs {
    pub paths: Vec<PathBuf>,
    pub seed: Option<u64>,
    pub seeds: Option<Vec<u64>>,
    pub shard: Option<String>,
    pub json: bool,
    pub report: Option<PathBuf>,
    pub html: Option<PathBuf>,
    pub jobs: Option<usize>,
    /// `--pair-timeout SECS`.
    pub pair_timeout: Option<u64>,
    pub update_snapshots: bool,
    pub print_trace: bool,
}

/// Scenario files: the files given, and the `*.yaml` files directly in the directories given
/// (subdirectories hold manifests and snapshots).
fn files(paths: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut v: Vec<PathBuf> = std::fs::read_dir(p)
                .with_context(|| format!("cannot read {}", p.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| f.is_file() && f.extension().is_some_and(|x| x == "yaml" || x == "yml"))
                .collect();
            v.sort();
            if v.is_empty() {
                bail!("{} holds no *.yaml scenario", p.display());
            }
            out.extend(v);
        } else if p.is_file() {
            out.push(p.clone());
        } else {
            bail!("{}: no such file or directory", p.display());
        }
    }
    Ok(out)
}

fn load_all(paths: &[PathBuf]) -> anyhow::Result<Vec<Scenario>> {
    let mut out: Vec<Scenario> = Vec::new();
    let mut errors = Vec::new();
    for f in files(paths)? {
        match load(&f) {
            Ok(s) => {
                if let Some(other) = out.iter().find(|o| o.name == s.name) {
                    errors.push(format!(
                        "{}: scenario name `{}` is also used by {}",
                        f.display(),
                        s.name,
                        other.file.display()
                    ));
                }
                out.push(s)
            }
            Err(e) => errors.push(e.to_string()),
        }
    }
    if !errors.is_empty() {
        bail!("{}", errors.join("\n"));
    }
    Ok(out)
}

pub fn check(paths: &[PathBuf]) -> anyhow::Result<bool> {
    let all = load_all(paths)?;
    for s in &all {
        println!(
            "ok  {}  {} ({} steps)",
            s.file.display(),
            s.name,
            s.steps.len()
        );
    }
    Ok(true)
}

fn parse_shard(s: &str) -> anyhow::Result<(usize, usize)> {
    let (k, n) = s.split_once('/').context("--shard takes K/N")?;
    let (k, n): (usize, usize) = (k.trim().parse()?, n.trim().parse()?);
    if n == 0 || k == 0 || k > n {
        bail!("--shard {s}: K must be 1..=N");
    }
    Ok((k, n))
}

pub fn run(args: RunArgs) -> anyhow::Result<bool> {
    let all = load_all(&args.paths)?;
    run_scenarios(&all, &args, &|s: &Scenario, seed: u64| {
        format!(
            "cargo run --release -p nsx-sim -- run {} --seed {seed} --print-trace",
            s.file.display()
        )
    })
}

/// Runs every (scenario, seed) pair of `all` and prints and writes one report: the engine of
/// `run` and of the built-in worlds. `replay` is the command that replays one failed pair.
pub fn run_scenarios(
    all: &[Scenario],
    args: &RunArgs,
    replay: &(dyn Fn(&Scenario, u64) -> String + Sync),
) -> anyhow::Result<bool> {
    let shard = args.shard.as_deref().map(parse_shard).transpose()?;
    let mut pairs: Vec<(usize, u64)> = Vec::new();
    for (i, s) in all.iter().enumerate() {
        let seeds = match (&args.seed, &args.seeds) {
            (Some(x), _) => vec![*x],
            (None, Some(v)) => v.clone(),
            (None, None) => vec![s.seed.unwrap_or(1)],
        };
        for seed in seeds {
            pairs.push((i, seed));
        }
    }
    if let Some((k, n)) = shard {
        pairs = pairs
            .into_iter()
            .enumerate()
            .filter(|(j, _)| j % n == k - 1)
            .map(|(_, p)| p)
            .collect();
    }
    let jobs = args
        .jobs
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1);
    let terminal = std::io::stderr().is_terminal() && !args.json;
    let next = AtomicUsize::new(0);
    let done = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<SeedReport>>> = Mutex::new(vec![None; pairs.len()]);
    let opts = RunOptions {
        stop_after: None,
        update_snapshots: args.update_snapshots,
        detail: DetailWhen::Never,
        pair_timeout: args.pair_timeout.map(std::time::Duration::from_secs),
        inject: None,
    };
    let injected = injections(all)?;
    // Each scenario's first pair (its index in `pairs`).
    let mut first_pair = vec![usize::MAX; all.len()];
    for (j, (i, _)) in pairs.iter().enumerate().rev() {
        first_pair[*i] = j;
    }
    std::thread::scope(|scope| {
        for _ in 0..jobs.min(pairs.len().max(1)) {
            scope.spawn(|| {
                loop {
                    let j = next.fetch_add(1, Ordering::SeqCst);
                    let Some((i, seed)) = pairs.get(j).copied() else {
                        break;
                    };
                    // The page details a scenario's first seed and every failing one.
                    let detail = match (&args.html, first_pair[i] == j) {
                        (None, _) => DetailWhen::Never,
                        (Some(_), true) => DetailWhen::Always,
                        (Some(_), false) => DetailWhen::Failed,
                    };
                    let pair_opts = RunOptions {
                        detail,
                        inject: injected
                            .iter()
                            .find(|(k, s, _)| *k == i && *s == seed)
                            .map(|(_, _, what)| *what),
                        ..opts.clone()
                    };
                    let started = std::time::Instant::now();
                    // A pair that panics is that pair's failure: the others run on and the
                    // report is written.
                    let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        run_one(&all[i], seed, &pair_opts).0
                    }));
                    let r = ran.unwrap_or_else(|payload| {
                        let msg = payload
                            .downcast_ref::<&str>()
                            .map(|s| s.to_string())
                            .or_else(|| payload.downcast_ref::<String>().cloned())
                            .unwrap_or_else(|| "a panic without a message".into());
                        SeedReport::ended(
                            seed,
                            "panic",
                            running_step(),
                            format!("panicked: {msg}"),
                            started.elapsed().as_millis() as u64,
                        )
                    });
                    if let Ok(mut res) = results.lock() {
                        res[j] = Some(r);
                    }
                    let d = done.fetch_add(1, Ordering::SeqCst) + 1;
                    if terminal {
                        eprint!(
                            "\r[{d}/{}] {} seed {seed}        ",
                            pairs.len(),
                            all[i].name
                        );
                    }
                }
            });
        }
    });
    if terminal {
        eprint!("\r{:60}\r", "");
    }
    let results: Vec<SeedReport> = results
        .into_inner()
        .unwrap_or_default()
        .into_iter()
        .flatten()
        .collect();
    let (mut passed, mut failed) = (0usize, 0usize);
    let mut per_scenario: Vec<Vec<&SeedReport>> = vec![Vec::new(); all.len()];
    for ((i, _), r) in pairs.iter().zip(&results) {
        per_scenario[*i].push(r);
        if r.passed {
            passed += 1;
        } else {
            failed += 1;
        }
    }
    if args.print_trace {
        for r in &results {
            for l in &r.trace {
                println!("{l}");
            }
        }
    }
    if !args.json {
        for (s, rs) in all.iter().zip(&per_scenario) {
            if rs.is_empty() {
                continue;
            }
            let ok = rs.iter().filter(|r| r.passed).count();
            let sim: u64 = rs.iter().map(|r| r.sim_time_ms).sum();
            let wall: u64 = rs.iter().map(|r| r.wall_ms).sum::<u64>().max(1);
            let reqs: u64 = rs.iter().map(|r| r.nsx_requests.total).sum::<u64>() / rs.len() as u64;
            println!(
                "{}  {:<32} {ok:>3}/{:<3} seeds  sim {:>8} ms  wall {:>7} ms  ({:.0}x)  nsx requests/seed {reqs}",
                if ok == rs.len() { "PASS" } else { "FAIL" },
                s.name,
                rs.len(),
                sim / rs.len() as u64,
                wall / rs.len() as u64,
                sim as f64 / wall as f64,
            );
            for r in rs.iter().filter(|r| !r.passed) {
                let how = match r.failure.as_deref() {
                    Some("panic") => "panic in ",
                    Some("timeout") => "timeout in ",
                    _ => "",
                };
                println!(
                    "  seed {}: {how}step {}: {}",
                    r.seed,
                    r.failed_step.as_deref().unwrap_or("?"),
                    r.message.as_deref().unwrap_or("")
                );
                println!("  replay: {}", replay(s, r.seed));
            }
        }
        println!("{passed} passed, {failed} failed");
    }
    let out = json!({
        "scenarios": all.iter().zip(&per_scenario).filter(|(_, rs)| !rs.is_empty()).map(|(s, rs)| json!({
            "name": s.name, "file": s.file.display().to_string(), "seeds": rs,
        })).collect::<Vec<_>>(),
        "passed": passed, "failed": failed,
    });
    if args.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    }
    if let Some(path) = &args.report {
        std::fs::write(path, serde_json::to_vec_pretty(&out)?)
            .with_context(|| format!("failed to write {}", path.display()))?;
    }
    if let Some(path) = &args.html {
        let runs: Vec<nsx_sim::html::ScenarioRuns<'_>> = all
            .iter()
            .zip(&per_scenario)
            .filter(|(_, rs)| !rs.is_empty())
            .map(|(s, rs)| nsx_sim::html::ScenarioRuns {
                name: &s.name,
                file: s.file.display().to_string(),
                seeds: rs.iter().map(|r| (*r, replay(s, r.seed))).collect(),
            })
            .collect();
        std::fs::write(path, nsx_sim::html::page("nsx-sim run", &runs))
            .with_context(|| format!("failed to write {}", path.display()))?;
    }
    Ok(failed == 0)
}

/// Failures the tests of the runner's isolation inject, from `NSX_SIM_INJECT`
/// (`panic@SCENARIO#SEED,stall@SCENARIO#SEED`): never set outside those tests.
fn injections(all: &[Scenario]) -> anyhow::Result<Vec<(usize, u64, Injection)>> {
    let Ok(text) = std::env::var("NSX_SIM_INJECT") else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for item in text.split(',').filter(|s| !s.is_empty()) {
        let parsed = item.split_once('@').and_then(|(what, rest)| {
            let (name, seed) = rest.split_once('#')?;
            let what = match what {
                "panic" => Injection::Panic,
                "stall" => Injection::Stall,
                _ => return None,
            };
            let i = all.iter().position(|s| s.name == name)?;
            Some((i, seed.parse().ok()?, what))
        });
        match parsed {
            Some(p) => out.push(p),
            None => bail!(
                "NSX_SIM_INJECT: `{item}` is not panic|stall@SCENARIO#SEED of a scenario run here"
            ),
        }
    }
    Ok(out)
}

fn run_to(
    file: &Path,
    seed: Option<u64>,
    at: Option<usize>,
) -> anyhow::Result<(SeedReport, nsx_sim::scenario::world::World)> {
    let s = load(file).map_err(|e| anyhow::anyhow!("{e}"))?;
    let seed = seed.or(s.seed).unwrap_or(1);
    let (r, w) = run_one(
        &s,
        seed,
        &RunOptions {
            stop_after: at,
            update_snapshots: false,
            detail: DetailWhen::Never,
            pair_timeout: None,
            inject: None,
        },
    );
    if !r.passed {
        eprintln!(
            "note: the run failed at step {}: {}",
            r.failed_step.as_deref().unwrap_or("?"),
            r.message.as_deref().unwrap_or("")
        );
    }
    let w = w.context("the world could not be built")?;
    Ok((r, w))
}

pub fn dump(
    file: &Path,
    seed: Option<u64>,
    at: Option<usize>,
    nsx: bool,
    ovs: Option<String>,
) -> anyhow::Result<bool> {
    let (_, w) = run_to(file, seed, at)?;
    match (nsx, ovs) {
        (_, Some(node)) => {
            let n = w.nodes.get(&node).with_context(|| {
                format!("no node {node} (nodes: {})", w.sc.cluster.nodes.join(", "))
            })?;
            let b = n
                .bridge
                .try_lock()
                .map_err(|_| anyhow::anyhow!("bridge busy"))?;
            print!("{}", b.dump_flows(true));
            print!("{}", b.dump_groups());
        }
        (true, None) => {
            let docs: Vec<serde_json::Value> = w.nsx.inspect(|s| {
                s.objects()
                    .map(|o| serde_json::Value::Object(o.doc.clone()))
                    .collect()
            });
            println!("{}", serde_json::to_string_pretty(&docs)?);
        }
        (false, None) => bail!("dump needs --nsx or --ovs NODE"),
    }
    Ok(true)
}

#[allow(clippy::too_many_arguments)]
pub fn trace(
    file: &Path,
    seed: Option<u64>,
    at: Option<usize>,
    from: &str,
    to: &str,
    port: u16,
    proto: &str,
    sport: u16,
) -> anyhow::Result<bool> {
    let src = Endpoint::parse(from, true).map_err(|e| anyhow::anyhow!(e))?;
    let dst = Endpoint::parse(to, false).map_err(|e| anyhow::anyhow!(e))?;
    let p = protocol(proto).map_err(|e| anyhow::anyhow!(e))?;
    let (_, w) = run_to(file, seed, at)?;
    let dst_ip = match &dst {
        Endpoint::Pod { namespace, name } => {
            w.pod_at(namespace, name)
                .map_err(|e| anyhow::anyhow!(e))?
                .ip
        }
        Endpoint::External(ip) => *ip,
        Endpoint::Node(name) => w.nodes.get(name).context("no such node")?.node_ip,
        Endpoint::Service { namespace, name } => {
            let s = w
                .api
                .get("services", namespace, name)
                .context("no such service")?;
            parse_ip(s["spec"]["clusterIP"].as_str().unwrap_or(""))
                .map_err(|e| anyhow::anyhow!(e))?
        }
        Endpoint::Lb { namespace, name } => {
            let s = w
                .api
                .get("services", namespace, name)
                .context("no such service")?;
            parse_ip(
                s["status"]["loadBalancer"]["ingress"][0]["ip"]
                    .as_str()
                    .unwrap_or(""),
            )
            .map_err(|e| anyhow::anyhow!(e))?
        }
    };
    let o = w
        .connect(&src, dst_ip, p, sport, port)
        .map_err(|e| anyhow::anyhow!(e))?;
    for l in &o.path {
        println!("{l}");
    }
    println!(
        "Result: {:?}, reply {}",
        o.reached,
        if o.reply_ok {
            "returned"
        } else {
            "did not return"
        }
    );
    Ok(o.works())
}
