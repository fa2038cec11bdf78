//! The trainer's processes: the user's command started so that it dies with the node (a node
//! killed mid-round must not leave a trainer writing to the folders its next start will use),
//! how a process that did not succeed ended, and what of its stderr a failure report keeps.

use std::{
    io,
    process::{Child, Command, ExitStatus, Stdio},
    sync::mpsc,
};

/// Times a trainer killed by a signal is started again on its task (it resumes from its
/// checkpoint folder) before the task is given up.
pub(super) const RESTARTS_AFTER_KILL: u32 = 3;

/// The user's command, split into the program and its arguments.
#[derive(Debug, Clone)]
pub struct TrainerCommand {
    program: String,
    args: Vec<String>,
}

impl TrainerCommand {
    /// Splits `command` on whitespace; the first word is the program.
    pub fn parse(command: &str) -> Result<Self, String> {
        let mut words = command.split_whitespace().map(String::from);
        let program = words.next().ok_or(
            "--trainer-cmd is empty; give the command to run, for example \"python3 train.py\"",
        )?;
        Ok(Self {
            program,
            args: words.collect(),
        })
    }

    /// A process of the command, with the given extra arguments, stdout inherited and stderr
    /// piped (so a failure can be reported with its last lines), that is killed when the
    /// thread starting it ends (on Linux; the node process ending ends every thread).
    pub(super) fn command(&self) -> Command {
        let mut command = Command::new(&self.program);
        command
            .args(&self.args)
            .stdout(Stdio::inherit())
            .stderr(Stdio::piped());
        die_with_parent(&mut command);
        command
    }

    /// The failure report for a command that could not start.
    pub(super) fn cannot_run(&self, e: &io::Error) -> String {
        format!("cannot run the trainer command '{}': {e}", self.program)
    }
}

/// Asks the kernel to SIGKILL the process when the thread that started it ends.
#[cfg(target_os = "linux")]
fn die_with_parent(command: &mut Command) {
    use std::os::unix::process::CommandExt;
    let parent = std::process::id();
    // SAFETY: the closure runs in the child between fork and exec and only makes two
    // async-signal-safe system calls (prctl, getppid) without allocating.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The node died between fork and prctl: nothing would kill this process later.
            if libc::getppid() as u32 != parent {
                return Err(io::Error::other(
                    "the node stopped while starting its trainer",
                ));
            }
            Ok(())
        });
    }
}

/// Elsewhere the trainer outlives a node that is killed; a node that stops by itself still
/// stops its trainer.
#[cfg(not(target_os = "linux"))]
fn die_with_parent(_command: &mut Command) {}

/// Keeps alive the thread a long-lived trainer was started from (and so the trainer) until
/// it is dropped.
#[derive(Debug)]
pub(super) struct StarterThread {
    _hold: mpsc::Sender<()>,
}

/// Starts `command` from a thread of its own that lives until the returned [`StarterThread`]
/// is dropped: a process tied to the thread that started it ([`TrainerCommand::command`])
/// then lives as long as its owner, not as long as the worker thread that asked for it.
pub(super) fn spawn_kept(mut command: Command) -> io::Result<(Child, StarterThread)> {
    let (give, started) = mpsc::channel();
    let (hold, release) = mpsc::channel::<()>();
    std::thread::Builder::new()
        .name("trainer-starter".into())
        .spawn(move || {
            if give.send(command.spawn()).is_ok() {
                // Returns once the StarterThread is dropped.
                let _ = release.recv();
            }
        })?;
    let child = started
        .recv()
        .map_err(|_| io::Error::other("the trainer's starter thread ended early"))??;
    Ok((child, StarterThread { _hold: hold }))
}

/// How a trainer process that did not succeed ended.
pub(super) enum Ended {
    /// A signal killed it: starting it again may finish the task.
    Killed(String),
    /// It failed by itself, or could not start.
    Failed(String),
}

impl Ended {
    /// `status` with `report` (the status and the end of stderr, in words): killed by a
    /// signal or failed by itself.
    pub(super) fn from_status(status: ExitStatus, report: String) -> Self {
        match std::os::unix::process::ExitStatusExt::signal(&status) {
            Some(_) => Ended::Killed(report),
            None => Ended::Failed(report),
        }
    }
}

impl From<Ended> for String {
    fn from(ended: Ended) -> Self {
        match ended {
            Ended::Killed(why) | Ended::Failed(why) => why,
        }
    }
}

/// The last lines a failed trainer wrote to stderr (at most 10 lines and 1,500 characters),
/// as `; stderr: ...`, so the node's failure report says why.
pub(super) fn stderr_tail(text: &str) -> String {
    let lines: Vec<&str> = text.trim_end().lines().collect();
    let tail = lines[lines.len().saturating_sub(10)..].join("\n");
    if tail.is_empty() {
        return String::new();
    }
    let start = tail.char_indices().rev().nth(1499).map_or(0, |(i, _)| i);
    format!("; stderr: {}", &tail[start..])
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use ferry_harness::process::{ends_within, running};
    use std::time::Duration;

    #[test]
    fn a_kept_trainer_lives_while_its_starter_is_held_and_dies_when_it_is_dropped() {
        let command = TrainerCommand::parse("sleep 30").expect("command");
        let (mut child, starter) = spawn_kept(command.command()).expect("starts");
        let pid = child.id();
        // The thread that asked is not the one that started it: it ends, the trainer stays.
        std::thread::spawn(|| ()).join().expect("joins");
        std::thread::sleep(Duration::from_millis(200));
        assert!(running(pid), "the trainer lives while its starter is held");
        drop(starter);
        assert!(
            ends_within(pid, Duration::from_secs(10)),
            "the trainer dies with its starter thread"
        );
        let _ = child.wait();
    }

    #[test]
    fn a_trainer_started_by_a_thread_dies_when_that_thread_ends() {
        let command = TrainerCommand::parse("sleep 30").expect("command");
        let mut child = std::thread::spawn(move || command.command().spawn().expect("starts"))
            .join()
            .expect("joins");
        assert!(
            ends_within(child.id(), Duration::from_secs(10)),
            "the trainer dies with the thread that started it"
        );
        let status = child.wait().expect("reaped");
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGKILL)
        );
    }

    #[test]
    fn the_end_of_stderr_is_kept_within_bounds() {
        let text: String = (0..30).map(|i| format!("line {i}\n")).collect();
        let tail = stderr_tail(&text);
        assert!(tail.starts_with("; stderr: line 20\n"), "{tail}");
        assert!(tail.ends_with("line 29"), "{tail}");
        assert_eq!(stderr_tail(" \n"), "");
        let long = "x".repeat(5000);
        assert_eq!(stderr_tail(&long).len(), "; stderr: ".len() + 1500);
    }
}
