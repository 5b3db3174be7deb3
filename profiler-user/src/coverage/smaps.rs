//! The whole resident memory of a target by kind, from `/proc/PID/smaps`: the allocator's
//! `[heap]` (brk), other private anonymous mappings (malloc's arenas and large chunks, direct
//! `mmap`s, runtime heaps: memscope cannot tell these apart by the mapping alone), thread
//! stacks, file-backed pages (and the private copies written into file mappings: `.data`,
//! `.bss`, relro), shared memory, and the rest (`[vdso]`, ...).
//!
//! Hostile input: the target names its mappings (`prctl(PR_SET_VMA_ANON_NAME)`, file names with
//! spaces or newlines-free junk, up to 65,530 mappings by default). Reading is bounded: at most
//! [`MAX_BYTES`] of text, lines longer than [`MAX_LINE`] skipped, [`MAX_MAPPINGS`] mappings; past
//! a bound the breakdown says `complete: false`. Names are used only to classify (`[heap]`,
//! `[stack]`, a `/` path, `[anon:...]`), never copied into the output.
use std::{
    fs::File,
    io::{self, BufRead, BufReader, Read},
};

use serde::{Deserialize, Serialize};

/// Most bytes of `/proc/PID/smaps` read (a mapping's entry is about 1.1 KiB of text).
pub const MAX_BYTES: u64 = 96 << 20;
/// Longest line parsed; longer ones (a mapping named with kilobytes of junk) are skipped whole.
pub const MAX_LINE: usize = 8192;
/// Most mappings classified.
pub const MAX_MAPPINGS: usize = 70_000;
/// Most threads whose stack pointer is looked up (to tell thread stacks from other mappings).
pub const MAX_THREADS: usize = 4096;

/// Resident bytes of a process by kind. Kinds add up to `rss_bytes` (when `complete`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Breakdown {
    /// Sum of every mapping's `Rss`.
    pub rss_bytes: u64,
    /// `[heap]`: the brk heap, where glibc's main arena and musl's allocator put small blocks.
    pub brk_heap_bytes: u64,
    /// Private anonymous mappings that are not a stack: malloc's other arenas and its large
    /// (mmapped) chunks, memory mapped directly with `mmap`, runtime heaps (Go, V8, pymalloc).
    pub anon_mapping_bytes: u64,
    /// `[stack]` and the anonymous mappings holding a thread's stack pointer.
    pub thread_stack_bytes: u64,
    /// Pages of file mappings as in the file (code, read-only data, clean pages).
    pub file_backed_bytes: u64,
    /// Private copies of file pages the process wrote (`.data`, `.bss`, relocations): they count
    /// in `RssAnon` but are not heap.
    pub file_private_anon_bytes: u64,
    /// Shared mappings (shared anonymous, `memfd`, System V and POSIX shared memory,
    /// shared file mappings' pages the process wrote).
    pub shared_bytes: u64,
    /// `[vdso]`, `[vvar]`, `[vsyscall]` and the like.
    pub other_bytes: u64,
    /// Mappings read.
    pub mappings: u64,
    /// Threads whose stack pointer was known (blocked threads; running ones are not).
    pub threads_located: u64,
    /// False when a bound was reached or the file could not be read to its end.
    pub complete: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Heap,
    Anon,
    Stack,
    File,
    Shared,
    Other,
}

/// One mapping's header and the fields we need.
#[derive(Debug)]
struct Entry {
    start: u64,
    end: u64,
    kind: Kind,
    rss: u64,
    anonymous: u64,
}

/// The breakdown of `pid`'s memory; `None` when its smaps cannot be read at all (gone, or no
/// privilege). Stack pointers of its threads come from `/proc/PID/task/TID/syscall`.
pub fn read(pid: u32) -> Option<Breakdown> {
    let file = File::open(format!("/proc/{pid}/smaps")).ok()?;
    let sps = thread_stack_pointers(pid);
    let mut b = parse(file.take(MAX_BYTES), &sps).ok()?;
    b.threads_located = sps.len() as u64;
    Some(b)
}

/// The stack pointers of `pid`'s threads that are blocked in the kernel (field 8 of
/// `/proc/PID/task/TID/syscall`: `nr a1 .. a6 sp pc`; `running` for a running thread).
fn thread_stack_pointers(pid: u32) -> Vec<u64> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return Vec::new() };
    let mut out = Vec::new();
    for entry in dir.flatten().take(MAX_THREADS) {
        let Ok(f) = File::open(entry.path().join("syscall")) else { continue };
        let mut text = String::new();
        if f.take(512).read_to_string(&mut text).is_err() {
            continue;
        }
        if let Some(sp) = parse_syscall_sp(&text) {
            out.push(sp);
        }
    }
    out
}

