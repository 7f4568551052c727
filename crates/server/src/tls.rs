//! Serving HTTPS: the `[tls]` section's certificate chain and private key, read once at startup
//! into a rustls server configuration. Connections then do their TLS handshake before HTTP, under
//! the header-read timeout (see `connection`).

use std::fmt;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::PrivateKeyDer;
use rustls::ServerConfig;
use tokio_rustls::TlsAcceptor;

use crate::config::TlsSettings;

/// The server side of TLS for every connection.
#[derive(Clone)]
pub struct Acceptor(pub(crate) TlsAcceptor);

impl fmt::Debug for Acceptor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Acceptor")
    }
}

/// The acceptor `settings` describe: `None` when both files are left empty (plain HTTP).
///
/// # Errors
/// The key at fault and why: only one of the two files given, a file that cannot be read or
/// holds no certificate or key, or a key that does not belong to the certificate.
pub(crate) fn acceptor(settings: &TlsSettings) -> Result<Option<Acceptor>, (&'static str, String)> {
    let (cert_file, key_file) = (&settings.cert_file, &settings.key_file);
    match (
        cert_file.as_os_str().is_empty(),
        key_file.as_os_str().is_empty(),
    ) {
        (true, true) => return Ok(None),
        (false, true) => {
            return Err((
                "tls.key_file",
                "is needed with tls.cert_file (both or neither)".into(),
            ))
        }
        (true, false) => {
            return Err((
                "tls.cert_file",
                "is needed with tls.key_file (both or neither)".into(),
            ))
        }
        (false, false) => {}
    }
    let chain =
        replication::tls::certificates(cert_file).map_err(|detail| ("tls.cert_file", detail))?;
    if let Ok(text) = std::fs::read(key_file) {
        let text = String::from_utf8_lossy(&text);
        if text.contains("ENCRYPTED PRIVATE KEY") || text.contains("Proc-Type: 4,ENCRYPTED") {
            return Err((
                "tls.key_file",
                format!(
                    "{}: the private key is encrypted, which is not supported (the server would need its passphrase at every start); decrypt it, e.g. `openssl pkey -in {0} -out key.pem`, and keep that file readable by the server alone",
                    key_file.display()
                ),
            ));
        }
    }
    let key = PrivateKeyDer::from_pem_file(key_file).map_err(|error| {
        let detail = match error {
            rustls::pki_types::pem::Error::NoItemsFound => format!(
                "{}: holds no PEM private key (-----BEGIN PRIVATE KEY-----, or RSA / EC PRIVATE KEY)",
                key_file.display()
            ),
            error => format!("{}: {error}", key_file.display()),
        };
        ("tls.key_file", detail)
    })?;
    let mut config = ServerConfig::builder_with_provider(replication::tls::crypto_provider())
        .with_safe_default_protocol_versions()
        .map_err(|error| ("tls.cert_file", format!("TLS cannot be set up: {error}")))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|error| {
            (
                "tls.key_file",
                format!(
                    "{} does not go with the certificate in {}: {error}",
                    key_file.display(),
                    cert_file.display()
                ),
            )
        })?;
    // Only HTTP/1 is served (see `connection`): a client that offers only `h2` is refused in
    // the handshake, one that offers nothing is served HTTP/1.1.
    config.alpn_protocols = vec![b"http/1.1".to_vec(), b"http/1.0".to_vec()];
    Ok(Some(Acceptor(TlsAcceptor::from(Arc::new(config)))))
}
