//! Running vmm processes: spawning them with an event log, reading the log, talking QMP,
//! and the checks of a completed migration; [`proxy`], a TCP proxy that injects faults;
//! [`postcopy`], post-copy migrations and their failures; [`test_ca`], test certificates
//! in QEMU's layout.
//! Used by `cargo xtask` (migrate-test, bench, interop), vmm's end-to-end tests, and for
//! its test CA by qemu-file's TLS tests and the fuzz targets (a crate of its own, using
//! no crate of the workspace, so that none of them builds xtask or what xtask needs).

pub mod postcopy;
pub mod proxy;
pub mod test_ca;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// The vmm binary the harness runs (set once; `vmm` on the PATH otherwise).
static VMM: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// Sets the vmm binary (a test passes `env!("CARGO_BIN_EXE_vmm")`).
pub fn set_vmm(path: impl Into<PathBuf>) {
    let _ = VMM.set(path.into());
}

/// The vmm binary.
pub fn vmm() -> &'static Path {
    VMM.get_or_init(|| PathBuf::from("vmm"))
}

/// The accelerator the tests use: KVM when it works here, else the software backend
/// (which runs the same migration code); says so once. `VMM_TEST_ACCEL=soft` forces the
/// software backend.
pub fn accel() -> &'static str {
    static ACCEL: std::sync::OnceLock<&'static str> = std::sync::OnceLock::new();
    ACCEL.get_or_init(|| {
        if std::env::var("VMM_TEST_ACCEL").as_deref() == Ok("soft") {
            eprintln!(
                "NOTE: VMM_TEST_ACCEL=soft: these tests run the guest on the software backend"
            );
            "soft"
        } else if std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok()
        {
            "kvm"
        } else {
            eprintln!(
                "NOTE: /dev/kvm is not usable: these tests run the guest on the SOFTWARE backend"
            );
            "soft"
        }
    })
}

