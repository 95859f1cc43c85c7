//! Developer tasks: `cargo xtask setup | build | test | sweep | fuzz | bench | demo`.

mod demo;
mod fuzz;
mod setup;

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "zt developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing need (eBPF toolchain, bpf-linker, Debian tools, bpffs).
    Setup,
    /// Setup, then build the agent (debug) with its eBPF programs.
    Build,
    /// Setup, build the agent, then run every test with ZT_AGENT_BIN pointing at it (as root).
    Test {
        /// Passed on to `cargo test`, e.g. `-- -p zt-tests --test testbed -- --nocapture`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        cargo_test_args: Vec<String>,
    },
    /// The kernel-vs-reference-evaluator tests at soak size (as root): the differential test
    /// and the packet fuzzer.
    Sweep {
        /// New flows to check, 4000 per random policy set (the test suite runs 100000).
        #[arg(long, default_value_t = 2_000_000)]
        cases: u64,
        /// Frames the packet fuzzer sends, 10000 per random policy set (the suite sends 100000).
        #[arg(long, default_value_t = 2_000_000)]
        frames: u64,
        /// Seed of the random policies, flows and frames (decimal or 0x-hex); default: the suite's.
        #[arg(long)]
        seed: Option<String>,
    },
    /// The cargo-fuzz targets (policy loader, sink specs, event decoder), each for `--runs`
    /// executions (installs cargo-fuzz if needed).
    Fuzz {
        #[arg(long, default_value_t = 1_000_000)]
        runs: u64,
        /// Only this target.
        #[arg(long)]
        target: Option<String>,
    },
    /// Flow events per second from the ring buffer to a JSON sink, as ratios against the raw
    /// ring-buffer drain measured in the same run (as root; optimized build).
    Bench,
    /// A guided run: workloads in namespaces, the agent in monitor mode, then in enforce mode.
    Demo,
}

fn main() {
    let result = match Cli::parse().task {
        Task::Setup => setup::run(),
        Task::Build => setup::run().and_then(|()| build_agent()),
        Task::Test { cargo_test_args } => test(&cargo_test_args),
        Task::Sweep { cases, frames, seed } => sweep(cases, frames, seed.as_deref()),
        // Needs no root: only the nightly and cargo-fuzz, which it installs if missing.
        Task::Fuzz { runs, target } => fuzz::run(runs, None, target.as_deref()),
        Task::Bench => bench(),
        Task::Demo => demo::run(),
    };
    if let Err(err) = result {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}

/// Exits with cargo's status once the tests ran.
fn test(cargo_test_args: &[String]) -> Result<()> {
    zt_tests::ensure_root()?;
    setup::run()?;
    setup::test_tools()?;
    build_agent()?;
    build_upgrade_variant()?;
    // No `--workspace`: the default members are every crate that builds for the host (zt-ebpf
    // only builds for BPF), and `-p <crate>` in the extra arguments still narrows the run.
    let status = cargo()
        .arg("test")
        .args(cargo_test_args)
        .env(zt_tests::agent::AGENT_BIN_ENV, agent_bin())
        .env(zt_tests::agent::UPGRADE_BIN_ENV, upgrade_variant_bin())
        .env("ZT_KUSTOMIZE", setup::kustomize_bin())
        .status()
        .context("spawn cargo test")?;
    // The whole suite (no narrowing arguments) ends with a short pass of every fuzz target.
    if status.success() && cargo_test_args.is_empty() {
        fuzz::run(fuzz::SMOKE_RUNS, Some(fuzz::SMOKE_SECONDS), None)?;
    }
    std::process::exit(status.code().unwrap_or(1));
}

/// Runs only the differential test, with `cases` flows.
fn sweep(cases: u64, frames: u64, seed: Option<&str>) -> Result<()> {
    // Read by the tests; set before any thread exists.
    env::set_var("ZT_DIFF_CASES", cases.to_string());
    env::set_var("ZT_FUZZ_FRAMES", frames.to_string());
    if let Some(seed) = seed {
        env::set_var("ZT_DIFF_SEED", seed);
        env::set_var("ZT_FUZZ_SEED", seed);
    }
    let tests = ["--package", "zt-tests", "--test", "differential", "--test", "packet_fuzz", "--", "--nocapture"];
    test(&tests.map(String::from))
}

/// Runs the benchmarks: the datapath's per-packet cost (tests/benches/datapath.rs, which writes
/// bench/results/<date>.md and .json), the agent's policy apply and memory (agent.rs, which
/// appends to them), the event pipeline (events.rs), end to end over veth (wire.rs), and last
/// the targets against the day's figures (targets.rs).
fn bench() -> Result<()> {
    zt_tests::ensure_root()?;
    setup::run()?;
    // The agent bench runs the agent as a node does: the release build.
    run_checked(cargo().args(["build", "--release", "--package", "zt-agent", "--bins"]), "see the compiler errors above")?;
    let agent = target_dir().join("release/zt-agent");
    // datapath first: it writes the day's results, which agent and wire append to.
    for bench in ["datapath", "agent", "events", "wire", "targets"] {
        run_checked(
            cargo().args(["bench", "--package", "zt-tests", "--bench", bench]).env(zt_tests::agent::AGENT_BIN_ENV, &agent),
            "see the errors above (the benches load the datapath, so they need root and a BPF-capable kernel)",
        )?;
    }
    Ok(())
}

fn build_agent() -> Result<()> {
    run_checked(cargo().args(["build", "--package", "zt-agent", "--bins"]), "see the compiler errors above")
}

/// The agent again, with a datapath whose programs differ (another program tag) and whose
/// conntrack map has another capacity (`ZT_DATAPATH_VARIANT`): what the upgrade tests replace
/// the running datapath with. Its own target directory keeps the two builds from undoing each
/// other.
fn build_upgrade_variant() -> Result<()> {
    run_checked(
        cargo()
            .args(["build", "--package", "zt-agent", "--bins", "--target-dir"])
            .arg(upgrade_variant_dir())
            .env("ZT_DATAPATH_VARIANT", "1"),
        "see the compiler errors above",
    )
}

fn upgrade_variant_dir() -> PathBuf {
    target_dir().join("upgrade-variant")
}

fn upgrade_variant_bin() -> PathBuf {
    upgrade_variant_dir().join("debug/zt-agent")
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_owned()
}

/// `$CARGO_TARGET_DIR` when set (relative to the workspace root), else `target`.
fn target_dir() -> PathBuf {
    let target_dir = env::var_os("CARGO_TARGET_DIR").map_or_else(|| "target".into(), PathBuf::from);
    workspace_root().join(target_dir)
}

/// The debug agent binary.
fn agent_bin() -> PathBuf {
    target_dir().join("debug/zt-agent")
}

/// The cargo that runs this xtask, in the workspace root.
fn cargo() -> Command {
    let mut command = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    command.current_dir(workspace_root());
    command
}

/// Runs `command`, streaming its output; on failure says what failed and `fix`.
fn run_checked(command: &mut Command, fix: &str) -> Result<()> {
    let status = command.status().with_context(|| format!("could not start {command:?}: {fix}"))?;
    if !status.success() {
        bail!("{command:?} failed ({status}): {fix}");
    }
    Ok(())
}
