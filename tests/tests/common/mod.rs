//! What several test binaries share (Cargo builds no test of its own from this directory).
// Each binary uses a part of it.
#![allow(dead_code)]

pub mod cni;
pub mod fake_api;
pub mod scenario;

/// A number from the environment, decimal or `0x…` hex, `_` allowed between digits; a value
/// that is not one fails the test rather than being ignored.
pub fn env_number(name: &str) -> Option<u64> {
    let text = std::env::var(name).ok()?;
    let text = text.trim().replace('_', "");
    let parsed = match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => text.parse(),
    };
    Some(parsed.unwrap_or_else(|_| panic!("{name}={text:?} is not a number")))
}
