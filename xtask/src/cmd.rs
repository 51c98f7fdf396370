//! Running cargo and other steps from the workspace's root, and where their builds go.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// The workspace's root.
pub(crate) fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// `cargo` (the one running xtask), in the workspace's root.
pub(crate) fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

/// Runs `c` as step `step`, announced; fails unless it succeeds.
pub(crate) fn run(step: &str, mut c: Command) -> Result<()> {
    eprintln!("==> {step}");
    let status = c.status().with_context(|| format!("starting {step}"))?;
    if !status.success() {
        bail!("{step} failed ({status})");
    }
    Ok(())
}

/// Where the builds of [`cargo`] go: `CARGO_TARGET_DIR` (a relative one is taken from the
/// workspace root, where they run) or the workspace's `target`.
pub(crate) fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) => root().join(d),
        None => root().join("target"),
    }
}

/// Builds vmm (the optimised dev profile) and returns its path.
pub(crate) fn build_vmm() -> Result<PathBuf> {
    let mut b = cargo();
    b.args(["build", "--quiet", "-p", "vmm"]);
    run("cargo build -p vmm", b)?;
    Ok(target_dir().join("debug/vmm"))
}

/// Builds vmm in release (the bench measures the shipped build) and returns its path.
pub(crate) fn build_release_vmm() -> Result<PathBuf> {
    let mut b = cargo();
    b.args(["build", "--quiet", "--release", "-p", "vmm"]);
    run("cargo build --release -p vmm", b)?;
    Ok(target_dir().join("release/vmm"))
}
