//! Console progress for a run: a bar while a round trains, one line per finished round.

use ferry_core::evaluation::FederatedEvaluation;
use ferry_engine::{federation::RoundObserver, record::RoundRecord};
use indicatif::{ProgressBar, ProgressStyle};

/// Shows a progress bar on stderr (hidden when stderr is not a terminal) and prints round
/// lines on stdout.
pub struct ConsoleProgress {
    rounds: u32,
    bar: Option<ProgressBar>,
}

impl ConsoleProgress {
    /// Progress for a run of at most `rounds` rounds.
    pub fn new(rounds: u32) -> Self {
        Self { rounds, bar: None }
    }

    /// Prints a committed round's federated evaluation, which in a deployment closes after
    /// the round's own line.
    pub fn round_evaluated(&self, record: &RoundRecord) {
        let line = match &record.federated {
            Some(_) => format!(
                "round {:>3}/{} evaluated{}",
                record.round,
                self.rounds,
                federated_summary(record.federated.as_ref())
            ),
            None => format!(
                "round {:>3}/{} evaluated: no node's evaluation arrived",
                record.round, self.rounds
            ),
        };
        self.notice(&line);
    }

    /// Prints a line about the run (a refusal, a resumed round) without breaking the bar.
    pub fn notice(&self, message: &str) {
        match &self.bar {
            // A hidden bar (stderr not a terminal) would swallow the line.
            Some(bar) if !bar.is_finished() && !bar.is_hidden() => bar.println(message),
            _ => println!("{message}"),
        }
    }
}

/// A progress bar on stderr with the given indicatif template (hidden when stderr is not a
/// terminal).
pub fn progress_bar(len: u64, template: &str) -> ProgressBar {
    let style = ProgressStyle::with_template(template)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    ProgressBar::new(len).with_style(style)
}

/// Prints each node's classes (label: examples), for federations small enough to read.
pub fn print_split(classes: &[[usize; ferry_ml::data::NUM_CLASSES]]) {
    if classes.len() > 20 {
        return;
    }
    for (node, counts) in classes.iter().enumerate() {
        let held: Vec<String> = counts
            .iter()
            .enumerate()
            .filter(|(_, n)| **n > 0)
            .map(|(label, n)| format!("{label}:{n}"))
            .collect();
        println!("  node {node}: {}", held.join(" "));
    }
}

/// Bytes as a short human figure.
pub fn human_bytes(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.1} MB", b / 1e6)
    } else if b >= 1e3 {
        format!("{:.1} kB", b / 1e3)
    } else {
        format!("{bytes} B")
    }
}

impl RoundObserver for ConsoleProgress {
    fn round_started(&mut self, round: u32, selected: usize) {
        let bar = progress_bar(
            selected as u64,
            "round {msg} [{bar:30}] {pos}/{len} nodes  {elapsed}",
        );
        bar.set_message(format!("{round}/{} training", self.rounds));
        self.bar = Some(bar);
    }

    fn node_returned(&mut self, _round: u32) {
        if let Some(bar) = &self.bar {
            bar.inc(1);
        }
    }

    fn evaluating(&mut self, round: u32) {
        if let Some(bar) = &self.bar {
            bar.set_message(format!("{round}/{} evaluating", self.rounds));
        }
    }

    fn evaluation_failed(&mut self, round: u32, reasons: &[String]) {
        let first = reasons.first().map_or("", String::as_str);
        self.notice(&format!(
            "round {round}: {} node(s) could not evaluate the model; first: {first}",
            reasons.len()
        ));
    }

    fn round_finished(&mut self, r: &RoundRecord) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        let failed = if r.failures > 0 {
            format!(" ({} failed)", r.failures)
        } else {
            String::new()
        };
        let privacy = r.dp.map_or(String::new(), |dp| {
            format!(
                "  epsilon {:.3} (delta {:e})  clip {:.4}",
                dp.epsilon, dp.delta, dp.clip_norm
            )
        });
        let backdoor = r
            .attack_success_rate
            .map_or(String::new(), |asr| format!("  backdoor success {asr:.4}"));
        let left_out = if r.excluded.is_empty() {
            String::new()
        } else {
            format!("  left out {}: {}", r.excluded.len(), r.excluded.join(","))
        };
        let aborted = r.aborted.as_ref().map_or(String::new(), |why| {
            format!("  aborted, model unchanged: {why}")
        });
        let clock = r.sim_time_s.map_or(String::new(), |t| {
            format!("  simulated {}", simulated_time(t))
        });
        let stale = r.staleness.map_or(String::new(), |s| {
            format!("  staleness mean {:.1} max {}", s.mean, s.max)
        });
        let unit = if r.staleness.is_some() {
            "version"
        } else {
            "round"
        };
        println!(
            "{unit} {:>3}/{}  accuracy {}  loss {}  participants {}{}  {:.1} s{clock}{stale}  up {}  down {}{}{}{}{}{}",
            r.round,
            self.rounds,
            figure(r.accuracy),
            figure(r.loss),
            r.participants,
            failed,
            r.wall_s,
            human_bytes(r.bytes_up),
            human_bytes(r.bytes_down),
            privacy,
            backdoor,
            left_out,
            aborted,
            federated_summary(r.federated.as_ref())
        );
    }
}

