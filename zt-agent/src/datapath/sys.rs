//! The few bpf(2) commands aya 0.14 does not expose: opening a pinned link as a plain fd, reading
//! what a link is attached to, replacing a link's program in place (BPF_LINK_UPDATE: aya has it
//! for XDP and TCX links but not for cgroup ones, and one path for all three is simpler), the
//! map-in-map update whose side effect is an RCU grace period, and the batch commands that write
//! and empty a generation's hash maps in a few calls instead of one per entry.

use std::{
    ffi::CString,
    os::{
        fd::{AsFd, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

use anyhow::{Context as _, Result};
use aya::{maps::MapData, Pod};
use aya_obj::generated::{bpf_cmd, bpf_link_info, bpf_link_type};

fn bpf<T>(cmd: bpf_cmd, attr: &mut T) -> std::io::Result<libc::c_long> {
    // SAFETY: `attr` is a valid, initialised bpf_attr prefix of the size passed; the kernel
    // zero-extends the rest and writes only within it.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, cmd as libc::c_long, attr as *mut T, size_of::<T>() as libc::c_uint) };
    if ret < 0 { Err(std::io::Error::last_os_error()) } else { Ok(ret) }
}

/// `union bpf_attr` for BPF_OBJ_GET.
#[repr(C)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

/// Opens a pinned object (here: a link) as a new fd.
pub fn obj_get(path: &Path) -> std::io::Result<OwnedFd> {
    let path = CString::new(path.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    let mut attr = ObjGetAttr { pathname: path.as_ptr() as u64, bpf_fd: 0, file_flags: 0 };
    let fd = bpf(bpf_cmd::BPF_OBJ_GET, &mut attr)?;
    // SAFETY: BPF_OBJ_GET returned a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `union bpf_attr` for BPF_OBJ_GET_INFO_BY_FD.
#[repr(C)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// What a link is, runs and is attached to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkInfo {
    pub id: u32,
    pub program_id: u32,
    /// The interface of an XDP or TCX link, 0 once that interface is gone (the link is then
    /// defunct: it judges nothing).
    pub ifindex: u32,
    /// The cgroup of a cgroup link.
    pub cgroup_id: u64,
}

pub fn link_info(link: BorrowedFd<'_>) -> std::io::Result<LinkInfo> {
    // SAFETY: bpf_link_info is plain data; all zeroes is a valid value.
    let mut info: bpf_link_info = unsafe { std::mem::zeroed() };
    let mut attr =
        InfoAttr { bpf_fd: link.as_raw_fd() as u32, info_len: size_of::<bpf_link_info>() as u32, info: &mut info as *mut _ as u64 };
    bpf(bpf_cmd::BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    // SAFETY: the union member read is the one the kernel fills for the link's type.
    let (ifindex, cgroup_id) = unsafe {
        match info.type_ {
            t if t == bpf_link_type::BPF_LINK_TYPE_XDP as u32 => (info.__bindgen_anon_1.xdp.ifindex, 0),
            t if t == bpf_link_type::BPF_LINK_TYPE_TCX as u32 => (info.__bindgen_anon_1.tcx.ifindex, 0),
            t if t == bpf_link_type::BPF_LINK_TYPE_CGROUP as u32 => (0, info.__bindgen_anon_1.cgroup.cgroup_id),
            _ => (0, 0),
        }
    };
    Ok(LinkInfo { id: info.id, program_id: info.prog_id, ifindex, cgroup_id })
}

/// `union bpf_attr` for BPF_LINK_UPDATE.
#[repr(C)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

/// Makes `link` run `program` from now on: one atomic swap in the kernel, so every packet is
/// judged by the old program or the new one, and none by no program.
pub fn link_update(link: BorrowedFd<'_>, program: BorrowedFd<'_>) -> std::io::Result<()> {
    let mut attr =
        LinkUpdateAttr { link_fd: link.as_raw_fd() as u32, new_prog_fd: program.as_raw_fd() as u32, flags: 0, old_prog_fd: 0 };
    bpf(bpf_cmd::BPF_LINK_UPDATE, &mut attr).map(drop)
}

/// The leading fields of `union bpf_attr` for BPF_MAP_CREATE (the kernel zero-extends the rest).
#[repr(C)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    inner_map_fd: u32,
}

/// `union bpf_attr` for BPF_MAP_UPDATE_ELEM.
#[repr(C)]
struct MapUpdateAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_MAP_TYPE_ARRAY_OF_MAPS: u32 = 12;

/// Waits for an RCU grace period: until every BPF program that started before has returned, so
/// none can still be using what it read before. The kernel does that wait when userspace updates
/// a map-in-map (`maybe_wait_bpf_programs`), for the programs that might look up the old inner
/// map; this one is a private, one-entry array of maps no program uses.
pub struct GracePeriod {
    outer: OwnedFd,
    inner: OwnedFd,
}

impl GracePeriod {
    pub fn new() -> Result<Self> {
        let create = |map_type, inner_map_fd| -> Result<OwnedFd> {
            let mut attr = MapCreateAttr { map_type, key_size: 4, value_size: 4, max_entries: 1, map_flags: 0, inner_map_fd };
            let fd = bpf(bpf_cmd::BPF_MAP_CREATE, &mut attr).context("creating the grace-period map")?;
            // SAFETY: BPF_MAP_CREATE returned a new file descriptor that nothing else owns.
            Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
        };
        let inner = create(BPF_MAP_TYPE_ARRAY, 0)?;
        let outer = create(BPF_MAP_TYPE_ARRAY_OF_MAPS, inner.as_raw_fd() as u32)?;
        Ok(Self { outer, inner })
    }

    pub fn wait(&self) -> Result<()> {
        let (key, value) = (0u32, self.inner.as_fd().as_raw_fd() as u32);
        let mut attr = MapUpdateAttr {
            map_fd: self.outer.as_raw_fd() as u32,
            _pad: 0,
            key: &key as *const u32 as u64,
            value: &value as *const u32 as u64,
            flags: 0,
        };
        bpf(bpf_cmd::BPF_MAP_UPDATE_ELEM, &mut attr).context("waiting for running BPF programs to finish")?;
        Ok(())
    }
}

/// `union bpf_attr` for the BPF_MAP_*_BATCH commands.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Elements per batch call: the kernel stages a lookup batch in buffers of this size.
const BATCH: usize = 4096;

fn map_fd(map: &MapData) -> u32 {
    map.fd().as_fd().as_raw_fd() as u32
}

/// Writes `entries` into a hash map (BPF_MAP_UPDATE_BATCH): one call per [`BATCH`] entries,
/// gathered a batch at a time (a generation's entries at once would add their size to the
/// agent's peak). On an error, the entries before the failing one are written.
pub fn update_batch<K: Pod, V: Pod>(map: &MapData, entries: impl IntoIterator<Item = (K, V)>) -> std::io::Result<()> {
    let mut entries = entries.into_iter();
    let (mut keys, mut values) = (Vec::with_capacity(BATCH), Vec::with_capacity(BATCH));
    loop {
        for (key, value) in entries.by_ref().take(BATCH) {
            keys.push(key);
            values.push(value);
        }
        if keys.is_empty() {
            return Ok(());
        }
        let mut attr = BatchAttr {
            keys: keys.as_ptr() as u64,
            values: values.as_ptr() as u64,
            count: keys.len() as u32,
            map_fd: map_fd(map),
            ..BatchAttr::default()
        };
        bpf(bpf_cmd::BPF_MAP_UPDATE_BATCH, &mut attr)?;
        keys.clear();
        values.clear();
    }
}

/// Every key of a hash map (BPF_MAP_LOOKUP_BATCH, whose values are read and dropped): one call
/// per [`BATCH`] elements, where walking key by key takes one per key.
pub fn keys_batch<K: Pod, V: Pod>(map: &MapData) -> std::io::Result<Vec<K>> {
    // SAFETY: Pod types are plain data, for which all zeroes is a valid value.
    let (mut keys, mut values) = unsafe { (vec![std::mem::zeroed::<K>(); BATCH], vec![std::mem::zeroed::<V>(); BATCH]) };
    let mut all = Vec::new();
    // A hash map's batch position is a bucket index; none given starts at the first bucket.
    let (mut position, mut next) = (0u32, 0u32);
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { &position as *const u32 as u64 },
            out_batch: &mut next as *mut u32 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: BATCH as u32,
            map_fd: map_fd(map),
            ..BatchAttr::default()
        };
        let result = bpf(bpf_cmd::BPF_MAP_LOOKUP_BATCH, &mut attr);
        all.extend_from_slice(&keys[..attr.count as usize]);
        match result {
            Ok(_) => {}
            // The walk is over; `count` says how much its last call still returned.
            Err(err) if err.raw_os_error() == Some(libc::ENOENT) => return Ok(all),
            Err(err) => return Err(err),
        }
        (position, first) = (next, false);
    }
}

/// Removes `keys` from a hash map (BPF_MAP_DELETE_BATCH): one call per [`BATCH`] keys. A key
/// that is not there is skipped.
pub fn delete_batch<K: Pod>(map: &MapData, keys: &[K]) -> std::io::Result<()> {
    let mut rest = keys;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(BATCH)];
        let mut attr =
            BatchAttr { keys: chunk.as_ptr() as u64, count: chunk.len() as u32, map_fd: map_fd(map), ..BatchAttr::default() };
        rest = match bpf(bpf_cmd::BPF_MAP_DELETE_BATCH, &mut attr) {
            Ok(_) => &rest[chunk.len()..],
            // The kernel stops at a missing key, the `count` keys before it deleted.
            Err(err) if err.raw_os_error() == Some(libc::ENOENT) => &rest[attr.count as usize + 1..],
            Err(err) => return Err(err),
        };
    }
    Ok(())
}
