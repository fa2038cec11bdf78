//! `ferry certs`: a private CA, a server certificate for the given hosts, and client
//! certificates for mutual TLS, generated with rcgen.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use clap::Args;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// Options of `ferry certs`.
#[derive(Args, Debug)]
pub struct CertsArgs {
    /// Folder to write the PEM files into.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Names and addresses the server certificate is valid for, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "localhost,127.0.0.1")]
    pub hosts: Vec<String>,
    /// Client certificates to issue for mutual TLS, by name, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "node")]
    pub clients: Vec<String>,
}

fn write_pem(dir: &Path, name: &str, pem: &str, private: bool) -> Result<()> {
    let path = dir.join(name);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let _ = private;
    options
        .open(&path)
        .and_then(|mut f| f.write_all(pem.as_bytes()))
        .with_context(|| format!("cannot write {}", path.display()))
}

fn leaf_params(names: Vec<String>, purpose: ExtendedKeyUsagePurpose) -> Result<CertificateParams> {
    let common_name = names.first().cloned().unwrap_or_default();
    let mut params = CertificateParams::new(names).context("invalid certificate name")?;
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.extended_key_usages = vec![purpose];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    Ok(params)
}

/// Writes `ca.pem`/`ca.key`, `server.pem`/`server.key` and `client-<name>.pem`/`.key` into `out`.
pub fn generate(out: &Path, hosts: &[String], clients: &[String]) -> Result<()> {
    anyhow::ensure!(
        !hosts.is_empty(),
        "--hosts needs at least one name or address"
    );
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "Ferry federation CA");
    let ca_key = KeyPair::generate()?;
    let ca_key_pem = ca_key.serialize_pem();
    let ca = CertifiedIssuer::self_signed(ca_params, ca_key)?;
    write_pem(out, "ca.pem", &ca.pem(), false)?;
    write_pem(out, "ca.key", &ca_key_pem, true)?;
    let issue = |file: &str, params: CertificateParams| -> Result<()> {
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &ca)?;
        write_pem(out, &format!("{file}.pem"), &cert.pem(), false)?;
        write_pem(out, &format!("{file}.key"), &key.serialize_pem(), true)
    };
    issue(
        "server",
        leaf_params(hosts.to_vec(), ExtendedKeyUsagePurpose::ServerAuth)?,
    )?;
    for client in clients {
        issue(
            &format!("client-{client}"),
            leaf_params(vec![client.clone()], ExtendedKeyUsagePurpose::ClientAuth)?,
        )?;
    }
    Ok(())
}

/// Runs `ferry certs`.
pub fn run(args: CertsArgs) -> Result<()> {
    generate(&args.out, &args.hosts, &args.clients)?;
    println!(
        "wrote ca.pem, server.pem (for {}) and client certificates for {} into {}",
        args.hosts.join(", "),
        args.clients.join(", "),
        args.out.display()
    );
    Ok(())
}
