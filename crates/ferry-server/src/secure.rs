//! A deployed secure round: the coordinator's SecAgg+ server and which node has done which
//! stage. Nodes drive the stages through the fleet protocol; the coordinator closes a stage
//! once every node still in it has acted, or at the stage's deadline, so a node that vanishes
//! between stages costs a timeout, not the round.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use ferry_secagg::{
    ParticipantId, PublicKeys, RevealedShare, Roster, SealedShare, SecAggError, SecAggParams,
    SecAggServer, SecureSum, UnmaskRequest,
};

use ferry_proto::secagg::MaskedSum;

use crate::refusal::Refusal;

/// One step a node takes in a secure round.
#[derive(Debug, Clone)]
pub enum SecAggStep {
    /// Stage 1: its public keys.
    Advertise(PublicKeys),
    /// Stage 1, answer: the roster.
    GetRoster,
    /// Stage 2: its sealed shares.
    Share(Vec<SealedShare>),
    /// Stage 2, answer: the shares sealed for it.
    GetInbox,
    /// Stage 4: whose secrets to reveal.
    GetUnmaskRequest,
    /// Stage 4: the shares it reveals.
    Reveal(Vec<RevealedShare>),
}

/// The coordinator's answer to a step.
#[derive(Debug, Clone)]
pub enum SecAggReply {
    /// Taken.
    Ack,
    /// Not ready: the other nodes have not caught up; ask again.
    Wait,
    /// The roster.
    Roster(Roster),
    /// The node's inbox.
    Inbox(Vec<SealedShare>),
    /// The unmask request.
    UnmaskRequest(UnmaskRequest),
}

