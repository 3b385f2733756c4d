//! TLS to etcd (`etcd+https://`): which server certificates to trust, and the client
//! certificate to show.
//!
//! rustls with the `ring` provider, through ureq's `rustls` feature. The default roots
//! are Mozilla's (`webpki-roots`, compiled in): the same on every platform, nothing read
//! from disk on a call, nothing to link (the macOS release is linked without an SDK,
//! where the platform verifier needs Security.framework). An etcd cluster's certificates
//! usually come from a private CA: `--etcd-cacert FILE` trusts that CA, and only it.
//! The files are read once, when the backend is opened, which only `--backend` does.

use std::path::{Path, PathBuf};

use ureq::tls::{Certificate, ClientCert, PemItem, PrivateKey, RootCerts, TlsConfig, TlsProvider};

/// `--etcd-cacert`, `--etcd-cert`, `--etcd-key` as given.
#[derive(Clone, Debug, Default)]
pub struct TlsFiles {
    /// PEM file of the CA certificate(s) to trust instead of Mozilla's roots.
    pub cacert: Option<PathBuf>,
    /// PEM file of the client certificate (and its chain).
    pub cert: Option<PathBuf>,
    /// PEM file of the client certificate's private key.
    pub key: Option<PathBuf>,
}

impl TlsFiles {
    /// Whether any TLS option was given.
    pub fn any(&self) -> bool {
        self.cacert.is_some() || self.cert.is_some() || self.key.is_some()
    }
}

/// The TLS configuration of these files; the error names the file and what is wrong.
pub fn config(files: &TlsFiles) -> Result<TlsConfig, String> {
    let roots = match &files.cacert {
        Some(path) => RootCerts::new_with_certs(&certificates(path, "--etcd-cacert")?),
        None => RootCerts::WebPki,
    };
    let client = match (&files.cert, &files.key) {
        (Some(cert), Some(key)) => Some(ClientCert::new_with_certs(
            &certificates(cert, "--etcd-cert")?,
            private_key(key)?,
        )),
        (None, None) => None,
        (Some(_), None) => return Err("--etcd-cert needs --etcd-key (its private key)".into()),
        (None, Some(_)) => return Err("--etcd-key needs --etcd-cert (its certificate)".into()),
    };
    Ok(TlsConfig::builder()
        .provider(TlsProvider::Rustls)
        .root_certs(roots)
        .client_cert(client)
        .build())
}

fn read(path: &Path, option: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{option} {}: {e}", path.display()))
}

/// Every certificate in a PEM file; at least one.
fn certificates(path: &Path, option: &str) -> Result<Vec<Certificate<'static>>, String> {
    let pem = read(path, option)?;
    let mut found = Vec::new();
    for item in ureq::tls::parse_pem(&pem) {
        match item {
            Ok(PemItem::Certificate(cert)) => found.push(cert),
            Ok(_) => {}
            Err(e) => return Err(format!("{option} {}: {e}", path.display())),
        }
    }
    if found.is_empty() {
        return Err(format!(
            "{option} {}: no PEM certificate (-----BEGIN CERTIFICATE-----) in it",
            path.display()
        ));
    }
    Ok(found)
}

/// The first private key in a PEM file.
fn private_key(path: &Path) -> Result<PrivateKey<'static>, String> {
    let pem = read(path, "--etcd-key")?;
    for item in ureq::tls::parse_pem(&pem) {
        match item {
            Ok(PemItem::PrivateKey(key)) => return Ok(key),
            Ok(_) => {}
            Err(e) => return Err(format!("--etcd-key {}: {e}", path.display())),
        }
    }
    Err(format!(
        "--etcd-key {}: no PEM private key (-----BEGIN PRIVATE KEY-----) in it",
        path.display()
    ))
}
