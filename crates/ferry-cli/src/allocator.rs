//! The process's allocator: mimalloc, told to hand freed memory back to the system at once.
//!
//! mimalloc keeps freed memory for reuse: model-sized buffers are allocated every round, and
//! with the system allocator each one is a fresh mapping whose every page faults in again. Left
//! to its defaults it also keeps what was freed for a second and commits its arenas eagerly, so
//! a process's peak memory counts buffers it no longer holds (a node of a 10M-parameter round
//! peaked at 110 MB instead of 95 MB; docs/benchmarks/vs-flower.md). mimalloc reads those two
//! settings from the environment when the process starts, before `main`, so a process started
//! without them starts itself again with them (the same process id: `exec`).

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Commit arena memory as it is used rather than all at once.
const EAGER_COMMIT: &str = "MIMALLOC_ARENA_EAGER_COMMIT";
/// Milliseconds before freed memory goes back to the system.
const PURGE_DELAY: &str = "MIMALLOC_PURGE_DELAY";

/// Restarts the process (same id, same arguments) with the allocator settings in its
/// environment, unless they are there already; settings the user gave are kept.
pub fn release_freed_memory_at_once() {
    #[cfg(unix)]
    if std::env::var_os(EAGER_COMMIT).is_none() {
        use std::os::unix::process::CommandExt;
        let mut args = std::env::args_os();
        let (Ok(exe), Some(arg0)) = (std::env::current_exe(), args.next()) else {
            return;
        };
        let mut command = std::process::Command::new(exe);
        command.arg0(arg0).args(args).env(EAGER_COMMIT, "0");
        if std::env::var_os(PURGE_DELAY).is_none() {
            command.env(PURGE_DELAY, "0");
        }
        // Returns only if the exec failed; the process then goes on with the defaults.
        let _ = command.exec();
    }
}
