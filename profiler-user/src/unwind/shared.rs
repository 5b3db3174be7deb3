//! One `UNWIND_ROWS` map for every target of the agent: a file's rows are placed once and used
//! by every traced process that maps it (libc's, libstdc++'s, a service's binary run as several
//! replicas), instead of one copy per target.
//!
//! The map is created here (an mmap-able BPF array, sized once: `--max-unwind-rows`), and each
//! target's uprobe.session programs are relocated against it in place of their own object's
//! (see `bpf::load`; classic uprobes are loaded by aya from the object and keep a map per
//! target). Rows of a file stay while some target uses them; freed ranges are reused
//! first-fit.
use std::{
    collections::HashMap,
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
};

use memmap2::MmapMut;
use profiler_common::UnwindRow;

use super::cache::FileKey;

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_F_MMAPABLE: u32 = 1 << 10;

/// `union bpf_attr` for BPF_MAP_CREATE, up to `map_flags`.
#[repr(C)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
}

struct Slot {
    start: u32,
    len: u32,
    users: u32,
}

/// The agent's shared row map.
pub struct SharedRows {
    fd: OwnedFd,
    mem: MmapMut,
    capacity: u32,
    next_free: u32,
    files: HashMap<FileKey, Slot>,
    /// Ranges no target uses any more: `(start, len)`.
    free: Vec<(u32, u32)>,
}

impl SharedRows {
    /// Creates the map for `capacity` rows (kernel memory: 8 bytes each, allocated now).
    pub fn create(capacity: u32) -> io::Result<SharedRows> {
        let capacity = capacity.max(1);
        let attr = MapCreateAttr {
            map_type: BPF_MAP_TYPE_ARRAY,
            key_size: 4,
            value_size: size_of::<UnwindRow>() as u32,
            max_entries: capacity,
            map_flags: BPF_F_MMAPABLE,
        };
        let ret = unsafe { libc::syscall(libc::SYS_bpf, BPF_MAP_CREATE, &attr as *const MapCreateAttr, size_of::<MapCreateAttr>()) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = unsafe { OwnedFd::from_raw_fd(ret as RawFd) };
        let mem = super::target::mmap_array(fd.as_raw_fd(), capacity as usize * size_of::<UnwindRow>())?;
        Ok(SharedRows { fd, mem, capacity, next_free: 0, files: HashMap::new(), free: Vec::new() })
    }

    /// The map's descriptor, for relocating programs against it.
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
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
        let mut shared = SharedRows::create(100).unwrap();
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