/// What closing stages produced.
#[derive(Debug)]
pub(crate) enum Progress {
    /// Nothing to close yet.
    Waiting,
    /// A stage closed; the masked-input stage (training) has begun when `training` is set.
    Advanced {
        /// What to tell the operator.
        notice: String,
        /// The masked-input stage began: the round's training deadline starts now.
        training: bool,
    },
    /// The round's sum is unmasked.
    Finished(SecureSum),
    /// The protocol cannot finish.
    Aborted(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Stage {
    Advertising,
    Sharing,
    Masking,
    Unmasking,
    Done,
}

/// The secure part of one open round.
pub(crate) struct SecureStages {
    round: u32,
    params: SecAggParams,
    server: SecAggServer,
    stage: Stage,
    stage_timeout: Duration,
    stage_deadline: Instant,
    ids: BTreeMap<String, ParticipantId>,
    roster: Option<Roster>,
    shared: BTreeSet<String>,
    in_round: BTreeSet<String>,
    masked: BTreeSet<String>,
    request: Option<UnmaskRequest>,
    revealed: BTreeSet<String>,
}

impl SecureStages {
    /// The protocol's parameters in this round (its threshold may follow its cohort).
    pub(crate) fn params(&self) -> SecAggParams {
        self.params
    }

    /// The stage the round is in, as operators read it.
    pub(crate) fn stage_name(&self) -> &'static str {
        match self.stage {
            Stage::Advertising => "advertise keys",
            Stage::Sharing => "share keys",
            Stage::Masking => "masked input",
            Stage::Unmasking => "unmask",
            Stage::Done => "done",
        }
    }

    /// A secure round over updates of `dim` values.
    pub(crate) fn new(
        round: u32,
        params: SecAggParams,
        context: Vec<u8>,
        graph_seed: [u8; 32],
        dim: usize,
        stage_timeout: Duration,
    ) -> Self {
        Self {
            round,
            params,
            server: SecAggServer::new(params, context, graph_seed, dim),
            stage: Stage::Advertising,
            stage_timeout,
            stage_deadline: Instant::now() + stage_timeout,
            ids: BTreeMap::new(),
            roster: None,
            shared: BTreeSet::new(),
            in_round: BTreeSet::new(),
            masked: BTreeSet::new(),
            request: None,
            revealed: BTreeSet::new(),
        }
    }

    fn gone(&self, why: &str) -> Refusal {
        Refusal::NotOpen(format!(
            "secure round {}: {why}; the round goes on without this node",
            self.round
        ))
    }

    fn id_of(&self, node: &str) -> Result<ParticipantId, Refusal> {
        self.ids
            .get(node)
            .copied()
            .ok_or_else(|| self.gone("this node did not advertise keys in time"))
    }

    fn invalid(e: SecAggError) -> Refusal {
        Refusal::Invalid(e.to_string())
    }

    /// Handles one step of `node`.
    pub(crate) fn handle(&mut self, node: &str, step: SecAggStep) -> Result<SecAggReply, Refusal> {
        match step {
            SecAggStep::Advertise(keys) => {
                if self.stage != Stage::Advertising {
                    return Err(self.gone("key advertising has closed"));
                }
                if self.ids.contains_key(node) {
                    return Err(Refusal::Invalid("this node already advertised keys".into()));
                }
                let id = self.server.receive_keys(keys).map_err(Self::invalid)?;
                self.ids.insert(node.to_string(), id);
                Ok(SecAggReply::Ack)
            }
            SecAggStep::GetRoster => {
                self.id_of(node)?;
                Ok(match &self.roster {
                    Some(roster) => SecAggReply::Roster(roster.clone()),
                    None => SecAggReply::Wait,
                })
            }
            SecAggStep::Share(shares) => {
                let id = self.id_of(node)?;
                if self.stage != Stage::Sharing {
                    return Err(self.gone("key sharing is not open"));
                }
                self.server
                    .receive_shares(id, shares)
                    .map_err(Self::invalid)?;
                self.shared.insert(node.to_string());
                Ok(SecAggReply::Ack)
            }
            SecAggStep::GetInbox => {
                let id = self.id_of(node)?;
                match self.stage {
                    Stage::Advertising | Stage::Sharing => Ok(SecAggReply::Wait),
                    Stage::Masking => self
                        .server
                        .inbox(id)
                        .map(|inbox| SecAggReply::Inbox(inbox.to_vec()))
                        .map_err(|_| self.gone("too few of this node's neighbours shared keys")),
                    Stage::Unmasking | Stage::Done => Err(self.gone("masked input has closed")),
                }
            }
            SecAggStep::GetUnmaskRequest => {
                let id = self.id_of(node)?;
                match (&self.request, self.stage) {
                    (Some(request), Stage::Unmasking) if request.survivors.contains(&id) => {
                        Ok(SecAggReply::UnmaskRequest(request.clone()))
                    }
                    (_, Stage::Unmasking | Stage::Done) => {
                        Err(self.gone("this node's masked input is not in the sum"))
                    }
                    _ => Ok(SecAggReply::Wait),
                }
            }
            SecAggStep::Reveal(shares) => {
                let id = self.id_of(node)?;
                if self.stage != Stage::Unmasking {
                    return Err(self.gone("unmasking is not open"));
                }
                self.server
                    .receive_unmask(id, &shares)
                    .map_err(Self::invalid)?;
                self.revealed.insert(node.to_string());
                Ok(SecAggReply::Ack)
            }
        }
    }

    /// Takes `node`'s uploaded masked input.
    pub(crate) fn take_masked(&mut self, node: &str, bytes: &[u8]) -> Result<(), Refusal> {
        let id = self.id_of(node)?;
        if self.stage != Stage::Masking || !self.in_round.contains(node) {
            return Err(self.gone("masked input is not open for this node"));
        }
        let input =
            ferry_proto::secagg::masked_from_bytes(bytes, self.server.input_len(), &self.params)
                .map_err(Self::invalid)?;
        self.server
            .receive_masked(id, &input)
            .map_err(Self::invalid)?;
        self.masked.insert(node.to_string());
        Ok(())
    }

    /// Takes a relay's sum of its contributors' masked inputs (every one of them in the
    /// round and owing its input), as if each had arrived alone.
    pub(crate) fn take_masked_sum(&mut self, sum: &MaskedSum) -> Result<(), Refusal> {
        if self.stage != Stage::Masking {
            return Err(self.gone("masked input is not open"));
        }
        let mut ids = Vec::with_capacity(sum.contributors.len());
        for node in &sum.contributors {
            if !self.in_round.contains(node) || self.masked.contains(node) {
                return Err(Refusal::Invalid(format!(
                    "node {node}'s masked input cannot count in this round's sum"
                )));
            }
            ids.push(self.id_of(node)?);
        }
        self.server
            .receive_masked_sum(&ids, &sum.input)
            .map_err(Self::invalid)?;
        self.masked.extend(sum.contributors.iter().cloned());
        Ok(())
    }

    /// The nodes whose masked input the round waits for, once key sharing has closed.
    pub(crate) fn masking_nodes(&self) -> Option<&BTreeSet<String>> {
        (self.stage >= Stage::Masking).then_some(&self.in_round)
    }

    /// Closes whatever stage is complete or past its deadline. `cohort` are the round's
    /// nodes, `answered` those that sent a masked input or gave up, `training_deadline` the
    /// round's deadline for masked input.
    pub(crate) fn advance(
        &mut self,
        cohort: &BTreeSet<String>,
        answered: &BTreeSet<String>,
        training_deadline: Instant,
        now: Instant,
    ) -> Progress {
        let timed_out = now >= self.stage_deadline;
        let outcome = match self.stage {
            Stage::Advertising => {
                let done = cohort
                    .iter()
                    .all(|n| self.ids.contains_key(n) || answered.contains(n));
                if !(done || timed_out) {
                    return Progress::Waiting;
                }
                self.server.close_advertising().map(|roster| {
                    let notice = format!(
                        "secure round {}: {} of {} nodes advertised keys",
                        self.round,
                        roster.members.len(),
                        cohort.len()
                    );
                    self.roster = Some(roster);
                    self.stage = Stage::Sharing;
                    Progress::Advanced {
                        notice,
                        training: false,
                    }
                })
            }
            Stage::Sharing => {
                let done = self
                    .ids
                    .keys()
                    .all(|n| self.shared.contains(n) || answered.contains(n));
                if !(done || timed_out) {
                    return Progress::Waiting;
                }
                self.server.close_sharing().map(|()| {
                    self.in_round = self
                        .ids
                        .iter()
                        .filter(|&(_, &id)| self.server.inbox(id).is_ok())
                        .map(|(n, _)| n.clone())
                        .collect();
                    self.stage = Stage::Masking;
                    Progress::Advanced {
                        notice: format!(
                            "secure round {}: {} nodes shared keys and are training",
                            self.round,
                            self.in_round.len()
                        ),
                        training: true,
                    }
                })
            }
            Stage::Masking => {
                let done = self.in_round.iter().all(|n| answered.contains(n));
                if !(done || now >= training_deadline) {
                    return Progress::Waiting;
                }
                self.server.close_masking().map(|request| {
                    let notice = format!(
                        "secure round {}: {} masked inputs in, {} nodes dropped after sharing keys",
                        self.round,
                        request.survivors.len(),
                        request.dropped.len()
                    );
                    self.request = Some(request);
                    self.stage = Stage::Unmasking;
                    Progress::Advanced {
                        notice,
                        training: false,
                    }
                })
            }
            Stage::Unmasking => {
                let done = self.masked.iter().all(|n| self.revealed.contains(n));
                if !(done || timed_out) {
                    return Progress::Waiting;
                }
                self.stage = Stage::Done;
                self.server.finish().map(Progress::Finished)
            }
            Stage::Done => return Progress::Waiting,
        };
        self.stage_deadline = now + self.stage_timeout;
        outcome.unwrap_or_else(|e| {
            self.stage = Stage::Done;
            Progress::Aborted(e.to_string())
        })
    }
}
