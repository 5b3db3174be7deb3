//! Bulk reads of hash maps with `BPF_MAP_LOOKUP_BATCH` (kernel 5.6+): a million live
//! allocations in a few dozen syscalls instead of two per entry. aya 0.14 has no batch
//! operations, so this is the raw `bpf(2)` call; callers fall back to iteration on error.
use std::{io, mem::size_of, os::fd::RawFd};

use aya::Pod;

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

/// `union bpf_attr`'s `batch` member.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Deletes `keys` from the hash map behind `fd`, up to 64Ki per call; keys already gone are
/// skipped one by one. Returns how many were deleted.
pub fn delete<K: Pod>(fd: RawFd, keys: &[K]) -> usize {
    let mut deleted = 0;
    let mut rest = keys;
    while !rest.is_empty() {
        let n = rest.len().min(1 << 16);
        let mut attr = BatchAttr { keys: rest.as_ptr() as u64, count: n as u32, map_fd: fd as u32, ..Default::default() };
        let ret = unsafe {
            libc::syscall(libc::SYS_bpf, BPF_MAP_DELETE_BATCH, &mut attr as *mut BatchAttr, size_of::<BatchAttr>())
        };
        // On ENOENT the kernel stops at the missing key: `count` says how many went before it.
        let done = (attr.count as usize).min(n);
        deleted += done;
        if ret < 0 && done < n {
            rest = &rest[done + 1..];
        } else {
            rest = &rest[n..];
        }
    }
    deleted
}

/// Hands the hash map behind `fd` to `f` a chunk at a time (up to 64Ki entries), so a caller
/// can aggregate a million entries without holding them all. Entries changing during the read
/// may be missed or seen once more, as with iteration. On error, `f` may already have seen part
/// of the map.
pub fn for_each_chunk<K: Pod + Default, V: Pod + Default>(fd: RawFd, f: impl FnMut(&[K], &[V])) -> io::Result<()> {
    for_each_chunk_per_cpu(fd, 1, f)
}

/// [`for_each_chunk`] for per-CPU maps: each key comes with `cpus` values (the kernel's
/// possible CPUs; `V`'s size must be a multiple of 8, the kernel's per-CPU stride).
pub fn for_each_chunk_per_cpu<K: Pod + Default, V: Pod + Default>(
    fd: RawFd,
    cpus: usize,
    mut f: impl FnMut(&[K], &[V]),
) -> io::Result<()> {
    debug_assert!(cpus == 1 || size_of::<V>().is_multiple_of(8));
    let mut chunk: usize = 1 << 16;
    let mut keys: Vec<K> = vec![K::default(); chunk];
    let mut values: Vec<V> = vec![V::default(); chunk * cpus];
    // The position token: a bucket index for hash maps; sized generously.
    let mut in_token = [0u64; 2];
    let mut out_token = [0u64; 2];
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { in_token.as_mut_ptr() as u64 },
            out_batch: out_token.as_mut_ptr() as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: chunk as u32,
            map_fd: fd as u32,
            ..Default::default()
        };
        let ret = unsafe {
            libc::syscall(libc::SYS_bpf, BPF_MAP_LOOKUP_BATCH, &mut attr as *mut BatchAttr, size_of::<BatchAttr>())
        };
        let err = (ret < 0).then(io::Error::last_os_error);
        match err.as_ref().and_then(io::Error::raw_os_error) {
            None | Some(libc::ENOENT) => {
                let n = (attr.count as usize).min(chunk);
                f(&keys[..n], &values[..n * cpus]);
                if err.is_some() {
                    return Ok(());
                }
                in_token = out_token;
                first = false;
            }
            // A bucket holds more entries than fit: retry the same position with more room.
            Some(libc::ENOSPC) if chunk < (1 << 24) => {
                chunk *= 4;
                keys.resize(chunk, K::default());
                values.resize(chunk * cpus, V::default());
            }
            _ => return Err(err.unwrap()),
        }
    }
}
