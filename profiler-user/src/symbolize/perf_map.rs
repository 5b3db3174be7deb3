//! Symbols of just-in-time compiled code from `/tmp/perf-PID.map` (written by `node
//! --perf-basic-prof`, the JVM's perf-map-agent, LuaJIT, ...): one `START SIZE NAME` line per
//! code object, in hex. V8's names (`JS:*handler /app/server.js:12:3`) are split into
//! function, file and line.
//!
//! Lines are never removed, so an address can be covered by several (V8 frees code and reuses
//! its memory; an optimized function's range can overlap older ones): the NEWEST line covering
//! an address names it. The map is kept as non-overlapping ranges, each new line painted over
//! what it covers, so a lookup is one ordered search.
//!
//! The file is the target's: it is opened inside the target's root by [`target_fs`] (a
//! symlink cannot point it at a host file, a FIFO is refused), and since it only grows it is
//! read incrementally from where the last read stopped, complete lines only, up to
//! [`Kind::PerfMap`]'s cap in total; a line longer than [`MAX_LINE`] is skipped. What was not
//! read is counted ([`PerfMapStats`]) and the refusal logged.
//!
//! The parsed map is charged to the target's memory [`budget`] ([`LINE_COST`] plus the name per
//! line kept): a file cap alone let a 64 MiB map of short lines cost ~225 MB. When the
//! target's or the agent's budget refuses, reading stops there (later lines are not loaded,
//! their addresses stay unnamed) and the target's status says so.
use std::{collections::BTreeMap, io, os::unix::fs::FileExt as _, sync::Arc};

use crate::{
    aggregate::{Frame, FrameInfo},
    budget::{self, Account, Reservation},
    process::Process,
    target_fs::{self, Kind, Reason, TargetFile},
};

/// Longest line kept; V8's longest names are a few hundred bytes.
pub const MAX_LINE: usize = 4096;
/// Bytes read per `pread`.
const CHUNK: usize = 64 << 10;
/// Memory charged per line kept, besides its name: the tree entry (key, end, name pointer)
/// with the B-tree's slack, the name's allocation header and rounding, and the allocator's
/// slack. Measured with the agent on 23-byte lines (8-byte names): ~146 bytes of RSS a line
/// (`hostile_targets_e2e::four_targets_with_200_mb_perf_maps_stay_within_the_budget`).
pub const LINE_COST: u64 = 136;

/// Where reading the map got to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct PerfMapStats {
    /// Bytes consumed (complete lines).
    pub bytes_read: u64,
    pub lines: u64,
    /// Lines skipped: longer than [`MAX_LINE`] or not `START SIZE NAME`.
    pub lines_skipped: u64,
    /// The file grew past the cap: the rest is not read.
    pub capped: bool,
    /// The memory budget (the target's or the agent's) refused: reading stopped here.
    pub budget_refused: bool,
}

pub struct PerfMap {
    pid: u32,
    /// When known: the file is only read while the pid still names this process.
    process: Option<Arc<Process>>,
    /// The file being read, and the offset of the first byte not consumed yet.
    file: Option<TargetFile>,
    offset: u64,
    /// An incomplete last line, kept until its newline arrives.
    partial: Vec<u8>,
    /// Inside a line longer than [`MAX_LINE`]: skip up to its newline.
    skipping: bool,
    stats: PerfMapStats,
    /// The memory the parsed lines are charged for (given back when the map is dropped or
    /// read again from the start).
    charge: Reservation,
    /// start -> (end, name), non-overlapping; a later line is painted over the parts of
    /// earlier ones it covers (the VM reused the memory for new code).
    code: BTreeMap<u64, (u64, Arc<str>)>,
}

impl PerfMap {
    /// The map of `pid`, looked up in the target's own /tmp (it may live in a container),
    /// charged to a budget account of its own.
    pub fn for_pid(pid: u32) -> PerfMap {
        PerfMap::with_account(pid, None, Account::new(pid))
    }

    /// The map of a process held by identity, charged to `account` (the target's).
    pub fn for_process(process: Arc<Process>, account: Arc<Account>) -> PerfMap {
        PerfMap::with_account(process.pid(), Some(process), account)
    }

