//! What the fleet benchmark reads about its own process from `/proc`: memory now, CPU time
//! so far, open sockets, and the bytes a folder holds.

use std::path::Path;

/// Resident memory now, in bytes.
pub fn rss_bytes() -> Option<u64> {
    crate::bench::proc_status_bytes("VmRSS:")
}

/// User plus system CPU seconds the process has used.
pub fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces) start at its closing parenthesis.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i)?.parse::<u64>().ok();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let total = ticks(11)? + ticks(12)?;
    Some(total as f64 / clock_ticks_per_second())
}

/// The kernel's clock tick, which `/proc/*/stat` counts in: 100 on Linux.
fn clock_ticks_per_second() -> f64 {
    100.0
}

/// Sockets the process holds open (its connections and listeners).
pub fn open_sockets() -> Option<usize> {
    let entries = std::fs::read_dir("/proc/self/fd").ok()?;
    Some(
        entries
            .flatten()
            .filter(|e| {
                std::fs::read_link(e.path())
                    .is_ok_and(|target| target.to_string_lossy().starts_with("socket:"))
            })
            .count(),
    )
}

/// Bytes held by the files under `path` (0 if it does not exist).
pub fn folder_bytes(path: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else {
        return std::fs::metadata(path).map_or(0, |m| m.len());
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => folder_bytes(&e.path()),
            _ => e.metadata().map_or(0, |m| m.len()),
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        assert!(rss_bytes().is_some_and(|b| b > 0));
        assert!(cpu_seconds().is_some());
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        assert!(open_sockets().is_some_and(|n| n >= 1));
        drop(listener);
    }

    #[test]
    fn folder_bytes_adds_nested_files() {
        let dir = tempfile::tempdir().expect("tmp");
        std::fs::create_dir_all(dir.path().join("a/b")).expect("dirs");
        std::fs::write(dir.path().join("a/x"), [0u8; 10]).expect("x");
        std::fs::write(dir.path().join("a/b/y"), [0u8; 5]).expect("y");
        assert_eq!(folder_bytes(dir.path()), 15);
        assert_eq!(folder_bytes(&dir.path().join("missing")), 0);
    }
}
