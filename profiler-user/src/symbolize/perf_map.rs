//! Symbols of just-in-time compiled code from `/tmp/perf-PID.map` (written by `node
//! --perf-basic-prof`, the JVM's perf-map-agent, LuaJIT, ...): one `START SIZE NAME` line per
//! code object, in hex. The file only grows; it is re-read when its size changed. V8's names
//! (`JS:*handler /app/server.js:12:3`) are split into function, file and line.
use std::{collections::BTreeMap, fs, path::PathBuf};

use crate::aggregate::{Frame, FrameInfo};

pub struct PerfMap {
    path: PathBuf,
    read_len: u64,
    /// start -> (end, name); a later line for the same start replaces an earlier one (the VM
    /// reused the memory for new code).
    code: BTreeMap<u64, (u64, String)>,
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
                self.code.insert(start, (start.saturating_add(size), name.to_string()));
            }
        }
        self.read_len = meta.len();
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
        assert!(map.lookup(0x1010).is_none());
    }
}
