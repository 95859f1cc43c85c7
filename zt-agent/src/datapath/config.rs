//! `ZT_CONFIG`: the node's mode, generation and slot, one 64-bit word (`zt_common::Config::word`)
//! in a memory-mapped array. Written with one atomic store, read with one load, by this process
//! and by every packet: a packet sees the old state or the new one whole, never a mix (a map
//! update would copy the value in place).

use std::{
    os::fd::AsFd,
    ptr::NonNull,
    sync::atomic::{AtomicU64, Ordering},
};

use anyhow::{Context as _, Result};
use aya::maps::MapData;
use nix::sys::mman::{mmap, munmap, MapFlags, ProtFlags};
use zt_common::Config;

/// The word, mapped into this process.
pub struct ConfigWord {
    word: NonNull<AtomicU64>,
    len: std::num::NonZeroUsize,
    /// Keeps the map alive as long as the mapping.
    map: MapData,
}

// SAFETY: the mapping is only accessed through the atomic.
unsafe impl Send for ConfigWord {}
unsafe impl Sync for ConfigWord {}

impl ConfigWord {
    /// Maps `map`, the config array (one u64, `BPF_F_MMAPABLE`).
    pub fn new(map: MapData) -> Result<Self> {
        let len = std::num::NonZeroUsize::new(page_size()).expect("a page has a size");
        // SAFETY: a new shared mapping of the map's memory; nothing else in this process maps it.
        let at = unsafe { mmap(None, len, ProtFlags::PROT_READ | ProtFlags::PROT_WRITE, MapFlags::MAP_SHARED, map.fd().as_fd(), 0) }
            .context("mapping ZT_CONFIG (a memory-mappable array)")?;
        Ok(Self { word: at.cast(), len, map })
    }

    /// The map, for another descriptor of it.
    pub fn map(&self) -> &MapData {
        &self.map
    }

    pub fn get(&self) -> Config {
        Config::from_word(self.atomic().load(Ordering::Acquire))
    }

    pub fn set(&self, config: Config) {
        self.atomic().store(config.word(), Ordering::Release);
    }

    fn atomic(&self) -> &AtomicU64 {
        // SAFETY: the array's value starts the mapping, page-aligned, and lives as long as it.
        unsafe { self.word.as_ref() }
    }
}

impl Drop for ConfigWord {
    fn drop(&mut self) {
        // SAFETY: mapped in `new`, not used after this.
        let _ = unsafe { munmap(self.word.cast(), self.len.get()) };
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) as usize }
}
