//! The device side (`rdma` feature): RAII wrappers over libibverbs objects and the READ
//! transfer loop.
//!
//! Ownership mirrors the verbs object tree so that dropping frees in reverse order of
//! creation: a [`QueuePair`] owns its completion queue and holds its protection domain; a
//! [`MemoryRegion`] holds its protection domain; a protection domain and a completion queue
//! hold the device context. Each holds its parent through an `Arc`, so a parent is freed
//! only after its last child.

#[allow(
    non_camel_case_types,
    non_upper_case_globals,
    non_snake_case,
    dead_code,
    unnecessary_transmutes,
    clippy::all,
    clippy::pedantic
)]
pub(crate) mod sys {
    include!(concat!(env!("OUT_DIR"), "/verbs_sys.rs"));
}

mod device;
mod memory;
mod qp;
mod read;

pub use device::Device;
pub use memory::{MemoryRegion, ProtectionDomain};
pub use qp::QueuePair;
pub use read::{read_blocks, ReadTransfer};

use std::ffi::{c_char, CStr};

use crate::config::Access;

// Access bits are part of the verbs ABI; fail the build if a header ever disagrees.
const _: () = {
    assert!(Access::LOCAL_WRITE.bits() == sys::IBV_ACCESS_LOCAL_WRITE);
    assert!(Access::REMOTE_WRITE.bits() == sys::IBV_ACCESS_REMOTE_WRITE);
    assert!(Access::REMOTE_READ.bits() == sys::IBV_ACCESS_REMOTE_READ);
    assert!(Access::RELAXED_ORDERING.bits() == sys::IBV_ACCESS_RELAXED_ORDERING);
};

/// A C string from libibverbs, or `fallback` when it returns NULL.
fn c_str(p: *const c_char, fallback: &str) -> String {
    if p.is_null() {
        return fallback.to_string();
    }
    // SAFETY: libibverbs returns NUL-terminated static or device-owned strings.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}
