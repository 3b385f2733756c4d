//! TLS to PostgreSQL as libpq's `sslmode` says, through rustls with the ring provider
//! (as for etcd):
//!
//! - `disable`: none; `allow`, `prefer`: TLS when the server offers it, `require`: TLS
//!   or nothing; none of them checks the server's certificate (libpq's meaning), unless
//!   `sslrootcert` is given, which makes `require` a `verify-ca` (as libpq does).
//! - `verify-ca`: the certificate must chain to `sslrootcert`; `verify-full`: and name
//!   the host (or its IP address) too.
//!
//! `sslrootcert` is a PEM file, or `system` for Mozilla's roots; its default is
//! `~/.postgresql/root.crt`. The client certificate is `sslcert` and `sslkey`, by
//! default `~/.postgresql/postgresql.crt` and `.key` when both exist.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, Error, RootCertStore, SignatureScheme};

use super::url::{PgUrl, SslMode};

/// The rustls configuration for this URL; the error names the file and what is wrong.
pub fn config(url: &PgUrl) -> Result<ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let algorithms = provider.signature_verification_algorithms;
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?;
    let home = dirs::home_dir().map(|h| h.join(".postgresql"));
    let verify =
        url.sslmode.verifies() || (url.sslmode == SslMode::Require && url.sslrootcert.is_some());
    let verifier: Arc<dyn ServerCertVerifier> = if verify {
        let roots = roots(url, home.as_deref())?;
        let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|e| format!("sslrootcert: {e}"))?;
        if url.sslmode == SslMode::VerifyFull {
            webpki
        } else {
            Arc::new(AnyName(webpki))
        }
    } else {
        Arc::new(Unchecked(algorithms))
    };
    let builder = builder
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let defaults = home
        .as_ref()
        .map(|h| (h.join("postgresql.crt"), h.join("postgresql.key")))
        .filter(|(c, k)| c.exists() && k.exists());
    let client = match (&url.sslcert, &url.sslkey) {
        (Some(cert), Some(key)) => Some((cert.clone(), key.clone())),
        (None, None) => defaults,
        (Some(_), None) => return Err("sslcert needs sslkey (its private key)".into()),
        (None, Some(_)) => return Err("sslkey needs sslcert (its certificate)".into()),
    };
    match client {
        None => Ok(builder.with_no_client_auth()),
        Some((cert, key)) => {
            let certs = certificates(&cert, "sslcert")?;
            let key = PrivateKeyDer::from_pem_file(&key)
                .map_err(|e| format!("sslkey {}: {e}", key.display()))?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| format!("sslcert {}: {e}", cert.display()))
        }
    }
}

fn roots(url: &PgUrl, home: Option<&Path>) -> Result<RootCertStore, String> {
    let path: PathBuf = match url.sslrootcert.as_deref() {
        Some("system") => {
            return Ok(RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
            });
        }
        Some(path) => path.into(),
        None => match home {
            Some(home) => home.join("root.crt"),
            None => return Err("sslmode verify-ca/verify-full needs sslrootcert".into()),
        },
    };
    let mut roots = RootCertStore::empty();
    for cert in certificates(&path, "sslrootcert")? {
        roots
            .add(cert)
            .map_err(|e| format!("sslrootcert {}: {e}", path.display()))?;
    }
    Ok(roots)
}

/// Every certificate in a PEM file; at least one.
fn certificates(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let bad = |e: &dyn std::fmt::Display| format!("{what} {}: {e}", path.display());
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| bad(&e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(&e))?;
    if certs.is_empty() {
        return Err(bad(
            &"no PEM certificate (-----BEGIN CERTIFICATE-----) in it",
        ));
    }
    Ok(certs)
}

/// `verify-ca`: the chain is checked, the name is not.
#[derive(Debug)]
struct AnyName(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for AnyName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName
                | rustls::CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// `prefer`, `require`: encryption without checking who the server is (libpq's
/// meaning of these modes); the handshake's signatures are still checked.
#[derive(Debug)]
struct Unchecked(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for Unchecked {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}
