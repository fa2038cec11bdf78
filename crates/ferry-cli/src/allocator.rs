//! The process's allocator: mimalloc, told to commit its arenas as they are used.
//!
//! mimalloc keeps freed memory for reuse: model-sized buffers and transfer chunks are allocated
//! every round, and with the system allocator each one is a fresh mapping whose every page
//! faults in again. Left to its defaults it also commits its arenas eagerly, so a process's
//! peak memory counts memory it never held at once (a node of a 10M-parameter round peaked at
//! 110 MB instead of 95-105 MB; docs/benchmarks/vs-flower.md). Freed memory is still kept for
//! mimalloc's default second: handing it back at once (`MIMALLOC_PURGE_DELAY=0`) took the node
//! to 95 MB but the round from 1.7 s to 2.2 s, every new chunk faulting its pages in again.
//! mimalloc reads the setting from the environment when the process starts, before `main`, so
//! a process started without it starts itself again with it (the same process id: `exec`).

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Commit arena memory as it is used rather than all at once.
const EAGER_COMMIT: &str = "MIMALLOC_ARENA_EAGER_COMMIT";

/// Restarts the process (same id, same arguments) with the allocator setting in its
/// environment, unless it is there already (a value the user gave is kept).
pub fn commit_memory_as_used() {
    #[cfg(unix)]
    if std::env::var_os(EAGER_COMMIT).is_none() {
        use std::os::unix::process::CommandExt;
        let mut args = std::env::args_os();
        let (Ok(exe), Some(arg0)) = (std::env::current_exe(), args.next()) else {
            return;
        };
        let mut command = std::process::Command::new(exe);
        command.arg0(arg0).args(args).env(EAGER_COMMIT, "0");
        // Returns only if the exec failed; the process then goes on with the defaults.
        let _ = command.exec();
    }
}
