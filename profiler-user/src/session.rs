//! One traced process, end to end: check it exists, find its allocator, load and attach the
//! probes, and answer snapshots (read maps -> build profile -> symbolize). This is the eBPF
//! implementation of [`crate::target::TracedTarget`].
use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::Context as _;
use profiler_common::Counter;
use tracing::info;

use crate::{
    aggregate::{build, HeapProfile},
    bpf::{
        attach::{self, ProbeSiteReport, TriggerPoint},
        load::{self, Loaded, ProbeMode, ProbeSettings},
        reader,
    },
    process::Process,
    procfs,
    symbolize::Symbolizer,
    target::{Attacher, TargetStats, TracedTarget},
    unwind::{self, RowStore, SharedRows, TargetUnwinder, UnwindHandle},
};

pub struct Session {
    pid: u32,
    comm: String,
    process: Arc<Process>,
    settings: ProbeSettings,
    attached_at: Instant,
    unseen_before_attach_bytes: u64,
    allocator: String,
    sites: Vec<ProbeSiteReport>,
    /// `Session` or `Classic`: what `Auto` came to.
    probe_mode: ProbeMode,
    unwind: Option<UnwindHandle>,
    inner: Arc<Mutex<Inner>>,
}

/// How often new stacks' JIT frames are named (see [`Symbolizer::pin_jit`]): well before V8
/// frees the code they return into and reuses its memory.
const PIN_INTERVAL: Duration = Duration::from_millis(200);

struct Inner {
    loaded: Loaded,
    symbolizer: Symbolizer,
    triggers_used: u32,
}

impl Session {
    /// Starts tracing `pid`. Errors are one line each: no such process, no privilege, no
    /// allocator, kernel refusal.
    pub fn attach(pid: u32, settings: ProbeSettings) -> anyhow::Result<Session> {
        Session::attach_sharing(pid, settings, None)
    }

    /// [`Session::attach`], with the unwind rows in the agent's `shared` map.
    pub fn attach_sharing(pid: u32, settings: ProbeSettings, shared: Option<&Arc<Mutex<SharedRows>>>) -> anyhow::Result<Session> {
        let started = Instant::now();
        // Everything read about `pid` below is checked to come from this very process at the
        // end (its pid could be reused by another one meanwhile).
        let process = Arc::new(Process::open(pid)?);
        load::check_environment()?;
        let comm = procfs::comm(pid)?;
        let allocator = attach::find_allocator(pid)?;
        let unseen = procfs::status_bytes(pid, "RssAnon").unwrap_or(0);
        // Tables first: the probes' row map is sized to what the target maps.
        let plan = unwind::target::plan(pid);
        let capacity = load::unwind_capacity(plan.rows, settings.max_unwind_rows);
        let shared_fd = shared.map(|s| s.lock().unwrap().raw_fd());
        let mut loaded = load::load(pid, settings, capacity, shared_fd)?;
        let unwind = match loaded.maps.unwind.take() {
            Some(maps) => {
                let rows = match shared {
                    Some(s) if maps.rows_shared => RowStore::Shared(Arc::clone(s)),
                    _ => RowStore::Own { map: maps.rows, capacity },
                };
                let unwinder = TargetUnwinder::new(process.clone(), rows, maps.mappings, maps.state, &plan)?;
                Some(UnwindHandle::start(unwinder, maps.counters))
            }
            None => None,
        };
        let sites = attach::attach(&mut loaded, pid, &allocator)
            .with_context(|| format!("attaching to process {pid} ({comm})"))?;
        let probe_mode = if loaded.session.is_some() { ProbeMode::Session } else { ProbeMode::Classic };
        let symbolizer = Symbolizer::for_process(process.clone());
        anyhow::ensure!(process.alive(), "process {pid} ({comm}) exited while memscope attached to it");
        let attach_ms = started.elapsed().as_millis() as u64;
        if let Some(u) = &unwind {
            u.set_attach_ms(attach_ms);
        }
        info!(pid, allocator = %allocator.path_in_target, ?probe_mode, attach_ms, "attached");
        let inner = Arc::new(Mutex::new(Inner { symbolizer, loaded, triggers_used: 0 }));
        spawn_jit_pinner(pid, Arc::downgrade(&inner));
        Ok(Session {
            pid,
            comm,
            process,
            settings,
            attached_at: Instant::now(),
            unseen_before_attach_bytes: unseen,
            allocator: allocator.path_in_target,
            sites,
            probe_mode,
            unwind,
            inner,
        })
    }

