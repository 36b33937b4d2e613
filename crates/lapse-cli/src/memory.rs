//! Handing freed memory back to the system.
//!
//! Under steady load the broker's live heap stays flat (heaptrack over a soak:
//! peak 7.9 MiB, nothing left at exit), yet with glibc its resident memory grew for
//! as long as the soak ran: each thread's arena keeps the pages of whatever it
//! freed, so resident memory follows the high-water mark of every arena, and
//! every stall that queues work raises one of them. `malloc_trim` returns those
//! free pages (all arenas, not only the top of the main heap). Other allocators
//! were tried first (BENCHMARKS.md, soak): jemalloc and mimalloc kept more.

use std::time::Duration;

/// How often: cheap (it walks free chunks of a heap of tens of MiB), and often
/// enough that a burst's memory is back within seconds.
pub const TRIM_PERIOD: Duration = Duration::from_secs(10);

/// Starts a thread that trims every `period`. Its own thread, not a task on the
/// blocking pool: a pool thread made for it would come with an arena of its own.
pub fn give_back_freed_memory_every(period: Duration) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let started = std::thread::Builder::new()
            .name("lapse-trim".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(period);
                    trim();
                }
            });
        if let Err(e) = started {
            // Only resident memory is at stake, never correctness.
            tracing::warn!(error = %e, "cannot start the memory trimmer");
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = period;
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[expect(
    unsafe_code,
    reason = "malloc_trim is a C function; see the SAFETY note"
)]
fn trim() {
    // SAFETY: `malloc_trim` takes no pointers from us: it walks glibc's own arenas,
    // each under that arena's lock, so it is sound to call from any thread at any
    // time while other threads allocate and free. Its result only says whether any
    // memory was released.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod tests {
    /// Resident memory of this process, KiB.
    fn rss_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS")
    }

    #[test]
    fn freed_memory_goes_back_to_the_system() {
        // Many small blocks (below the mmap threshold, so they live in the arena),
        // one in 64 kept so the heap's top stays pinned and plain `free` cannot
        // shrink it: only a trim gives the pages between back.
        let blocks: Vec<Vec<u8>> = (0..64 * 1024u32)
            .map(|i| vec![u8::try_from(i % 251).unwrap_or(0); 1024])
            .collect();
        // Allocated after them, so above them on the heap.
        let kept: Vec<Vec<u8>> = blocks.iter().step_by(64).cloned().collect();
        drop(blocks);
        let before = rss_kib();
        super::trim();
        let after = rss_kib();
        assert!(
            after + 16 * 1024 < before,
            "64 MiB freed, but resident memory went only {before} -> {after} KiB"
        );
        assert_eq!(kept.len(), 1024);
    }
}
