//! SIGKILL during snapshot writes, for real: this test binary re-runs itself as a child that
//! writes large snapshots into a store without pause ([`writer_child`]), and the parent kills
//! it at varied moments, then reopens the store and checks that every snapshot it lists reads
//! back whole, that the temp file of the interrupted write is reported and removed, and that
//! no snapshot written before is lost.
use std::{
    process::{Command, Stdio},
    time::Duration,
};

use super::*;
use crate::aggregate::{FrameInfo, StackSample};

const DIR_ENV: &str = "MEMSCOPE_CRASH_TEST_DIR";

fn big_profile(pid: u32, seq: usize) -> HeapProfile {
    HeapProfile {
        pid,
        taken_at_ms: 1_795_536_301_000 + seq as u64,
        stacks: (0..40_000)
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
    for round in 0..6u64 {
        let mut child = Command::new(&exe)
            .args(["--exact", "store::crash_tests::writer_child", "--ignored", "--nocapture", "--test-threads", "1"])
            .env(DIR_ENV, dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Varied moments, so kills land in different phases of a write.
        std::thread::sleep(Duration::from_millis(400 + round * 137));
        unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
        child.wait().unwrap();
        let (store, report) = SnapshotStore::open(dir.path(), Retention { max_count: 100_000, max_bytes: u64::MAX }).unwrap();
        assert!(report.unreadable.is_empty(), "round {round}: {:?}", report.unreadable);
        strays += report.stray_temp_files.len();
        let list = store.list();
        assert!(list.len() >= known, "round {round}: {} snapshots, {known} before the kill", list.len());
        for meta in &list {
            let (_, profile) = store.get(&SnapshotId::parse(&meta.id).unwrap()).unwrap();
            assert_eq!(profile.stacks.len(), 40_000, "{} read back incomplete", meta.id);
        }
        known = list.len();
        let temps = fs::read_dir(dir.path()).unwrap().filter(|e| {
            e.as_ref().unwrap().file_name().to_string_lossy().starts_with(file::TEMP_PREFIX)
        });
        assert_eq!(temps.count(), 0, "a temp file survived the reopen");
    }
    assert!(known > 0, "the writer never finished a snapshot");
    // Writes take ~100-300 ms each and run back to back: most kills land inside one.
    assert!(strays > 0, "no kill interrupted a write (the test did not test anything)");
}
