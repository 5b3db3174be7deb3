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
    inner: Mutex<Inner>,
}

struct Inner {
    loaded: Loaded,
    symbolizer: Symbolizer,
    triggers_used: u32,
}

impl Session {
    /// Starts tracing `pid`. Errors are one line each: no such process, no privilege, no
    /// allocator, kernel refusal.
    pub fn attach(pid: u32, settings: ProbeSettings) -> anyhow::Result<Session> {
        // Everything read about `pid` below is checked to come from this very process at the
        // end (its pid could be reused by another one meanwhile).
        let process = Arc::new(Process::open(pid)?);
        load::check_environment()?;
        let comm = procfs::comm(pid)?;
        let allocator = attach::find_allocator(pid)?;
        let unseen = procfs::status_bytes(pid, "RssAnon").unwrap_or(0);
        let mut loaded = load::load(pid, settings)?;
        let sites = attach::attach(&mut loaded, pid, &allocator)
            .with_context(|| format!("attaching to process {pid} ({comm})"))?;
        let probe_mode = if loaded.session.is_some() { ProbeMode::Session } else { ProbeMode::Classic };
        let symbolizer = Symbolizer::for_process(process.clone());
        anyhow::ensure!(process.alive(), "process {pid} ({comm}) exited while memscope attached to it");
        info!(pid, allocator = %allocator.path_in_target, ?probe_mode, "attached");
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
            inner: Mutex::new(Inner { symbolizer, loaded, triggers_used: 0 }),
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
        let profile = build::build(&raw, &ctx, |addrs| symbolizer.symbolize(addrs));
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
            sample_bytes: self.settings.sample_bytes,
            probe_mode: self.probe_mode.name().to_string(),
            alive: self.alive(),
        }
    }

    fn trigger_host(&self) -> Option<&dyn crate::trigger::TriggerHost> {
        Some(self)
    }
}

/// Attaches real eBPF sessions with fixed settings (the agent's).
pub struct EbpfAttacher {
    pub settings: ProbeSettings,
}

impl Attacher for EbpfAttacher {
    fn attach(&self, pid: u32) -> anyhow::Result<Arc<dyn TracedTarget>> {
        Ok(Arc::new(Session::attach(pid, self.settings)?))
    }
}
