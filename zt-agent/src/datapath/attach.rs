//! Attachments as pinned links. Every hook the agent attaches is a BPF link pinned under
//! `links/<hook>@<target>`, so it stays attached when the agent exits, however it exits. An
//! agent that finds a link pinned for the attachment it wants, still attached to the same
//! interface or cgroup, switches that link to its own program with BPF_LINK_UPDATE: one atomic
//! swap in the kernel, so there is no instant when nothing judges (XDP allows one program per
//! interface, so this is the only gapless path there; TCX and cgroup links are treated alike).

use std::{
    fs::File,
    os::{fd::AsFd as _, unix::fs::MetadataExt as _},
    path::Path,
};

use anyhow::{Context as _, Result};
use aya::{
    programs::{
        links::FdLink, tc, CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, Program, SchedClassifier, TcAttachType,
        Xdp, XdpMode,
    },
    util::KernelVersion,
};
use zt_common::{interface_flags, programs};

use super::{sys, Attachment, Datapath};

/// Each hook's program.
const HOOKS: [(&str, &str); 5] = [
    (programs::TC_INGRESS, "tc-ingress"),
    (programs::TC_EGRESS, "tc-egress"),
    (programs::XDP, "xdp"),
    (programs::CGROUP_INGRESS, "cgroup-ingress"),
    (programs::CGROUP_EGRESS, "cgroup-egress"),
];

/// What a link pin found at start-up was, and what became of it.
enum Found {
    /// No pin, or one whose interface or cgroup is gone (removed): attach anew.
    Nothing,
    /// Switched to this agent's program; `replaced` if it ran a different one.
    Adopted { replaced: bool },
}