/// Simulated seconds as `1h02m`, `3m20s` or `12.5s`.
pub fn simulated_time(seconds: f64) -> String {
    let whole = seconds as u64;
    match whole {
        0..60 => format!("{seconds:.1}s"),
        60..3600 => format!("{}m{:02}s", whole / 60, whole % 60),
        _ => format!("{}h{:02}m", whole / 3600, whole % 3600 / 60),
    }
}

/// A federated evaluation in a round line: `  federated accuracy 0.8123 (min 0.7010, median
/// 0.8150, max 0.8901 over 3 nodes) loss 0.5120`; empty without one.
pub fn federated_summary(federated: Option<&FederatedEvaluation>) -> String {
    federated.map_or(String::new(), |f| {
        let failed = if f.failures > 0 {
            format!(", {} failed", f.failures)
        } else {
            String::new()
        };
        format!(
            "  federated accuracy {:.4} (min {:.4}, median {:.4}, max {:.4} over {} nodes{failed}) loss {:.4}",
            f.accuracy, f.accuracy_min, f.accuracy_median, f.accuracy_max, f.nodes, f.loss
        )
    })
}

/// Prints how evenly the final model serves the sites that scored it, when they did:
/// `fairness over 20 sites: worst site-3 0.6123, worst 10% (2 sites) 0.6500, mean 0.8012,
/// spread 0.2100, std 0.0512`.
pub fn print_fairness(fairness: Option<&ferry_core::fairness::FairnessReport>) {
    if let Some(f) = fairness {
        println!(
            "fairness over {} sites: worst {} {:.4}, worst 10% ({} sites) {:.4}, mean {:.4}, \
             spread {:.4}, std {:.4}",
            f.sites,
            f.worst_site,
            f.worst_accuracy,
            f.worst_tenth_sites,
            f.worst_tenth_accuracy,
            f.mean_accuracy,
            f.spread,
            f.std
        );
    }
}

/// One line on what the sites gain over training alone, for example
/// `gain over training alone on each site's held-out data: mean +0.1520, least 7 -0.0300 (1 of
/// 10 sites worse off)`; nothing without baselines' per-site figures.
pub fn print_local_gain(gain: Option<&ferry_core::fairness::LocalGain>) {
    if let Some(g) = gain {
        println!(
            "gain over training alone on each site's held-out data: mean {:+.4}, least {} \
             {:+.4} ({} of {} sites worse off)",
            g.mean_gain, g.worst_site, g.worst_gain, g.sites_worse_off, g.sites
        );
    }
}

/// A figure to four decimals, or `-` when it was not measured (NaN).
pub fn figure(value: f64) -> String {
    if value.is_nan() {
        "-".to_string()
    } else {
        format!("{value:.4}")
    }
}

/// Two observers fed the same events, in order.
pub struct Both<A, B>(pub A, pub B);

impl<A: RoundObserver, B: RoundObserver> RoundObserver for Both<A, B> {
    fn round_started(&mut self, round: u32, selected: usize) {
        self.0.round_started(round, selected);
        self.1.round_started(round, selected);
    }

    fn node_returned(&mut self, round: u32) {
        self.0.node_returned(round);
        self.1.node_returned(round);
    }

    fn evaluating(&mut self, round: u32) {
        self.0.evaluating(round);
        self.1.evaluating(round);
    }

    fn evaluation_failed(&mut self, round: u32, reasons: &[String]) {
        self.0.evaluation_failed(round, reasons);
        self.1.evaluation_failed(round, reasons);
    }

    fn round_finished(&mut self, record: &RoundRecord) {
        self.0.round_finished(record);
        self.1.round_finished(record);
    }
}

#[cfg(test)]
mod tests {
    use super::human_bytes;

    #[test]
    fn simulated_time_is_shown_in_its_largest_units() {
        assert_eq!(super::simulated_time(12.54), "12.5s");
        assert_eq!(super::simulated_time(200.0), "3m20s");
        assert_eq!(super::simulated_time(3725.0), "1h02m");
    }

    #[test]
    fn bytes_are_shown_in_the_largest_fitting_unit() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1_777_040), "1.8 MB");
        assert_eq!(human_bytes(4_000_000_000), "4.00 GB");
    }
}
