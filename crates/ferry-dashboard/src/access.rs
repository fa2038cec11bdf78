//! Who may look and who may act.
//!
//! Viewing is open to requests from this machine (a loopback peer that also names a loopback
//! host, so a page elsewhere cannot reach it by rebinding its own name to 127.0.0.1), and to
//! anyone presenting the viewer or the admin token as `Authorization: Bearer`. Actions need
//! the admin token in that header, which a page on another site cannot attach without a CORS
//! preflight that this server never grants; an `Origin` or `Sec-Fetch-Site` naming another
//! site is refused as well. The dashboard sets no cookies, so nothing is sent on a user's
//! behalf by the browser.

use std::net::SocketAddr;

use axum::{
    Json,
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
};

/// The tokens the dashboard accepts, kept as sha256 hex digests.
#[derive(Debug, Clone, Default)]
pub struct Access {
    viewer_token_sha256: Option<String>,
    admin_token_sha256: Option<String>,
}

impl Access {
    /// Accepts the viewer token and the admin token whose sha256 hex digests are given;
    /// without an admin token no action can be taken, without a viewer token only this
    /// machine (or the admin) can look.
    pub fn new(viewer_token_sha256: Option<String>, admin_token_sha256: Option<String>) -> Self {
        Self {
            viewer_token_sha256,
            admin_token_sha256,
        }
    }

    /// Whether an admin token is configured, so that actions can be allowed at all.
    pub fn has_admin(&self) -> bool {
        self.admin_token_sha256.is_some()
    }

    /// Refuses a request that may not read the run's data.
    pub fn may_view(&self, peer: SocketAddr, headers: &HeaderMap) -> Result<(), Refusal> {
        if peer.ip().is_loopback() && names_loopback_host(headers) {
            return Ok(());
        }
        match bearer(headers).map(hash) {
            Some(presented)
                if Some(&presented) == self.viewer_token_sha256.as_ref()
                    || Some(&presented) == self.admin_token_sha256.as_ref() =>
            {
                Ok(())
            }
            Some(_) => Err(refusal(StatusCode::UNAUTHORIZED, "wrong viewer token")),
            None => Err(refusal(
                StatusCode::UNAUTHORIZED,
                "viewing from another machine needs the viewer token (the server printed where \
                 it is stored); enter it on the page",
            )),
        }
    }

    /// Refuses a request that may not act: it must carry the admin token and come from the
    /// dashboard's own pages.
    pub fn may_act(&self, headers: &HeaderMap) -> Result<(), Refusal> {
        if cross_site(headers) {
            return Err(refusal(
                StatusCode::FORBIDDEN,
                "cross-site request refused: actions are taken from the dashboard's own pages",
            ));
        }
        let Some(expected) = &self.admin_token_sha256 else {
            return Err(refusal(
                StatusCode::FORBIDDEN,
                "this dashboard has no operator actions (it shows a simulation or finished runs)",
            ));
        };
        match bearer(headers).map(hash) {
            Some(presented) if &presented == expected => Ok(()),
            Some(_) => Err(refusal(StatusCode::UNAUTHORIZED, "wrong admin token")),
            None => Err(refusal(
                StatusCode::UNAUTHORIZED,
                "actions need the admin token (the server printed where it is stored); enter \
                 it on the Operate page",
            )),
        }
    }
}

/// Why a request was turned away: its status and a message naming the fix, sent as
/// `{"error": message}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The HTTP status.
    pub status: StatusCode,
    /// What was wrong and what to do.
    pub message: String,
}

/// A refusal with `status` saying `message`.
pub fn refusal(status: StatusCode, message: &str) -> Refusal {
    Refusal {
        status,
        message: message.to_string(),
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(serde_json::json!({ "error": self.message })),
        )
            .into_response()
    }
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

fn hash(token: &str) -> String {
    ferry_core::model::sha256_hex(token.as_bytes())
}

