//! One traced process, end to end: check it exists, find its allocator, claim a target slot of
//! the shared probes and attach them, and answer snapshots (read maps -> build profile ->
//! symbolize). This is the eBPF implementation of [`crate::target::TracedTarget`].
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
        contract,
        load::{self, ProbeMode, ProbeSettings, Probes, SourceMode},
        target_view::TargetProbes,
    },
    pause::PauseLedger,
    process::Process,
    procfs,
    symbolize::Symbolizer,
    target::{Attacher, TargetStats, TracedTarget},
    unwind::{self, TargetUnwinder, UnwindHandle},
};

pub struct Session {
    pid: u32,
    comm: String,
    process: Arc<Process>,
    attached_at: Instant,
    unseen_before_attach_bytes: u64,
    /// What the target's files say memscope cannot see ([`crate::coverage`]).
    coverage: crate::coverage::Tracker,
    allocator: String,
    /// `usdt:ddheap` when traced through the USDT contract, `None` through its allocator.
    source: Option<String>,
    /// With a contract: whether it reports frees (live-heap builds).
    live_tracking: bool,
    /// With a contract: where the producer keeps its sampling interval, when known.
    interval_addr: Option<u64>,
    /// How a Go program's heap is seen (`bpf::go_runtime`).
    runtime_heap: Option<String>,
    sites: Vec<ProbeSiteReport>,
    unwind: UnwindHandle,
    target: Arc<TargetProbes>,
    inner: Arc<Mutex<Inner>>,
    /// The target's share of the agent's memory budget ([`crate::budget`]).
    budget: Arc<crate::budget::Account>,
    pauses: PauseLedger,
}

/// How often new stacks' JIT frames are named (see [`Symbolizer::pin_jit`]): well before V8
/// frees the code they return into and reuses its memory.
const PIN_INTERVAL: Duration = Duration::from_millis(200);

struct Inner {
    symbolizer: Symbolizer,
}

impl Session {
    /// Starts tracing `pid` with probes of its own (`memscope record`), their unwind row map
    /// sized to what the target maps. Errors are one line each: no such process, no
    /// privilege, no allocator, kernel refusal.
    pub fn attach(pid: u32, settings: ProbeSettings) -> anyhow::Result<Session> {
        Session::attach_named(pid, settings, &Default::default())
    }

    /// [`Session::attach`] with the allocator's entry points named by address
    /// (`--alloc-symbol`, see [`crate::bpf::stripped`]) when `named` is not empty.
    pub fn attach_named(
        pid: u32,
        settings: ProbeSettings,
        named: &crate::bpf::stripped::NamedEntries,
    ) -> anyhow::Result<Session> {
        load::check_environment()?;
        let plan = unwind::target::plan(pid);
        let capacity = load::unwind_capacity(plan.rows, settings.max_unwind_rows);
        // One target: one slot (each is 80 KiB of kernel memory).
        let probes = Arc::new(Probes::load(ProbeSettings { target_slots: 1, ..settings }, capacity)?);
        Session::attach_on_named(&probes, pid, plan, named, false)
    }

    /// Starts tracing `pid` in a slot of the loaded `probes` (the agent's, shared by all its
    /// targets), with the unwind tables of `plan`.
    pub fn attach_on(probes: &Arc<Probes>, pid: u32, plan: unwind::target::Plan) -> anyhow::Result<Session> {
        Session::attach_on_named(probes, pid, plan, &Default::default(), false)
    }

