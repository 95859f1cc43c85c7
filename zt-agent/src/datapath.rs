//! The kernel side as the agent sees it: load the embedded eBPF object, fill its maps from a
//! compiled policy, attach it to interfaces, flip the mode. Dropping a `Datapath` detaches
//! everything it attached (TCX and XDP links are owned by the loaded object).

use std::{fs::File, path::Path};

use anyhow::{bail, Context as _, Result};
use aya::{
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, MapData, PerCpuArray, RingBuf},
    programs::{tc, CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, SchedClassifier, TcAttachType, Xdp, XdpMode},
    util::KernelVersion,
    Ebpf,
};
use zt_common::{maps, programs, Config, IpKey, PolicyKey, PolicyValue, COUNTER_COUNT};

use crate::policy::compile::{ipcache_prefix, Compiled};

/// The eBPF object, built from `zt-ebpf` by this crate's build script.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/zt-ebpf"));

/// Node-wide enforcement mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Pass everything, report would-be denials as `audit` events.
    Monitor,
    /// Drop what policy denies.
    Enforce,
}

impl Mode {
    pub fn from_raw(raw: u32) -> Self {
        if raw == zt_common::mode::ENFORCE { Mode::Enforce } else { Mode::Monitor }
    }
    pub fn raw(self) -> u32 {
        match self {
            Mode::Monitor => zt_common::mode::MONITOR,
            Mode::Enforce => zt_common::mode::ENFORCE,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Mode::Monitor => "monitor",
            Mode::Enforce => "enforce",
        }
    }
}

/// Where a program is attached, for `status` and logs.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Attachment {
    pub interface: String,
    pub hook: &'static str,
}

pub struct Datapath {
    ebpf: Ebpf,
    config: Array<MapData, Config>,
    ipcache: LpmTrie<MapData, IpKey, u32>,
    policy: LpmTrie<MapData, PolicyKey, PolicyValue>,
    isolation: HashMap<MapData, u32, u32>,
    cgroups: HashMap<MapData, u64, u32>,
    interfaces: HashMap<MapData, u32, u32>,
    counters: PerCpuArray<MapData, u64>,
    attachments: Vec<Attachment>,
}

fn take_map<T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(ebpf: &mut Ebpf, name: &str) -> Result<T> {
    let map = ebpf.take_map(name).with_context(|| format!("eBPF object has no map {name}"))?;
    T::try_from(map).with_context(|| format!("map {name} has an unexpected type"))
}

impl Datapath {
    /// Loads every program (the verifier runs here) without attaching anything.
    pub fn load() -> Result<Self> {
        if OBJECT.is_empty() {
            bail!("this zt-agent was built with AYA_BUILD_SKIP set and carries no eBPF object; rebuild it with `cargo xtask build`");
        }
        let mut ebpf = Ebpf::load(OBJECT).context("loading the eBPF object (are you root?)")?;
        for name in [programs::TC_INGRESS, programs::TC_EGRESS] {
            let program: &mut SchedClassifier = program_mut(&mut ebpf, name)?;
            program.load().with_context(|| format!("verifying {name}"))?;
        }
        let xdp: &mut Xdp = program_mut(&mut ebpf, programs::XDP)?;
        xdp.load().with_context(|| format!("verifying {}", programs::XDP))?;
        for name in [programs::CGROUP_INGRESS, programs::CGROUP_EGRESS] {
            let program: &mut CgroupSkb = program_mut(&mut ebpf, name)?;
            program.load().with_context(|| format!("verifying {name}"))?;
        }
        Ok(Self {
            config: take_map(&mut ebpf, maps::CONFIG)?,
            ipcache: take_map(&mut ebpf, maps::IPCACHE)?,
            policy: take_map(&mut ebpf, maps::POLICY)?,
            isolation: take_map(&mut ebpf, maps::ISOLATION)?,
            cgroups: take_map(&mut ebpf, maps::CGROUPS)?,
            interfaces: take_map(&mut ebpf, maps::INTERFACES)?,
            counters: take_map(&mut ebpf, maps::COUNTERS)?,
            ebpf,
            attachments: Vec::new(),
        })
    }

    /// Fills the identity and policy maps. Call before attaching: the maps start empty.
    pub fn install(&mut self, compiled: &Compiled) -> Result<()> {
        for (net, id) in &compiled.ipcache {
            let (prefix_len, key) = ipcache_prefix(net);
            self.ipcache
                .insert(&Key::new(prefix_len, key), id, 0)
                .with_context(|| format!("ipcache full at {net} (capacity {})", maps::IPCACHE_CAPACITY))?;
        }
        for (id, flags) in &compiled.isolation {
            self.isolation
                .insert(id, flags, 0)
                .with_context(|| format!("isolation map full (capacity {})", maps::ISOLATION_CAPACITY))?;
        }
        for (prefix_len, key, value) in &compiled.policy {
            self.policy
                .insert(&Key::new(*prefix_len, *key), value, 0)
                .with_context(|| format!("policy map full (capacity {})", maps::POLICY_CAPACITY))?;
        }
        Ok(())
    }

    pub fn config(&self) -> Result<Config> {
        Ok(self.config.get(&0, 0)?)
    }

    /// Switches monitor/enforce with one map write; nothing is reloaded.
    pub fn set_mode(&mut self, mode: Mode) -> Result<()> {
        let mut config = self.config.get(&0, 0)?;
        config.mode = mode.raw();
        self.config.set(0, config, 0)?;
        Ok(())
    }

