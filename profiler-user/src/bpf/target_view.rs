//! One target's view over the shared probes: a slot in the per-target maps (settings,
//! counters, unwind mappings), a fresh generation that keys its entries in the shared `LIVE`
//! and `STACK_STATS`, and its links. Claiming a slot costs a few map writes, attaching a few
//! `bpf(2)` calls: no program is loaded or verified per target.
//!
//! When a target goes, a background thread drops its links (no probe of it runs after that),
//! frees its slot for the next target and deletes what it left in the shared maps (a million
//! live entries take a few hundred milliseconds to list); the slot's new generation keeps
//! entries not yet deleted from being taken for the next owner's.
//!
//! A target's allocator probes can also leave it for a while and come back
//! ([`TargetProbes::suspend_allocator_probes`], used by [`crate::pause`] around V8 heap
//! walks): the slot, its maps and live entries stay; only the links go and are made again.
use std::{
    collections::HashSet,
    os::fd::{AsFd as _, AsRawFd as _},
    sync::{Arc, Mutex},
};

use aya::maps::{IterableMap as _, MapError, PerCpuValues};
use profiler_common::{target_id, LiveKey, StackKey, TargetConfig, COUNTER_COUNT, MAX_TRIGGERS};
use tracing::{debug, info, warn};

use super::{
    attach::{self, AttachError, Link, ProbeSiteReport, TriggerPoint},
    batch,
    load::{ProbeMode, Probes, SlotMaps},
    reader::{self, RawSnapshot, RawStack},
};
use super::contract::{self, Contract, ContractObject};
use crate::{process::Process, target_fs::TargetFile};

/// Snapshot triggers (return and USDT probe sites) one target may have.
pub const MAX_TRIGGERS_PER_TARGET: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    #[error("all {0} target slots of the probes are taken (memscope agent --max-targets): detach one first")]
    Full(usize),
    #[error("at most {MAX_TRIGGERS} snapshot triggers in all, {MAX_TRIGGERS_PER_TARGET} per target")]
    TriggersFull,
    #[error("eBPF map: {0}")]
    Map(#[from] MapError),
}

/// One target of the shared probes; dropping it detaches the target.
pub struct TargetProbes {
    probes: Arc<Probes>,
    pid: u32,
    slot: u32,
    id: u64,
    links: Mutex<Vec<Link>>,
    /// The allocator the links were made on, to make them again after a suspension.
    allocator: Mutex<Option<attach::Allocator>>,
    /// Or the USDT contract they were made on.
    contract: Mutex<Option<Contract>>,
    triggers: Mutex<Vec<(u32, Link)>>,
}

impl TargetProbes {
    /// Gives `pid` a free slot with a new generation, its counters and sampling state zeroed,
    /// sampling every `sample_bytes` bytes; every target's share of `LIVE` is recomputed.
    pub fn claim(probes: &Arc<Probes>, pid: u32, sample_bytes: u64) -> Result<TargetProbes, SlotError> {
        let mut slots = probes.slots.lock().unwrap();
        let slot = slots.owners.iter().position(|o| o.pid.is_none()).ok_or(SlotError::Full(slots.owners.len()))? as u32;
        let owner = &mut slots.owners[slot as usize];
        owner.generation = owner.generation.wrapping_add(1).max(1);
        owner.pid = Some(pid);
        owner.base_sample_bytes = sample_bytes;
        owner.sample_bytes = sample_bytes;
        owner.usdt = false;
        owner.classic = false;
        let id = target_id(slot, owner.generation);
        reset_slot(&mut slots, slot)?;
        rebalance(&mut slots, probes.settings.max_allocs)?;
        debug!(pid, slot, id, "target slot claimed");
        Ok(TargetProbes {
            probes: Arc::clone(probes),
            pid,
            slot,
            id,
            links: Mutex::new(Vec::new()),
            allocator: Mutex::new(None),
            contract: Mutex::new(None),
            triggers: Mutex::new(Vec::new()),
        })
    }

