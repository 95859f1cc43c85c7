//! `cargo xtask fuzz`: the cargo-fuzz targets in `fuzz/` (libFuzzer, address sanitizer), each
//! for a number of executions. `cargo xtask test` ends with a short pass of each.

use std::{fs, process::Command, time::Instant};

use anyhow::{bail, Result};

use crate::{run_checked, setup, target_dir, workspace_root};

pub const TARGETS: [&str; 3] = ["policy_loader", "sink_spec", "event_decoder"];
/// The test command's short pass: each target for this many seconds, or this many executions
/// if it gets there first.
pub const SMOKE_SECONDS: u64 = 20;
pub const SMOKE_RUNS: u64 = 1_000_000;

/// Runs the targets (`only` that one, if given) for `runs` executions each, or for `seconds` if
/// that comes first. An input that crashes a target, runs 10 s or takes 2 GiB fails the run;
/// libFuzzer prints the path it saved that input under.
pub fn run(runs: u64, seconds: Option<u64>, only: Option<&str>) -> Result<()> {
    if let Some(only) = only.filter(|only| !TARGETS.contains(only)) {
        bail!("no fuzz target `{only}`: the targets are {}", TARGETS.join(", "));
    }
    let toolchain = setup::fuzz_toolchain()?;
    let root = workspace_root();
    // Beside the workspace's builds, as the upgrade variant is: its own flags (nightly,
    // sanitizer) would otherwise rebuild everything twice.
    let build_dir = target_dir().join("fuzz");
    let cargo_fuzz = |subcommand: &str| {
        let mut command = Command::new("rustup");
        command
            .args(["run", toolchain, "cargo", "fuzz", subcommand, "--target-dir"])
            .arg(&build_dir)
            .current_dir(&root)
            // The agent's build script would build the eBPF object; the targets need none.
            .env("AYA_BUILD_SKIP", "1")
            // This xtask's cargo and toolchain are stable's; `rustup run` picks the nightly.
            .env_remove("CARGO")
            .env_remove("RUSTUP_TOOLCHAIN");
        command
    };
    let started = Instant::now();
    println!("fuzz: building the targets with {toolchain}");
    run_checked(&mut cargo_fuzz("build"), "see the compiler errors above")?;
    println!("fuzz: built in {} s", started.elapsed().as_secs());
    for target in TARGETS.iter().filter(|t| only.is_none_or(|only| only == **t)) {
        // New inputs go to a corpus under the target directory (the first one libFuzzer is
        // given); the committed seeds under fuzz/corpus stay as they are.
        let grown = target_dir().join("fuzz-corpus").join(target);
        fs::create_dir_all(&grown)?;
        match seconds {
            Some(seconds) => println!("fuzz: {target}, {runs} executions or {seconds} s"),
            None => println!("fuzz: {target}, {runs} executions"),
        }
        let started = Instant::now();
        let artifacts = root.join("fuzz/artifacts").join(target);
        fs::create_dir_all(&artifacts)?;
        run_checked(
            cargo_fuzz("run")
                .arg(target)
                .arg(&grown)
                .arg(root.join("fuzz/corpus").join(target))
                // Plain scheduling: with the whole agent instrumented, entropic's per-input
                // bookkeeping took 60% of the policy loader's time (2.5 times fewer inputs).
                .args(["--", &format!("-runs={runs}"), "-max_len=65536", "-timeout=10", "-entropic=0"])
                .arg(format!("-artifact_prefix={}/", artifacts.display()))
                .args(seconds.map(|s| format!("-max_total_time={s}"))),
            &format!(
                "the fuzzer stopped on an input, saved under {}/ (its path is above); reproduce with \
                 `AYA_BUILD_SKIP=1 rustup run {toolchain} cargo fuzz run {target} <that file>`",
                artifacts.display()
            ),
        )?;
        println!("fuzz: {target} passed in {} s", started.elapsed().as_secs());
    }
    Ok(())
}