impl Datapath {
    /// TC ingress and egress on a workload's host-side interface.
    pub fn attach_workload(&mut self, interface: &str) -> Result<()> {
        if !KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0)) {
            // Before TCX, classifiers hang off a clsact qdisc.
            if let Err(err) = tc::qdisc_add_clsact(interface) {
                tracing::debug!(%interface, %err, "clsact qdisc not added (it may exist already)");
            }
        }
        let ifindex = ifindex(interface)?;
        self.mark_interface(ifindex, interface_flags::WORKLOAD)?;
        for (name, attach_type, hook) in [
            (programs::TC_INGRESS, TcAttachType::Ingress, "tc-ingress"),
            (programs::TC_EGRESS, TcAttachType::Egress, "tc-egress"),
        ] {
            self.attach_pinned(name, hook, interface, |info| info.ifindex == ifindex, |program| {
                let program: &mut SchedClassifier = program.try_into()?;
                let id = program.attach(interface, attach_type)?;
                Ok(FdLink::try_from(program.take_link(id)?)?)
            })?;
        }
        Ok(())
    }

    /// Native XDP on an uplink: traffic from other nodes is judged before an skb exists.
    pub fn attach_uplink(&mut self, interface: &str) -> Result<()> {
        let ifindex = ifindex(interface)?;
        self.mark_interface(ifindex, interface_flags::UPLINK)?;
        self.attach_pinned(programs::XDP, "xdp", interface, |info| info.ifindex == ifindex, |program| {
            let program: &mut Xdp = program.try_into()?;
            let id = program
                .attach(interface, XdpMode::Driver)
                .with_context(|| format!("attaching native XDP to {interface} (does its driver support XDP?)"))?;
            Ok(FdLink::try_from(program.take_link(id)?)?)
        })
    }

    /// cgroup_skb ingress and egress on a cgroup v2 directory: its processes and those of every
    /// cgroup below it. Links take no attach flags (`Single` means none): the kernel runs them
    /// alongside other programs on the cgroup, and no program can override another's drop.
    pub fn attach_cgroup(&mut self, dir: &Path) -> Result<()> {
        let cgroup = File::open(dir).with_context(|| format!("opening cgroup {}", dir.display()))?;
        let cgroup_id = cgroup.metadata()?.ino();
        let label = dir.display().to_string();
        for (name, attach_type, hook) in [
            (programs::CGROUP_INGRESS, CgroupSkbAttachType::Ingress, "cgroup-ingress"),
            (programs::CGROUP_EGRESS, CgroupSkbAttachType::Egress, "cgroup-egress"),
        ] {
            let target = cgroup_id.to_string();
            self.attach_pinned_as(name, hook, &target, &label, |info| info.cgroup_id == cgroup_id, |program| {
                let program: &mut CgroupSkb = program.try_into()?;
                let id = program.attach(&cgroup, attach_type, CgroupAttachMode::Single)?;
                Ok(FdLink::try_from(program.take_link(id)?)?)
            })?;
        }
        Ok(())
    }

    /// After the attachments this agent was asked for: every other link an earlier agent pinned
    /// that still has its interface or cgroup is switched to this agent's programs too (it keeps
    /// enforcing, with this policy — never frozen on an old program and old maps), and listed;
    /// one whose target is gone is unpinned. Returns the interfaces and cgroups kept this way.
    pub fn adopt_remaining_links(&mut self) -> Result<Vec<String>> {
        let Some(pins) = &self.pins else { return Ok(Vec::new()) };
        let wanted: Vec<_> = self.attachments.iter().map(|a| (a.hook, a.pin_target.clone())).collect();
        let mut kept = Vec::new();
        for (pin, info) in pins.pinned_links()? {
            let name = pin.file_name().expect("a pin has a name").to_string_lossy().into_owned();
            let Some((hook, target)) = name.split_once('@') else { continue };
            if wanted.iter().any(|(h, t)| *h == hook && *t == target) {
                continue;
            }
            let Some((program, hook)) = HOOKS.iter().find(|(_, h)| *h == hook).copied() else { continue };
            let attached = info.ifindex != 0 || info.cgroup_id != 0;
            if !attached {
                std::fs::remove_file(&pin).with_context(|| format!("unpinning {}", pin.display()))?;
                continue;
            }
            match hook {
                "tc-ingress" | "tc-egress" => self.mark_interface(info.ifindex, interface_flags::WORKLOAD)?,
                "xdp" => self.mark_interface(info.ifindex, interface_flags::UPLINK)?,
                _ => {}
            }
            let link = sys::obj_get(&pin)?;
            let ours = self.ebpf.program(program).context("eBPF object has no such program")?;
            sys::link_update(link.as_fd(), ours.fd()?.as_fd()).with_context(|| format!("adopting {}", pin.display()))?;
            self.start.links_adopted += 1;
            let label = target.replace(':', ".");
            tracing::warn!(
                hook,
                target = %label,
                "attached by an earlier agent and not asked for by this one: it stays enforced \
                 (remove it with `zt-agent detach`, which removes everything)"
            );
            kept.push(label.clone());
            self.attachments.push(Attachment { interface: label, hook, pin_target: target.to_owned() });
        }
        Ok(kept)
    }

    /// A workload interface went away: the kernel already detached its links; their pins go, and
    /// its entry, so an interface that reuses the index starts with nothing.
    pub fn forget_interface(&mut self, interface: &str, ifindex: u32) -> Result<()> {
        self.write_interface(ifindex, zt_common::InterfaceInfo::default())?;
        let Some(pins) = &self.pins else { return Ok(()) };
        for hook in ["tc-ingress", "tc-egress", "xdp"] {
            let pin = pins.link(hook, interface);
            if pin.exists() {
                std::fs::remove_file(&pin).with_context(|| format!("unpinning {}", pin.display()))?;
            }
        }
        self.attachments.retain(|a| a.interface != interface);
        Ok(())
    }

    fn attach_pinned(
        &mut self,
        program: &str,
        hook: &'static str,
        interface: &str,
        same_target: impl Fn(&sys::LinkInfo) -> bool,
        attach: impl FnOnce(&mut Program) -> Result<FdLink>,
    ) -> Result<()> {
        self.attach_pinned_as(program, hook, interface, interface, same_target, attach)
    }

    /// Adopts the link pinned for (`hook`, `target`) if it is still attached there, or attaches
    /// and pins a new one. `label` names the attachment in `status`.
    fn attach_pinned_as(
        &mut self,
        program: &str,
        hook: &'static str,
        target: &str,
        label: &str,
        same_target: impl Fn(&sys::LinkInfo) -> bool,
        attach: impl FnOnce(&mut Program) -> Result<FdLink>,
    ) -> Result<()> {
        let pin = self.pins.as_ref().context("attaching needs a pinned datapath")?.link(hook, target);
        match self.adopt_link(program, &pin, same_target).with_context(|| format!("adopting {}", pin.display()))? {
            Found::Adopted { replaced } => {
                self.start.links_adopted += 1;
                self.start.programs_replaced += usize::from(replaced);
            }
            Found::Nothing => {
                let link = attach(self.ebpf.program_mut(program).context("eBPF object has no such program")?)
                    .with_context(|| format!("attaching {hook} to {label}"))?;
                link.pin(&pin).with_context(|| format!("pinning {}", pin.display()))?;
            }
        }
        if !self.attachments.iter().any(|a| a.interface == label && a.hook == hook) {
            let pin_target = target.replace('.', ":");
            self.attachments.push(Attachment { interface: label.to_owned(), hook, pin_target });
        }
        Ok(())
    }

    fn adopt_link(&mut self, program: &str, pin: &Path, same_target: impl Fn(&sys::LinkInfo) -> bool) -> Result<Found> {
        if !pin.exists() {
            return Ok(Found::Nothing);
        }
        let link = sys::obj_get(pin)?;
        let info = sys::link_info(link.as_fd())?;
        if !same_target(&info) {
            // Its interface went away while no agent watched (or a new one took the name).
            tracing::info!(pin = %pin.display(), "dropping a pinned link whose target is gone");
            std::fs::remove_file(pin)?;
            return Ok(Found::Nothing);
        }
        // Read before the update, which may free the program it replaces.
        let pins = self.pins.as_ref().context("adopting needs a pinned datapath")?;
        let theirs_tag = pins.pinned_program(info.program_id)?.map(|p| p.tag());
        let ours = self.ebpf.program(program).context("eBPF object has no such program")?;
        let ours_tag = ours.info()?.tag();
        sys::link_update(link.as_fd(), ours.fd()?.as_fd()).context("BPF_LINK_UPDATE")?;
        Ok(Found::Adopted { replaced: theirs_tag != Some(ours_tag) })
    }
}

fn ifindex(interface: &str) -> Result<u32> {
    nix::net::if_::if_nametoindex(interface).with_context(|| format!("no interface named {interface}"))
}
