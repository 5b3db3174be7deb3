//! SIGKILL during snapshot writes, for real: this test binary re-runs itself as a child that
//! writes large snapshots into a store without pause ([`writer_child`]), and the parent kills
//! it at varied moments, then reopens the store and checks that every snapshot it lists reads
//! back whole, that the temp file of the interrupted write is reported and removed, and that
//! no snapshot written before is lost.
use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use super::*;
use crate::aggregate::{FrameInfo, StackSample};

const DIR_ENV: &str = "MEMSCOPE_CRASH_TEST_DIR";

fn big_profile(pid: u32, seq: usize) -> HeapProfile {
    HeapProfile {
        pid,
        taken_at_ms: 1_795_536_301_000 + seq as u64,
        stacks: (0..10_000)
            .map(|i| StackSample {
                frames: vec![FrameInfo {
                    function: Some(format!("f{i}_{seq}_{:x}", i * 7919).into()),
                    address: 0x1000 + i as u64,
                    ..FrameInfo::default()
                }
                .into()],
                live_bytes: i as u64,
                live_allocs: 1,
                ..StackSample::default()
            })
            .collect(),
        ..HeapProfile::default()
    }
}

/// Snapshot files written to the end (renamed into place).
fn committed(dir: &Path) -> usize {
    fs::read_dir(dir)
        .unwrap()
        .filter(|e| {
            let name = e.as_ref().unwrap().file_name().to_string_lossy().into_owned();
            name.ends_with(file::SUFFIX) && !name.starts_with(file::TEMP_PREFIX)
        })
        .count()
}

/// Not a test on its own: the writer that [`sigkill_mid_write_loses_nothing`] starts and kills.
#[test]
#[ignore = "run by sigkill_mid_write_loses_nothing"]
fn writer_child() {
    let Ok(dir) = std::env::var(DIR_ENV) else { return };
    let (store, _) = SnapshotStore::open(Path::new(&dir), Retention { max_count: 100_000, max_bytes: u64::MAX }).unwrap();
    for seq in 0.. {
        store.put(&big_profile(7, seq), "writer", "api").unwrap();
    }
}

#[test]
fn sigkill_mid_write_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let (mut known, mut strays) = (0usize, 0usize);
    for round in 0..5u64 {
        let mut child = Command::new(&exe)
            .args(["--exact", "store::crash_tests::writer_child", "--ignored", "--nocapture", "--test-threads", "1"])
            .env(DIR_ENV, dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Wait for one whole write (its time depends on the build and the load), then kill at
        // a different fraction of the next one each round.
        let started = Instant::now();
        while committed(dir.path()) <= known && started.elapsed() < Duration::from_secs(120) {
            std::thread::sleep(Duration::from_millis(5));
        }
        let write = started.elapsed();
        std::thread::sleep(write.mul_f64(0.1 + 0.2 * round as f64));
        unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
        child.wait().unwrap();
        let (store, report) = SnapshotStore::open(dir.path(), Retention { max_count: 100_000, max_bytes: u64::MAX }).unwrap();
        assert!(report.unreadable.is_empty(), "round {round}: {:?}", report.unreadable);
        strays += report.stray_temp_files.len();
        let list = store.list();
        assert!(list.len() >= known, "round {round}: {} snapshots, {known} before the kill", list.len());
        for meta in &list {
            let (_, profile) = store.get(&SnapshotId::parse(&meta.id).unwrap()).unwrap();
            assert_eq!(profile.stacks.len(), 10_000, "{} read back incomplete", meta.id);
        }
        known = list.len();
        let temps = fs::read_dir(dir.path()).unwrap().filter(|e| {
            e.as_ref().unwrap().file_name().to_string_lossy().starts_with(file::TEMP_PREFIX)
        });
        assert_eq!(temps.count(), 0, "a temp file survived the reopen");
    }
    assert!(known > 0, "the writer never finished a snapshot");
    // Writes run back to back and the kills land within the length of one: most interrupt one.
    assert!(strays > 0, "no kill interrupted a write (the test did not test anything)");
}
