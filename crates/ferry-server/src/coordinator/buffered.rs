//! Asynchronous buffered aggregation in deployment (FedBuff), the same rule as
//! `ferry_engine::fedbuff` in simulation.
//!
//! A version is a round whose cohort is not fixed: any online node without a task in flight,
//! that has not yet contributed to the open version, is handed the open version's model when
//! it asks, while fewer than `max_concurrency` tasks are in flight. A task outlives the version
//! it was given in: its node uploads for the round it trained on, and the update is stored
//! with that round and folded into the open version weighted by its staleness. Once
//! `buffer_size` updates are in, the version closes and commits as a round does, and the next
//! one opens at once. A task not delivered within `round_timeout` frees its slot. A restarted
//! coordinator re-folds the open version's stored updates with the staleness each was stored
//! with; tasks in flight when it stopped are lost, and their nodes are given new ones.

use std::time::Instant;

use ferry_core::staleness::Weighted;
use ferry_engine::fedbuff::FedBuff;

use crate::coordinator::{Coordinator, NodeTask, State, Training, unix_ms};

/// A task handed to a node in an asynchronous run, until its update arrives or it expires.
pub(super) struct InFlight {
    /// What the node was told (its round is the version it trains on).
    pub(super) task: NodeTask,
    /// When its slot is given back without an update.
    pub(super) deadline: Instant,
}

/// Where an update for a round goes: the round it is counted in, and its staleness weight
/// (asynchronous runs only).
pub(super) struct Destination {
    pub(super) round: u32,
    pub(super) staleness: Option<(u64, f64)>,
}

impl Coordinator {
    /// FedBuff's settings, when the run aggregates asynchronously.
    pub(super) fn buffered(&self) -> Option<&FedBuff> {
        self.spec.asynchronous.as_ref()
    }

    /// An asynchronous run's task for `node`: the one it has in flight, or a new one from the
    /// open version if a slot is free and the node has not contributed to it yet.
    pub(super) fn buffered_task(
        &self,
        state: &mut State,
        buffer: &FedBuff,
        node: &str,
    ) -> Option<NodeTask> {
        if let Some(flight) = state.in_flight.get(node) {
            return Some(flight.task.clone());
        }
        let free = state.in_flight.len() < buffer.max_concurrency;
        let t = state.training.as_ref()?;
        // `answered` holds every node whose update the version folded or refused.
        if !free || t.answered.contains(node) {
            return None;
        }
        let deadline = Instant::now() + self.spec.round_timeout;
        let task = NodeTask {
            deadline_unix_ms: unix_ms(deadline),
            ..self.node_task(state, t)
        };
        if let Some(t) = state.training.as_mut() {
            t.cohort.insert(node.to_string());
        }
        state.in_flight.insert(
            node.to_string(),
            InFlight {
                task: task.clone(),
                deadline,
            },
        );
        Some(task)
    }

    /// Where `node`'s update for `round` is counted, if it may deliver one now: the open
    /// round for a cohort node of a synchronous run; the open version, with the update's
    /// staleness weight, for the node's task in flight in an asynchronous one.
    pub(super) fn destination(&self, state: &State, node: &str, round: u32) -> Option<Destination> {
        let t = state.training.as_ref()?;
        let open = t.plan_task.round;
        let Some(buffer) = self.buffered() else {
            let waiting = open == round && t.cohort.contains(node) && !t.answered.contains(node);
            return waiting.then_some(Destination {
                round,
                staleness: None,
            });
        };
        (Self::in_flight_for(state, node, round) && round <= open).then(|| {
            let tau = u64::from(open - round);
            Destination {
                round: open,
                staleness: Some((tau, buffer.staleness.weight(tau))),
            }
        })
    }

    /// Whether `node` has its task on `round`'s model in flight (asynchronous runs only).
    pub(super) fn in_flight_for(state: &State, node: &str, round: u32) -> bool {
        state
            .in_flight
            .get(node)
            .is_some_and(|f| f.task.task.round == round)
    }

    /// Asynchronous runs: the refusal of `node`'s update for `round` that found no version to
    /// join (the one it was headed for is being committed, or closed while it was stored)
    /// while its task is still in flight: it is sent again, into the next version.
    pub(super) fn send_again(
        state: &State,
        node: &str,
        round: u32,
    ) -> Option<crate::coordinator::Refusal> {
        Self::in_flight_for(state, node, round).then(|| {
            crate::coordinator::Refusal::NotYet(format!(
                "version {} closed before this update could join it; send it again in a \
                 moment, into the next version",
                state.round
            ))
        })
    }

    /// Folds `source` into the open version with its staleness weight, or as it is in a
    /// synchronous round; notes the staleness.
    pub(super) fn fold_weighted(
        t: &mut Training,
        node: &str,
        source: &mut dyn ferry_core::aggregate::UpdateSource,
        staleness: Option<(u64, f64)>,
    ) -> Result<(), ferry_core::CoreError> {
        let Some((tau, weight)) = staleness else {
            return t.open.accept_source(node, source);
        };
        t.open
            .accept_source(node, &mut Weighted::new(source, weight))?;
        t.staleness.add(tau, weight);
        metrics::histogram!("ferry_update_staleness").record(tau as f64);
        Ok(())
    }

    /// An asynchronous run's open version: frees the slots of tasks past their deadline and
    /// closes the version once its buffer is full. Returns whether waiting nodes may now have
    /// work.
    pub(super) async fn step_buffered(
        &self,
        state: &mut State,
        buffer: &FedBuff,
        now: Instant,
    ) -> Result<bool, crate::ServerError> {
        let before = state.in_flight.len();
        let mut expired = Vec::new();
        state.in_flight.retain(|node, flight| {
            let keep = flight.deadline > now;
            if !keep {
                expired.push((node.clone(), flight.task.task.round));
            }
            keep
        });
        if let Some(t) = state.training.as_mut() {
            for (node, round) in &expired {
                t.open.fail(
                    node,
                    format!("its task on round {round}'s model was not delivered in time"),
                );
            }
        }
        let full = state
            .training
            .as_ref()
            .is_some_and(|t| t.open.accepted() >= buffer.buffer_size);
        if full {
            self.close_round(state).await?;
            return Ok(true);
        }
        Ok(state.in_flight.len() < before)
    }
}
