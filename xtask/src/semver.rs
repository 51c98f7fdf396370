//! `cargo xtask semver`: the published crates' public API against the last release, with
//! cargo-semver-checks (rustdoc's JSON of both, some 200 lints of what breaks a user).
//!
//! The release is `[workspace.metadata.release]` in the workspace's Cargo.toml: its commit
//! (built as the baseline, so a clone without tags works) and the crates it covers. A
//! change that would break a user of the release fails here until the crate's version
//! says so (0.1.x → 0.2.0); additions pass. `savevm-derive` is not in the list: a
//! proc-macro's interface is the code it accepts, which rustdoc does not describe (its
//! output is pinned by savevm's golden tests instead).

use std::ffi::OsString;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::cmd::{cargo, root, run};

/// The release the API is checked against.
#[derive(Debug)]
struct Release {
    tag: String,
    commit: String,
    crates: Vec<String>,
}

/// Reads `[workspace.metadata.release]` through `cargo metadata`.
fn release() -> Result<Release> {
    let mut c = cargo();
    c.args(["metadata", "--format-version", "1", "--no-deps"]);
    let out = c.output().context("running cargo metadata")?;
    if !out.status.success() {
        bail!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let r = &meta["metadata"]["release"];
    let field = |name: &str| {
        r[name].as_str().map(str::to_owned).with_context(|| {
            format!("Cargo.toml: [workspace.metadata.release] has no string `{name}`")
        })
    };
    let crates = r["crates"]
        .as_array()
        .context("Cargo.toml: [workspace.metadata.release] has no `crates` list")?
        .iter()
        .map(|c| c.as_str().map(str::to_owned).context("a crate name"))
        .collect::<Result<Vec<_>>>()?;
    Ok(Release {
        tag: field("tag")?,
        commit: field("commit")?,
        crates,
    })
}

/// How to run cargo-semver-checks: `VMM_SEMVER_CHECKS` (the binary .ci/run installs), or
/// `cargo semver-checks` if it is installed; None if neither.
fn tool() -> Option<Command> {
    if let Some(bin) = std::env::var_os("VMM_SEMVER_CHECKS") {
        let mut c = Command::new(bin);
        c.current_dir(root()).arg("semver-checks");
        return Some(c);
    }
    let installed = cargo()
        .args(["semver-checks", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    installed.then(|| {
        let mut c = cargo();
        c.arg("semver-checks");
        c
    })
}

/// What CI runs: the check, or a note when the tool is missing outside CI (.ci/run
/// installs it and names it in `VMM_SEMVER_CHECKS`, so there it always runs).
pub(crate) fn ci_step() -> Result<()> {
    if tool().is_none() && std::env::var_os("CI").is_none() {
        eprintln!(
            "==> SKIPPED the semver check: cargo-semver-checks is not installed \
             (cargo install --locked cargo-semver-checks; .ci/run does)"
        );
        return Ok(());
    }
    check()
}

/// Checks every released crate's public API against the release's commit.
pub(crate) fn check() -> Result<()> {
    let release = release()?;
    let Some(mut c) = tool() else {
        bail!(
            "cargo-semver-checks is not installed: cargo install --locked cargo-semver-checks \
             (or name its binary in VMM_SEMVER_CHECKS)"
        );
    };
    let present = Command::new("git")
        .current_dir(root())
        .args(["cat-file", "-e"])
        .arg(format!("{}^{{commit}}", release.commit))
        .status()
        .is_ok_and(|s| s.success());
    if !present {
        bail!(
            "the release {} (commit {}) is not in this clone's history: the semver check \
             builds it as its baseline (a shallow clone? git fetch --unshallow)",
            release.tag,
            release.commit
        );
    }
    for krate in &release.crates {
        c.args(["-p", krate]);
    }
    c.args([OsString::from("--baseline-rev"), release.commit.into()]);
    run(
        &format!(
            "cargo semver-checks: {} against {}",
            release.crates.join(", "),
            release.tag
        ),
        c,
    )
}
