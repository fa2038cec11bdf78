//! The relay's side of the server: its own credential (enrolled once with a relay token), the
//! sync loop that keeps its [`View`](crate::view::View) current and reports its online nodes,
//! and fetching each model once, resumably, into the relay's blobs.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use ferry_client::{
    backoff::Backoff,
    connection::{self, StoredCredential},
    failover::Servers,
    transfer,
};
use ferry_proto::v1::{
    BlobRef, RelaySyncRequest, fleet_client::FleetClient, relay_client::RelayClient,
};
use tokio::sync::watch;
use tonic::Code;

use crate::{RelayError, RelaySettings, relay::Relay};

/// Longest a sync waits at the server for the work to change.
const SYNC_WAIT_MS: u32 = 10_000;

/// Shortest time between two syncs: a burst of changes at the server (a fleet enrolling, a
/// round's updates arriving) costs a relay one sync per gap, not one per change.
const SYNC_GAP: Duration = Duration::from_millis(50);

/// How often a sync names every online node; the syncs between name only the nodes heard
/// from since the one before (the server keeps a node online for `offline_after` after it
/// was last named).
const FULL_ONLINE_EVERY: Duration = Duration::from_secs(1);

/// The relay's link to the server above it.
#[derive(Clone)]
pub struct Upstream {
    /// Fleet calls: downloads, partial uploads, forwarded node calls.
    pub fleet: FleetClient<Servers>,
    /// Relay calls: sync and adoption.
    pub relay: RelayClient<Servers>,
    /// The relay's own credential.
    pub credential: StoredCredential,
}

impl Upstream {
    /// Connects to the server and loads the relay's credential, enrolling with the relay
    /// token the first time.
    pub async fn connect(settings: &RelaySettings) -> Result<Self, RelayError> {
        let servers = connection::channel(&settings.upstream)?;
        let mut fleet = FleetClient::new(servers.clone());
        let relay = RelayClient::new(servers);
        let url = &settings.upstream.url;
        let credential = match StoredCredential::load(&settings.data_dir, url)? {
            Some(credential) => credential,
            None => {
                let token = settings.token.as_deref().ok_or_else(|| {
                    RelayError::Settings(format!(
                        "no relay credential in {}; pass --token with a token from `ferry \
                         token create --relay`",
                        settings.data_dir.display()
                    ))
                })?;
                let secret = connection::enrolment_secret(&settings.data_dir)?;
                let credential = enrol(&mut fleet, url, token, &secret).await?;
                credential.save(&settings.data_dir)?;
                credential
            }
        };
        Ok(Self {
            fleet,
            relay,
            credential,
        })
    }

    /// The relay's identifier at the server.
    pub fn relay_id(&self) -> &str {
        &self.credential.node_id
    }

    /// The name of the relay's token.
    pub fn relay_name(&self) -> &str {
        &self.credential.name
    }
}

/// Enrols the relay, trying again while the server cannot be reached (for about a minute).
async fn enrol(
    fleet: &mut FleetClient<Servers>,
    url: &str,
    token: &str,
    secret: &str,
) -> Result<StoredCredential, RelayError> {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    loop {
        match connection::enrol_as(fleet, url, token, secret).await {
            Ok((credential, kind)) if kind == "relay" => return Ok(credential),
            Ok((credential, kind)) => {
                return Err(RelayError::Settings(format!(
                    "the token enrolled a {kind} ('{}'), not a relay: create a relay token \
                     with `ferry token create --relay` (and revoke '{}')",
                    credential.name, credential.name
                )));
            }
            Err(status)
                if status.code() == Code::Unavailable
                    && backoff.failing_for() < Duration::from_secs(60) =>
            {
                tracing::warn!("cannot enrol yet ({}); retrying", status.message());
                tokio::time::sleep(backoff.next_delay()).await;
            }
            Err(status) => {
                return Err(RelayError::Settings(format!(
                    "enrolling the relay failed: {}",
                    status.message()
                )));
            }
        }
    }
}

