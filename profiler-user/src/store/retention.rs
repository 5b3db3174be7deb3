//! Retention: how many snapshots, and how many bytes of them, the store keeps. When a limit is
//! passed the oldest snapshots (by sequence number) are removed first; the newest snapshot is
//! always kept, even when it alone is larger than the byte limit.

/// Limits of the snapshot store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    /// Most snapshots kept (`--retain-count`).
    pub max_count: usize,
    /// Most bytes on disk kept (`--retain-bytes`), counting compressed file sizes.
    pub max_bytes: u64,
}

impl Retention {
    pub const DEFAULT_COUNT: usize = 100;
    pub const DEFAULT_BYTES: u64 = 1 << 30;
}

impl Default for Retention {
    fn default() -> Self {
        Retention { max_count: Self::DEFAULT_COUNT, max_bytes: Self::DEFAULT_BYTES }
    }
}

/// Which snapshots to remove. `oldest_first` lists `(seq, size)` sorted by ascending seq; the
/// last one (the newest) is never chosen. Returns the seqs to remove, oldest first.
pub(crate) fn victims(policy: Retention, oldest_first: &[(u64, u64)]) -> Vec<u64> {
    let mut count = oldest_first.len();
    let mut bytes: u64 = oldest_first.iter().map(|&(_, s)| s).sum();
    let max_count = policy.max_count.max(1);
    let mut out = Vec::new();
    for &(seq, size) in oldest_first.iter().take(oldest_first.len().saturating_sub(1)) {
        if count <= max_count && bytes <= policy.max_bytes {
            break;
        }
        out.push(seq);
        count -= 1;
        bytes -= size;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Oldest go first; count and byte limits both apply; the newest always stays.
    #[test]
    fn removes_oldest_until_within_limits() {
        let snaps = [(1, 10), (2, 10), (3, 10), (4, 10)];
        assert_eq!(victims(Retention { max_count: 2, max_bytes: 1000 }, &snaps), vec![1, 2]);
        assert_eq!(victims(Retention { max_count: 10, max_bytes: 25 }, &snaps), vec![1, 2]);
        assert_eq!(victims(Retention { max_count: 10, max_bytes: 40 }, &snaps), Vec::<u64>::new());
        assert_eq!(victims(Retention { max_count: 10, max_bytes: 5 }, &snaps), vec![1, 2, 3]);
        assert_eq!(victims(Retention { max_count: 0, max_bytes: 5 }, &[]), Vec::<u64>::new());
    }
}