    fn with_account(pid: u32, process: Option<Arc<Process>>, account: Arc<Account>) -> PerfMap {
        PerfMap {
            pid,
            process,
            file: None,
            offset: 0,
            partial: Vec::new(),
            skipping: false,
            stats: PerfMapStats::default(),
            charge: account.reservation(budget::Use::PerfMap),
            code: BTreeMap::new(),
        }
    }

    pub fn stats(&self) -> PerfMapStats {
        self.stats
    }

    /// Reads what was appended since the last call (cheap when nothing was). A file replaced
    /// by another (new inode) or truncated is read again from its start.
    pub fn refresh(&mut self) {
        let path = format!("/tmp/perf-{}.map", self.pid);
        let file = match target_fs::open_in_root(self.pid, &path, Kind::PerfMap) {
            Ok(f) => f,
            Err(e) => {
                if !e.is_not_found() {
                    tracing::debug!("perf map of {}: {e}", self.pid);
                }
                return;
            }
        };
        // Opened inside the root of the process alive now: the traced one, or stop here.
        if self.process.as_ref().is_some_and(|p| !p.alive()) {
            return;
        }
        let len = file.len();
        let same = self.file.as_ref().is_some_and(|f| f.identity() == file.identity());
        if !same || len < self.offset {
            let account = self.charge.account().clone();
            *self = PerfMap::with_account(self.pid, self.process.take(), account);
        }
        self.file = Some(file);
        if let Err(e) = self.read_appended(len) {
            tracing::debug!("reading the perf map of {}: {e}", self.pid);
        }
    }

    fn read_appended(&mut self, len: u64) -> io::Result<()> {
        let Some(file) = self.file.clone() else { return Ok(()) };
        let end = len.min(Kind::PerfMap.cap());
        if len > end && !self.stats.capped {
            self.stats.capped = true;
            target_fs::refuse(&format!("/tmp/perf-{}.map", self.pid), Kind::PerfMap, Reason::TooLarge);
        }
        let mut buf = vec![0u8; CHUNK];
        while self.offset < end && !self.stats.budget_refused {
            let want = ((end - self.offset) as usize).min(CHUNK);
            let n = file.file().read_at(&mut buf[..want], self.offset)?;
            if n == 0 {
                break;
            }
            self.offset += n as u64;
            self.consume(&buf[..n]);
        }
        if self.stats.budget_refused {
            self.charge.account().note_not_loaded(
                budget::Use::PerfMap,
                format!("/tmp/perf-{}.map: lines after byte {} of {len} not loaded", self.pid, self.stats.bytes_read),
            );
        }
        Ok(())
    }

    /// Splits bytes into lines; keeps the incomplete tail (bounded by [`MAX_LINE`]).
    fn consume(&mut self, mut bytes: &[u8]) {
        while let Some(nl) = bytes.iter().position(|&b| b == b'\n') {
            if self.stats.budget_refused {
                return;
            }
            let (line, rest) = (&bytes[..nl], &bytes[nl + 1..]);
            bytes = rest;
            if std::mem::take(&mut self.skipping) || self.partial.len() + line.len() > MAX_LINE {
                self.partial.clear();
                self.stats.lines_skipped += 1;
            } else if self.partial.is_empty() {
                self.line(line);
            } else {
                let mut whole = std::mem::take(&mut self.partial);
                whole.extend_from_slice(line);
                self.line(&whole);
            }
            self.stats.bytes_read = self.offset - bytes.len() as u64;
        }
        if self.skipping || self.stats.budget_refused {
            return;
        }
        if self.partial.len() + bytes.len() > MAX_LINE {
            self.partial.clear();
            self.skipping = true;
        } else {
            self.partial.extend_from_slice(bytes);
        }
    }

    fn line(&mut self, line: &[u8]) {
        let parsed = std::str::from_utf8(line).ok().and_then(parse_line);
        match parsed {
            Some((start, size, name)) => {
                if self.charge.try_grow(LINE_COST + name.len() as u64).is_err() {
                    self.stats.budget_refused = true;
                    return;
                }
                self.stats.lines += 1;
                self.add(start, size, name);
            }
            None => self.stats.lines_skipped += 1,
        }
    }