/// A fresh scratch directory for one case.
pub fn scratch(name: &str) -> PathBuf {
    static SWEPT: std::sync::Once = std::sync::Once::new();
    SWEPT.call_once(sweep_scratch);
    let d = std::env::temp_dir().join(format!("vmm-e2e-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Removes the scratch directories of test processes that are gone (a run keeps its
/// own for a look after a failure, until the next run; disk images in them are large).
fn sweep_scratch() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix("vmm-e2e-")) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// A vmm process with its event log.
#[derive(Debug)]
pub struct Vmm {
    pub child: Child,
    pub log: PathBuf,
    pub name: String,
}

impl Vmm {
    /// Starts `vmm run` with `args` plus a log, serial output to a file, no progress line
    /// and the tests' accelerator (unless `args` name one).
    pub fn start(dir: &Path, name: &str, args: &[&str]) -> Vmm {
        Self::start_with(dir, name, args, |_| {})
    }

    /// As [`Vmm::start`], letting `configure` adjust the command (inherited descriptors).
    pub fn start_with(
        dir: &Path,
        name: &str,
        args: &[&str],
        configure: impl FnOnce(&mut Command),
    ) -> Vmm {
        let log = dir.join(format!("{name}.jsonl"));
        let mut cmd = Command::new(vmm());
        cmd.arg("run");
        if !args.contains(&"--accel") {
            cmd.args(["--accel", accel()]);
        }
        cmd.args(["--progress", "never"])
            .arg("--log-json")
            .arg(&log)
            .arg("--serial")
            .arg(dir.join(format!("{name}-serial.txt")))
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(dir.join(format!("{name}-stderr.txt"))).expect("stderr file"),
            ));
        configure(&mut cmd);
        let child = cmd.spawn().expect("starting vmm");
        Vmm {
            child,
            log,
            name: name.into(),
        }
    }

    pub fn events(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    pub fn event(&self, name: &str) -> Option<Value> {
        self.events().into_iter().find(|e| e["event"] == name)
    }

    /// Waits for an event (panics after 60 s or if the process exits first).
    /// Waits for a destination's `listening` event and returns the URI it gives.
    pub fn listening_uri(&mut self) -> String {
        self.wait_event("listening")["uri"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    pub fn wait_event(&mut self, name: &str) -> Value {
        let t = Instant::now();
        loop {
            if let Some(e) = self.event(name) {
                return e;
            }
            if let Some(s) = self.child.try_wait().unwrap() {
                panic!(
                    "{} exited ({s}) before event {name}: {}",
                    self.name,
                    self.stderr()
                );
            }
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "{}: no event {name} in 60 s",
                self.name
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn stderr(&self) -> String {
        let p = self.log.with_file_name(format!("{}-stderr.txt", self.name));
        std::fs::read_to_string(p).unwrap_or_default()
    }

    /// Waits for the process to exit (at most 120 s).
    pub fn wait(&mut self) -> ExitStatus {
        let t = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            if t.elapsed() > Duration::from_secs(120) {
                let _ = self.child.kill();
                panic!("{} did not exit in 120 s: {}", self.name, self.stderr());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A destination on a free TCP port of 127.0.0.1 that hashes RAM at the switchover
/// (`--verify`) and exits a second after its guest runs; `extra` and `guest` go to it.
/// Returns it and the URI it listens on.
pub fn verified_destination(
    dir: &Path,
    name: &str,
    extra: &[&str],
    guest: &[&str],
) -> (Vmm, String) {
    let mut args = vec![
        "--incoming",
        "tcp:127.0.0.1:0",
        "--verify",
        "--exit-after",
        "1",
    ];
    args.extend_from_slice(extra);
    args.extend_from_slice(guest);
    let mut d = Vmm::start(dir, name, &args);
    let uri = d.listening_uri();
    (d, uri)
}

/// Runs a destination on `listen` and a source migrating to it (the URI the destination
/// reports if `target` is None); returns both, finished.
pub fn migrate(dir: &Path, listen: &str, target: Option<&str>, guest: &[&str]) -> (Vmm, Vmm) {
    let mut dst_args = vec!["--incoming", listen, "--verify", "--exit-after", "1"];
    dst_args.extend_from_slice(guest);
    let mut dst = Vmm::start(dir, "destination", &dst_args);
    let ready = dst.wait_event("listening");
    let uri = target
        .map(str::to_string)
        .unwrap_or_else(|| ready["uri"].as_str().unwrap().to_string());
    let mut src_args = vec!["--migrate-to", uri.as_str(), "--verify"];
    src_args.extend_from_slice(guest);
    let mut src = Vmm::start(dir, "source", &src_args);
    let s = src.wait();
    assert!(s.success(), "source failed: {}", src.stderr());
    let d = dst.wait();
    assert!(d.success(), "destination failed: {}", dst.stderr());
    (src, dst)
}

/// The checks of a completed migration: equal RAM hashes at the switchover, the guest's
/// pass counter going on at the destination, no stale page, the source gone.
pub fn check_migrated(src: &Vmm, dst: &Vmm) {
    let sh = src
        .events()
        .into_iter()
        .find(|e| e["event"] == "ram-hash")
        .expect("source hash");
    let dh = dst
        .events()
        .into_iter()
        .find(|e| e["event"] == "ram-hash")
        .expect("destination hash");
    assert_eq!(sh["hash"], dh["hash"], "RAM differs at the switchover");
    assert_eq!(sh["pass"], dh["pass"]);
    let exit = dst.event("exit").expect("destination exit event");
    assert!(
        exit["pass"].as_u64().unwrap() > dh["pass"].as_u64().unwrap(),
        "the guest did not carry on at the destination: {exit} vs {dh}"
    );
    assert_eq!(exit["mismatches"], 0, "the guest found stale pages");
    assert_eq!(
        src.event("exit").expect("source exit")["reason"],
        "migrated"
    );
}

/// A QMP client.
#[derive(Debug)]
pub struct Qmp {
    r: BufReader<UnixStream>,
    w: UnixStream,
    pub events: Vec<Value>,
}

impl Qmp {
    pub fn connect(path: &Path) -> Qmp {
        Qmp::connect_within(path, Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("QMP {}: {e}", path.display()))
    }

    /// [`Qmp::connect`], waiting up to `timeout` for the socket (a VMM that allocates
    /// all of a large guest's memory first opens it late).
    pub fn connect_within(path: &Path, timeout: Duration) -> std::io::Result<Qmp> {
        let t = Instant::now();
        let s = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(_) if t.elapsed() < timeout => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(e),
            }
        };
        let mut q = Qmp {
            r: BufReader::new(s.try_clone().unwrap()),
            w: s,
            events: vec![],
        };
        let greeting = q.read();
        assert!(greeting["QMP"].is_object(), "{greeting}");
        let r = q.cmd("qmp_capabilities", json!({}));
        assert_eq!(r, json!({}));
        Ok(q)
    }

    fn read(&mut self) -> Value {
        let mut line = String::new();
        let read = self.r.read_line(&mut line);
        if read.is_err() || line.is_empty() {
            // The peer closed the connection (after quit, or its process ended, as a
            // QEMU destination does when its load fails): an error reply.
            return json!({"error": {"class": "Closed", "desc": "the QMP connection was closed"}});
        }
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"))
    }

    /// Runs a command; returns `return` or panics with `error`.
    pub fn cmd(&mut self, name: &str, args: Value) -> Value {
        let r = self.try_cmd(name, args);
        r.unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    /// Runs a command; Err with the error object.
    pub fn try_cmd(&mut self, name: &str, args: Value) -> Result<Value, Value> {
        if let Err(e) = writeln!(self.w, "{}", json!({"execute": name, "arguments": args})) {
            return Err(
                json!({"class": "Closed", "desc": format!("the QMP connection is gone: {e}")}),
            );
        }
        loop {
            let v = self.read();
            if v.get("event").is_some() {
                self.events.push(v);
                continue;
            }
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            return Err(v["error"].clone());
        }
    }

    /// Reads what is left until the peer closes the connection, keeping the events (the
    /// last ones a process sends before it exits).
    pub fn read_to_end(&mut self) {
        loop {
            let v = self.read();
            if v.get("event").is_some() {
                self.events.push(v);
            } else if v["error"]["class"] == "Closed" {
                return;
            }
        }
    }

    /// Polls x-query-guest until the guest has completed `pass` passes (panics after 60 s).
    pub fn wait_guest_pass(&mut self, pass: u64) {
        let t = Instant::now();
        loop {
            let g = self.cmd("x-query-guest", json!({}));
            if g["pass"].as_u64().unwrap() >= pass {
                return;
            }
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "the guest is stuck: {g}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Polls query-migrate until `status` (panics after 60 s).
    pub fn wait_status(&mut self, status: &str) -> Value {
        let t = Instant::now();
        loop {
            let m = self.cmd("query-migrate", json!({}));
            if m["status"] == status {
                return m;
            }
            assert!(t.elapsed() < Duration::from_secs(60), "no {status}: {m}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
