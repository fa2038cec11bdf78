//! One fuzz run: inputs from the [`Mutator`] fed to a decoder, each panic and each oversized
//! allocation kept with the input that caused it.

use std::{
    collections::BTreeMap,
    panic::{AssertUnwindSafe, catch_unwind},
};

use crate::{
    mutate::{Framing, Mutator},
    probe,
};

/// A decoder under test.
pub struct Target {
    /// The name the command line uses.
    pub name: &'static str,
    /// What the decoder reads, and from whom.
    pub about: &'static str,
    /// Valid encodings, the starting points of mutation.
    pub seeds: fn() -> Vec<Vec<u8>>,
    /// How the seeds are framed.
    pub framing: Framing,
    /// Decodes one input: `Ok` when it is accepted, the typed error's kind when refused.
    pub decode: fn(&[u8]) -> Result<(), String>,
}

/// An input that broke a rule, and how.
#[derive(Debug, Clone)]
pub struct Finding {
    /// The input, to replay it.
    pub input: Vec<u8>,
    /// The panic's message, or the allocation's size against the cap.
    pub what: String,
}

/// What one run saw.
#[derive(Debug, Default)]
pub struct Report {
    /// Inputs tried.
    pub inputs: u64,
    /// Inputs the decoder accepted.
    pub accepted: u64,
    /// Refusals, counted by error kind.
    pub refusals: BTreeMap<String, u64>,
    /// Inputs that panicked.
    pub panics: u64,
    /// Inputs that made an allocation larger than [`allocation_cap`].
    pub oversized: u64,
    /// The first few inputs that panicked or allocated too much, to replay.
    pub findings: Vec<Finding>,
    /// The largest single allocation of any input, when the probe is installed.
    pub largest_allocation: Option<usize>,
}

impl Report {
    /// Whether no input panicked or allocated past the cap.
    pub fn is_clean(&self) -> bool {
        self.panics == 0 && self.oversized == 0
    }

    /// Inputs refused with a typed error.
    pub fn refused(&self) -> u64 {
        self.refusals.values().sum()
    }

    fn keep(&mut self, input: &[u8], what: String) {
        if self.findings.len() < KEPT {
            self.findings.push(Finding {
                input: input.to_vec(),
                what,
            });
        }
    }
}

/// An input for a target whose first byte picks what the rest is (a message type, a file
/// kind, a width): the byte, then `body`.
pub fn tagged(tag: u8, body: &[u8]) -> Vec<u8> {
    [&[tag][..], body].concat()
}

/// A [`tagged`] input's tag and body, or the error kind `Empty`.
pub fn untag(input: &[u8]) -> Result<(u8, &[u8]), String> {
    input
        .split_first()
        .map(|(&tag, body)| (tag, body))
        .ok_or_else(|| "Empty".to_string())
}

/// Findings kept: enough to replay, without filling memory when a bug fires on
/// every input.
const KEPT: usize = 16;

/// The most one input may make the decoder allocate at once: a fixed 1 MiB plus 16 bytes per
/// input byte (a float tensor decoded from bytes takes 1x to 2x its input). A header that
/// claims 4 GB must not get them.
pub fn allocation_cap(input_len: usize) -> usize {
    (1 << 20) + 16 * input_len
}

/// Feeds `inputs` inputs, generated from `seed`, to `target`; `progress` hears the count done
/// every 10,000 inputs.
pub fn run(target: &Target, inputs: u64, seed: u64, mut progress: impl FnMut(u64)) -> Report {
    let mut mutator = Mutator::new((target.seeds)(), target.framing, seed);
    let mut report = Report::default();
    quiet_while_fuzzing();
    FUZZING.with(|f| f.set(true));
    for done in 0..inputs {
        let input = mutator.next_input();
        let (outcome, largest) =
            probe::measure(|| catch_unwind(AssertUnwindSafe(|| (target.decode)(&input))));
        report.inputs += 1;
        match outcome {
            Ok(Ok(())) => report.accepted += 1,
            Ok(Err(kind)) => *report.refusals.entry(kind).or_default() += 1,
            Err(payload) => {
                report.panics += 1;
                let what = payload
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_string()))
                    .unwrap_or_else(|| "a panic without a message".into());
                report.keep(&input, format!("panicked: {what}"));
            }
        }
        if let Some(largest) = largest {
            let cap = allocation_cap(input.len());
            if largest > cap {
                report.oversized += 1;
                let what = format!(
                    "allocated {largest} bytes at once from a {}-byte input (cap {cap})",
                    input.len()
                );
                report.keep(&input, what);
            }
            report.largest_allocation = report.largest_allocation.max(Some(largest));
        }
        if (done + 1) % 10_000 == 0 {
            progress(done + 1);
        }
    }
    FUZZING.with(|f| f.set(false));
    report
}

thread_local! {
    /// Whether this thread is feeding a decoder, whose panics are expected and counted.
    static FUZZING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Installs, once, a panic hook that stays silent for panics on fuzzing threads and passes
/// every other panic (a failing test's, say) to the hook that was there before.
fn quiet_while_fuzzing() {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !FUZZING.with(std::cell::Cell::get) {
                previous(info);
            }
        }));
    });
}
