//! Real Redis and PostgreSQL servers for the fleet tests: private instances, each on its own
//! loopback port with its own data directory, started from the Debian packages that
//! `.ci/run` installs, and stopped (or restarted, for the failure tests) by the test.
//!
//! A missing server binary fails the test with a message saying what to install: a fleet test
//! never passes by skipping.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// A free loopback port (bound, then released for the server to take).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_until(what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ready() {
        assert!(Instant::now() < deadline, "{what} did not come up in 30 s");
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------------------
// Redis

pub struct Redis {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Mutex<Option<Child>>,
}

impl Redis {
    pub fn start() -> Redis {
        let r = Redis {
            port: free_port(),
            dir: tempfile::tempdir().unwrap(),
            child: Mutex::new(None),
        };
        r.spawn();
        r
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    fn spawn(&self) {
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port"])
            .arg(self.port.to_string())
            .args(["--save", "", "--appendonly", "no", "--dir"])
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start redis-server ({e}): install Debian's redis-server (bash .ci/run does)")
            });
        *self.child.lock().unwrap() = Some(child);
        let port = self.port;
        wait_until("redis-server", || ping(port));
    }

    /// Stop the server (SIGKILL: the store vanishes as in a crash). Its data is gone too
    /// (no persistence), as after a failover to an empty replica.
    pub fn stop(&self) {
        let child = self.child.lock().unwrap().take();
        if let Some(mut c) = child {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start it again on the same port.
    pub fn restart(&self) {
        self.stop();
        self.spawn();
    }

    /// Run one command through redis-cli-like RESP over a plain socket; returns the raw reply.
    pub fn command(&self, args: &[&str]) -> String {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        let mut req = format!("*{}\r\n", args.len());
        for a in args {
            req.push_str(&format!("${}\r\n{}\r\n", a.len(), a));
        }
        s.write_all(req.as_bytes()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 65536];
        let n = s.read(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }
}

fn ping(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    if s.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 16];
    matches!(s.read(&mut buf), Ok(n) if buf[..n].starts_with(b"+PONG"))
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---------------------------------------------------------------------------------------
// PostgreSQL

/// The newest `/usr/lib/postgresql/<version>/bin`, else whatever is on PATH.
fn pg_bin(tool: &str) -> PathBuf {
    static DIR: OnceLock<Option<PathBuf>> = OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let v = e.file_name().to_str()?.parse::<u32>().ok()?;
                let bin = e.path().join("bin");
                bin.join("postgres").exists().then_some((v, bin))
            })
            .collect();
        versions.sort();
        versions.pop().map(|(_, p)| p)
    });
    match dir {
        Some(d) => d.join(tool),
        None => PathBuf::from(tool),
    }
}

/// PostgreSQL refuses to run as root: as root, run its tools as the `postgres` user.
fn pg_command(tool: &str) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(pg_bin(tool));
        c
    } else {
        Command::new(pg_bin(tool))
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn give_to_postgres(path: &Path) {
    if is_root() {
        let ok = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(path)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "chown {} to postgres failed", path.display());
    }
}

fn run(mut c: Command, what: &str) {
    let out = c.output().unwrap_or_else(|e| {
        panic!("cannot run {what} ({e}): install Debian's postgresql (bash .ci/run does)")
    });
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One initdb per test process, copied for every server (initdb takes seconds, a copy not).
fn template() -> &'static Path {
    static TEMPLATE: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &TEMPLATE
        .get_or_init(|| {
            let root = tempfile::Builder::new()
                .prefix("lgw-pg-template")
                .tempdir_in("/tmp")
                .unwrap();
            give_to_postgres(root.path());
            let data = root.path().join("data");
            let mut c = pg_command("initdb");
            c.arg("-D")
                .arg(&data)
                .args(["-U", "postgres", "--auth=trust", "-N", "-E", "UTF8"])
                .stdout(Stdio::null());
            run(c, "initdb");
            (root, data)
        })
        .1
}

pub struct Postgres {
    pub port: u16,
    root: tempfile::TempDir,
    running: AtomicBool,
}

impl Postgres {
    pub fn start() -> Postgres {
        let root = tempfile::Builder::new()
            .prefix("lgw-pg")
            .tempdir_in("/tmp")
            .unwrap();
        let ok = Command::new("cp")
            .arg("-a")
            .arg(template())
            .arg(root.path().join("data"))
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "copying the PostgreSQL template failed");
        give_to_postgres(root.path());
        let pg = Postgres {
            port: free_port(),
            root,
            running: AtomicBool::new(false),
        };
        pg.spawn();
        pg
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres` (trust auth on loopback).
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn spawn(&self) {
        let data = self.root.path().join("data");
        let mut c = pg_command("pg_ctl");
        c.arg("-D")
            .arg(&data)
            .arg("-l")
            .arg(self.root.path().join("server.log"))
            .arg("-o")
            .arg(format!(
                "-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections=200",
                self.port,
                self.root.path().display()
            ))
            .args(["-w", "-t", "60", "start"])
            .stdout(Stdio::null());
        run(c, "pg_ctl start");
        self.running.store(true, Ordering::SeqCst);
        let port = self.port;
        wait_until("postgres", || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
    }

    /// Stop the server. `immediate` is a crash (no shutdown checkpoint); `fast` a clean stop.
    pub fn stop(&self, mode: &str) {
        if !self.running.swap(false, Ordering::SeqCst) {
            return;
        }
        let mut c = pg_command("pg_ctl");
        c.arg("-D")
            .arg(self.root.path().join("data"))
            .args(["-m", mode, "-w", "stop"])
            .stdout(Stdio::null());
        run(c, "pg_ctl stop");
    }

    pub fn restart(&self) {
        self.stop("immediate");
        self.spawn();
    }

    /// Run SQL through psql, returning its unaligned, tuples-only output.
    pub fn psql(&self, sql: &str) -> String {
        let out = Command::new(pg_bin("psql"))
            .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .arg(self.url())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "psql failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop("immediate");
    }
}

#[test]
fn private_servers_start_answer_and_restart() {
    let r = Redis::start();
    assert!(r.command(&["SET", "k", "v"]).starts_with("+OK"));
    r.restart();
    assert!(
        r.command(&["GET", "k"]).starts_with("$-1"),
        "no persistence"
    );
    let pg = Postgres::start();
    assert_eq!(pg.psql("SELECT 40 + 2"), "42");
    pg.psql("CREATE TABLE t (x int); INSERT INTO t VALUES (1)");
    pg.restart();
    assert_eq!(
        pg.psql("SELECT count(*) FROM t"),
        "1",
        "committed data survives"
    );
}
