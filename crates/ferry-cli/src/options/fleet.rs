//! The fleet options of `ferry simulate`: asynchronous aggregation, simulated devices and
//! compression, checked into [`FleetSettings`].

use anyhow::{Context, Result, bail};
use ferry_core::staleness::StalenessWeight;
use ferry_engine::{fedbuff::FedBuff, selection};
use ferry_sim::fleet::{DEFAULT_STEP_S, DeviceSettings, FleetSettings};

use super::{SimulateArgs, check};

impl SimulateArgs {
    /// The run's mode, devices and compression.
    pub(super) fn resolve_fleet(
        &self,
        clients: usize,
        fraction: f64,
        min_clients: usize,
    ) -> Result<FleetSettings> {
        let compress = match &self.compress {
            Some(text) => text.parse().context("--compress")?,
            None => Default::default(),
        };
        let devices = self.resolve_devices()?;
        if let Some(deadline) = self.round_deadline {
            check(deadline > 0.0 && deadline.is_finite(), || {
                format!("--round-deadline must be a positive number of seconds, got {deadline}")
            })?;
            check(devices.is_some(), || {
                "--round-deadline is in simulated seconds: give the run simulated devices \
                 (--speed, --availability, --bandwidth, --step-time or --trace)"
                    .into()
            })?;
        }
        let fedbuff = match self.mode.as_deref().unwrap_or("sync") {
            "sync" => {
                for (flag, given) in [
                    ("--buffer-size", self.buffer_size.is_some()),
                    ("--max-concurrency", self.max_concurrency.is_some()),
                    ("--staleness", self.staleness.is_some()),
                ] {
                    check(!given, || format!("{flag} applies to --mode async"))?;
                }
                None
            }
            "async" => {
                let buffer_size = self.buffer_size.unwrap_or(10);
                let cohort = selection::cohort_size(clients, fraction, min_clients);
                let max_concurrency = self
                    .max_concurrency
                    .unwrap_or(cohort.max(buffer_size).min(clients));
                let staleness: StalenessWeight = match &self.staleness {
                    Some(text) => text.parse().context("--staleness")?,
                    None => StalenessWeight::default(),
                };
                Some(FedBuff {
                    buffer_size,
                    max_concurrency,
                    staleness,
                    // In asynchronous mode the deadline bounds each task.
                    task_deadline_s: self.round_deadline,
                })
            }
            other => bail!("--mode must be sync or async, got '{other}'"),
        };
        Ok(FleetSettings {
            fedbuff,
            round_deadline_s: self.round_deadline,
            devices,
            compress,
        })
    }

    /// The simulated devices, when any device option is given.
    fn resolve_devices(&self) -> Result<Option<DeviceSettings>> {
        let given = self.speed.is_some()
            || self.availability.is_some()
            || self.bandwidth.is_some()
            || self.step_time.is_some()
            || self.trace.is_some();
        if !given {
            return Ok(None);
        }
        if self.trace.is_some() {
            check(self.speed.is_none() && self.availability.is_none(), || {
                "--trace gives each node's speed and online windows; drop --speed and \
                 --availability"
                    .into()
            })?;
        }
        let defaults = DeviceSettings::default();
        let step_s = self.step_time.unwrap_or(DEFAULT_STEP_S);
        check(step_s > 0.0 && step_s.is_finite(), || {
            format!("--step-time must be a positive number of seconds, got {step_s}")
        })?;
        Ok(Some(DeviceSettings {
            speed: match &self.speed {
                Some(text) => text.parse().context("--speed")?,
                None => defaults.speed,
            },
            availability: match &self.availability {
                Some(text) => text.parse().context("--availability")?,
                None => defaults.availability,
            },
            bandwidth_mbps: self.bandwidth.as_deref().map(parse_bandwidth).transpose()?,
            step_s,
            trace: self.trace.clone(),
        }))
    }
}

/// `UP,DOWN` in Mbit/s, both positive.
fn parse_bandwidth(text: &str) -> Result<(f64, f64)> {
    let parsed = text
        .split_once(',')
        .and_then(|(up, down)| {
            Some((
                up.trim().parse::<f64>().ok()?,
                down.trim().parse::<f64>().ok()?,
            ))
        })
        .filter(|(up, down)| *up > 0.0 && *down > 0.0 && up.is_finite() && down.is_finite());
    parsed.with_context(|| {
        format!("--bandwidth is UP,DOWN in Mbit/s, both positive (for example 2,20), got '{text}'")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Result<ferry_sim::SimConfig> {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            run: SimulateArgs,
        }
        let cli = Cli::try_parse_from(std::iter::once("ferry").chain(extra.iter().copied()))?;
        cli.run.resolve()
    }

    #[test]
    fn async_defaults_follow_the_cohort_and_the_buffer() {
        let c = args(&["--clients", "100", "--fraction", "0.2", "--mode", "async"]).unwrap();
        let fedbuff = c.fleet.fedbuff.unwrap();
        assert_eq!((fedbuff.buffer_size, fedbuff.max_concurrency), (10, 20));
        assert_eq!(fedbuff.staleness, StalenessWeight::Polynomial { a: 0.5 });
        assert_eq!(fedbuff.task_deadline_s, None);
        let bounded = args(&[
            "--mode",
            "async",
            "--speed",
            "uniform:1,2",
            "--round-deadline",
            "30",
        ]);
        assert_eq!(
            bounded.unwrap().fleet.fedbuff.unwrap().task_deadline_s,
            Some(30.0)
        );
        let json = serde_json::to_value(&c).unwrap();
        assert_eq!(json["mode"], "async");
        assert_eq!(json["fedbuff"]["buffer_size"], 10);
        assert_eq!(json["compress"], "none");
    }

    #[test]
    fn misuse_is_named() {
        let cases: &[(&[&str], &str)] = &[
            (
                &["--buffer-size", "5"],
                "--buffer-size applies to --mode async",
            ),
            (&["--mode", "later"], "--mode must be sync or async"),
            (
                &["--round-deadline", "30"],
                "give the run simulated devices",
            ),
            (&["--bandwidth", "2"], "--bandwidth is UP,DOWN"),
            (&["--speed", "fast"], "unknown speed distribution"),
            (&["--trace", "t.csv", "--speed", "constant"], "drop --speed"),
            (&["--compress", "zip"], "unknown compression"),
            (
                &["--compress", "int8", "--secagg"],
                "cannot be used with SecAgg+",
            ),
            (
                &[
                    "--compress",
                    "int8",
                    "--dp-noise-multiplier",
                    "1",
                    "--dp-clip",
                    "0.1",
                    "--dp-placement",
                    "distributed",
                ],
                "distributed differential privacy",
            ),
            (
                &[
                    "--mode",
                    "async",
                    "--dp-noise-multiplier",
                    "1",
                    "--dp-clip",
                    "0.1",
                ],
                "not available in asynchronous mode",
            ),
            (&["--mode", "async", "--secagg"], "SecAgg+ is not available"),
            (
                &[
                    "--mode",
                    "async",
                    "--aggregator",
                    "krum",
                    "--buffer-size",
                    "3",
                ],
                "buffer-size 3 is below",
            ),
        ];
        for (flags, expected) in cases {
            let e = format!("{:#}", args(flags).unwrap_err());
            assert!(e.contains(expected), "{flags:?}: {e}");
        }
        // Central DP composes with compression: the server clips each decoded update.
        let central = [
            "--compress",
            "int8",
            "--dp-noise-multiplier",
            "1",
            "--dp-clip",
            "0.1",
        ];
        assert!(args(&central).is_ok());
    }
}