    /// Lets the probes keep the JavaScript function of each V8 frame of this target (before
    /// [`TargetProbes::attach`]: from its first allocation on).
    pub fn enable_js_frames(&self, config: profiler_common::JsFrameConfig) -> Result<(), MapError> {
        self.probes.slots.lock().unwrap().js_config.set(self.slot, config, 0)
    }

    /// Attaches the allocator probes for this target; `classic`: uprobes and uretprobes even
    /// where the probes have uprobe.session (see [`crate::session`] for when).
    pub fn attach(&mut self, alloc: &attach::Allocator, classic: bool) -> Result<Vec<ProbeSiteReport>, AttachError> {
        let file = alloc.host_path.identity();
        let file_classic = self.probes.files.lock().unwrap().get(&file).is_some_and(|f| f.classic);
        let classic = classic || file_classic || self.probes.session.is_none();
        self.probes.slots.lock().unwrap().owners[self.slot as usize].classic = classic;
        let (report, links) = attach::attach(&self.probes, self.id, self.pid, alloc, classic)?;
        self.links.lock().unwrap().extend(links);
        *self.allocator.lock().unwrap() = Some(alloc.clone());
        Ok(report)
    }

    /// Attaches the USDT contract's probes for this target instead of allocator probes: the
    /// service's own sampler decides, the probes see samples only.
    pub fn attach_contract(&mut self, contract: &Contract) -> Result<Vec<ProbeSiteReport>, AttachError> {
        let (report, links) = attach::attach_contract(&self.probes, self.who(), &contract.provider, &contract.objects, 0)?;
        self.links.lock().unwrap().extend(links);
        *self.contract.lock().unwrap() = Some(contract.clone());
        self.probes.slots.lock().unwrap().owners[self.slot as usize].usdt = true;
        Ok(report)
    }

    /// Adds `objects` (mapped since the attach, e.g. `dlopen`ed, carrying the same provider's
    /// contract) to a target traced through the contract: attached now, or at the resume when
    /// the probes are suspended. Objects already traced are left as they are.
    pub fn extend_contract(&self, objects: Vec<ContractObject>) -> Result<Vec<ProbeSiteReport>, AttachError> {
        let mut links = self.links.lock().unwrap();
        let mut contract = self.contract.lock().unwrap();
        let Some(contract) = contract.as_mut() else { return Ok(Vec::new()) };
        let fresh: Vec<ContractObject> = objects
            .into_iter()
            .filter(|o| contract.objects.iter().all(|known| known.path_in_target != o.path_in_target))
            .collect();
        if fresh.is_empty() {
            return Ok(Vec::new());
        }
        let mut report = Vec::new();
        if !links.is_empty() {
            let (sites, added) =
                attach::attach_contract(&self.probes, self.who(), &contract.provider, &fresh, contract.sites() as u32)?;
            links.extend(added);
            report = sites;
        }
        contract.objects.extend(fresh);
        Ok(report)
    }