    /// `forks`: a process known to fork short-lived children (a `forks=true` workload), see
    /// [`classic_for_forks`].
    fn attach_on_named(
        probes: &Arc<Probes>,
        pid: u32,
        plan: unwind::target::Plan,
        named: &crate::bpf::stripped::NamedEntries,
        forks: bool,
    ) -> anyhow::Result<Session> {
        let started = Instant::now();
        // Everything read about `pid` below is checked to come from this very process at the
        // end (its pid could be reused by another one meanwhile).
        let process = Arc::new(Process::open(pid)?);
        let comm = procfs::comm(pid)?;
        let traced = choose_source(probes, pid, named)?;
        let unseen = procfs::status_bytes(pid, "RssAnon").unwrap_or(0);
        let coverage = match &traced {
            Traced::Allocator(a) => crate::coverage::Tracker::new(pid, &a.path_in_target, a.shims_only(), unseen),
            Traced::Contract(c) => {
                let path = c.objects.first().map(|o| o.path_in_target.as_str()).unwrap_or_default();
                crate::coverage::Tracker::new(pid, path, false, unseen)
            }
        };
        // Through the contract the service samples: the probes record every sample they see.
        let sample_bytes = match &traced {
            Traced::Allocator(_) => probes.settings().sample_bytes,
            Traced::Contract(_) => 0,
        };
        let mut target = TargetProbes::claim(probes, pid, sample_bytes)?;
        let v8 = crate::symbolize::v8::find_layout(pid);
        if let Ok(Some(layout)) = &v8 {
            target.enable_js_frames(layout.frame_config())?;
        }
        let maps = &probes.unwind;
        let unwinder = TargetUnwinder::new(
            process.clone(),
            Arc::clone(&maps.rows),
            load::dup_map("UNWIND_MAPPINGS", &maps.mappings)?,
            load::dup_map("UNWIND_STATE", &maps.state)?,
            target.slot(),
            &plan,
        )?;
        // The mappings are in place before the first probe fires.
        let unwind = UnwindHandle::start(unwinder, probes.counters_handle()?);
        let sites = match &traced {
            Traced::Allocator(allocator) => target.attach(allocator, classic_for_forks(probes, pid, forks)),
            Traced::Contract(contract) => target.attach_contract(contract),
        }
        .with_context(|| format!("attaching to process {pid} ({comm})"))?;
        let runtime_heap = match &traced {
            Traced::Allocator(a) => a.runtime_heap().map(str::to_string),
            Traced::Contract(_) => None,
        };
        let (allocator, source, live_tracking, interval_addr) = match traced {
            Traced::Allocator(a) => (a.path_in_target, None, true, None),
            Traced::Contract(c) => {
                let path = c.objects.iter().map(|o| o.path_in_target.as_str()).collect::<Vec<_>>().join(", ");
                (path, Some(c.source_name()), c.live_tracking(), contract::interval_address(pid, &c))
            }
        };
        let probe_mode = target.probe_mode();
        let budget = crate::budget::Account::for_pid(pid);
        let mut symbolizer = Symbolizer::for_process(process.clone(), budget.clone());
        crate::symbolize::v8::enable(&mut symbolizer, &process, v8);
        anyhow::ensure!(process.alive(), "process {pid} ({comm}) exited while memscope attached to it");
        let attach_ms = started.elapsed().as_millis() as u64;
        unwind.set_attach_ms(attach_ms);
        info!(pid, %allocator, source = source.as_deref().unwrap_or("allocator"), ?probe_mode, attach_ms, slot = target.slot(), "attached");
        let inner = Arc::new(Mutex::new(Inner { symbolizer }));
        let target = Arc::new(target);
        target.join_file();
        if source.is_some() {
            // Libraries `dlopen`ed later may carry the contract too.
            unwind.on_maps_change(Arc::new(target.contract_follower(&process)));
        }
        spawn_jit_pinner(pid, Arc::downgrade(&target), Arc::downgrade(&inner));
        Ok(Session {
            pid,
            comm,
            process,
            attached_at: Instant::now(),
            unseen_before_attach_bytes: unseen,
            coverage,
            allocator,
            source,
            live_tracking,
            interval_addr,
            runtime_heap,
            sites,
            unwind,
            target,
            inner,
            budget,
            pauses: PauseLedger::new(),
        })
    }

    pub fn allocator(&self) -> &str {
        &self.allocator
    }

    /// `usdt:ddheap` (or `usdt:otel_memory`) when traced through the USDT contract, `None`
    /// when through its allocator.
    pub fn source(&self) -> Option<&str> {
        self.source.as_deref()
    }

    /// The producer's mean sampling interval now, when memscope can read it (the `ddheap`
    /// sampler's).
    pub fn producer_interval(&self) -> Option<u64> {
        contract::read_interval(self.pid, self.interval_addr?)
    }

    /// Whether frees are seen (false only for a contract without a `free` probe).
    pub fn live_tracking(&self) -> bool {
        self.live_tracking
    }

    /// How a Go program's heap is seen, when the target is one.
    pub fn runtime_heap(&self) -> Option<&str> {
        self.runtime_heap.as_deref()
    }

    pub fn probe_sites(&self) -> &[ProbeSiteReport] {
        &self.sites
    }

    /// How the probes were attached: `Session` or `Classic`.
    pub fn probe_mode(&self) -> ProbeMode {
        self.target.probe_mode()
    }

    /// This target's part of the probes (its sampling interval, counters, maps).
    pub fn target_probes(&self) -> &Arc<TargetProbes> {
        &self.target
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
        Ok(self.target.counters()?)
    }
}

