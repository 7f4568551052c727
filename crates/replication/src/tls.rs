//! TLS for links to peers reached at `https://` or `wss://`: which certificate authorities a
//! peer's certificate may chain to (the public web's, from `webpki-roots`, plus those of the
//! peer's `ca_file`), and reading PEM certificates, which the server's `[tls]` uses too.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::{ClientConfig, RootCertStore};

/// The certificates in the PEM file at `path`, in file order.
///
/// # Errors
/// A sentence naming the file, when it cannot be read, is not PEM, or holds no certificate.
pub fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let unreadable = |error: rustls::pki_types::pem::Error| format!("{}: {error}", path.display());
    let certificates = CertificateDer::pem_file_iter(path)
        .map_err(unreadable)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(unreadable)?;
    if certificates.is_empty() {
        return Err(format!(
            "{}: holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            path.display()
        ));
    }
    Ok(certificates)
}

/// The cryptography every TLS configuration here uses: rustls's `ring` provider.
pub fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A client configuration that trusts the public web's certificate authorities and, when
/// given, those in `ca_file` (a private CA's certificate, for example).
///
/// # Errors
/// A sentence naming what is wrong with `ca_file`.
pub(crate) fn client_config(ca_file: Option<&Path>) -> Result<Arc<ClientConfig>, String> {
    let mut roots = RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    if let Some(ca_file) = ca_file {
        for certificate in certificates(ca_file)? {
            roots.add(certificate).map_err(|error| {
                format!(
                    "{}: a certificate in it cannot be a trust anchor: {error}",
                    ca_file.display()
                )
            })?;
        }
    }
    let config = ClientConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()
        .map_err(|error| format!("TLS cannot be set up: {error}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}