/// Keeps the relay's view current until `stop`: one long-poll at a time, at most one per
/// [`SYNC_GAP`], reporting the relay's online nodes (all of them at most once per
/// [`FULL_ONLINE_EVERY`], else those heard from since the last sync); while the server cannot
/// be reached, the view says why and the sync is tried again with a growing pause.
pub async fn sync_loop(relay: Arc<Relay>, mut stop: watch::Receiver<bool>) {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    let mut client = relay.upstream.relay.clone();
    let mut last_full: Option<Instant> = None;
    let mut last_sync: Option<Instant> = None;
    loop {
        if *stop.borrow() {
            return;
        }
        if let Some(gap) = last_sync.and_then(|at| SYNC_GAP.checked_sub(at.elapsed())) {
            tokio::select! {
                () = tokio::time::sleep(gap) => {}
                _ = stop.changed() => return,
            }
        }
        let started = Instant::now();
        let full = last_full.is_none_or(|at| at.elapsed() >= FULL_ONLINE_EVERY);
        let online = relay.online_nodes(if full { None } else { last_sync });
        last_sync = Some(started);
        let version = relay.subscribe().borrow().version;
        let request = relay
            .upstream
            .credential
            .authorize(tonic::Request::new(RelaySyncRequest {
                online,
                wait_ms: SYNC_WAIT_MS,
                version,
                relays: relay.online_relays(),
            }));
        let answered = tokio::select! {
            answered = client.sync(request) => answered,
            _ = stop.changed() => return,
        };
        match answered {
            Ok(answer) => {
                backoff.reset();
                if full {
                    last_full = Some(started);
                }
                let answer = answer.into_inner();
                if !answer.revoked.is_empty()
                    && let Err(e) = relay.store.revoke(&answer.revoked).await
                {
                    tracing::warn!("recording revoked nodes: {e}");
                }
                let over = answer.finished.is_some();
                relay.apply(answer);
                if over {
                    // Nothing more will come; the relay tells its nodes, then stops.
                    return;
                }
                for blob in relay.missing_blobs() {
                    tokio::spawn(fetch(relay.clone(), blob));
                }
            }
            Err(status) => {
                // The nodes this sync named may not have reached the server: name all next.
                last_full = None;
                let why = ferry_client::explain(&status);
                if status.code() == Code::Unauthenticated || status.code() == Code::PermissionDenied
                {
                    tracing::error!("the server refused this relay: {why}");
                }
                relay.unreachable(why.clone());
                let pause = backoff.next_delay();
                tracing::warn!(
                    "cannot sync with the server ({why}); trying again in {:.1} s",
                    pause.as_secs_f64()
                );
                tokio::select! {
                    () = tokio::time::sleep(pause) => {}
                    _ = stop.changed() => return,
                }
            }
        }
    }
}

/// Fetches `blob` into the relay's blobs (resuming a partial download across failures and
/// restarts), then marks it held; gives up once the server no longer serves it.
async fn fetch(relay: Arc<Relay>, blob: BlobRef) {
    if !relay.start_fetch(&blob.hash) {
        return;
    }
    let downloads = relay.downloads_dir();
    let path = transfer::download_path(&downloads, &blob.hash);
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    let mut client = relay.upstream.fleet.clone();
    loop {
        let fetched = transfer::download(
            &mut client,
            &relay.upstream.credential,
            &blob.hash,
            blob.size_bytes,
            &path,
        )
        .await;
        match fetched {
            Ok(()) => match relay.blobs.adopt(&blob.hash, &path).await {
                Ok(()) => {
                    let _ = std::fs::remove_file(&path);
                    tracing::info!("fetched blob {} ({} bytes)", blob.hash, blob.size_bytes);
                    relay.fetched(&blob.hash, true);
                    return;
                }
                Err(e) => tracing::warn!("keeping blob {}: {e}", blob.hash),
            },
            Err(status) if matches!(status.code(), Code::NotFound | Code::OutOfRange) => {
                tracing::info!(
                    "blob {} is no longer served: {}",
                    blob.hash,
                    status.message()
                );
                relay.fetched(&blob.hash, false);
                return;
            }
            Err(status) => {
                tracing::warn!("fetching blob {}: {}", blob.hash, status.message())
            }
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}