impl Session {
    /// Attaches a snapshot trigger at `file_offset` of the file the target maps at
    /// `path_in_target`; returns its slot in [`Session::trigger_hits`].
    pub fn attach_trigger(&self, path_in_target: &str, file_offset: u64, point: TriggerPoint) -> anyhow::Result<u32> {
        let host = procfs::host_path(self.pid, path_in_target)?;
        anyhow::ensure!(self.alive(), "process {} exited: no trigger attached", self.pid);
        self.target.attach_trigger(&host, file_offset, point)
    }

    /// How often each trigger slot has fired since it was attached.
    pub fn trigger_hits(&self) -> anyhow::Result<Vec<u64>> {
        Ok(self.target.trigger_hits()?)
    }
}

/// Names new stacks' JIT frames every [`PIN_INTERVAL`] while the session lives, when the
/// target writes a perf map (a native target costs one `stat` per tick).
fn spawn_jit_pinner(pid: u32, target: std::sync::Weak<TargetProbes>, inner: std::sync::Weak<Mutex<Inner>>) {
    let spawned = std::thread::Builder::new().name(format!("jit-names-{pid}")).spawn(move || loop {
        std::thread::sleep(PIN_INTERVAL);
        let (Some(target), Some(inner)) = (target.upgrade(), inner.upgrade()) else { return };
        let mut guard = inner.lock().unwrap();
        let symbolizer = &mut guard.symbolizer;
        if !symbolizer.pins() {
            continue;
        }
        match target.new_stacks(symbolizer.pinned_stacks()) {
            Ok(stacks) => symbolizer.pin_jit(&stacks),
            Err(e) => tracing::debug!(pid, error = %e, "reading new stacks for JIT names"),
        }
    });
    if let Err(e) = spawned {
        tracing::warn!(pid, error = %e, "cannot start the JIT naming thread; JIT frames are named at snapshot time only");
    }
}

/// Whether `pid`'s allocator gets classic uprobes though the probes have uprobe.session
/// (`--probe-mode auto`): when it forks children (a `forks=true` workload, or children running
/// its own executable at the attach). The breakpoints of a uprobe_multi link are copied into
/// every child it forks, where the kernel runs no program and removes none: each call of an
/// untraced child traps, twice with the return, for nothing. A classic uprobe's breakpoint
/// leaves an untraced child at its first hit. Measured (`cargo xtask bench --pg-only`):
/// PostgreSQL under `pgbench -C` (a backend forked per connection) kept 170 of ~420 tps with
/// the postmaster under uprobe.session, 341 under classic uprobes.
fn classic_for_forks(probes: &Probes, pid: u32, forks: bool) -> bool {
    let classic = probes.settings().probe_mode == ProbeMode::Auto && (forks || procfs::forks_workers(pid));
    if classic && probes.session.is_some() {
        info!(pid, "a process that forks: its allocator gets classic uprobes, which its untraced children shed");
    }
    classic
}

/// What a target is traced through.
enum Traced {
    Allocator(attach::Allocator),
    Contract(contract::Contract),
}

/// The USDT contract when the target carries it and `--source` allows it, else its allocator
/// (`--source usdt` refuses a target without the contract, or a kernel that cannot trace it).
fn choose_source(probes: &Probes, pid: u32, named: &crate::bpf::stripped::NamedEntries) -> anyhow::Result<Traced> {
    let mode = probes.settings().source;
    if mode == SourceMode::Allocator {
        return Ok(Traced::Allocator(attach::find_allocator_named(pid, named)?));
    }
    if let Err(e) = &probes.usdt {
        anyhow::ensure!(mode != SourceMode::Usdt, "--source usdt: this kernel cannot trace the USDT contract: {e}");
        return Ok(Traced::Allocator(attach::find_allocator_named(pid, named)?));
    }
    if mode == SourceMode::Usdt {
        return Ok(Traced::Contract(contract::require(pid)?));
    }
    match contract::find(pid) {
        Ok(Some(c)) => return Ok(Traced::Contract(c)),
        Ok(None) => {}
        Err(e) => tracing::warn!(pid, "looking for the USDT contract: {e}; tracing the allocator"),
    }
    Ok(Traced::Allocator(attach::find_allocator_named(pid, named)?))
}