    /// What follows a target traced through the contract as it maps new objects (called by
    /// [`crate::unwind::UnwindHandle::on_maps_change`]): each executable file it maps after the
    /// contract was found is searched once, and those carrying the contract's provider are attached
    /// ([`TargetProbes::extend_contract`]); nothing once `process` or this target is gone.
    pub fn contract_follower(self: &Arc<Self>, process: &Arc<Process>) -> impl Fn() + Send + Sync + 'static {
        let (target, process) = (Arc::downgrade(self), Arc::downgrade(process));
        let searched = self.contract.lock().unwrap().as_ref().map(|c| c.searched.clone()).unwrap_or_default();
        let seen = Mutex::new(searched.into_iter().collect::<HashSet<String>>());
        move || {
            let (Some(target), Some(process)) = (target.upgrade(), process.upgrade()) else { return };
            let Some(provider) = target.contract.lock().unwrap().as_ref().map(|c| c.provider.clone()) else { return };
            let mut seen = seen.lock().unwrap();
            let found = match contract::find_new(target.pid, &provider, &mut seen) {
                Ok(found) => found,
                Err(e) => return debug!(pid = target.pid, "contract search after a maps change: {e}"),
            };
            // The maps read were this process's only if it still runs (its pid is not reused).
            if found.is_empty() || !process.alive() {
                return;
            }
            let paths: Vec<String> = found.iter().map(|o| o.path_in_target.clone()).collect();
            match target.extend_contract(found) {
                Ok(sites) => info!(pid = target.pid, ?paths, sites = sites.len(), "USDT contract found in objects mapped since the attach: traced"),
                Err(e) => warn!(pid = target.pid, ?paths, "USDT contract in objects mapped since the attach not traced: {e}"),
            }
        }
    }

    /// `(target id, slot, pid)`: who the probes' cookies and maps name.
    fn who(&self) -> (u64, u32, u32) {
        (self.id, self.slot, self.pid)
    }

    /// Registers this target with the others probed on its allocator file. A uprobe is one per
    /// file and offset, and its breakpoint leaves an untraced process (a forked child) only
    /// when every consumer on it asks for that, which uprobe.session links never do: one
    /// target on the file under uprobe.session keeps the children of a forking target on it
    /// trapping. So once a target on a file is probed with classic uprobes because it forks,
    /// every target on that file is switched to classic uprobes, and later ones attach so.
    pub fn join_file(self: &Arc<Self>) {
        let Some(file) = self.allocator.lock().unwrap().as_ref().map(|a| a.host_path.identity()) else { return };
        let classic = self.probe_mode() == ProbeMode::Classic && self.probes.session.is_some();
        let switch = {
            let mut files = self.probes.files.lock().unwrap();
            let entry = files.entry(file).or_default();
            entry.targets.retain(|t| t.strong_count() > 0);
            entry.targets.push(Arc::downgrade(self));
            if classic && !entry.classic {
                entry.classic = true;
                entry.targets.iter().filter_map(std::sync::Weak::upgrade).collect()
            } else if entry.classic && !classic {
                // Attached under uprobe.session while a forking target made the file classic.
                vec![Arc::clone(self)]
            } else {
                Vec::new()
            }
        };
        for target in switch {
            target.switch_to_classic();
        }
    }

    /// Replaces this target's uprobe.session links with classic uprobes (see
    /// [`TargetProbes::join_file`]); calls in flight meanwhile are forgotten, as at a resume.
    fn switch_to_classic(&self) {
        let mut links = self.links.lock().unwrap();
        let Some(alloc) = self.allocator.lock().unwrap().clone() else { return };
        if self.probe_mode() == ProbeMode::Classic {
            return;
        }
        self.probes.slots.lock().unwrap().owners[self.slot as usize].classic = true;
        if links.is_empty() {
            // Suspended: the resume attaches classic uprobes.
            return;
        }
        drop(std::mem::take(&mut *links));
        self.forget_calls_in_flight();
        match attach::attach(&self.probes, self.id, self.pid, &alloc, true) {
            Ok((_, fresh)) => {
                links.extend(fresh);
                info!(pid = self.pid, "a process that forks is traced on the same allocator: classic uprobes now");
            }
            Err(e) => warn!(pid = self.pid, "switching to classic uprobes failed, the allocator probes stay detached: {e}"),
        }
    }

    /// Takes the allocator probes out of the process (its triggers stay): every link is
    /// released, concurrently (one RCU grace period for all, ~40 ms), and no breakpoint of
    /// them is left in the target when this returns. The slot, its counters and its live
    /// entries stay. Returns how many links were released (0 when already suspended).
    pub fn suspend_allocator_probes(&self) -> usize {
        let links = std::mem::take(&mut *self.links.lock().unwrap());
        let n = links.len();
        std::thread::scope(|scope| {
            for link in links {
                scope.spawn(move || drop(link));
            }
        });
        debug!(pid = self.pid, links = n, "allocator probes suspended");
        n
    }

    /// Puts the allocator probes back after [`TargetProbes::suspend_allocator_probes`], at the
    /// same sites of the same file, with the same cookies (this target's id). Nothing happens
    /// when they are attached.
    pub fn resume_allocator_probes(&self) -> Result<(), AttachError> {
        let mut links = self.links.lock().unwrap();
        if !links.is_empty() {
            return Ok(());
        }
        if let Some(contract) = self.contract.lock().unwrap().clone() {
            let (_, fresh) = attach::attach_contract(&self.probes, self.who(), &contract.provider, &contract.objects, 0)?;
            links.extend(fresh);
            return Ok(());
        }
        let Some(alloc) = self.allocator.lock().unwrap().clone() else { return Ok(()) };
        self.forget_calls_in_flight();
        let (_, fresh) = attach::attach(&self.probes, self.id, self.pid, &alloc, self.probe_mode() == ProbeMode::Classic)?;
        links.extend(fresh);
        debug!(pid = self.pid, links = links.len(), "allocator probes resumed");
        Ok(())
    }

    /// Calls whose entry was seen before a suspension never had their return seen: their
    /// threads' `INFLIGHT` slots would stay active (every later call of the thread taken for a
    /// nested one, never recorded) and `ACTIVE_CALLS` counted up. With no probe of this target
    /// attached, nothing of it is in flight: both are cleared.
    fn forget_calls_in_flight(&self) {
        let mut ebpf = self.probes.ebpf.lock().unwrap();
        if let Some(map) = ebpf.map_mut("INFLIGHT") {
            match aya::maps::HashMap::<&mut aya::maps::MapData, u64, profiler_common::InFlight>::try_from(map) {
                Ok(mut inflight) => {
                    let stale: Vec<u64> = inflight
                        .iter()
                        .filter_map(Result::ok)
                        .filter(|(_, call)| call.stack.target == self.id && call.active != 0)
                        .map(|(k, _)| k)
                        .collect();
                    for k in &stale {
                        let _ = inflight.remove(k);
                    }
                    debug!(pid = self.pid, stale = stale.len(), "calls in flight at the suspension forgotten");
                }
                Err(e) => warn!(pid = self.pid, "cannot read INFLIGHT: {e}"),
            }
        }
        drop(ebpf);
        if let Err(e) = self.probes.slots.lock().unwrap().active_calls.set(self.slot, 0, 0) {
            warn!(pid = self.pid, "cannot reset the target's calls in flight: {e}");
        }
    }

    /// How this target's allocator probes are attached: `Session` or `Classic`.
    pub fn probe_mode(&self) -> ProbeMode {
        let classic = self.probes.slots.lock().unwrap().owners[self.slot as usize].classic;
        if classic || self.probes.session.is_none() { ProbeMode::Classic } else { ProbeMode::Session }
    }

    /// Whether the allocator probes are attached now.
    pub fn allocator_probes_attached(&self) -> bool {
        !self.links.lock().unwrap().is_empty()
    }

    pub fn probes(&self) -> &Arc<Probes> {
        &self.probes
    }

    pub fn slot(&self) -> u32 {
        self.slot
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    /// This target's counters, indexed by `profiler_common::Counter`.
    pub fn counters(&self) -> Result<Vec<u64>, MapError> {
        reader::read_counters(&self.probes.maps, self.slot)
    }

    /// The sampling interval in force (the governor may have changed it).
    pub fn sample_bytes(&self) -> u64 {
        self.probes.slots.lock().unwrap().owners[self.slot as usize].sample_bytes
    }

    /// What the probes cost this target, when the governor measures it.
    pub fn cost(&self) -> Option<crate::governor::ProbeCost> {
        self.probes.costs.lock().unwrap().get(&self.id).cloned()
    }

    /// Everything this target recorded. Allocations younger than `min_age_ns` are live but not
    /// leaks.
    pub fn read(&self, min_age_ns: u64) -> Result<RawSnapshot, MapError> {
        reader::read(&self.probes.maps, self.id, self.slot, min_age_ns)
    }

    /// This target's stacks not in `known` (see [`reader::new_stacks`]).
    pub fn new_stacks(&self, known: &HashSet<StackKey>) -> Result<Vec<RawStack>, MapError> {
        reader::new_stacks(&self.probes.maps, self.id, known)
    }

    /// Attaches a snapshot trigger; returns its index in [`TargetProbes::trigger_hits`].
    pub fn attach_trigger(&self, host: &TargetFile, file_offset: u64, point: TriggerPoint) -> anyhow::Result<u32> {
        if self.triggers.lock().unwrap().len() >= MAX_TRIGGERS_PER_TARGET {
            return Err(SlotError::TriggersFull.into());
        }
        let slot = {
            let mut slots = self.probes.slots.lock().unwrap();
            let free = (0..MAX_TRIGGERS).find(|s| !slots.triggers_used.contains(s)).ok_or(SlotError::TriggersFull)?;
            slots.triggers_used.insert(free);
            slots.trigger_hits.set(free, 0, 0)?;
            free
        };
        let attached = (|| -> anyhow::Result<Link> {
            let mut ebpf = self.probes.ebpf.lock().unwrap();
            Ok(attach::attach_trigger(&mut ebpf, self.pid, host, file_offset, point, slot)?)
        })();
        let link = match attached {
            Ok(link) => link,
            Err(e) => {
                self.probes.slots.lock().unwrap().triggers_used.remove(&slot);
                return Err(e);
            }
        };
        let mut triggers = self.triggers.lock().unwrap();
        triggers.push((slot, link));
        Ok(triggers.len() as u32 - 1)
    }

    /// How often each of this target's triggers has fired since it was attached.
    pub fn trigger_hits(&self) -> Result<Vec<u64>, MapError> {
        let triggers = self.triggers.lock().unwrap();
        let slots = self.probes.slots.lock().unwrap();
        triggers.iter().map(|(slot, _)| slots.trigger_hits.get(slot, 0)).collect()
    }
}

