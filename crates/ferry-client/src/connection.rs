//! Reaching the server: the TLS channel, and the node's credential (enrolled once, kept in the
//! node's state folder, attached to every call).

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use ferry_proto::v1::{EnrolRequest, fleet_client::FleetClient};
use serde::{Deserialize, Serialize};
use tonic::{
    Request,
    metadata::MetadataValue,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};

use crate::{ClientError, failover::Servers};

/// How to reach the server.
#[derive(Debug, Clone)]
pub struct ServerAddress {
    /// `https://HOST:PORT`, or `http://127.0.0.1:PORT` against an `--insecure` server; several
    /// separated by commas where an active server has standbys (see [`Servers`]).
    pub url: String,
    /// CA certificate (PEM) that signed the server's certificate.
    pub ca_pem: Option<Vec<u8>>,
    /// The node's own certificate and key (PEM), for servers that require mutual TLS.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

/// Builds a lazily connecting channel to the server: to each of its addresses, used in turn
/// as [`Servers`] says.
pub fn channel(address: &ServerAddress) -> Result<Servers, ClientError> {
    let channels = address
        .url
        .split(',')
        .map(str::trim)
        .filter(|url| !url.is_empty())
        .map(|url| Ok((url.to_string(), dial(url, address)?)))
        .collect::<Result<Vec<_>, ClientError>>()?;
    if channels.is_empty() {
        return Err(ClientError::Settings(
            "no server address; give --server https://HOST:PORT".into(),
        ));
    }
    Ok(Servers::new(channels))
}

/// A lazily connecting channel to the one server address `url`, with `address`'s TLS.
fn dial(url: &str, address: &ServerAddress) -> Result<Channel, ClientError> {
    let bad =
        |e: tonic::transport::Error| ClientError::Settings(format!("server address '{url}': {e}"));
    let mut endpoint = Endpoint::from_shared(url.to_string())
        .map_err(|e| ClientError::Settings(format!("server address '{url}': {e}")))?
        .connect_timeout(Duration::from_secs(5))
        .initial_stream_window_size(Some(8 << 20))
        .initial_connection_window_size(Some(32 << 20))
        .tcp_keepalive(Some(Duration::from_secs(30)))
        // A server that stops answering while its connection stays up (paused, frozen, its
        // host's network cut after the handshake) fails the calls waiting on it within about
        // 15 s, so that the node tries again, or tries a standby: the kernel keeps a paused
        // process's TCP alive, but only the process answers HTTP/2 pings.
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true);
    if url.starts_with("https://") {
        let mut tls = ClientTlsConfig::new();
        match &address.ca_pem {
            Some(ca) => tls = tls.ca_certificate(Certificate::from_pem(ca)),
            None => {
                return Err(ClientError::Settings(
                    "an https server needs --ca CA.pem (the CA that signed its certificate)".into(),
                ));
            }
        }
        if let Some((cert, key)) = &address.identity {
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        endpoint = endpoint.tls_config(tls).map_err(bad)?;
    } else if !url.starts_with("http://") {
        return Err(ClientError::Settings(format!(
            "server address '{url}' must start with https:// (or http:// for an --insecure server)"
        )));
    }
    Ok(endpoint.connect_lazy())
}

/// The node's credential, as stored in its state folder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredCredential {
    /// The server it belongs to.
    pub server: String,
    /// The node's identifier.
    pub node_id: String,
    /// The node's secret.
    pub secret: String,
    /// The token name the node enrolled under.
    pub name: String,
    /// A relay's credential, used for a call it forwards for this node of its subtree (never
    /// stored).
    #[serde(skip)]
    pub on_behalf_of: Option<String>,
}

impl StoredCredential {
    fn path(state_dir: &Path) -> PathBuf {
        state_dir.join("credential.json")
    }