/// An alloc-only producer: live bytes and leaks cannot be known, only what was allocated.
fn without_live_figures(p: &mut HeapProfile) {
    p.totals.live_bytes = 0;
    p.totals.live_allocs = 0;
    for s in &mut p.stacks {
        s.live_bytes = 0;
        s.live_allocs = 0;
        s.leak_bytes = 0;
        s.leak_allocs = 0;
        s.oldest_age_s = 0.0;
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl TracedTarget for Session {
    fn pid(&self) -> u32 {
        self.pid
    }

    fn process(&self) -> Option<Arc<Process>> {
        Some(self.process.clone())
    }

    fn snapshot(&self, min_age: Duration) -> anyhow::Result<HeapProfile> {
        let exited = !self.alive();
        let mut guard = self.inner.lock().unwrap();
        let symbolizer = &mut guard.symbolizer;
        let started = Instant::now();
        let sample_bytes = self.target.sample_bytes();
        let raw = self.target.read(min_age.as_nanos() as u64).context("reading the probes' maps")?;
        tracing::debug!(stacks = raw.stacks.len(), ms = started.elapsed().as_millis() as u64, "maps read");
        let ctx = build::BuildContext {
            pid: self.pid,
            taken_at_ms: now_ms(),
            duration_s: self.attached_at.elapsed().as_secs_f64(),
            min_age_s: min_age.as_secs_f64(),
            sample_bytes,
            unseen_before_attach_bytes: self.unseen_before_attach_bytes,
            target_exited: exited,
        };
        let started = Instant::now();
        // Stacks the naming thread has not seen yet (JavaScript names are read now, not later).
        let fresh: Vec<_> = raw.stacks.iter().filter(|s| !symbolizer.pinned_stacks().contains(&s.key)).cloned().collect();
        symbolizer.pin_jit(&fresh);
        let mut profile = build::build(&raw, &ctx, |addrs| symbolizer.symbolize(addrs));
        // JIT frames named when their stack was new win over today's perf map.
        for (r, s) in raw.stacks.iter().zip(profile.stacks.iter_mut()) {
            for (i, (addr, frame)) in r.return_addresses().into_iter().zip(s.frames.iter_mut()).enumerate() {
                if let Some(pinned) = symbolizer.pinned_at(&r.key, i, addr) {
                    *frame = pinned.clone();
                }
            }
        }
        profile.js_names = symbolizer.js_stats();
        profile.expand_inlined();
        if let Some(source) = &self.source {
            profile.source = Some(source.clone());
            profile.live_tracking = Some(self.live_tracking);
            // The producer's interval (0: unknown): what every output reports as the sampling.
            profile.sample_bytes = self.producer_interval().unwrap_or(0);
            if !self.live_tracking {
                // Nothing is ever seen freed: every sample would look live forever.
                without_live_figures(&mut profile);
            }
        }
        profile.unwind_tables = Some(self.unwind.stats());
        profile.probe_gaps = Some(self.pauses.gaps()).filter(|g| g.count > 0);
        profile.runtime_heap = self.runtime_heap.clone();
        if !exited {
            profile.mappings = crate::symbolize::mappings::executable_mappings(self.pid);
            let t = &profile.totals;
            profile.coverage = self.coverage.of(self.pid, t.live_bytes, t.allocs, true).filter(|_| self.alive());
        }
        tracing::debug!(ms = started.elapsed().as_millis() as u64, "profile built and symbolized");
        Ok(profile)
    }

    fn stats(&self) -> TargetStats {
        let counters = self.target.counters().unwrap_or_default();
        let c = |k: Counter| counters.get(k as usize).copied().unwrap_or(0);
        let (live_bytes, live_allocs) = if self.live_tracking { build::live_from_counters(&counters) } else { (0, 0) };
        TargetStats {
            pid: self.pid,
            comm: self.comm.clone(),
            live_bytes,
            live_allocs,
            allocs: c(Counter::Allocs),
            frees: c(Counter::Frees) + c(Counter::UntrackedFrees),
            dropped: build::dropped(&counters),
            unwind: build::unwind(&counters),
            unwind_tables: Some(self.unwind.stats()),
            memory_budget: Some(self.budget.report()),
            sample_bytes: if self.source.is_some() { self.producer_interval().unwrap_or(0) } else { self.target.sample_bytes() },
            probe_cost: self.target.cost(),
            probe_mode: self.probe_mode().name().to_string(),
            source: self.source.clone().unwrap_or_else(|| "allocator".to_string()),
            alive: self.alive(),
            labels: Default::default(),
            pauses: Some(self.pauses.status(&crate::pause::default_budget())),
            coverage: self.coverage.of(self.pid, live_bytes, c(Counter::Allocs), false).filter(|_| self.alive()),
            runtime_heap: self.runtime_heap.clone(),
        }
    }

    fn trigger_host(&self) -> Option<&dyn crate::trigger::TriggerHost> {
        Some(self)
    }

    fn pauses(&self) -> Option<&PauseLedger> {
        Some(&self.pauses)
    }

    fn suspend_probes(&self) -> anyhow::Result<()> {
        self.target.suspend_allocator_probes();
        Ok(())
    }

    /// Not on a process that is gone (its pid may name another one by now).
    fn resume_probes(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.alive(), "process {} exited: its probes stay detached", self.pid);
        Ok(self.target.resume_allocator_probes()?)
    }
}

/// Attaches real eBPF sessions, every one a target of the same probes: loaded (and verified)
/// at the first attach with the agent's settings, `settings.max_unwind_rows` unwind rows and
/// `settings.max_allocs` live allocations for all targets together.
///
/// The maps are preallocated at their full size when the probes load (hash maps of the
/// kernel's preallocated kind: no allocation in the probes, no failure under memory pressure),
/// so their memory does not follow the number of targets. With [`EbpfAttacher::release_idle`],
/// probes no target has used for that long are unloaded, their maps freed: an agent with
/// nothing to trace holds no map memory, and the next attach loads them again (0.5 to 0.7 s
/// of verification).
pub struct EbpfAttacher {
    settings: ProbeSettings,
    /// `--cpu-budget`: the governor's share of one CPU per target (percent).
    cpu_budget: Option<f64>,
    probes: Mutex<Option<Arc<Probes>>>,
}

impl EbpfAttacher {
    pub fn new(settings: ProbeSettings, cpu_budget: Option<f64>) -> EbpfAttacher {
        EbpfAttacher { settings, cpu_budget, probes: Mutex::new(None) }
    }

    /// Unloads the probes (and frees their maps) once no target has held them for `after`:
    /// checked on a thread of its own, which ends when the attacher is dropped.
    pub fn release_idle(self: &Arc<Self>, after: Duration) {
        let weak = Arc::downgrade(self);
        let tick = (after / 4).clamp(Duration::from_millis(100), Duration::from_secs(10));
        let spawned = std::thread::Builder::new().name("probe-release".into()).spawn(move || {
            let mut idle_since: Option<Instant> = None;
            loop {
                std::thread::sleep(tick);
                let Some(attacher) = weak.upgrade() else { return };
                let mut probes = attacher.probes.lock().unwrap();
                // Held by the attacher alone: no target (each holds its slot's `Arc`).
                let unused = probes.as_ref().is_some_and(|p| Arc::strong_count(p) == 1);
                if !unused {
                    idle_since = None;
                    continue;
                }
                let since = *idle_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= after {
                    *probes = None;
                    idle_since = None;
                    info!(idle_s = after.as_secs(), "no target for a while: probes unloaded and their maps freed");
                }
            }
        });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the thread that unloads idle probes; they stay loaded");
        }
    }

    /// The probes, once loaded.
    pub fn probes(&self) -> Option<Arc<Probes>> {
        self.probes.lock().unwrap().clone()
    }

    /// `(rows in use, capacity, bytes)` of the unwind row map, once loaded.
    pub fn shared_rows_usage(&self) -> Option<(usize, usize, usize)> {
        Some(self.probes()?.unwind.rows.lock().unwrap().usage())
    }
}

