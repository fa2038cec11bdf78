//! The node's side of a secure round over the fleet protocol: advertise keys and share them
//! before training, mask the update after it, and reveal shares once the server knows who
//! made it. The node's secrets come from this machine's entropy and never leave it except as
//! shares sealed for its neighbours.

use ferry_core::{Update, aggregate::validate_update};
use ferry_proto::{
    secagg as convert,
    v1::{
        SecAggEmpty, SecAggRequest, SecAggTask, sec_agg_request::Step, sec_agg_response::Outcome,
    },
};
use ferry_secagg::{SealedShare, SecAggClient, SecAggParams};
use tonic::Status;

use crate::{
    ClientError,
    link::{AgentEvent, Link, retry, round_gone},
};

/// How long one SecAgg call may wait for the other nodes before asking again.
const STAGE_WAIT_MS: u32 = 20_000;

/// A call's outcome: the server's answer, or why the round is gone for this node.
type Answer = Result<Outcome, String>;

impl<E: Fn(AgentEvent) + Send + Sync> Link<'_, E> {
    /// Sends `step` for `round` until the server answers something other than "wait";
    /// retries through network trouble.
    async fn call(&mut self, round: u32, step: Step) -> Result<Answer, ClientError> {
        loop {
            let request = self
                .credential
                .authorize(tonic::Request::new(SecAggRequest {
                    round,
                    wait_ms: STAGE_WAIT_MS,
                    step: Some(step.clone()),
                }));
            match self.client.sec_agg(request).await {
                Ok(response) => {
                    self.backoff.reset();
                    match response.into_inner().outcome {
                        Some(Outcome::Wait(_)) => {}
                        Some(outcome) => return Ok(Ok(outcome)),
                        None => return Ok(Err("the server sent an empty SecAgg answer".into())),
                    }
                }
                Err(status) if round_gone(&status) => return Ok(Err(message(&status))),
                Err(status) => retry(&status, self.settings, self.backoff, self.on_event).await?,
            }
        }
    }
}

fn message(status: &Status) -> String {
    status.message().to_string()
}

fn unexpected(stage: &str) -> String {
    format!("the server answered {stage} with something else; upgrade this node")
}

/// A node's secure round after the key stages, waiting for its update.
pub(crate) struct SecureSession {
    round: u32,
    client: SecAggClient,
    params: SecAggParams,
    weight_cap: Option<u64>,
    inbox: Vec<SealedShare>,
}

impl SecureSession {
    /// Stages 1 and 2: advertises fresh keys, waits for the roster, shares the secrets among
    /// the neighbours and collects what they sealed for this node. `Ok(Err(reason))` when the
    /// round went on without this node.
    pub(crate) async fn join<E: Fn(AgentEvent) + Send + Sync>(
        link: &mut Link<'_, E>,
        round: u32,
        task: &SecAggTask,
    ) -> Result<Result<Self, String>, ClientError> {
        let (params, weight_cap) = convert::task_from_wire(task);
        let mut client = match SecAggClient::from_os_entropy(params) {
            Ok(client) => client,
            Err(e) => return Ok(Err(e.to_string())),
        };
        let advertise = Step::Advertise(convert::keys_to_wire(&client.public_keys()));
        match link.call(round, advertise).await? {
            Ok(Outcome::Ack(_)) => {}
            Ok(_) => return Ok(Err(unexpected("advertised keys"))),
            Err(reason) => return Ok(Err(reason)),
        }
        let roster = match link.call(round, Step::GetRoster(SecAggEmpty {})).await? {
            Ok(Outcome::Roster(roster)) => match convert::roster_from_wire(&roster) {
                Ok(roster) => roster,
                Err(e) => return Ok(Err(e.to_string())),
            },
            Ok(_) => return Ok(Err(unexpected("a roster request"))),
            Err(reason) => return Ok(Err(reason)),
        };
        let sealed = match client.share_keys(&roster) {
            Ok(sealed) => sealed,
            Err(e) => return Ok(Err(e.to_string())),
        };
        match link
            .call(round, Step::Share(convert::shares_to_wire(&sealed)))
            .await?
        {
            Ok(Outcome::Ack(_)) => {}
            Ok(_) => return Ok(Err(unexpected("shared keys"))),
            Err(reason) => return Ok(Err(reason)),
        }
        let inbox = match link.call(round, Step::GetInbox(SecAggEmpty {})).await? {
            Ok(Outcome::Inbox(inbox)) => convert::shares_from_wire(&inbox),
            Ok(_) => return Ok(Err(unexpected("an inbox request"))),
            Err(reason) => return Ok(Err(reason)),
        };
        Ok(Ok(Self {
            round,
            client,
            params,
            weight_cap,
            inbox,
        }))
    }

    /// Stage 3: the masked input to upload in place of the update.
    pub(crate) fn mask(&mut self, update: &Update, dim: usize) -> Result<Vec<u8>, String> {
        validate_update(update, dim).map_err(|e| e.to_string())?;
        let weight = ferry_secagg::weight_factor(update.num_examples, self.weight_cap);
        let masked = self
            .client
            .mask(&self.inbox, &update.delta, weight)
            .map_err(|e| e.to_string())?;
        Ok(convert::masked_to_bytes(&masked, &self.params))
    }

    /// Stage 4: once the server has closed the masked input, reveals the shares it asks for
    /// (refusing a request that would expose a neighbour's update).
    pub(crate) async fn unmask<E: Fn(AgentEvent) + Send + Sync>(
        mut self,
        link: &mut Link<'_, E>,
    ) -> Result<Result<(), String>, ClientError> {
        let request = match link
            .call(self.round, Step::GetUnmaskRequest(SecAggEmpty {}))
            .await?
        {
            Ok(Outcome::UnmaskRequest(request)) => convert::request_from_wire(&request),
            Ok(_) => return Ok(Err(unexpected("an unmask request"))),
            Err(reason) => return Ok(Err(reason)),
        };
        let shares = match self.client.unmask(&request) {
            Ok(shares) => shares,
            Err(e) => return Ok(Err(e.to_string())),
        };
        match link
            .call(self.round, Step::Reveal(convert::revealed_to_wire(&shares)))
            .await?
        {
            Ok(Outcome::Ack(_)) => Ok(Ok(())),
            Ok(_) => Ok(Err(unexpected("revealed shares"))),
            Err(reason) => Ok(Err(reason)),
        }
    }
}