    /// For `crate::fuzzing`: bytes as if read from the file.
    #[doc(hidden)]
    pub fn feed(&mut self, bytes: &[u8]) {
        self.offset += bytes.len() as u64;
        self.consume(bytes);
    }

    fn add(&mut self, start: u64, size: u64, name: &str) {
        self.paint(start, start.saturating_add(size), name);
    }

    /// Records `[start, end)` as `name`, over whatever older lines said about that range.
    fn paint(&mut self, start: u64, end: u64, name: &str) {
        if end <= start {
            return;
        }
        // An older range that starts before and reaches into this one keeps its head (and its
        // tail past `end`, when it spans this one whole).
        if let Some((&s, (e, n))) = self.code.range(..start).next_back() {
            if *e > start {
                let (e, n) = (*e, n.clone());
                self.code.insert(s, (start, n.clone()));
                if e > end {
                    self.code.insert(end, (e, n));
                }
            }
        }
        // Older ranges that start inside this one are covered; the last may stick out past `end`.
        let inside: Vec<u64> = self.code.range(start..end).map(|(&s, _)| s).collect();
        for s in inside {
            if let Some((e, n)) = self.code.remove(&s) {
                if e > end {
                    self.code.insert(end, (e, n));
                }
            }
        }
        self.code.insert(start, (end, name.into()));
    }

    /// Whether the target has a perf map (writes JIT symbols): only its existence, no content
    /// is read here, and the last component is not followed.
    pub fn present(&self) -> bool {
        self.file.is_some() || target_fs::exists_in_root(self.pid, &format!("/tmp/perf-{}.map", self.pid))
    }

    pub fn lookup(&self, addr: u64) -> Option<Frame> {
        let (_, (end, name)) = self.code.range(..=addr).next_back()?;
        (addr < *end).then(|| frame_for(addr, name))
    }
}

fn parse_line(line: &str) -> Option<(u64, u64, &str)> {
    let mut it = line.splitn(3, ' ');
    let start = u64::from_str_radix(it.next()?, 16).ok()?;
    let size = u64::from_str_radix(it.next()?, 16).ok()?;
    Some((start, size, it.next()?.trim()))
}

