//! Ring-buffer records as the event reader decodes them: any bytes the kernel (or a corrupted
//! buffer) could hand over decode to an event or to nothing, never a panic, and every code in
//! a decoded event has a name.
#![no_main]

use libfuzzer_sys::fuzz_target;
use zt_agent::events::{self, record};

fuzz_target!(|data: &[u8]| {
    let Some(event) = events::decode(data) else { return };
    assert!(data.len() >= std::mem::size_of::<zt_common::FlowEvent>(), "only a whole event decodes");
    let _ = (record::verdict_name(event.verdict), record::direction_name(event.direction));
    let _ = zt_common::Reason::from_u8(event.reason).map(zt_common::Reason::name);
    let _ = zt_common::Hook::from_u8(event.hook).map(zt_common::Hook::name);
});