impl Drop for TargetProbes {
    /// Detaching waits for the kernel: each uprobe link's release ends with an RCU grace period
    /// (~40 ms here), and a target has three links and its triggers. That happens on a thread
    /// of its own, the links released concurrently (one grace period for all, measured in
    /// `cargo xtask bench`'s node section): the caller does not wait. The slot is given back
    /// only once no probe of this target can run any more.
    fn drop(&mut self) {
        let links = std::mem::take(&mut *self.links.lock().unwrap());
        let triggers = std::mem::take(&mut *self.triggers.lock().unwrap());
        self.probes.costs.lock().unwrap().remove(&self.id);
        let (probes, id, slot, pid) = (Arc::clone(&self.probes), self.id, self.slot, self.pid);
        let detach = move || {
            let trigger_slots: Vec<u32> = triggers.iter().map(|(s, _)| *s).collect();
            std::thread::scope(|scope| {
                for link in links.into_iter().chain(triggers.into_iter().map(|(_, l)| l)) {
                    scope.spawn(move || drop(link));
                }
            });
            release_slot(&probes, slot, pid, &trigger_slots);
            purge(&probes, id);
        };
        if let Err(e) = std::thread::Builder::new().name("detach".into()).spawn(detach) {
            warn!(pid = self.pid, "no detach thread ({e}): the target's slot is not reused");
        }
    }
}

