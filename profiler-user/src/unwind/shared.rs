//! One `UNWIND_ROWS` map for every target: a file's rows are placed once and used by every
//! traced process that maps it (libc's, libstdc++'s, a service's binary run as several
//! replicas), instead of one copy per target.
//!
//! The map is the loaded object's (an mmap-able BPF array, sized once: `--max-unwind-rows`).
//! Rows of a file stay while some target uses them; freed ranges are reused first-fit.
use std::{
    collections::HashMap,
    io,
    os::fd::{AsFd as _, AsRawFd as _},
};

use aya::maps::MapData;
use memmap2::MmapMut;
use profiler_common::UnwindRow;

use super::cache::FileKey;

struct Slot {
    start: u32,
    len: u32,
    users: u32,
}

/// The row map of all targets.
pub struct SharedRows {
    _map: MapData,
    mem: MmapMut,
    capacity: u32,
    next_free: u32,
    files: HashMap<FileKey, Slot>,
    /// Ranges no target uses any more: `(start, len)`.
    free: Vec<(u32, u32)>,
}

impl SharedRows {
    /// Places rows in `map`, an mmap-able array of `capacity` rows.
    pub fn over(map: MapData, capacity: u32) -> io::Result<SharedRows> {
        let mem = super::target::mmap_array(map.fd().as_fd().as_raw_fd(), 0, capacity as usize * size_of::<UnwindRow>())?;
        Ok(SharedRows { _map: map, mem, capacity, next_free: 0, files: HashMap::new(), free: Vec::new() })
    }

    /// Where file `key`'s rows are, placing them unless another target already did; None when
    /// they do not fit.
    pub fn acquire(&mut self, key: FileKey, rows: &[UnwindRow]) -> Option<u32> {
        if let Some(slot) = self.files.get_mut(&key) {
            slot.users += 1;
            return Some(slot.start);
        }
        let len = u32::try_from(rows.len()).ok()?;
        let start = match self.free.iter().position(|&(_, free_len)| free_len >= len) {
            Some(i) => {
                let (start, free_len) = self.free.swap_remove(i);
                if free_len > len {
                    self.free.push((start + len, free_len - len));
                }
                start
            }
            None => {
                let end = self.next_free.checked_add(len).filter(|&end| end <= self.capacity)?;
                std::mem::replace(&mut self.next_free, end)
            }
        };
        let at = start as usize * size_of::<UnwindRow>();
        let bytes = super::target::as_bytes(rows);
        self.mem[at..at + bytes.len()].copy_from_slice(bytes);
        self.files.insert(key, Slot { start, len, users: 1 });
        Some(start)
    }

    /// One target fewer uses file `key`'s rows.
    pub fn release(&mut self, key: FileKey) {
        let Some(slot) = self.files.get_mut(&key) else { return };
        slot.users -= 1;
        if slot.users == 0 {
            let slot = self.files.remove(&key).expect("present");
            self.free.push((slot.start, slot.len));
        }
    }

    /// `(rows in use, capacity, map bytes)`.
    pub fn usage(&self) -> (usize, usize, usize) {
        let used = self.files.values().map(|s| s.len as usize).sum();
        (used, self.capacity as usize, self.mem.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two targets mapping the same file share its rows; once neither does, the range is
    /// reused by the next file (needs root: a real BPF map).
    #[test]
    fn files_share_rows_and_freed_ranges_are_reused() {
        if unsafe { libc::geteuid() } != 0 {
            panic!("needs root (creates a BPF map)");
        }
        let array = aya_obj::generated::bpf_map_type::BPF_MAP_TYPE_ARRAY as u32;
        let def = aya_obj::Map::new_from_params(array, 4, size_of::<UnwindRow>() as u32, 100, 1 << 10);
        let map = MapData::create(def, "test_rows", None).unwrap();
        let mut shared = SharedRows::over(map, 100).unwrap();
        let rows = vec![UnwindRow { pc: 1, cfa_offset: 8, kind: 1, rbp: 0 }; 40];
        let a = shared.acquire((1, 1), &rows).unwrap();
        assert_eq!(shared.acquire((1, 1), &rows), Some(a));
        let b = shared.acquire((1, 2), &rows).unwrap();
        assert_ne!(a, b);
        assert_eq!(shared.acquire((1, 3), &rows), None, "no room for a third");
        shared.release((1, 1));
        assert_eq!(shared.usage().0, 80, "still used by one target");
        shared.release((1, 1));
        assert_eq!(shared.acquire((1, 3), &rows), Some(a), "freed range reused");
    }
}
