//! The strategy settings of `ferry simulate`'s options: the server step's hyper-parameters,
//! checked, and the cross-site validation matrix asked for.

use anyhow::{Result, bail};
use ferry_core::{cross_site::CrossSiteModels, qfedavg::FairParams, strategy::StrategyParams};

use super::{SimulateArgs, check};

impl SimulateArgs {
    /// The strategy's hyper-parameters, each flag given checked and the rest at its default.
    pub(super) fn resolve_strategy_params(&self) -> Result<StrategyParams> {
        let defaults = StrategyParams::default();
        let server = StrategyParams {
            mu: self.mu.unwrap_or(defaults.mu),
            server_lr: self.server_lr,
            server_momentum: self.server_momentum.unwrap_or(defaults.server_momentum),
            beta1: self.beta1.unwrap_or(defaults.beta1),
            beta2: self.beta2.unwrap_or(defaults.beta2),
            tau: self.tau.unwrap_or(defaults.tau),
            q: self.q.unwrap_or(defaults.q),
            q_lr: self.q_lr.unwrap_or(defaults.q_lr),
        };
        FairParams::checked(server.q, 1.0 / server.q_lr).map_err(|_| {
            anyhow::anyhow!(
                "--q must be a number >= 0 and --q-lr a positive number, got {} and {}",
                server.q,
                server.q_lr
            )
        })?;
        if let Some(lr) = server.server_lr {
            check(lr > 0.0 && lr.is_finite(), || {
                format!("--server-lr must be a positive number, got {lr}")
            })?;
        }
        for (flag, value) in [
            ("--server-momentum", server.server_momentum),
            ("--beta1", server.beta1),
            ("--beta2", server.beta2),
        ] {
            check((0.0..1.0).contains(&value), || {
                format!("{flag} must be in [0, 1), got {value}")
            })?;
        }
        check(server.mu >= 0.0 && server.mu.is_finite(), || {
            format!("--mu must be a number >= 0, got {}", server.mu)
        })?;
        check(server.tau > 0.0 && server.tau.is_finite(), || {
            format!("--tau must be a positive number, got {}", server.tau)
        })?;
        Ok(server)
    }

    /// The cross-site matrix asked for, refusing sites' own models where updates are meant to
    /// stay hidden or private.
    pub(super) fn resolve_cross_site(&self, dp: bool) -> Result<Option<CrossSiteModels>> {
        let Some(text) = &self.cross_site else {
            return Ok(None);
        };
        let models: CrossSiteModels = text.parse().map_err(|e: String| anyhow::anyhow!("--{e}"))?;
        if models == CrossSiteModels::Local {
            let hidden = if self.secagg {
                Some("SecAgg+ hides each site's update from the server")
            } else if dp {
                Some("differential privacy bounds what the run reveals about each site")
            } else {
                None
            };
            if let Some(why) = hidden {
                bail!(
                    "--cross-site local sends each site's own model out of the site, but {why}; \
                     use --cross-site global, which shares only scores"
                );
            }
        }
        Ok(Some(models))
    }
}
