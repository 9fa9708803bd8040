//! A self-signed certificate for the lab's endpoint, and the client side
//! that trusts exactly it.

use std::sync::Arc;

use anyhow::{Context, Result};
use rustls::{
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer},
    ClientConfig, RootCertStore, ServerConfig,
};

pub const SERVER_NAME: &str = "mail.lab.example";

pub struct LabTls {
    pub server: Arc<ServerConfig>,
    pub client: Arc<ClientConfig>,
    /// The certificate and its key in PEM, for the lab's nginx and HAProxy.
    pub cert_pem: String,
    pub key_pem: String,
}

pub fn lab_tls() -> Result<LabTls> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cert = rcgen::generate_simple_self_signed(vec![SERVER_NAME.to_string()])
        .context("generating the lab certificate")?;
    let der: CertificateDer<'static> = cert.cert.der().clone();
    let (cert_pem, key_pem) = (cert.cert.pem(), cert.signing_key.serialize_pem());
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.signing_key.serialize_der()));
    let server = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("TLS versions")?
        .with_no_client_auth()
        .with_single_cert(vec![der.clone()], key)
        .context("the lab server certificate")?;
    let mut roots = RootCertStore::empty();
    roots.add(der).context("trusting the lab certificate")?;
    let client = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS versions")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(LabTls {
        server: Arc::new(server),
        client: Arc::new(client),
        cert_pem,
        key_pem,
    })
}
