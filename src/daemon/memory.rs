//! How the daemon asks the C allocator to behave: big buffers go back to the kernel
//! when freed.
//!
//! glibc's malloc serves a request of `M_MMAP_THRESHOLD` or more with its own mapping,
//! unmapped on free; but by default the threshold rises to the size of any such buffer
//! freed (up to 32 MiB), after which buffers that big come from the heap arenas and
//! stay in the process once freed. A sync of a 100,000-user node frees several
//! buffers of 1–4 MB (the panel's body, the list being read, the state record) every
//! interval, one per node, on whichever worker thread ran it: with the moving
//! threshold they were all kept, per arena (daemon_rss: 4 nodes × 100,000 users, VmRSS
//! 75 MiB steady; with a fixed threshold 30 MiB, issue 15). Setting the threshold
//! fixes it at its default, 128 KiB. Reads and writes nothing else.

/// glibc's default threshold, fixed rather than left to move.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: libc::c_int = 128 * 1024;

/// Fixes the allocator's mmap threshold (glibc); elsewhere nothing.
pub fn return_big_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only sets a malloc parameter; it returns 0 when it refused
        // (then the default behaviour stays, which is only more memory).
        let ok = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) };
        if ok == 0 {
            tracing::debug!("mallopt(M_MMAP_THRESHOLD) refused; big buffers may stay in the heap");
        }
    }
}
