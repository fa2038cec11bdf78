//! `ferry token create|revoke`: one-time enrolment tokens for nodes and relays. The store keeps only each
//! token's hash; the token itself is printed once.

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::{Args, Subcommand};
use ferry_server::store::{IdentityKind, Store};

/// Token commands.
#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// Create a one-time enrolment token for a node and print it.
    Create(TokenArgs),
    /// Revoke a token and the node that enrolled with it.
    Revoke(TokenArgs),
}

/// Which token, and which server's store.
#[derive(Args, Debug)]
pub struct TokenArgs {
    /// The node's name, for example site-3.
    #[arg(long)]
    pub name: String,
    /// The token enrols an aggregation relay (`ferry relay`), not a node.
    #[arg(long)]
    pub relay: bool,
    /// The server configuration whose store to use.
    #[arg(long, value_name = "FILE.toml", conflicts_with = "store")]
    pub config: Option<PathBuf>,
    /// The store URL directly (sqlite:PATH or postgres://...) [default: the config's, or
    /// sqlite:./ferry-data/ferry.db].
    #[arg(long)]
    pub store: Option<String>,
}

async fn open_store(args: &TokenArgs) -> Result<Store> {
    let url = match (&args.store, &args.config) {
        (Some(url), _) => url.clone(),
        (None, Some(path)) => crate::server::store_url(path)?,
        (None, None) => crate::server::DEFAULT_STORE.to_string(),
    };
    Ok(Store::open(&url).await?)
}

/// Runs a token command.
pub fn run(command: TokenCommand) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        match command {
            TokenCommand::Create(args) => {
                if args.name.trim().is_empty() {
                    bail!("--name must not be empty");
                }
                let kind = if args.relay {
                    IdentityKind::Relay
                } else {
                    IdentityKind::Node
                };
                let token = open_store(&args)
                    .await?
                    .create_token_for(&args.name, kind)
                    .await?;
                println!("{token}");
                let (who, command) = match kind {
                    IdentityKind::Relay => ("relay", "ferry relay --token ..."),
                    IdentityKind::Node => ("node", "ferry client --token ..."),
                };
                eprintln!(
                    "one-time {who} token for '{}': give it to the {who} ({command}); it is not stored and cannot be shown again",
                    args.name
                );
            }
            TokenCommand::Revoke(args) => {
                let store = open_store(&args).await?;
                if !store.revoke(&args.name).await? {
                    bail!("no token named '{}'; `ferry token create --name {}` makes one", args.name, args.name);
                }
                println!("revoked '{}' and any node enrolled with it", args.name);
            }
        }
        Ok(())
    })
}