    pub fn allocator(&self) -> &str {
        &self.allocator
    }

    pub fn probe_sites(&self) -> &[ProbeSiteReport] {
        &self.sites
    }

    /// How the probes were attached: `Session` or `Classic`.
    pub fn probe_mode(&self) -> ProbeMode {
        self.probe_mode
    }

    pub fn settings(&self) -> ProbeSettings {
        self.settings
    }

    pub fn elapsed(&self) -> Duration {
        self.attached_at.elapsed()
    }

    /// Whether the target is still running (a pidfd and its start time, so pid reuse cannot
    /// fool it).
    pub fn alive(&self) -> bool {
        self.process.alive()
    }

    /// The traced process by identity: signals and `/proc` reads about it go through this.
    pub fn process(&self) -> &Arc<Process> {
        &self.process
    }

    /// Summed counters, indexed by `profiler_common::Counter`.
    pub fn counters(&self) -> anyhow::Result<Vec<u64>> {
        let inner = self.inner.lock().unwrap();
        Ok(reader::read_counters(&inner.loaded.maps)?)
    }
}

impl Session {
    /// Attaches a snapshot trigger at `file_offset` of the file the target maps at
    /// `path_in_target`; returns its slot in [`Session::trigger_hits`].
    pub fn attach_trigger(&self, path_in_target: &str, file_offset: u64, point: TriggerPoint) -> anyhow::Result<u32> {
        let mut inner = self.inner.lock().unwrap();
        let slot = inner.triggers_used;
        anyhow::ensure!(slot < profiler_common::MAX_TRIGGERS, "at most {} triggers per target", profiler_common::MAX_TRIGGERS);
        let host = procfs::host_path(self.pid, path_in_target)?;
        anyhow::ensure!(self.alive(), "process {} exited: no trigger attached", self.pid);
        attach::attach_trigger(&mut inner.loaded.ebpf, self.pid, &host, file_offset, point, slot)?;
        inner.triggers_used += 1;
        Ok(slot)
    }

    /// How often each trigger slot has fired since it was attached.
    pub fn trigger_hits(&self) -> anyhow::Result<Vec<u64>> {
        let inner = self.inner.lock().unwrap();
        (0..inner.triggers_used)
            .map(|i| Ok(inner.loaded.maps.trigger_hits.get(&i, 0)?))
            .collect()
    }
}

