//! Simulated devices: each node's compute speed, link bandwidth and the windows of simulated
//! time it is online, so that a simulated run can report accuracy against time and bytes,
//! and synchronous and asynchronous runs can be compared on the same fleet.
//!
//! A device profile comes from a distribution drawn from the run seed, or from a trace (CSV
//! rows `node,online_from,online_to,speed[,up_mbps,down_mbps]`, one row per online window).
//! Time is in simulated seconds from the start of the run.

mod distribution;

pub use distribution::{Availability, SpeedDistribution};

use ferry_core::seed::mix_seed;

use crate::EngineError;

/// Stream mixed into the run seed for device draws, apart from every other draw.
const DEVICE_STREAM: u64 = 0x6465_7669_6365;

/// One node's device.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceProfile {
    /// Compute speed relative to the reference device.
    pub speed: f64,
    /// Uplink, bytes per second (infinite: transfers take no time).
    pub up_bytes_per_s: f64,
    /// Downlink, bytes per second.
    pub down_bytes_per_s: f64,
    /// Online windows `[from, to)`, sorted and disjoint; `to` may be infinite.
    pub online: Vec<(f64, f64)>,
}

impl DeviceProfile {
    /// Whether the node is online at `t`.
    pub fn online_at(&self, t: f64) -> bool {
        self.window_at(t).is_some()
    }

    /// When the online window holding `t` ends (`None` when offline at `t`).
    pub fn online_until(&self, t: f64) -> Option<f64> {
        self.window_at(t).map(|(_, to)| to)
    }

    /// The first moment at or after `t` when the node is online; `None` if never again.
    pub fn next_online(&self, t: f64) -> Option<f64> {
        if self.online_at(t) {
            return Some(t);
        }
        let i = self.online.partition_point(|&(from, _)| from <= t);
        self.online.get(i).map(|&(from, _)| from)
    }

    fn window_at(&self, t: f64) -> Option<(f64, f64)> {
        let i = self.online.partition_point(|&(from, _)| from <= t);
        let (from, to) = *self.online.get(i.checked_sub(1)?)?;
        (from <= t && t < to).then_some((from, to))
    }
}

/// One task's simulated timeline on a node.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Timeline {
    /// When the node's update has fully arrived, if it stays online that long.
    pub done_at: f64,
    /// When the node goes offline, if that happens before `done_at`: the task is lost then.
    pub lost_at: Option<f64>,
}

impl Timeline {
    /// When the coordinator knows the task's outcome: its update arrived, or the node left.
    pub fn ends_at(&self) -> f64 {
        self.lost_at.unwrap_or(self.done_at)
    }
}

/// The simulated fleet: a profile per node and the reference device's time per SGD step.
#[derive(Debug, Clone, PartialEq)]
pub struct Devices {
    profiles: Vec<DeviceProfile>,
    step_s: f64,
}

impl Devices {
    /// A fleet of these profiles, where a reference device takes `step_s` simulated seconds
    /// per local SGD step.
    pub fn new(profiles: Vec<DeviceProfile>, step_s: f64) -> Result<Self, EngineError> {
        if !(step_s > 0.0 && step_s.is_finite()) {
            return Err(EngineError::Settings(format!(
                "the step time must be a positive number of simulated seconds, got {step_s}"
            )));
        }
        for (node, p) in profiles.iter().enumerate() {
            let fine = p.speed > 0.0
                && p.speed.is_finite()
                && p.up_bytes_per_s > 0.0
                && p.down_bytes_per_s > 0.0
                && p.online.windows(2).all(|w| w[0].1 <= w[1].0)
                && p.online.iter().all(|&(from, to)| from < to && from >= 0.0);
            if !fine {
                return Err(EngineError::Settings(format!(
                    "node {node}'s device needs a positive speed and bandwidth and sorted, \
                     disjoint online windows"
                )));
            }
        }
        Ok(Self { profiles, step_s })
    }