/// The host part of a `Host` or `Origin` value (`host`, `host:port`, `[v6]:port`,
/// `scheme://host:port`).
fn host_of(value: &str) -> &str {
    let authority = value.split_once("://").map_or(value, |(_, rest)| rest);
    let authority = authority.split('/').next().unwrap_or(authority);
    if let Some(v6) = authority.strip_prefix('[') {
        return v6.split(']').next().unwrap_or(v6);
    }
    authority
        .rsplit_once(':')
        .map_or(authority, |(host, _)| host)
}

fn names_loopback_host(headers: &HeaderMap) -> bool {
    let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) else {
        return false;
    };
    let host = host_of(host);
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Whether the browser says the request comes from a page of another origin.
fn cross_site(headers: &HeaderMap) -> bool {
    let value = |name| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(site) = value(header::HeaderName::from_static("sec-fetch-site"))
        && site != "same-origin"
        && site != "none"
    {
        return true;
    }
    match (value(header::ORIGIN), value(header::HOST)) {
        (Some(origin), Some(host)) => {
            let authority = origin.split_once("://").map_or(origin, |(_, rest)| rest);
            !authority.eq_ignore_ascii_case(host)
        }
        (Some(_), None) => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(
                header::HeaderName::from_bytes(name.as_bytes()).expect("name"),
                value.parse().expect("value"),
            );
        }
        map
    }

    fn access() -> Access {
        Access::new(Some(hash("viewer")), Some(hash("admin")))
    }

    const LOCAL: &str = "127.0.0.1:5000";
    const REMOTE: &str = "10.0.0.9:5000";

    #[test]
    fn loopback_peers_naming_a_loopback_host_view_without_a_token() {
        let peer = LOCAL.parse().expect("addr");
        for host in [
            "127.0.0.1:8080",
            "localhost:8080",
            "[::1]:8080",
            "localhost",
        ] {
            assert!(access().may_view(peer, &headers(&[("host", host)])).is_ok());
        }
        // A rebound name reaching the loopback interface is not trusted.
        let rebound = headers(&[("host", "evil.example:8080")]);
        assert!(access().may_view(peer, &rebound).is_err());
    }

    #[test]
    fn remote_viewers_need_the_viewer_or_admin_token() {
        let peer = REMOTE.parse().expect("addr");
        let host = ("host", "fl.example.org:8080");
        assert!(access().may_view(peer, &headers(&[host])).is_err());
        let wrong = headers(&[host, ("authorization", "Bearer nope")]);
        assert!(access().may_view(peer, &wrong).is_err());
        for token in ["Bearer viewer", "Bearer admin"] {
            let h = headers(&[host, ("authorization", token)]);
            assert!(access().may_view(peer, &h).is_ok(), "{token}");
        }
    }

    #[test]
    fn actions_need_the_admin_token_and_the_same_origin() {
        let host = ("host", "127.0.0.1:8080");
        let admin = ("authorization", "Bearer admin");
        assert!(access().may_act(&headers(&[host, admin])).is_ok());
        let same = headers(&[host, admin, ("origin", "http://127.0.0.1:8080")]);
        assert!(access().may_act(&same).is_ok());
        let viewer = headers(&[host, ("authorization", "Bearer viewer")]);
        assert!(access().may_act(&viewer).is_err());
        assert!(access().may_act(&headers(&[host])).is_err());
        let other = headers(&[host, admin, ("origin", "http://evil.example")]);
        assert_eq!(
            access().may_act(&other).expect_err("cross-site").status,
            StatusCode::FORBIDDEN
        );
        let fetched = headers(&[host, admin, ("sec-fetch-site", "cross-site")]);
        assert!(access().may_act(&fetched).is_err());
        let no_admin = Access::new(Some(hash("viewer")), None);
        assert!(no_admin.may_act(&headers(&[host, admin])).is_err());
    }

    #[test]
    fn hosts_are_read_from_every_form() {
        assert_eq!(host_of("localhost:80"), "localhost");
        assert_eq!(host_of("[::1]:80"), "::1");
        assert_eq!(host_of("http://a.b:9/x"), "a.b");
        assert_eq!(host_of("a.b"), "a.b");
    }
}