/// `JS:*name /path/file.js:12:3` -> function `name`, file, line 12. Other names are kept whole.
fn frame_for(addr: u64, name: &str) -> Frame {
    let mut frame = FrameInfo { address: addr, module: Some("[jit]".into()), ..Default::default() };
    let Some(js) = name.strip_prefix("JS:") else {
        frame.function = Some(name.into());
        return frame.into();
    };
    let js = js.trim_start_matches(['*', '~', '^', '+']);
    let (function, location) = js.split_once(' ').unwrap_or((js, ""));
    frame.function = Some(if function.is_empty() { "(anonymous)" } else { function }.into());
    let mut parts = location.rsplitn(3, ':');
    let (col, line, file) = (parts.next(), parts.next(), parts.next());
    match (file, line.and_then(|l| l.parse().ok()), col) {
        (Some(file), Some(line), Some(_)) => {
            frame.file = Some(file.into());
            frame.line = Some(line);
        }
        _ if !location.is_empty() => frame.file = Some(location.into()),
        _ => {}
    }
    frame.into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{fs, io::Write as _};

    /// V8 names split into function, file and line; other names kept; later lines win; the
    /// file is re-read when it grows.
    #[test]
    fn reads_and_looks_up_perf_maps() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("perf.map");
        fs::write(&path, "1000 20 JS:~leakyHandler /srv/app.js:2:22\n2000 10 Builtin:ArrayPush\n").unwrap();
        let mut map = PerfMap::for_pid(0);
        let read = |map: &mut PerfMap| {
            let file = target_fs::open_checked(&path, Kind::PerfMap).unwrap();
            let len = file.len();
            map.file = Some(file);
            map.read_appended(len).unwrap();
        };
        read(&mut map);
        let f = map.lookup(0x1010).unwrap();
        assert_eq!(f.function.as_deref(), Some("leakyHandler"));
        assert_eq!((f.file.as_deref(), f.line), (Some("/srv/app.js"), Some(2)));
        assert_eq!(map.lookup(0x2005).unwrap().function.as_deref(), Some("Builtin:ArrayPush"));
        assert!(map.lookup(0x1020).is_none() && map.lookup(0x500).is_none());
        let mut f = fs::OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"1000 8 JS:*(anonymous) /srv/b.js:9").unwrap();
        read(&mut map);
        assert_eq!(map.lookup(0x1010).unwrap().function.as_deref(), Some("leakyHandler"), "an incomplete line is not used");
        f.write_all(b":1\n").unwrap();
        read(&mut map);
        let f = map.lookup(0x1004).unwrap();
        assert_eq!((f.function.as_deref(), f.line), (Some("(anonymous)"), Some(9)));
        // The newest line covering an address wins; the older one still names what it alone covers.
        assert_eq!(map.lookup(0x1010).unwrap().function.as_deref(), Some("leakyHandler"));
        assert_eq!(map.stats().lines, 3);
    }

    /// Lines longer than MAX_LINE, junk and NUL runs (a sparse file) are skipped with bounded
    /// memory; complete lines around them are kept.
    #[test]
    fn long_lines_and_junk_are_skipped() {
        let mut map = PerfMap::for_pid(0);
        map.offset = 0;
        let mut data = b"1000 10 a\n".to_vec();
        data.extend(std::iter::repeat_n(0u8, 3 * CHUNK));
        data.extend_from_slice(b"\nnot a line\n2000 10 b\n3000 1");
        for chunk in data.chunks(CHUNK) {
            map.offset += chunk.len() as u64;
            map.consume(chunk);
            assert!(map.partial.len() <= MAX_LINE);
        }
        assert_eq!(map.lookup(0x1005).unwrap().function.as_deref(), Some("a"));
        assert_eq!(map.lookup(0x2005).unwrap().function.as_deref(), Some("b"));
        assert!(map.lookup(0x3000).is_none());
        assert_eq!((map.stats.lines, map.stats.lines_skipped), (2, 2));
        assert_eq!(map.stats.bytes_read, data.len() as u64 - 6);
    }

    /// Overlapping lines in every arrangement: the newest covering line names each address.
    #[test]
    fn newest_covering_line_wins() {
        let mut map = PerfMap::for_pid(0);
        let name = |m: &PerfMap, a: u64| m.lookup(a).and_then(|f| f.function.as_deref().map(str::to_string));
        map.paint(0x1000, 0x1200, "JS:~old /a.js:1:1");
        // Newer range starting before the old one and ending inside it (the case the old
        // lookup got wrong: the old range's start is closer to the address).
        map.paint(0x0f00, 0x1100, "JS:*opt /a.js:2:1");
        assert_eq!(name(&map, 0x1010).as_deref(), Some("opt"));
        assert_eq!(name(&map, 0x0f10).as_deref(), Some("opt"));
        assert_eq!(name(&map, 0x1150).as_deref(), Some("old"));
        // Newer range strictly inside: splits the older one.
        map.paint(0x1120, 0x1140, "JS:*mid /a.js:3:1");
        assert_eq!(name(&map, 0x1130).as_deref(), Some("mid"));
        assert_eq!(name(&map, 0x1110).as_deref(), Some("old"));
        assert_eq!(name(&map, 0x1190).as_deref(), Some("old"));
        // Newer range covering everything.
        map.paint(0x0e00, 0x1300, "JS:*all /a.js:4:1");
        for a in [0x0e00, 0x0f10, 0x1010, 0x1130, 0x1190, 0x12ff] {
            assert_eq!(name(&map, a).as_deref(), Some("all"), "{a:#x}");
        }
        assert!(map.lookup(0x1300).is_none() && map.lookup(0x0dff).is_none());
        assert_eq!(map.code.len(), 1);
    }
}
