//! Builds the eBPF programs from source (nightly + bpf-linker, see `cargo xtask setup`) and puts
//! the object in OUT_DIR, where `datapath` embeds it.
use std::{env, fs, path::PathBuf};

fn main() -> anyhow::Result<()> {
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let skip = env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if skip {
        // Unit-test loops that never load programs: embed an empty object, which the loader
        // rejects with a message saying how the binary was built.
        fs::write(out_dir.join("zt-ebpf"), [])?;
        return Ok(());
    }
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?).join("../zt-ebpf");
    let root = root.to_str().expect("utf-8 path");
    aya_build::build_ebpf(
        [aya_build::Package { name: "zt-ebpf", root_dir: root, ..Default::default() }],
        aya_build::Toolchain::default(),
    )
}
