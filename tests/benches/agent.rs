//! `cargo xtask bench`, the agent: how long a policy takes from its file changing to being in
//! force, and the agent's peak memory, at 1k, 10k and 100k rules — each beside the same
//! measures for a 10-rule policy taken in the same run (the baseline: what the agent costs
//! whatever its policy).
//!
//! The agent runs as it does on a node, in a test-made node namespace: started on a one-rule
//! policy over the same identities, then the policy is replaced by the large one as the kubelet
//! replaces a ConfigMap's files (written aside, switched with one rename of `..data`), and the
//! time runs from that rename until the agent's `policy` event says it is applied —
//! so it includes the reload's debounce (150 ms) and the switch. Peak memory is the agent's
//! VmHWM after it. Appends its table to bench/results/<date>.md and its figures to the .json
//! that `benches/datapath.rs` wrote.
//!
//! Needs root.

use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use serde_json::{json, Value};
use zt_tests::{bench_policy::policy_text, Agent, AgentOptions, Topology, TopologySpec};

const IDENTITIES: usize = 1_000;
const SIZES: [usize; 3] = [1_000, 10_000, 100_000];
const BASELINE_RULES: usize = 10;

/// The agent's resident memory, in MiB: its peak so far (VmHWM), and what is resident now of
/// its heap and other private memory (RssAnon), of its own binary, and of the BPF maps it has
/// mapped (the event ring buffer and the config word: kernel memory, counted here because
/// they are mapped).
struct Memory {
    peak: f64,
    anonymous: f64,
    binary: f64,
    bpf_maps: f64,
}

fn memory(agent: &Agent) -> Memory {
    let status = fs::read_to_string(format!("/proc/{}/status", agent.pid())).expect("the agent runs");
    let field = |name: &str| -> f64 {
        let kib: f64 = status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.trim_start_matches(':').trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} in /proc/<pid>/status"));
        kib / 1024.0
    };
    // Resident KiB of the mappings whose name `pick` accepts.
    let smaps = fs::read_to_string(format!("/proc/{}/smaps", agent.pid())).expect("the agent runs");
    let resident = |pick: &dyn Fn(&str) -> bool| -> f64 {
        let (mut total, mut counted) = (0.0, false);
        for line in smaps.lines() {
            if let Some(kib) = line.strip_prefix("Rss:") {
                if counted {
                    total += kib.trim().trim_end_matches("kB").trim().parse::<f64>().unwrap();
                }
            } else if line.split_whitespace().next().is_some_and(|range| range.contains('-') && !range.ends_with(':')) {
                counted = line.split_whitespace().nth(5).is_some_and(pick);
            }
        }
        total / 1024.0
    };
    let binary = fs::read_link(format!("/proc/{}/exe", agent.pid())).expect("the agent runs");
    Memory {
        peak: field("VmHWM"),
        anonymous: field("RssAnon"),
        binary: resident(&|name| Path::new(name) == binary),
        bpf_maps: resident(&|name| name == "anon_inode:bpf-map"),
    }
}

/// Policy files the set is split into (each file is held to 4 MiB, 100k rules are more).
const FILES: usize = 4;

/// Writes the policy into `dir/<version>/` as [`FILES`] files, at document boundaries.
fn write_version(dir: &Path, version: &str, text: &str) {
    let target = dir.join(version);
    fs::create_dir(&target).unwrap();
    let documents: Vec<&str> = text.split("---\n").filter(|d| !d.is_empty()).collect();
    let per_file = documents.len().div_ceil(FILES);
    for file in 0..FILES {
        let chunk = documents.iter().skip(file * per_file).take(per_file);
        let content: String = chunk.map(|d| format!("---\n{d}")).collect();
        fs::write(target.join(format!("{file}.yaml")), format!("# part {file}\n{content}")).unwrap();
    }
}

/// The set in `dir` as a Kubernetes ConfigMap volume holds it: `<name>.yaml` links through
/// the `..data` link into a version directory, and a new version replaces `..data` with one
/// rename, so every file changes at once.
fn publish(dir: &Path, version: &str) {
    let link = dir.join("..data.new");
    std::os::unix::fs::symlink(version, &link).unwrap();
    fs::rename(&link, dir.join("..data")).unwrap();
    for file in 0..FILES {
        let name = dir.join(format!("{file}.yaml"));
        if !name.exists() {
            std::os::unix::fs::symlink(format!("..data/{file}.yaml"), name).unwrap();
        }
    }
}

/// A reload to `rules` rules: seconds from the policy's change to the reload applied, the
/// phases the agent timed (its `applied` event's `phases_ms`), and its memory after it.
struct Applied {
    seconds: f64,
    phases_ms: Value,
    memory: Memory,
}