    /// Draws `nodes` profiles from the distributions and `seed`; every node has the same
    /// bandwidth (in megabits per second; `None` for transfers that take no time).
    pub fn drawn(
        nodes: usize,
        speed: SpeedDistribution,
        availability: Availability,
        bandwidth_mbps: Option<(f64, f64)>,
        step_s: f64,
        seed: u64,
    ) -> Result<Self, EngineError> {
        let (up, down) = bandwidth_mbps.map_or((f64::INFINITY, f64::INFINITY), |(u, d)| {
            (mbps_to_bytes(u), mbps_to_bytes(d))
        });
        let speeds = speed.draw(nodes, mix_seed(seed, DEVICE_STREAM))?;
        let profiles = speeds
            .into_iter()
            .enumerate()
            .map(|(node, speed)| {
                let seed = mix_seed(seed, DEVICE_STREAM ^ (node as u64 + 1));
                Ok(DeviceProfile {
                    speed,
                    up_bytes_per_s: up,
                    down_bytes_per_s: down,
                    online: availability.draw(seed)?,
                })
            })
            .collect::<Result<_, EngineError>>()?;
        Self::new(profiles, step_s)
    }

    /// Reads a trace of `nodes` nodes: CSV rows `node,online_from,online_to,speed` with
    /// optional `up_mbps,down_mbps` (default: `default_mbps`, or transfers that take no
    /// time); a header row and `#` comments are skipped. Every node from 0 to `nodes - 1`
    /// needs at least one row, and one speed.
    pub fn from_trace(
        text: &str,
        nodes: usize,
        default_mbps: Option<(f64, f64)>,
        step_s: f64,
    ) -> Result<Self, EngineError> {
        let (up, down) = default_mbps.map_or((f64::INFINITY, f64::INFINITY), |(u, d)| {
            (mbps_to_bytes(u), mbps_to_bytes(d))
        });
        let mut profiles: Vec<Option<DeviceProfile>> = vec![None; nodes];
        for (number, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') || line.starts_with("node") {
                continue;
            }
            let bad = |why: &str| {
                EngineError::Settings(format!(
                    "trace line {}: {why} (expected node,online_from,online_to,speed\
                     [,up_mbps,down_mbps], times in simulated seconds, to may be inf)",
                    number + 1
                ))
            };
            let fields: Vec<&str> = line.split(',').map(str::trim).collect();
            if fields.len() != 4 && fields.len() != 6 {
                return Err(bad(&format!("{} fields", fields.len())));
            }
            let node: usize = fields[0]
                .parse()
                .map_err(|_| bad("the node is not a number"))?;
            let number_at = |i: usize| -> Result<f64, EngineError> {
                fields[i]
                    .parse::<f64>()
                    .ok()
                    .filter(|v| !v.is_nan())
                    .ok_or_else(|| bad(&format!("'{}' is not a number", fields[i])))
            };
            let (from, to, speed) = (number_at(1)?, number_at(2)?, number_at(3)?);
            let (node_up, node_down) = if fields.len() == 6 {
                (mbps_to_bytes(number_at(4)?), mbps_to_bytes(number_at(5)?))
            } else {
                (up, down)
            };
            let slot = profiles.get_mut(node).ok_or_else(|| {
                bad(&format!(
                    "node {node} is not in the run's {nodes} nodes (0 to {})",
                    nodes.saturating_sub(1)
                ))
            })?;
            let profile = slot.get_or_insert_with(|| DeviceProfile {
                speed,
                up_bytes_per_s: node_up,
                down_bytes_per_s: node_down,
                online: Vec::new(),
            });
            if profile.speed != speed {
                return Err(bad(&format!(
                    "node {node} has speed {} on an earlier line and {speed} here",
                    profile.speed
                )));
            }
            profile.online.push((from, to));
        }
        let mut complete = Vec::with_capacity(nodes);
        for (node, profile) in profiles.into_iter().enumerate() {
            let mut profile = profile.ok_or_else(|| {
                EngineError::Settings(format!(
                    "the trace has no row for node {node}; it needs rows for nodes 0 to {}",
                    nodes - 1
                ))
            })?;
            profile.online.sort_by(|a, b| a.0.total_cmp(&b.0));
            complete.push(profile);
        }
        Self::new(complete, step_s)
    }

    /// The fleet as a trace ([`Devices::from_trace`] reads it back): one row per online
    /// window that opens before `horizon_s`, each node's last one left open (the node stays
    /// online from then on), with its links in Mbit/s where they are finite. Up to the
    /// horizon the trace is the same fleet.
    pub fn to_trace(&self, horizon_s: f64) -> String {
        let mut out = String::from("node,online_from,online_to,speed,up_mbps,down_mbps\n");
        for (node, p) in self.profiles.iter().enumerate() {
            let links = if p.up_bytes_per_s.is_finite() && p.down_bytes_per_s.is_finite() {
                format!(
                    ",{},{}",
                    p.up_bytes_per_s * 8.0 / 1e6,
                    p.down_bytes_per_s * 8.0 / 1e6
                )
            } else {
                String::new()
            };
            let kept = p
                .online
                .iter()
                .filter(|(from, _)| *from < horizon_s)
                .count();
            for (i, (from, to)) in p.online.iter().take(kept).enumerate() {
                let to = if i + 1 == kept { f64::INFINITY } else { *to };
                out.push_str(&format!("{node},{from},{to},{}{links}\n", p.speed));
            }
        }
        out
    }

    /// Nodes in the fleet.
    pub fn len(&self) -> usize {
        self.profiles.len()
    }

    /// Whether the fleet has no node.
    pub fn is_empty(&self) -> bool {
        self.profiles.is_empty()
    }

    /// Node `node`'s device.
    pub fn profile(&self, node: usize) -> &DeviceProfile {
        &self.profiles[node]
    }

    /// The nodes online at `t`, ascending.
    pub fn online_at(&self, t: f64) -> Vec<usize> {
        (0..self.profiles.len())
            .filter(|&n| self.profiles[n].online_at(t))
            .collect()
    }

    /// The first moment at or after `t` when at least `count` nodes are online together;
    /// `None` if that never happens.
    pub fn when_online(&self, count: usize, t: f64) -> Option<f64> {
        let online_at = |m: f64| self.profiles.iter().filter(|p| p.online_at(m)).count();
        if online_at(t) >= count {
            return Some(t);
        }
        let mut moments: Vec<f64> = self
            .profiles
            .iter()
            .flat_map(|p| p.online.iter().map(|&(from, _)| from))
            .filter(|&from| from > t)
            .collect();
        moments.sort_by(f64::total_cmp);
        moments.dedup();
        moments.into_iter().find(|&m| online_at(m) >= count)
    }

    /// The timeline of a task given to `node` at `t`: download `down_bytes`, run `steps`
    /// local SGD steps, upload `up_bytes`; lost if the node's online window ends first.
    pub fn timeline(
        &self,
        node: usize,
        t: f64,
        steps: u64,
        down_bytes: u64,
        up_bytes: u64,
    ) -> Timeline {
        let p = &self.profiles[node];
        let done_at = t
            + transfer_s(down_bytes, p.down_bytes_per_s)
            + steps as f64 * self.step_s / p.speed
            + transfer_s(up_bytes, p.up_bytes_per_s);
        let until = p.online_until(t).unwrap_or(t);
        Timeline {
            done_at,
            lost_at: (until < done_at).then_some(until),
        }
    }
}

