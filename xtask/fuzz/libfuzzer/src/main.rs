//! libFuzzer's entry: `FUZZ_TARGET=<name> fuzz [libFuzzer options] [corpus dirs]`.
#![no_main]

use std::sync::OnceLock;

use fuzz_targets::{TARGETS, Target};

static TARGET: OnceLock<&'static Target> = OnceLock::new();

libfuzzer_sys::fuzz_target!(
    init: {
        let name = std::env::var("FUZZ_TARGET").unwrap_or_default();
        let Some(t) = fuzz_targets::target(&name) else {
            let names: Vec<_> = TARGETS.iter().map(|t| t.name).collect();
            eprintln!("fuzz: set FUZZ_TARGET to one of {}", names.join(", "));
            std::process::exit(2);
        };
        let _ = TARGET.set(t);
    },
    |data: &[u8]| {
        if let Some(t) = TARGET.get() {
            (t.run)(data);
        }
    }
);
