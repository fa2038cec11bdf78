//! How a simulated fleet behaves: synchronous rounds or asynchronous buffered aggregation,
//! simulated devices on a simulated clock, and update compression.

use std::path::PathBuf;

use ferry_core::compress::Compression;
use ferry_engine::{
    devices::{Availability, Devices, SpeedDistribution},
    fedbuff::FedBuff,
    federation::Mode,
};
use serde::{Serialize, Serializer};

use crate::SimError;

/// The reference device's simulated seconds per local SGD step when a run does not say.
pub const DEFAULT_STEP_S: f64 = 0.05;

/// Synchronous or asynchronous aggregation, devices and compression, as configured.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct FleetSettings {
    /// Asynchronous buffered aggregation's settings; `None` for synchronous rounds.
    pub fedbuff: Option<FedBuff>,
    /// On simulated devices, simulated seconds a synchronous round waits for its cohort (an
    /// asynchronous run bounds each task by it, in `fedbuff`).
    pub round_deadline_s: Option<f64>,
    /// Simulated devices; `None` measures the run in rounds only.
    pub devices: Option<DeviceSettings>,
    /// How updates (and, where sound, downloads) travel.
    pub compress: Compression,
}

/// Records name the mode (`sync` or `async`) beside the asynchronous settings.
impl Serialize for FleetSettings {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Recorded<'a> {
            mode: &'static str,
            #[serde(skip_serializing_if = "Option::is_none")]
            fedbuff: Option<&'a FedBuff>,
            #[serde(skip_serializing_if = "Option::is_none")]
            round_deadline_s: Option<f64>,
            #[serde(skip_serializing_if = "Option::is_none")]
            devices: Option<&'a DeviceSettings>,
            compress: Compression,
        }
        Recorded {
            mode: if self.fedbuff.is_some() {
                "async"
            } else {
                "sync"
            },
            fedbuff: self.fedbuff.as_ref(),
            round_deadline_s: self.round_deadline_s,
            devices: self.devices.as_ref(),
            compress: self.compress,
        }
        .serialize(s)
    }
}

/// Where the simulated devices come from.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeviceSettings {
    /// Compute speed per node, drawn from the seed (ignored with a trace).
    #[serde(serialize_with = "as_text")]
    pub speed: SpeedDistribution,
    /// Online windows per node, drawn from the seed (ignored with a trace).
    #[serde(serialize_with = "as_text")]
    pub availability: Availability,
    /// Every node's uplink and downlink in megabits per second (a trace may set its own);
    /// `None`: transfers take no simulated time.
    pub bandwidth_mbps: Option<(f64, f64)>,
    /// The reference device's simulated seconds per local SGD step.
    pub step_s: f64,
    /// A trace file (CSV `node,online_from,online_to,speed[,up_mbps,down_mbps]`) in place of
    /// the distributions.
    pub trace: Option<PathBuf>,
}

impl Default for DeviceSettings {
    fn default() -> Self {
        Self {
            speed: SpeedDistribution::Constant,
            availability: Availability::Always,
            bandwidth_mbps: None,
            step_s: DEFAULT_STEP_S,
            trace: None,
        }
    }
}

fn as_text<T: std::fmt::Display, S: Serializer>(value: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(value)
}

impl DeviceSettings {
    /// The devices of `nodes` nodes: read from the trace, or drawn from `seed`.
    pub fn devices(&self, nodes: usize, seed: u64) -> Result<Devices, SimError> {
        Ok(match &self.trace {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    SimError::Devices(format!("cannot read the trace {}: {e}", path.display()))
                })?;
                Devices::from_trace(&text, nodes, self.bandwidth_mbps, self.step_s)
                    .map_err(|e| SimError::Devices(format!("{}: {e}", path.display())))?
            }
            None => Devices::drawn(
                nodes,
                self.speed,
                self.availability,
                self.bandwidth_mbps,
                self.step_s,
                seed,
            )?,
        })
    }
}

impl FleetSettings {
    /// The engine's mode.
    pub fn mode(&self) -> Mode {
        match self.fedbuff {
            Some(fedbuff) => Mode::Buffered(fedbuff),
            None => Mode::Synchronous {
                deadline_s: self.round_deadline_s,
            },
        }
    }

    /// The run's simulated devices for `nodes` nodes: as configured, or reference devices
    /// always online for an asynchronous run that names none (it needs a clock).
    pub fn devices(&self, nodes: usize, seed: u64) -> Result<Option<Devices>, SimError> {
        match (&self.devices, self.fedbuff) {
            (Some(settings), _) => settings.devices(nodes, seed).map(Some),
            (None, Some(_)) => DeviceSettings::default().devices(nodes, seed).map(Some),
            (None, None) => Ok(None),
        }
    }
}
