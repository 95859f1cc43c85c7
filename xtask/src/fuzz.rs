//! `cargo xtask fuzz`: the cargo-fuzz targets in `fuzz/` (libFuzzer, address sanitizer), each
//! for a number of executions. `cargo xtask test` runs a short pass of each.

use std::{fs, process::Command};

use anyhow::Result;

use crate::{run_checked, setup, workspace_root};

pub const TARGETS: [&str; 3] = ["policy_loader", "sink_spec", "event_decoder"];
/// The test command's short pass: each target for this many executions or seconds, whichever
/// comes first (the policy loader runs about a hundred inputs a second, the others thousands).
pub const SMOKE_RUNS: u64 = 1_000_000;
pub const SMOKE_SECONDS: u64 = 20;

/// Runs `targets` (all when `only` is none) for `runs` executions each, or `seconds` if given;
/// an input that crashes a target fails the run, and libFuzzer prints where it saved it.
pub fn run(runs: u64, seconds: Option<u64>, only: Option<&str>) -> Result<()> {
    let toolchain = setup::fuzz_toolchain()?;
    let root = workspace_root();
    for target in TARGETS.iter().filter(|t| only.is_none_or(|only| only == **t)) {
        // New inputs go to a corpus under target/ (the first directory libFuzzer is given);
        // the committed seeds under fuzz/corpus stay as they are.
        let grown = root.join("target/fuzz-corpus").join(target);
        fs::create_dir_all(&grown)?;
        match seconds {
            Some(seconds) => println!("fuzz: {target}, {runs} executions or {seconds} s"),
            None => println!("fuzz: {target}, {runs} executions"),
        }
        run_checked(
            Command::new("rustup")
                .args(["run", toolchain, "cargo", "fuzz", "run", target])
                .arg(&grown)
                .arg(root.join("fuzz/corpus").join(target))
                .args(["--", &format!("-runs={runs}"), "-max_len=65536"])
                .args(seconds.map(|s| format!("-max_total_time={s}")))
                .current_dir(&root)
                // The agent's build script would build the eBPF object; the targets need none.
                .env("AYA_BUILD_SKIP", "1")
                .env_remove("CARGO")
                .env_remove("RUSTUP_TOOLCHAIN"),
            &format!(
                "the fuzzer stopped on an input (saved under fuzz/artifacts/{target}/, path above); reproduce with \
                 `rustup run {toolchain} cargo fuzz run {target} <that file>`"
            ),
        )?;
    }
    Ok(())
}
