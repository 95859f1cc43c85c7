//! What several test binaries share (Cargo builds no test of its own from this directory).
// Each binary uses a part of it.
#![allow(dead_code)]

pub mod scenario;
