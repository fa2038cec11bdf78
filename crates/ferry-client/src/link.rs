//! How the node agent reaches the server and waits on it: its settings, the events it
//! reports, what it holds while it talks to the server, and when it retries a failed call.

use std::{path::PathBuf, time::Duration};

use ferry_proto::v1::fleet_client::FleetClient;
use tonic::{Code, Status};

use crate::{
    ClientError,
    backoff::Backoff,
    connection::{ServerAddress, StoredCredential},
    failover::Servers,
};

/// How the agent behaves.
#[derive(Debug, Clone)]
pub struct AgentSettings {
    /// The server.
    pub server: ServerAddress,
    /// One-time enrolment token, used when the state folder holds no credential.
    pub token: Option<String>,
    /// Where the node keeps its credential (and trainer state).
    pub state_dir: PathBuf,
    /// Mixed into every round's seed so nodes draw different randomness.
    pub seed_stream: u64,
    /// Longest wait between reconnection attempts.
    pub max_backoff: Duration,
    /// Give up after the server has been unreachable this long.
    pub give_up_after: Duration,
    /// Whether the node lets its own fine-tuned model leave the site for a cross-site
    /// validation matrix (`cross-site = "local"`); a site's model reveals more about its data
    /// than its scores do, so it is the site's choice.
    pub share_local_model: bool,
}

/// Something the agent reports while it works.
#[derive(Debug, Clone)]
pub enum AgentEvent {
    /// Enrolled (or reloaded the credential) as this node.
    Ready {
        /// The node's identifier.
        node_id: String,
        /// Its token name.
        name: String,
    },
    /// A round's training task arrived (its model is downloaded next).
    Assigned(u32),
    /// Training for a round.
    Training(u32),
    /// Scoring a round's global model on the node's held-out data.
    Evaluating(u32),
    /// After the last round: fine-tuning the final model into this site's own model, which
    /// leaves the site for the cross-site matrix (the node opted in).
    Tuning,
    /// The node's score of a round's global model was sent.
    Evaluated {
        /// The round.
        round: u32,
        /// For the cross-site matrix: the site whose own model was scored (`None`: the
        /// global model).
        site_model: Option<String>,
        /// The node's accuracy on its held-out data.
        accuracy: f64,
    },
    /// The round's update was accepted (or was already counted).
    Delivered {
        /// The round.
        round: u32,
        /// True when the server had already counted it.
        duplicate: bool,
    },
    /// The round went on without this node.
    Abandoned {
        /// The round.
        round: u32,
        /// Why.
        reason: String,
    },
    /// The server could not be reached; retrying.
    Retrying(String),
}

/// What the agent needs to talk to the server.
pub(crate) struct Link<'a, E> {
    pub(crate) settings: &'a AgentSettings,
    pub(crate) client: &'a mut FleetClient<Servers>,
    pub(crate) credential: &'a StoredCredential,
    pub(crate) backoff: &'a mut Backoff,
    pub(crate) on_event: &'a E,
}

/// Waits before the next attempt, or fails for errors that retrying cannot fix.
pub(crate) async fn retry(
    status: &Status,
    settings: &AgentSettings,
    backoff: &mut Backoff,
    on_event: &(impl Fn(AgentEvent) + Send + Sync),
) -> Result<(), ClientError> {
    if status.code() == Code::Unauthenticated {
        return Err(ClientError::Unauthenticated(status.message().to_string()));
    }
    if backoff.failing_for() > settings.give_up_after {
        return Err(ClientError::Unreachable {
            seconds: backoff.failing_for().as_secs_f64(),
            last: explain(status),
        });
    }
    if status.metadata().contains_key(ferry_proto::ACTIVE_SERVER) {
        // A standby named the active server, and the next call goes there: no reason to wait
        // longer and longer while servers fail over.
        backoff.restart();
    }
    let delay = backoff.next_delay();
    on_event(AgentEvent::Retrying(format!(
        "{} ({:?}); retrying in {:.1} s",
        explain(status),
        status.code(),
        delay.as_secs_f64()
    )));
    tokio::time::sleep(delay).await;
    Ok(())
}

/// A failed call's message with the errors under it (a refused TLS handshake says why only
/// there: "transport error: ... received fatal alert: CertificateRequired").
pub fn explain(status: &Status) -> String {
    let mut text = status.message().to_string();
    let mut source = std::error::Error::source(status);
    while let Some(error) = source {
        let said = error.to_string();
        if !text.contains(&said) {
            text.push_str(": ");
            text.push_str(&said);
        }
        source = error.source();
    }
    text
}

/// Whether a failed call means the round is gone for this node (rather than a network blip).
pub(crate) fn round_gone(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::FailedPrecondition | Code::NotFound | Code::InvalidArgument | Code::ResourceExhausted
    )
}
