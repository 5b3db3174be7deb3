//! Symbols of just-in-time compiled code from `/tmp/perf-PID.map` (written by `node
//! --perf-basic-prof`, the JVM's perf-map-agent, LuaJIT, ...): one `START SIZE NAME` line per
//! code object, in hex. The file only grows; it is re-read when its size changed. V8's names
//! (`JS:*handler /app/server.js:12:3`) are split into function, file and line.
//!
//! Lines are never removed, so an address can be covered by several (V8 frees code and reuses
//! its memory; an optimized function's range can overlap older ones): the NEWEST line covering
//! an address names it. The map is kept as non-overlapping ranges, each new line painted over
//! what it covers, so a lookup is one ordered search.
use std::{collections::BTreeMap, fs, path::PathBuf, sync::Arc};

use crate::aggregate::{Frame, FrameInfo};

pub struct PerfMap {
    path: PathBuf,
    read_len: u64,
    /// start -> (end, name), non-overlapping; a later line is painted over the parts of
    /// earlier ones it covers (the VM reused the memory for new code).
    code: BTreeMap<u64, (u64, Arc<str>)>,
}

impl PerfMap {
    /// The map of `pid`, looked up in the target's own /tmp (it may live in a container).
    pub fn for_pid(pid: u32) -> PerfMap {
        PerfMap { path: PathBuf::from(format!("/proc/{pid}/root/tmp/perf-{pid}.map")), read_len: 0, code: BTreeMap::new() }
    }

    /// Re-reads the file when it grew (cheap when it did not).
    pub fn refresh(&mut self) {
        let Ok(meta) = fs::metadata(&self.path) else { return };
        if meta.len() == self.read_len {
            return;
        }
        let Ok(text) = fs::read_to_string(&self.path) else { return };
        self.code.clear();
        for line in text.lines() {
            if let Some((start, size, name)) = parse_line(line) {
                self.paint(start, start.saturating_add(size), name);
            }
        }
        self.read_len = meta.len();
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

    /// Whether the map file exists (the target writes JIT symbols).
    pub fn present(&self) -> bool {
        fs::metadata(&self.path).is_ok()
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

    /// V8 names split into function, file and line; other names kept; later lines win; the
    /// file is re-read when it grows.
    #[test]
    fn reads_and_looks_up_perf_maps() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("perf.map");
        fs::write(&path, "1000 20 JS:~leakyHandler /srv/app.js:2:22\n2000 10 Builtin:ArrayPush\n").unwrap();
        let mut map = PerfMap { path: path.clone(), read_len: 0, code: BTreeMap::new() };
        map.refresh();
        let f = map.lookup(0x1010).unwrap();
        assert_eq!(f.function.as_deref(), Some("leakyHandler"));
        assert_eq!((f.file.as_deref(), f.line), (Some("/srv/app.js"), Some(2)));
        assert_eq!(map.lookup(0x2005).unwrap().function.as_deref(), Some("Builtin:ArrayPush"));
        assert!(map.lookup(0x1020).is_none() && map.lookup(0x500).is_none());
        fs::write(&path, "1000 20 JS:~leakyHandler /srv/app.js:2:22\n2000 10 Builtin:ArrayPush\n1000 8 JS:*(anonymous) /srv/b.js:9:1\n").unwrap();
        map.refresh();
        let f = map.lookup(0x1004).unwrap();
        assert_eq!((f.function.as_deref(), f.line), (Some("(anonymous)"), Some(9)));
        // The newest line covering an address wins; the older one still names what it alone covers.
        assert_eq!(map.lookup(0x1010).unwrap().function.as_deref(), Some("leakyHandler"));
    }

    /// Overlapping lines in every arrangement: the newest covering line names each address.
    #[test]
    fn newest_covering_line_wins() {
        let mut map = PerfMap { path: PathBuf::new(), read_len: 0, code: BTreeMap::new() };
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