/// Names new stacks' JIT frames every [`PIN_INTERVAL`] while the session lives, when the
/// target writes a perf map (a native target costs one `stat` per tick).
fn spawn_jit_pinner(pid: u32, inner: std::sync::Weak<Mutex<Inner>>) {
    let spawned = std::thread::Builder::new().name(format!("jit-names-{pid}")).spawn(move || loop {
        std::thread::sleep(PIN_INTERVAL);
        let Some(inner) = inner.upgrade() else { return };
        let mut guard = inner.lock().unwrap();
        let Inner { loaded, symbolizer, .. } = &mut *guard;
        if !symbolizer.has_jit() {
            continue;
        }
        match reader::new_stacks(&loaded.maps, symbolizer.pinned_stacks()) {
            Ok(stacks) => symbolizer.pin_jit(&stacks),
            Err(e) => tracing::debug!(pid, error = %e, "reading new stacks for JIT names"),
        }
    });
    if let Err(e) = spawned {
        tracing::warn!(pid, error = %e, "cannot start the JIT naming thread; JIT frames are named at snapshot time only");
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl TracedTarget for Session {
    fn pid(&self) -> u32 {
        self.pid
    }

    fn snapshot(&self, min_age: Duration) -> anyhow::Result<HeapProfile> {
        let exited = !self.alive();
        let mut guard = self.inner.lock().unwrap();
        let Inner { loaded, symbolizer, .. } = &mut *guard;
        let started = Instant::now();
        let raw = reader::read(&loaded.maps, min_age.as_nanos() as u64)
            .context("reading the probes' maps")?;
        tracing::debug!(stacks = raw.stacks.len(), ms = started.elapsed().as_millis() as u64, "maps read");
        let ctx = build::BuildContext {
            pid: self.pid,
            taken_at_ms: now_ms(),
            duration_s: self.attached_at.elapsed().as_secs_f64(),
            min_age_s: min_age.as_secs_f64(),
            sample_bytes: self.settings.sample_bytes,
            unseen_before_attach_bytes: self.unseen_before_attach_bytes,
            target_exited: exited,
        };
        let started = Instant::now();
        let mut profile = build::build(&raw, &ctx, |addrs| symbolizer.symbolize(addrs));
        // JIT frames named when their stack was new win over today's perf map.
        for (r, s) in raw.stacks.iter().zip(profile.stacks.iter_mut()) {
            for (addr, frame) in r.return_addresses().into_iter().zip(s.frames.iter_mut()) {
                if let Some(pinned) = symbolizer.pinned(&r.key, addr) {
                    *frame = pinned.clone();
                }
            }
        }
        profile.expand_inlined();
        profile.unwind_tables = self.unwind.as_ref().map(UnwindHandle::stats);
        if !exited {
            profile.mappings = crate::symbolize::mappings::executable_mappings(self.pid);
        }
        tracing::debug!(ms = started.elapsed().as_millis() as u64, "profile built and symbolized");
        Ok(profile)
    }

    fn stats(&self) -> TargetStats {
        let inner = self.inner.lock().unwrap();
        let counters = reader::read_counters(&inner.loaded.maps).unwrap_or_default();
        drop(inner);
        let c = |k: Counter| counters.get(k as usize).copied().unwrap_or(0);
        let sampled_live_bytes = c(Counter::SampledBytes).saturating_sub(c(Counter::FreeBytes));
        let sampled_live = c(Counter::SampledAllocs).saturating_sub(c(Counter::Frees));
        let k = build::sampling_scale(
            c(Counter::SampledBytes) as f64 / c(Counter::SampledAllocs).max(1) as f64,
            self.settings.sample_bytes,
        );
        TargetStats {
            pid: self.pid,
            comm: self.comm.clone(),
            live_bytes: (sampled_live_bytes as f64 * k) as u64,
            live_allocs: (sampled_live as f64 * k) as u64,
            allocs: c(Counter::Allocs),
            frees: c(Counter::Frees) + c(Counter::UntrackedFrees),
            dropped: build::dropped(&counters),
            unwind: build::unwind(&counters),
            unwind_tables: self.unwind.as_ref().map(UnwindHandle::stats),
            sample_bytes: self.settings.sample_bytes,
            probe_mode: self.probe_mode.name().to_string(),
            alive: self.alive(),
            labels: Default::default(),
        }
    }

    fn trigger_host(&self) -> Option<&dyn crate::trigger::TriggerHost> {
        Some(self)
    }
}

/// Attaches real eBPF sessions with fixed settings (the agent's), their unwind rows in one
/// map shared by all of them (`settings.max_unwind_rows` rows in all, created at the first
/// attach).
pub struct EbpfAttacher {
    settings: ProbeSettings,
    shared_rows: std::sync::OnceLock<Option<Arc<Mutex<SharedRows>>>>,
}

impl EbpfAttacher {
    pub fn new(settings: ProbeSettings) -> EbpfAttacher {
        EbpfAttacher { settings, shared_rows: std::sync::OnceLock::new() }
    }

    pub fn settings(&self) -> ProbeSettings {
        self.settings
    }

    /// `(rows in use, capacity, bytes)` of the shared row map, once created.
    pub fn shared_rows_usage(&self) -> Option<(usize, usize, usize)> {
        self.shared_rows.get()?.as_ref().map(|s| s.lock().unwrap().usage())
    }
}

impl Attacher for EbpfAttacher {
    fn attach(&self, pid: u32) -> anyhow::Result<Arc<dyn TracedTarget>> {
        let shared = self.shared_rows.get_or_init(|| match SharedRows::create(self.settings.max_unwind_rows) {
            Ok(rows) => Some(Arc::new(Mutex::new(rows))),
            Err(e) => {
                tracing::warn!("no shared unwind row map ({e}): each target gets its own");
                None
            }
        });
        Ok(Arc::new(Session::attach_sharing(pid, self.settings, shared.as_ref())?))
    }
}