    /// The credential saved in `state_dir` for `server`, if any.
    pub fn load(state_dir: &Path, server: &str) -> Result<Option<Self>, ClientError> {
        let path = Self::path(state_dir);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(ClientError::Io {
                    context: format!("reading {}", path.display()),
                    source,
                });
            }
        };
        let credential: Self = serde_json::from_str(&text).map_err(|e| {
            ClientError::Settings(format!(
                "{} is not a credential file ({e}); delete it and enrol again with a new token",
                path.display()
            ))
        })?;
        Ok((credential.server == server).then_some(credential))
    }

    /// Saves the credential in `state_dir` (written to a temporary file, then renamed).
    pub fn save(&self, state_dir: &Path) -> Result<(), ClientError> {
        let text =
            serde_json::to_string_pretty(self).map_err(|e| ClientError::Settings(e.to_string()))?;
        crate::state_file::replace(&Self::path(state_dir), text.as_bytes())
    }

    /// Attaches the credential to a request.
    pub fn authorize<T>(&self, mut request: Request<T>) -> Request<T> {
        if let Ok(value) =
            MetadataValue::try_from(format!("Bearer {}.{}", self.node_id, self.secret))
        {
            request
                .metadata_mut()
                .insert(ferry_proto::AUTHORIZATION, value);
        }
        if let Some(node) = &self.on_behalf_of
            && let Ok(value) = MetadataValue::try_from(node.as_str())
        {
            request
                .metadata_mut()
                .insert(ferry_proto::ON_BEHALF_OF, value);
        }
        request
    }

    /// This (relay's) credential for calls made on behalf of `node`.
    pub fn on_behalf_of(&self, node: &str) -> Self {
        Self {
            on_behalf_of: Some(node.to_string()),
            ..self.clone()
        }
    }
}

/// The secret this identity enrols with, kept in `state_dir` from its first attempt, so that
/// an enrolment retried after a lost answer (the token spent) gets the same identity.
pub fn enrolment_secret(state_dir: &Path) -> Result<String, ClientError> {
    let path = state_dir.join("enrolment-secret");
    let io = |context: String| move |source| ClientError::Io { context, source };
    match std::fs::read_to_string(&path) {
        Ok(secret) if !secret.trim().is_empty() => return Ok(secret.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(format!("reading {}", path.display()))(e)),
    }
    let mut bytes = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut bytes);
    let secret = ferry_core::model::hex(&bytes);
    crate::state_file::replace(&path, secret.as_bytes())?;
    Ok(secret)
}

/// Exchanges a one-time token for the node's credential. A relay's token is refused: it
/// enrols a relay (`ferry relay`), which a node must not become.
pub async fn enrol(
    client: &mut FleetClient<Servers>,
    server: &str,
    token: &str,
    secret: &str,
) -> Result<StoredCredential, tonic::Status> {
    let (credential, kind) = enrol_as(client, server, token, secret).await?;
    if kind == "relay" {
        return Err(tonic::Status::unauthenticated(
            "this token enrols a relay, not a node: start `ferry relay` with it, or create a \
             node token with `ferry token create`",
        ));
    }
    Ok(credential)
}

/// Exchanges a one-time token for a credential whose secret is `secret` (the caller's own,
/// kept across retries: see [`enrolment_secret`]), and says what the token enrolled ("node"
/// or "relay"). A retry after a lost answer gets the same identity.
pub async fn enrol_as(
    client: &mut FleetClient<Servers>,
    server: &str,
    token: &str,
    secret: &str,
) -> Result<(StoredCredential, String), tonic::Status> {
    let response = client
        .enrol(EnrolRequest {
            token: token.to_string(),
            secret_hash: ferry_core::model::sha256_hex(secret.as_bytes()),
        })
        .await?
        .into_inner();
    let kind = if response.kind.is_empty() {
        "node".to_string()
    } else {
        response.kind
    };
    Ok((
        StoredCredential {
            server: server.to_string(),
            node_id: response.node_id,
            // A server that chose the secret itself (before client-chosen secrets) sends it.
            secret: if response.secret.is_empty() {
                secret.to_string()
            } else {
                response.secret
            },
            name: response.name,
            on_behalf_of: None,
        },
        kind,
    ))
}