    pub fn set_generation(&mut self, generation: u32) -> Result<()> {
        let mut config = self.config.get(&0, 0)?;
        config.generation = generation;
        self.config.set(0, config, 0)?;
        Ok(())
    }

    /// TC ingress and egress on a workload's host-side interface.
    pub fn attach_workload(&mut self, interface: &str) -> Result<()> {
        if !KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0)) {
            // Before TCX, classifiers hang off a clsact qdisc.
            if let Err(err) = tc::qdisc_add_clsact(interface) {
                tracing::debug!(%interface, %err, "clsact qdisc not added (it may exist already)");
            }
        }
        for (name, attach_type, hook) in [
            (programs::TC_INGRESS, TcAttachType::Ingress, "tc-ingress"),
            (programs::TC_EGRESS, TcAttachType::Egress, "tc-egress"),
        ] {
            let program: &mut SchedClassifier = program_mut(&mut self.ebpf, name)?;
            program
                .attach(interface, attach_type)
                .with_context(|| format!("attaching {hook} to {interface}"))?;
            self.attachments.push(Attachment { interface: interface.to_owned(), hook });
        }
        Ok(())
    }

    /// Native XDP on an uplink: traffic from other nodes is judged before an skb exists.
    pub fn attach_uplink(&mut self, interface: &str) -> Result<()> {
        let program: &mut Xdp = program_mut(&mut self.ebpf, programs::XDP)?;
        program
            .attach(interface, XdpMode::Driver)
            .with_context(|| format!("attaching native XDP to {interface} (does its driver support XDP?)"))?;
        self.attachments.push(Attachment { interface: interface.to_owned(), hook: "xdp" });
        Ok(())
    }

    /// cgroup_skb ingress and egress on a cgroup v2 directory: its processes and those of every
    /// cgroup below it. The attachment is a BPF link, which the kernel always runs alongside
    /// other programs on the cgroup (links take no attach flags: `Single` means none), and no
    /// program can override another's drop.
    pub fn attach_cgroup(&mut self, dir: &Path) -> Result<()> {
        let cgroup = File::open(dir).with_context(|| format!("opening cgroup {}", dir.display()))?;
        for (name, attach_type, hook) in [
            (programs::CGROUP_INGRESS, CgroupSkbAttachType::Ingress, "cgroup-ingress"),
            (programs::CGROUP_EGRESS, CgroupSkbAttachType::Egress, "cgroup-egress"),
        ] {
            let program: &mut CgroupSkb = program_mut(&mut self.ebpf, name)?;
            program
                .attach(&cgroup, attach_type, CgroupAttachMode::Single)
                .with_context(|| format!("attaching {hook} to cgroup {}", dir.display()))?;
            self.attachments.push(Attachment { interface: dir.display().to_string(), hook });
        }
        Ok(())
    }

    /// Processes in cgroup `cgroup_id` are identity `id`, wherever they send from.
    pub fn bind_cgroup(&mut self, cgroup_id: u64, id: u32) -> Result<()> {
        self.cgroups
            .insert(cgroup_id, id, 0)
            .with_context(|| format!("cgroup map full (capacity {})", maps::CGROUPS_CAPACITY))
    }

    pub fn unbind_cgroup(&mut self, cgroup_id: u64) -> Result<()> {
        match self.cgroups.remove(&cgroup_id) {
            Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            other => Ok(other?),
        }
    }

    /// The workload behind host-side interface `ifindex` is identity `id`.
    pub fn bind_interface(&mut self, ifindex: u32, id: u32) -> Result<()> {
        self.interfaces
            .insert(ifindex, id, 0)
            .with_context(|| format!("interface map full (capacity {})", maps::INTERFACES_CAPACITY))
    }

    /// `addr` alone is identity `id` (a certificate binding), over any prefix that covers it.
    pub fn bind_address(&mut self, addr: std::net::IpAddr, id: u32) -> Result<()> {
        let (prefix_len, key) = ipcache_prefix(&addr.into());
        self.ipcache
            .insert(&Key::new(prefix_len, key), id, 0)
            .with_context(|| format!("ipcache full at {addr} (capacity {})", maps::IPCACHE_CAPACITY))
    }

    pub fn unbind_address(&mut self, addr: std::net::IpAddr) -> Result<()> {
        let (prefix_len, key) = ipcache_prefix(&addr.into());
        match self.ipcache.remove(&Key::new(prefix_len, key)) {
            Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            other => Ok(other?),
        }
    }

    pub fn unbind_interface(&mut self, ifindex: u32) -> Result<()> {
        match self.interfaces.remove(&ifindex) {
            Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            other => Ok(other?),
        }
    }

    pub fn attachments(&self) -> &[Attachment] {
        &self.attachments
    }

    /// The flow-event ring buffer; can be taken once.
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>> {
        take_map(&mut self.ebpf, maps::EVENTS)
    }

    /// Counters summed over CPUs, indexed as in `zt_common::counter_index`.
    pub fn counters(&self) -> Result<Vec<u64>> {
        (0..COUNTER_COUNT)
            .map(|i| Ok(self.counters.get(&i, 0)?.iter().sum()))
            .collect()
    }

    /// A loaded program, for BPF_PROG_TEST_RUN.
    pub fn program<T>(&mut self, name: &str) -> Result<&mut T>
    where
        for<'a> &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
    {
        program_mut(&mut self.ebpf, name)
    }
}

fn program_mut<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let program = ebpf.program_mut(name).with_context(|| format!("eBPF object has no program {name}"))?;
    program.try_into().with_context(|| format!("program {name} has an unexpected type"))
}