fn parse_syscall_sp(text: &str) -> Option<u64> {
    let fields: Vec<&str> = text.split_whitespace().collect();
    // `nr a1 a2 a3 a4 a5 a6 sp pc`, or `-1 sp pc` for a thread blocked outside a syscall.
    let sp = match fields.len() {
        9 => fields[7],
        3 => fields[1],
        _ => return None,
    };
    u64::from_str_radix(sp.strip_prefix("0x")?, 16).ok().filter(|&v| v != 0)
}

/// Parses smaps text from `r` (already capped by the caller), classifying anonymous mappings
/// that hold one of `stack_pointers` as thread stacks.
fn parse(r: impl Read, stack_pointers: &[u64]) -> io::Result<Breakdown> {
    let mut reader = BufReader::new(r);
    let mut b = Breakdown { complete: true, ..Default::default() };
    let mut current: Option<Entry> = None;
    let mut line = Vec::with_capacity(256);
    let finish = |e: Entry, b: &mut Breakdown| {
        b.mappings += 1;
        b.rss_bytes += e.rss;
        let kind = if e.kind == Kind::Anon && stack_pointers.iter().any(|&sp| e.start <= sp && sp < e.end) {
            Kind::Stack
        } else {
            e.kind
        };
        match kind {
            Kind::Heap => b.brk_heap_bytes += e.rss,
            Kind::Anon => b.anon_mapping_bytes += e.rss,
            Kind::Stack => b.thread_stack_bytes += e.rss,
            Kind::Shared => b.shared_bytes += e.rss,
            Kind::Other => b.other_bytes += e.rss,
            Kind::File => {
                let anon = e.anonymous.min(e.rss);
                b.file_private_anon_bytes += anon;
                b.file_backed_bytes += e.rss - anon;
            }
        }
    };
    loop {
        line.clear();
        let n = read_line_bounded(&mut reader, &mut line)?;
        if n == 0 {
            break;
        }
        if line.len() > MAX_LINE {
            // A huge mapping name (or junk): the mapping is not classified.
            b.complete = false;
            if let Some(e) = current.take() {
                finish(e, &mut b);
            }
            continue;
        }
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_end_matches('\n');
        if let Some(e) = parse_header(text) {
            if let Some(prev) = current.replace(e) {
                finish(prev, &mut b);
            }
            if b.mappings as usize >= MAX_MAPPINGS {
                b.complete = false;
                current = None;
                break;
            }
            continue;
        }
        let Some(e) = current.as_mut() else { continue };
        if let Some(kb) = field_kb(text, "Rss") {
            e.rss = kb.saturating_mul(1024);
        } else if let Some(kb) = field_kb(text, "Anonymous") {
            e.anonymous = kb.saturating_mul(1024);
        }
    }
    if let Some(e) = current.take() {
        finish(e, &mut b);
    }
    Ok(b)
}

/// Reads one line into `buf`, keeping at most `MAX_LINE + 1` bytes of it (the rest is read
/// and dropped). Returns the bytes consumed (0 at the end).
fn read_line_bounded(r: &mut impl BufRead, buf: &mut Vec<u8>) -> io::Result<usize> {
    let mut consumed = 0;
    loop {
        let available = r.fill_buf()?;
        if available.is_empty() {
            return Ok(consumed);
        }
        let (chunk, done) = match available.iter().position(|&c| c == b'\n') {
            Some(i) => (&available[..=i], true),
            None => (available, false),
        };
        let room = (MAX_LINE + 1).saturating_sub(buf.len());
        buf.extend_from_slice(&chunk[..chunk.len().min(room)]);
        let len = chunk.len();
        r.consume(len);
        consumed += len;
        if done {
            return Ok(consumed);
        }
    }
}

/// `Rss:     1234 kB` -> 1234.
fn field_kb(line: &str, name: &str) -> Option<u64> {
    let rest = line.strip_prefix(name)?.strip_prefix(':')?;
    let mut it = rest.split_whitespace();
    let n = it.next()?.parse().ok()?;
    (it.next() == Some("kB")).then_some(n)
}

