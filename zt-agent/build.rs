//! Builds the eBPF programs from source (nightly + bpf-linker, see `cargo xtask setup`) and puts
//! the object in OUT_DIR, where `datapath` embeds it.
use std::{env, fs, path::PathBuf, process::Command};

/// The nightly whose LLVM matches bpf-linker 0.10.0; `cargo xtask setup` installs it when the
/// machine's `nightly` is another channel.
const PINNED_NIGHTLY: &str = "nightly-2026-05-20";

fn main() -> anyhow::Result<()> {
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    // Said on both paths: an empty object built with the variable set must be rebuilt as soon
    // as it is unset, even in a target directory shared with the unit-test loop.
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    // The upgrade tests' second datapath (see `cargo xtask test`).
    println!("cargo:rerun-if-env-changed=ZT_DATAPATH_VARIANT");
    let skip = env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if skip {
        // Without this, the next build without AYA_BUILD_SKIP would keep the empty object.
        println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
        // Unit-test loops that never load programs: embed an empty object, which the loader
        // rejects with a message saying how the binary was built.
        fs::write(out_dir.join("zt-ebpf"), [])?;
        fs::write(out_dir.join("zt-reference"), [])?;
        return Ok(());
    }
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?).join("../zt-ebpf");
    let root = root.to_str().expect("utf-8 path");
    aya_build::build_ebpf(
        [aya_build::Package { name: "zt-ebpf", root_dir: root, ..Default::default() }],
        ebpf_toolchain(),
    )
}

fn ebpf_toolchain() -> aya_build::Toolchain<'static> {
    let pinned_installed = Command::new("rustup")
        .args(["run", PINNED_NIGHTLY, "rustc", "--version"])
        .output()
        .is_ok_and(|out| out.status.success());
    aya_build::Toolchain::Custom(if pinned_installed { PINNED_NIGHTLY } else { "nightly" })
}