/// Frees `slot` and `triggers` for other targets, once the departed target's links are gone.
fn release_slot(probes: &Probes, slot: u32, pid: u32, triggers: &[u32]) {
    let mut slots = probes.slots.lock().unwrap();
    for t in triggers {
        slots.triggers_used.remove(t);
    }
    slots.owners[slot as usize].pid = None;
    slots.owners[slot as usize].sample_bytes = 0;
    if let Err(e) = slots.js_config.set(slot, profiler_common::JsFrameConfig::default(), 0) {
        warn!(pid, "cannot clear the target's V8 frame settings: {e}");
    }
    if let Err(e) = write_config(&mut slots, slot, 0).and_then(|()| rebalance(&mut slots, probes.settings.max_allocs)) {
        warn!(pid, "cannot release the target's slot: {e}");
    }
}

/// Zeroes everything per slot the probes keep for `slot`.
fn reset_slot(slots: &mut SlotMaps, slot: u32) -> Result<(), MapError> {
    let cpus = aya::util::nr_cpus().map_err(|(_, e)| MapError::SyscallError(aya::sys::SyscallError { call: "nr_cpus", io_error: e }))?;
    for i in 0..COUNTER_COUNT {
        slots.counters.set(slot * COUNTER_COUNT + i, PerCpuValues::try_from(vec![0u64; cpus])?, 0)?;
    }
    slots.countdown.set(slot, PerCpuValues::try_from(vec![0i64; cpus])?, 0)?;
    slots.target_live.set(slot, 0, 0)?;
    slots.active_calls.set(slot, 0, 0)?;
    slots.go.set(slot, profiler_common::GoTarget::default(), 0)?;
    slots.js_config.set(slot, profiler_common::JsFrameConfig::default(), 0)?;
    Ok(())
}