/// A mapping's header line (`start-end perms offset dev inode [name]`), classified.
fn parse_header(line: &str) -> Option<Entry> {
    let m = crate::procfs::parse_maps_line(line)?;
    let perms = line.split(' ').nth(1)?;
    let shared = perms.as_bytes().get(3) == Some(&b's');
    let name = m.path.as_deref();
    let kind = match name {
        _ if shared => Kind::Shared,
        Some("[heap]") => Kind::Heap,
        Some("[stack]") => Kind::Stack,
        Some(n) if n.starts_with("[anon:") || n.starts_with("[anon_shmem:") => Kind::Anon,
        Some(n) if n.starts_with('[') => Kind::Other,
        // memfd and SysV segments are shared memory even when mapped privately.
        Some(n) if n.starts_with("/memfd:") || n.starts_with("/SYSV") || n.starts_with("/dev/shm/") => Kind::Shared,
        Some(_) if m.inode != 0 => Kind::File,
        Some(_) => Kind::Other,
        None => Kind::Anon,
    };
    // A bare `/dev/zero` private mapping is anonymous memory.
    let kind = if name == Some("/dev/zero") && !shared { Kind::Anon } else { kind };
    Some(Entry { start: m.start, end: m.end, kind, rss: 0, anonymous: 0 })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
55d000000000-55d000021000 rw-p 00000000 00:00 0                          [heap]
Size:                132 kB
Rss:                 100 kB
Anonymous:           100 kB
7f0000000000-7f0004000000 rw-p 00000000 00:00 0 
Rss:                8192 kB
Anonymous:          8192 kB
7f1000000000-7f1000800000 rw-p 00000000 00:00 0 
Rss:                  16 kB
Anonymous:            16 kB
7f2000000000-7f2000100000 r-xp 00000000 fe:01 1183                       /usr/lib/x86_64-linux-gnu/libc.so.6
Rss:                 900 kB
Anonymous:             0 kB
7f2000100000-7f2000104000 rw-p 00100000 fe:01 1183                       /usr/lib/x86_64-linux-gnu/libc.so.6
Rss:                  16 kB
Anonymous:            12 kB
7f3000000000-7f3000010000 rw-s 00000000 00:01 77                         /memfd:ring (deleted)
Rss:                  64 kB
Anonymous:             0 kB
7f4000000000-7f4000001000 rw-p 00000000 00:00 0                          [anon:my arena]
Rss:                   4 kB
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0                          [stack]
Rss:                  32 kB
7ffd10000000-7ffd10002000 r-xp 00000000 00:00 0                          [vdso]
Rss:                   8 kB
";

    /// Every kind is counted where it belongs; a thread's stack is found by its stack pointer;
    /// kinds add up to the RSS.
    #[test]
    fn classifies_every_kind() {
        let b = parse(SMAPS.as_bytes(), &[0x7f1000700000]).unwrap();
        assert!(b.complete);
        assert_eq!(b.mappings, 9);
        assert_eq!(b.brk_heap_bytes, 100 << 10);
        assert_eq!(b.anon_mapping_bytes, (8192 + 4) << 10);
        assert_eq!(b.thread_stack_bytes, (16 + 32) << 10);
        assert_eq!(b.file_backed_bytes, (900 + 4) << 10);
        assert_eq!(b.file_private_anon_bytes, 12 << 10);
        assert_eq!(b.shared_bytes, 64 << 10);
        assert_eq!(b.other_bytes, 8 << 10);
        let kinds = b.brk_heap_bytes
            + b.anon_mapping_bytes
            + b.thread_stack_bytes
            + b.file_backed_bytes
            + b.file_private_anon_bytes
            + b.shared_bytes
            + b.other_bytes;
        assert_eq!(kinds, b.rss_bytes);
    }

    /// A mapping named with a huge string is skipped (not classified by a name cut short), the
    /// breakdown says it is incomplete, and reading goes on; garbage never panics.
    #[test]
    fn bounded_against_hostile_names() {
        let long =
            format!("7f4000000000-7f4000001000 rw-p 00000000 00:00 0 [anon:{}]\nRss: 4 kB\n", "x".repeat(MAX_LINE * 3));
        let text = format!("{long}{SMAPS}");
        let b = parse(text.as_bytes(), &[]).unwrap();
        assert!(!b.complete);
        assert_eq!(b.brk_heap_bytes, 100 << 10);
        for junk in [
            "",
            "\n\n",
            "Rss: 5 kB\n",
            "zz-yy rw-p 0 0 0\nRss: x kB\n",
            "1-2 rw-p 0 0:0 0\nRss: 99999999999999999999 kB\n",
        ] {
            let _ = parse(junk.as_bytes(), &[]).unwrap();
        }
    }

    /// Thread stack pointers come from `syscall` (blocked threads); running threads have none.
    #[test]
    fn syscall_stack_pointer() {
        assert_eq!(parse_syscall_sp("202 0x7f 0x80 0x0 0x0 0x0 0x0 0x7ffc1000 0x7f00aa\n"), Some(0x7ffc1000));
        assert_eq!(parse_syscall_sp("-1 0x7ffc2000 0x4011\n"), Some(0x7ffc2000));
        assert_eq!(parse_syscall_sp("running\n"), None);
        let me = read(std::process::id()).unwrap();
        assert!(me.complete && me.rss_bytes > 0 && me.file_backed_bytes > 0, "{me:?}");
    }
}
