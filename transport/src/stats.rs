//! Bytes ferry's own code copies on the data path, counted per thread.
//!
//! The counts bench (`cargo bench -p ferry-benches --bench counts`) runs the gateway and the agent
//! each on a thread of its own and reads this counter there, to say how many bytes per request and
//! per MiB of body our code moves from one buffer to another (what yamux, tungstenite and hyper
//! copy is not ours and not counted here). A thread-local add costs about as much as the length
//! check beside it, so it stays on in the shipped binaries.

use std::cell::Cell;

thread_local! {
    static COPIED: Cell<u64> = const { Cell::new(0) };
}

/// Counts `n` bytes copied by this thread.
#[inline]
pub fn copied(n: usize) {
    COPIED.with(|c| c.set(c.get().wrapping_add(n as u64)));
}

/// Bytes copied by ferry's transport code on this thread since it started.
pub fn copied_on_this_thread() -> u64 {
    COPIED.with(Cell::get)
}