pub(super) fn write_config(slots: &mut SlotMaps, slot: u32, max_allocs: u32) -> Result<(), MapError> {
    let owner = slots.owners[slot as usize];
    let attached = slots.owners.iter().filter(|o| o.pid.is_some()).count().max(1) as u64;
    let live_quota = if owner.pid.is_some() { u64::from(max_allocs) / attached } else { 0 };
    slots.targets.set(slot, TargetConfig { sample_bytes: owner.sample_bytes, live_quota }, 0)
}

/// Every attached target gets an equal share of `LIVE` (`--max-allocs`).
fn rebalance(slots: &mut SlotMaps, max_allocs: u32) -> Result<(), MapError> {
    for slot in 0..slots.owners.len() as u32 {
        if slots.owners[slot as usize].pid.is_some() {
            write_config(slots, slot, max_allocs)?;
        }
    }
    Ok(())
}

/// Deletes what departed target `id` left in `LIVE` and `STACK_STATS`, then the stacks no
/// target uses any more: those unreferenced at this purge and the last one (a stack stored an
/// instant before its first total is referenced at the next).
fn purge(probes: &Probes, id: u64) {
    // One at a time: each holds a map's listing (a few MiB), and fifty targets may go at once.
    let mut previous = probes.unreferenced_stacks.lock().unwrap();
    let maps = &probes.maps;
    let live_fd = maps.live.map().fd().as_fd().as_raw_fd();
    let mut dead: Vec<LiveKey> = Vec::new();
    let listed = batch::for_each_chunk(live_fd, |keys: &[LiveKey], _: &[profiler_common::AllocInfo]| {
        dead.extend(keys.iter().filter(|k| k.target == id));
    });
    if let Err(e) = listed {
        warn!("cannot list live allocations to purge: {e}");
        return;
    }
    let live = batch::delete(live_fd, &dead);
    let Ok(stats) = reader::stack_stats(maps, None) else { return };
    let (theirs, others): (Vec<_>, Vec<_>) = stats.into_iter().partition(|(k, _)| k.target == id);
    let theirs: Vec<StackKey> = theirs.into_iter().map(|(k, _)| k).collect();
    let stats_deleted = batch::delete(maps.stack_stats.map().fd().as_fd().as_raw_fd(), &theirs);
    let referenced: HashSet<u64> = others.iter().map(|(k, _)| k.stack_id).collect();
    let stacks_fd = maps.stacks.map().fd().as_fd().as_raw_fd();
    let mut unreferenced = Vec::new();
    let listed = batch::for_each_chunk(stacks_fd, |ids: &[u64], _: &[profiler_common::StackFrames]| {
        unreferenced.extend(ids.iter().filter(|id| !referenced.contains(id)));
    });
    if listed.is_err() {
        return;
    }
    let (doomed, kept): (Vec<u64>, Vec<u64>) = unreferenced.into_iter().partition(|id| previous.contains(id));
    let stacks = batch::delete(stacks_fd, &doomed);
    // Their JavaScript functions (only stacks of V8 targets have an entry).
    let js_fd = maps.js_frames.map().fd().as_fd().as_raw_fd();
    let doomed_set: HashSet<u64> = doomed.iter().copied().collect();
    let mut js_doomed: Vec<u64> = Vec::new();
    if batch::for_each_chunk(js_fd, |ids: &[u64], _: &[profiler_common::StackFrames]| {
        js_doomed.extend(ids.iter().filter(|id| doomed_set.contains(id)));
    })
    .is_ok()
    {
        batch::delete(js_fd, &js_doomed);
    }
    *previous = kept.into_iter().collect();
    debug!(target = id, live, stats = stats_deleted, stacks, "departed target purged");
}