fn apply(rules: usize) -> Applied {
    let t = Topology::new(TopologySpec::new()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policies");
    fs::create_dir(&policy).unwrap();
    // One rule to start with: every measured reload changes the policy.
    write_version(&policy, "..v1", &policy_text(1, IDENTITIES));
    publish(&policy, "..v1");
    let options = AgentOptions { extra_args: vec!["--capacity".into(), "hosts=262144".into()], ..AgentOptions::for_node(t.node(), &policy, "enforce") };
    let agent = Agent::start(t.node().ns(), &options).unwrap();
    let applied = |agent: &Agent| agent.events().iter().filter(|e| e["kind"] == "policy" && e["result"] == "applied").count();
    let before = applied(&agent);
    write_version(&policy, "..v2", &policy_text(rules, IDENTITIES));
    let started = Instant::now();
    publish(&policy, "..v2");
    while applied(&agent) == before {
        assert!(started.elapsed() < Duration::from_secs(120), "the reload to {rules} rules never applied\n{}", agent.stderr());
        assert!(
            !agent.events().iter().any(|e| e["kind"] == "policy" && e["result"] == "rejected"),
            "the reload to {rules} rules was rejected\n{}",
            agent.stderr()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let seconds = started.elapsed().as_secs_f64();
    let events = agent.events();
    let event = events.iter().rev().find(|e| e["kind"] == "policy" && e["result"] == "applied").expect("counted above");
    Applied { seconds, phases_ms: event["phases_ms"].clone(), memory: memory(&agent) }
}

fn main() {
    let date = String::from_utf8(std::process::Command::new("date").arg("+%F").output().unwrap().stdout).unwrap();
    let date = date.trim();
    let base = apply(BASELINE_RULES);
    let (base_s, base_mib) = (base.seconds, base.memory.peak);
    let mut md = String::new();
    writeln!(md, "\n## The agent: policy apply and peak memory, {IDENTITIES} identities\n").unwrap();
    writeln!(md, "From the policy's change (the `..data` rename) to the reload applied (the 150 ms debounce included), and the agent's VmHWM after it; × the same for a {BASELINE_RULES}-rule policy in this run ({base_s:.2} s, {base_mib:.0} MiB).").unwrap();
    writeln!(md, "The phases are the agent's own timing of the reload (its `applied` event): reading and parsing the files, compiling, staging the new generation's map entries, and the switch (the config write, the grace period, emptying the old generation's entries). After the reload, what is resident of the agent's heap and other private memory, of its binary, and of the BPF maps it has mapped (the event ring buffer).\n").unwrap();
    writeln!(md, "| rules | apply s | × baseline | load ms | compile ms | stage ms | switch ms | peak MiB | × baseline | heap MiB | binary MiB | mapped BPF maps MiB |").unwrap();
    writeln!(md, "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|").unwrap();
    let mut figures = Vec::new();
    let figures_of = |rules: usize, applied: &Applied| {
        json!({
            "rules": rules, "apply_seconds": applied.seconds, "phases_ms": applied.phases_ms,
            "peak_mib": applied.memory.peak, "anonymous_mib": applied.memory.anonymous,
            "binary_mib": applied.memory.binary, "bpf_maps_mib": applied.memory.bpf_maps,
        })
    };
    let row = |md: &mut String, rules: usize, applied: &Applied| {
        let phase = |name: &str| applied.phases_ms[name].as_f64().unwrap_or(f64::NAN);
        let m = &applied.memory;
        writeln!(
            md,
            "| {rules} | {:.2} | {:.1} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.1} | {:.0} | {:.0} | {:.0} |",
            applied.seconds,
            applied.seconds / base_s,
            phase("load"),
            phase("compile"),
            phase("stage"),
            phase("switch"),
            m.peak,
            m.peak / base_mib,
            m.anonymous,
            m.binary,
            m.bpf_maps
        )
        .unwrap();
    };
    row(&mut md, BASELINE_RULES, &base);
    for rules in SIZES {
        eprintln!("bench: agent, {rules} rules");
        let applied = apply(rules);
        row(&mut md, rules, &applied);
        let mut figure = figures_of(rules, &applied);
        figure["apply_vs_baseline"] = json!(applied.seconds / base_s);
        figure["peak_vs_baseline"] = json!(applied.memory.peak / base_mib);
        figures.push(figure);
    }
    print!("{md}");

    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../bench/results");
    fs::create_dir_all(&dir).unwrap();
    let md_path = dir.join(format!("{date}.md"));
    let mut text = fs::read_to_string(&md_path).unwrap_or_default();
    text.push_str(&md);
    fs::write(&md_path, text).unwrap();
    let json_path = dir.join(format!("{date}.json"));
    let mut results: Value = fs::read_to_string(&json_path).ok().and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_else(|| json!({}));
    results["agent"] = json!({"identities": IDENTITIES, "baseline": figures_of(BASELINE_RULES, &base), "sizes": figures});
    fs::write(&json_path, serde_json::to_string_pretty(&results).unwrap() + "\n").unwrap();
    eprintln!("bench: appended to {}", md_path.display());
}
