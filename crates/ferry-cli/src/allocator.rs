//! The process's allocator: mimalloc, told to commit its arenas as they are used (and, in a
//! coordinator, to hand freed memory back after 50 ms).
//!
//! mimalloc keeps freed memory for reuse: model-sized buffers and transfer chunks are allocated
//! every round, and with the system allocator each one is a fresh mapping whose every page
//! faults in again. Left to its defaults it also commits its arenas eagerly, so a process's
//! peak memory counts memory it never held at once (a node of a 10M-parameter round peaked at
//! 110 MB instead of 95-105 MB; docs/benchmarks/vs-flower.md). A node keeps freed memory for
//! mimalloc's default second: handing it back at once (`MIMALLOC_PURGE_DELAY=0`) took the node
//! to 95 MB but the round from 1.7 s to 2.2 s, every new chunk faulting its pages in again.
//! mimalloc reads these settings from the environment when the process starts, before `main`,
//! so a process started without them starts itself again with them (the same process id:
//! `exec`).

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Commit arena memory as it is used rather than all at once.
const EAGER_COMMIT: &str = "MIMALLOC_ARENA_EAGER_COMMIT";
/// Milliseconds before freed memory goes back to the system.
const PURGE_DELAY: &str = "MIMALLOC_PURGE_DELAY";

/// Whether the command line starts a coordinator (`ferry server`, or the server half of
/// `ferry bench round`).
fn is_coordinator(args: &[std::ffi::OsString]) -> bool {
    let word = |i: usize| args.get(i).and_then(|a| a.to_str());
    word(0) == Some("server")
        || (word(0) == Some("bench") && matches!(word(1), Some("round-server" | "fleet-server")))
}

/// Restarts the process (same id, same arguments) with the allocator settings in its
/// environment, unless they are there already (values the user gave are kept).
pub fn commit_memory_as_used() {
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        let mut args = std::env::args_os();
        let (Ok(exe), Some(arg0)) = (std::env::current_exe(), args.next()) else {
            return;
        };
        let args: Vec<_> = args.collect();
        let missing_commit = std::env::var_os(EAGER_COMMIT).is_none();
        // A coordinator's footprint is what an operator provisions for: it hands freed
        // transfer buffers back after 50 ms (a 20 x 10M round: 107 MB instead of 130-143 MB;
        // at once, 104 MB but a round 20% slower, every chunk faulting its pages in again).
        let missing_purge = is_coordinator(&args) && std::env::var_os(PURGE_DELAY).is_none();
        if !missing_commit && !missing_purge {
            return;
        }
        let mut command = std::process::Command::new(exe);
        command.arg0(arg0).args(&args);
        if missing_commit {
            command.env(EAGER_COMMIT, "0");
        }
        if missing_purge {
            command.env(PURGE_DELAY, "50");
        }
        // Returns only if the exec failed; the process then goes on with the defaults.
        let _ = command.exec();
    }
}