fn mbps_to_bytes(mbps: f64) -> f64 {
    mbps * 1e6 / 8.0
}

fn transfer_s(bytes: u64, per_s: f64) -> f64 {
    if per_s.is_infinite() {
        0.0
    } else {
        bytes as f64 / per_s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trace_gives_each_node_its_windows_speed_and_links() {
        let trace = "node,online_from,online_to,speed\n\
                     0,0,100,1\n\
                     # a comment\n\
                     0,200,inf,1\n\
                     1,50,60,0.5,8,80\n";
        let d = Devices::from_trace(trace, 2, None, 0.1).unwrap();
        assert!(d.profile(0).online_at(99.0));
        assert!(!d.profile(0).online_at(150.0));
        assert_eq!(d.profile(0).next_online(150.0), Some(200.0));
        assert_eq!(d.profile(1).next_online(61.0), None);
        assert_eq!(d.profile(1).up_bytes_per_s, 1e6);
        assert_eq!(d.online_at(55.0), vec![0, 1]);
        assert_eq!(d.when_online(2, 100.0), None);
        assert_eq!(d.when_online(1, 100.0), Some(200.0));
        // 10 steps at half speed is 2 s; 1 MB up at 1 MB/s is 1 s: past the window's end.
        let t = d.timeline(1, 55.0, 10, 0, 1_000_000);
        assert_eq!(t.done_at, 58.0);
        assert_eq!(t.lost_at, None);
        let t = d.timeline(1, 58.0, 10, 0, 1_000_000);
        assert_eq!(t.lost_at, Some(60.0));
        assert_eq!(t.ends_at(), 60.0);
    }

    #[test]
    fn bad_traces_name_the_line_and_the_fault() {
        let cases = [
            ("0,0,10\n", "line 1: 3 fields"),
            (
                "0,0,10,1\n0,20,30,2\n1,0,1,1\n",
                "line 2: node 0 has speed 1",
            ),
            ("0,0,10,1\n", "no row for node 1"),
            ("5,0,10,1\n", "node 5 is not in the run's 2 nodes"),
            ("0,0,x,1\n1,0,1,1\n", "'x' is not a number"),
            ("0,0,10,1\n0,5,20,1\n1,0,1,1\n", "disjoint"),
        ];
        for (trace, expected) in cases {
            let e = Devices::from_trace(trace, 2, None, 0.1)
                .unwrap_err()
                .to_string();
            assert!(e.contains(expected), "{trace:?}: {e}");
        }
    }

    #[test]
    fn drawn_fleets_repeat_from_the_seed_and_follow_the_distribution() {
        let speed = "stragglers:0.3,10".parse().unwrap();
        let sessions = "sessions:600,300".parse().unwrap();
        let a = Devices::drawn(100, speed, sessions, Some((1.0, 10.0)), 0.05, 7).unwrap();
        let b = Devices::drawn(100, speed, sessions, Some((1.0, 10.0)), 0.05, 7).unwrap();
        assert_eq!(a, b);
        let again = Devices::from_trace(&a.to_trace(f64::INFINITY), 100, None, 0.05).unwrap();
        assert_eq!(again, a);
        let day = Devices::from_trace(&a.to_trace(86_400.0), 100, None, 0.05).unwrap();
        for t in [0.0, 5_000.0, 80_000.0] {
            assert_eq!(day.online_at(t), a.online_at(t));
        }
        assert_eq!(day.online_at(1e7).len(), 100);
        let slow = (0..100).filter(|&n| a.profile(n).speed < 1.0).count();
        assert_eq!(slow, 30);
        // Online about two thirds of the time.
        let online: usize = (0..200)
            .map(|i| a.online_at(f64::from(i) * 500.0).len())
            .sum();
        let share = online as f64 / 20_000.0;
        assert!((0.55..0.78).contains(&share), "online share {share}");
    }

    #[test]
    fn distributions_parse_and_bad_ones_are_explained() {
        for text in [
            "constant",
            "uniform:0.5,2",
            "lognormal:0.5",
            "stragglers:0.3,10",
        ] {
            assert_eq!(text.parse::<SpeedDistribution>().unwrap().to_string(), text);
        }
        for bad in [
            "fast",
            "uniform:2,1",
            "stragglers:2,10",
            "stragglers:0.3,0.5",
        ] {
            assert!(bad.parse::<SpeedDistribution>().is_err(), "{bad}");
        }
        assert_eq!(
            "sessions:600,300"
                .parse::<Availability>()
                .unwrap()
                .to_string(),
            "sessions:600,300"
        );
        let e = "sessions:0,1"
            .parse::<Availability>()
            .unwrap_err()
            .to_string();
        assert!(e.contains("expected always or sessions"), "{e}");
    }
}
