//! Build script: links the unwinder statically on Linux with glibc, so that a fresh hit
//! does not load `libgcc_s.so.1`.
//!
//! Why: std links the unwinder (used only for backtraces under `panic = "abort"`) from
//! `libgcc_s.so.1`, whose load-time constructor (`__cpu_indicator_init`) runs about a
//! dozen `cpuid` instructions. In a virtual machine each one traps to the hypervisor:
//! measured here, loading it cost ~100 µs per call, as much as `cat` of the result.
//! The static `libgcc_eh.a` holds the same unwinder without that constructor. If the
//! linker cannot find it, nothing changes and `libgcc_s.so.1` is used as before.

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=RUSTC_LINKER");
    let target = |key: &str| env::var(format!("CARGO_CFG_TARGET_{key}")).unwrap_or_default();
    if target("OS") != "linux" || target("ENV") != "gnu" {
        return;
    }
    if let Some(archive) = find_libgcc_eh() {
        let dir = archive.parent().expect("an absolute path has a parent");
        println!("cargo:rustc-link-search=native={}", dir.display());
        // Whole archive: std asks for the unwinder after our own libraries are linked,
        // so only a whole archive defines it before `-lgcc_s` is considered (which
        // `--as-needed` then drops).
        println!("cargo:rustc-link-lib=static:-bundle,+whole-archive=gcc_eh");
    }
}

/// Asks the C compiler that links the binary where its `libgcc_eh.a` is.
fn find_libgcc_eh() -> Option<PathBuf> {
    let cross = env::var("TARGET").ok() != env::var("HOST").ok();
    let linker = match env::var("RUSTC_LINKER") {
        Ok(linker) => linker,
        Err(_) if cross => return None,
        Err(_) => "cc".to_owned(),
    };
    let output = Command::new(linker)
        .arg("-print-file-name=libgcc_eh.a")
        .output()
        .ok()?;
    let path = PathBuf::from(String::from_utf8(output.stdout).ok()?.trim());
    // Not found: the compiler prints the bare name back.
    (output.status.success() && path.is_absolute() && path.is_file()).then_some(path)
}