impl EbpfAttacher {
    /// The probes, loaded (and the governor started) on first use.
    fn loaded(&self) -> anyhow::Result<Arc<Probes>> {
        let mut probes = self.probes.lock().unwrap();
        if let Some(p) = &*probes {
            return Ok(Arc::clone(p));
        }
        let loaded = Arc::new(Probes::load(self.settings, self.settings.max_unwind_rows)?);
        if let Some(budget) = self.cpu_budget {
            crate::governor::start(&loaded, budget);
        }
        *probes = Some(Arc::clone(&loaded));
        Ok(loaded)
    }
}

impl EbpfAttacher {
    fn attach_with(&self, pid: u32, forks: bool) -> anyhow::Result<Arc<dyn TracedTarget>> {
        load::check_environment()?;
        let plan = unwind::target::plan(pid);
        let probes = self.loaded()?;
        Ok(Arc::new(Session::attach_on_named(&probes, pid, plan, &Default::default(), forks)?))
    }
}

impl Attacher for EbpfAttacher {
    fn attach(&self, pid: u32) -> anyhow::Result<Arc<dyn TracedTarget>> {
        self.attach_with(pid, false)
    }

    fn attach_forking(&self, pid: u32) -> anyhow::Result<Arc<dyn TracedTarget>> {
        self.attach_with(pid, true)
    }

    /// Loads the probes (0.5 to 0.7 s of verification, and the maps allocated) at once.
    fn warm_up(&self) {
        if let Err(e) = self.loaded() {
            tracing::debug!("probes not loaded ahead of the first attach: {e:#}");
        }
    }
}
