//! The ledger's disk fills up under a running gateway (issue 7): requests
//! that cost credits fail closed with 503 LEDGER_UNAVAILABLE and are not forwarded, free
//! requests go on, `linkup_gateway_ledger_errors_total` counts it, and once the disk is back
//! the kept rows are written: nothing the upstream charged is lost.
//!
//! The disk is real: a 2 MB tmpfs mounted for the test (the suite runs as root, as `.ci/run`
//! does), filled with a file. (A read-only remount is refused by the kernel while the ledger
//! holds its files open for writing, so read-only is covered by the ledger's unit tests.)

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::*;

/// A small tmpfs, unmounted (lazily, so open files don't keep it busy) on drop.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount() -> SmallDisk {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=2m", "tmpfs"])
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mounting a tmpfs failed (the test needs root, as .ci/run has): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        SmallDisk { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Fill every free byte with a file; returns it.
    fn fill(&self) -> PathBuf {
        use std::io::Write;
        let filler = self.path().join("filler");
        let mut f = std::fs::File::create(&filler).unwrap();
        let chunk = vec![0u8; 64 * 1024];
        loop {
            match f.write(&chunk) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => {
                    assert_eq!(e.raw_os_error(), Some(28), "expected ENOSPC, got {e}");
                    break;
                }
            }
        }
        // Smaller writes until not one byte fits.
        while f.write(&[0u8; 512]).is_ok_and(|n| n > 0) {}
        while f.write(&[0u8]).is_ok_and(|n| n > 0) {}
        filler
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.path()).status();
    }
}

async fn ledger_errors(h: &Harness) -> u64 {
    let m = h.admin("/metrics").await.text();
    m.lines()
        .find(|l| l.starts_with("linkup_gateway_ledger_errors_total "))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no ledger_errors metric in:\n{m}"))
}

async fn recorded_total(h: &Harness) -> u64 {
    let ledger = h.gw.process.ledger.clone();
    tokio::task::spawn_blocking(move || ledger.totals())
        .await
        .unwrap()
        .unwrap()
        .1
}

/// Send costly requests until the gateway refuses one with LEDGER_UNAVAILABLE (the first few
/// may still fit in pages the ledger already holds); then check the refusal is not forwarded
/// and that free requests are still served.
async fn fails_closed_for_costly_requests(h: &Harness, account: &str) {
    let mut refused = None;
    for _ in 0..400 {
        let a = h.post("/v2/profiles", &action(account, "get")).await;
        if a.status == 503 {
            refused = Some(a);
            break;
        }
        assert_eq!(a.status, 200, "{}", a.text());
    }
    let a = refused.expect("the gateway never noticed the ledger cannot be written");
    assert_eq!(a.code(), "LEDGER_UNAVAILABLE");
    assert_eq!(a.source(), "gateway");
    assert!(ledger_errors(h).await > 0);

    let calls = h.upstream_calls();
    for _ in 0..5 {
        let a = h.post("/v2/profiles", &action(account, "get")).await;
        assert_eq!(a.status, 503, "{}", a.text());
        assert_eq!(a.code(), "LEDGER_UNAVAILABLE");
    }
    assert_eq!(h.upstream_calls(), calls, "refusals were forwarded");

    // Free requests go on.
    let free = h.get("/v2/credits").await;
    assert_eq!(free.status, 200, "{}", free.text());
    assert_eq!(h.upstream_calls(), calls + 1);
}

/// Once the disk is back the kept rows are written and costly requests are served again;
/// the ledger then holds every credit the upstream charged.
async fn recovers_and_loses_nothing(h: &Harness, account: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let a = h.post("/v2/profiles", &action(account, "get")).await;
        if a.status == 200 {
            break;
        }
        assert_eq!(a.code(), "LEDGER_UNAVAILABLE", "{}", a.text());
        assert!(Instant::now() < deadline, "the ledger never recovered");
        tokio::time::sleep(Duration::from_millis(100)).await; // a retry period, not a sync
    }
    let charged = h.emu.stats().credits_charged as u64;
    let deadline = Instant::now() + Duration::from_secs(30);
    while recorded_total(h).await != charged {
        assert!(
            Instant::now() < deadline,
            "ledger {} != charged {charged}",
            recorded_total(h).await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_full_disk_fails_closed_for_costly_requests_and_loses_nothing() {
    let disk = SmallDisk::mount();
    let ledger = disk.path().join("ledger.sqlite3");
    let h = Harness::start_with("", &format!("[ledger]\npath = \"{}\"\n", ledger.display())).await;
    let account = h.connected_account("tok-full").await;
    assert_eq!(
        h.post("/v2/profiles", &action(&account, "get"))
            .await
            .status,
        200
    );

    let filler = disk.fill();
    fails_closed_for_costly_requests(&h, &account).await;

    std::fs::remove_file(filler).unwrap();
    recovers_and_loses_nothing(&h, &account).await;
    h.gw.shutdown().await;
}
