//! Every parser of untrusted input, as a fuzz target: a function from bytes that must
//! never panic, never hang and never allocate by a length it has not checked, and whose
//! errors stay short (they never echo the input).
//!
//! `cargo xtask fuzz` drives these with libFuzzer (coverage-guided, seeded with
//! [`Target::seeds`], the golden streams); `cargo test` replays the seeds and every input
//! kept in `regressions/<target>/` (each one crashed a target once).
//!
//! ```
//! let t = fuzz_targets::target("qmp").unwrap();
//! (t.run)(br#"{"execute": "query-status"}"#);
//! (t.run)(b"\xff{{{");
//! ```

mod bounded;
mod memfd;
mod multifd;
mod streams;
mod text;
mod tls;

pub use bounded::MAX_ERROR_LEN;

/// One fuzz target.
#[derive(Debug)]
pub struct Target {
    /// Its name, on the command line and under `regressions/`.
    pub name: &'static str,
    /// What it parses.
    pub about: &'static str,
    /// Parses one input; panics only on a bug.
    pub run: fn(&[u8]),
    /// Valid inputs to start from.
    pub seeds: fn() -> Vec<Vec<u8>>,
}

/// All targets.
pub const TARGETS: &[Target] = &[
    Target {
        name: "stream",
        about: "a whole migration stream into a destination with RAM, a disk and the vmm's CPU and KVM device sections",
        run: streams::full,
        seeds: streams::full_seeds,
    },
    Target {
        name: "tls",
        about: "a whole stream carried by a TLS session (an authorized source's bytes) into the `stream` destination: the same verdict as from memory",
        run: tls::tls,
        seeds: streams::full_seeds,
    },
    Target {
        name: "ram",
        about: "a stream into a destination with only RAM (the RAM section loader)",
        run: streams::ram,
        seeds: streams::ram_seeds,
    },
    Target {
        name: "block",
        about: "a stream into a destination with only a disk (the block section loader)",
        run: streams::block,
        seeds: streams::block_seeds,
    },
    Target {
        name: "analyze",
        about: "`vmm analyze`: a stream file with its VM description trailer, dumped as text",
        run: streams::analyze,
        seeds: streams::full_seeds,
    },
    Target {
        name: "multifd",
        about: "one multifd channel (opening message, packets plain or zstd, SYNCs) into the destination's receiver",
        run: multifd::channel,
        seeds: multifd::seeds,
    },
    Target {
        name: "qmp",
        about: "one line of QMP input",
        run: text::qmp,
        seeds: text::qmp_seeds,
    },
    Target {
        name: "uri",
        about: "migration URIs, --drive and --object specs, and sizes",
        run: text::uri,
        seeds: text::uri_seeds,
    },
];

/// The target called `name`.
pub fn target(name: &str) -> Option<&'static Target> {
    TARGETS.iter().find(|t| t.name == name)
}
