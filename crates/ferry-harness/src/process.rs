//! Processes a test watches from outside: whether one it did not start has ended.

use std::time::{Duration, Instant};

/// Whether process `pid` is running (Linux, through `/proc`): a zombie, ended but not yet
/// reaped, counts as ended.
pub fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|stat| stat.split_whitespace().nth(2) != Some("Z"))
}

/// Whether process `pid` ends within `limit`, looking every 20 ms.
pub fn ends_within(pid: u32, limit: Duration) -> bool {
    let started = Instant::now();
    while started.elapsed() < limit {
        if !running(pid) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_is_seen_running_and_then_ended() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep starts");
        assert!(running(child.id()));
        assert!(!ends_within(child.id(), Duration::from_millis(100)));
        child.kill().expect("kill");
        assert!(ends_within(child.id(), Duration::from_secs(10)));
        let _ = child.wait();
        assert!(!running(child.id()));
    }
}
