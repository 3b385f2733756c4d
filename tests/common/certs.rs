//! Certificates for the TLS tests, made at run time with rcgen (no openssl binary): a
//! CA, a server certificate for 127.0.0.1 and localhost signed by it, a client
//! certificate signed by it, and a second CA that signed nothing the servers show.

use std::fs;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};

/// PEM files in a directory.
#[derive(Clone, Debug)]
pub struct Certs {
    /// The CA that signed the server and client certificates.
    pub ca: PathBuf,
    /// Another CA: trusting it alone, no server verifies.
    pub other_ca: PathBuf,
    pub server: PathBuf,
    pub server_key: PathBuf,
    pub client: PathBuf,
    pub client_key: PathBuf,
    /// A client certificate whose CommonName is `certuser`: PostgreSQL's `cert` login
    /// takes the role from it.
    pub pg_client: PathBuf,
    pub pg_client_key: PathBuf,
}

fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    CertifiedIssuer::self_signed(params, KeyPair::generate().expect("CA key")).expect("CA cert")
}

fn leaf(
    issuer: &CertifiedIssuer<'static, KeyPair>,
    name: Option<&str>,
    usages: Vec<ExtendedKeyUsagePurpose>,
) -> (String, String) {
    let sans = vec!["127.0.0.1".to_owned(), "localhost".to_owned()];
    let mut params = CertificateParams::new(sans).expect("leaf params");
    // etcd's gateway refuses a client certificate with a CommonName (it cannot log in
    // by it), so a client's has none.
    params.distinguished_name = DistinguishedName::new();
    if let Some(name) = name {
        params.distinguished_name.push(DnType::CommonName, name);
    }
    params.extended_key_usages = usages;
    let key = KeyPair::generate().expect("leaf key");
    let cert = params.signed_by(&key, issuer).expect("leaf cert");
    (cert.pem(), key.serialize_pem())
}

impl Certs {
    /// Makes every certificate and key in `dir`.
    pub fn make(dir: &Path) -> Certs {
        fs::create_dir_all(dir).expect("certs dir");
        let write = |name: &str, text: &str| {
            let path = dir.join(name);
            fs::write(&path, text).expect("write a PEM file");
            path
        };
        let authority = ca("singleflight test CA");
        let other = ca("some other CA");
        // The servers' certificate is also their peers' client certificate.
        let (server, server_key) = leaf(
            &authority,
            Some("etcd"),
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        );
        let (client, client_key) =
            leaf(&authority, None, vec![ExtendedKeyUsagePurpose::ClientAuth]);
        let (pg_client, pg_client_key) = leaf(
            &authority,
            Some("certuser"),
            vec![ExtendedKeyUsagePurpose::ClientAuth],
        );
        Certs {
            pg_client: write("pg-client.pem", &pg_client),
            pg_client_key: write("pg-client-key.pem", &pg_client_key),
            ca: write("ca.pem", &authority.pem()),
            other_ca: write("other-ca.pem", &other.pem()),
            server: write("server.pem", &server),
            server_key: write("server-key.pem", &server_key),
            client: write("client.pem", &client),
            client_key: write("client-key.pem", &client_key),
        }
    }
}
