//! Serving HTTPS: the `[tls]` section's certificate chain and private key, read at startup into
//! a rustls server configuration. Connections then do their TLS handshake before HTTP, under the
//! header-read timeout (see `connection`).
//!
//! The certificate is read again when its files change (checked every `tls.reload_interval`),
//! so a renewed one is served without a restart; new handshakes get it, connections already
//! open keep theirs. Files that do not load (a renewal caught halfway, a key that does not go
//! with the certificate) are logged and the certificate in use is kept.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::PrivateKeyDer;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use tokio_rustls::TlsAcceptor;

use crate::config::TlsSettings;

/// The server side of TLS for every connection, and the certificate it presents now.
#[derive(Clone)]
pub struct Acceptor {
    pub(crate) tls: TlsAcceptor,
    current: Arc<Current>,
}

impl fmt::Debug for Acceptor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Acceptor")
    }
}

/// The certificate presented now, with what it was loaded from.
#[derive(Debug)]
struct Current {
    cert_file: PathBuf,
    key_file: PathBuf,
    loaded: RwLock<Loaded>,
}

#[derive(Debug)]
struct Loaded {
    key: Arc<CertifiedKey>,
    /// `None` when the certificate's validity could not be read.
    validity: Option<Validity>,
    /// The files' modification times and sizes when they were last read.
    stamp: Option<Stamp>,
}

type Stamp = [(Option<SystemTime>, u64); 2];

/// Why the `[tls]` files do not load: the key at fault and what is wrong.
pub(crate) type LoadError = (&'static str, String);

impl ResolvesServerCert for Current {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.read().key.clone())
    }
}

impl Current {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, Loaded> {
        self.loaded.read().unwrap_or_else(|p| p.into_inner())
    }

    fn stamp(&self) -> Option<Stamp> {
        stamp(&self.cert_file, &self.key_file)
    }
}

/// The files' modification times and sizes; `None` when either cannot be read.
fn stamp(cert_file: &Path, key_file: &Path) -> Option<Stamp> {
    let of = |path: &Path| {
        let meta = std::fs::metadata(path).ok()?;
        Some((meta.modified().ok(), meta.len()))
    };
    Some([of(cert_file)?, of(key_file)?])
}

impl Acceptor {
    /// When the certificate presented now is valid.
    pub(crate) fn validity(&self) -> Option<Validity> {
        self.current.read().validity
    }

    /// Reads the certificate and key again if their files changed since they were last read,
    /// and presents them from the next handshake on. Returns what happened, for the log: `None`
    /// when nothing changed, else the new certificate's validity or why it was not taken.
    pub(crate) fn reload_if_changed(&self) -> Option<Result<Option<Validity>, LoadError>> {
        let stamp = self.current.stamp();
        if stamp.is_none() || stamp == self.current.read().stamp {
            // Unchanged, or a file is missing for a moment (a renewal that swaps files).
            return None;
        }
        let outcome = load(&self.current.cert_file, &self.current.key_file);
        let mut loaded = self
            .current
            .loaded
            .write()
            .unwrap_or_else(|p| p.into_inner());
        // Tried once per change of the files, whatever came of it.
        loaded.stamp = stamp;
        Some(outcome.map(|(key, validity)| {
            loaded.key = key;
            loaded.validity = validity;
            validity
        }))
    }
}

/// The acceptor `settings` describe: `None` when both files are left empty (plain HTTP).
///
/// # Errors
/// The key at fault and why: only one of the two files given, a file that cannot be read or
/// holds no certificate or key, or a key that does not belong to the certificate.
pub(crate) fn acceptor(settings: &TlsSettings) -> Result<Option<Acceptor>, LoadError> {
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
    // Taken before reading, so that a change made while reading is read again later.
    let stamp = stamp(cert_file, key_file);
    let (key, validity) = load(cert_file, key_file)?;
    let current = Arc::new(Current {
        cert_file: cert_file.clone(),
        key_file: key_file.clone(),
        loaded: RwLock::new(Loaded {
            key,
            validity,
            stamp,
        }),
    });
    let mut config = ServerConfig::builder_with_provider(replication::tls::crypto_provider())
        .with_safe_default_protocol_versions()
        .map_err(|error| ("tls.cert_file", format!("TLS cannot be set up: {error}")))?
        .with_no_client_auth()
        .with_cert_resolver(current.clone());
    // Only HTTP/1 is served (see `connection`): a client that offers only `h2` is refused in
    // the handshake, one that offers nothing is served HTTP/1.1.
    config.alpn_protocols = vec![b"http/1.1".to_vec(), b"http/1.0".to_vec()];
    Ok(Some(Acceptor {
        tls: TlsAcceptor::from(Arc::new(config)),
        current,
    }))
}

/// The certificate chain in `cert_file` with the private key in `key_file`, checked to go
/// together, and when the certificate is valid.
fn load(
    cert_file: &Path,
    key_file: &Path,
) -> Result<(Arc<CertifiedKey>, Option<Validity>), LoadError> {
    let chain =
        replication::tls::certificates(cert_file).map_err(|detail| ("tls.cert_file", detail))?;
    let pem = std::fs::read(key_file).map_err(|error| {
        (
            "tls.key_file",
            format!("{}: I/O error: {error}", key_file.display()),
        )
    })?;
    let text = String::from_utf8_lossy(&pem);
    if text.contains("ENCRYPTED PRIVATE KEY") || text.contains("Proc-Type: 4,ENCRYPTED") {
        return Err((
            "tls.key_file",
            format!(
                "{}: the private key is encrypted, which is not supported (the server would need its passphrase at every start); decrypt it, e.g. `openssl pkey -in {0} -out key.pem`, and keep that file readable by the server alone",
                key_file.display()
            ),
        ));
    }
    let key = PrivateKeyDer::from_pem_slice(&pem).map_err(|error| {
        let detail = match error {
            rustls::pki_types::pem::Error::NoItemsFound => format!(
                "{}: holds no PEM private key (-----BEGIN PRIVATE KEY-----, or RSA / EC PRIVATE KEY)",
                key_file.display()
            ),
            error => format!("{}: {error}", key_file.display()),
        };
        ("tls.key_file", detail)
    })?;
    let validity = validity(&chain[0]);
    let certified = CertifiedKey::from_der(chain, key, &replication::tls::crypto_provider())
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
    Ok((Arc::new(certified), validity))
}

/// When a certificate is valid, in seconds since the Unix epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Validity {
    pub(crate) not_before: i64,
    pub(crate) not_after: i64,
}

/// Logs a warning when the server's certificate is not valid yet, has expired, or expires
/// within 30 days; clients would refuse it, and nothing else would say why.
pub(crate) fn warn_of_expiry(validity: Option<Validity>, cert_file: &Path) {
    let now = SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| {
            i64::try_from(since.as_secs()).unwrap_or(i64::MAX)
        });
    match validity {
        Some(validity) => {
            if let Some(warning) = expiry_warning(validity, now) {
                tracing::warn!(target: "lockstep", cert_file = %cert_file.display(), "{warning}");
            }
        }
        None => tracing::warn!(
            target: "lockstep",
            cert_file = %cert_file.display(),
            "the TLS certificate's validity could not be read, so its expiry is not checked"
        ),
    }
}

/// Checks the certificate's files every `interval` until `shutdown`, and serves what they hold
/// from the next handshake on once they change and load (see [`Acceptor::reload_if_changed`]).
pub(crate) async fn reload_on_change(
    acceptor: Acceptor,
    interval: std::time::Duration,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let cert_file = acceptor.current.cert_file.clone();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
        match acceptor.reload_if_changed() {
            None => {}
            Some(Ok(validity)) => {
                tracing::info!(
                    target: "lockstep",
                    cert_file = %cert_file.display(),
                    "the TLS certificate's files changed; new connections get the new certificate"
                );
                warn_of_expiry(validity, &cert_file);
            }
            Some(Err((key, detail))) => tracing::warn!(
                target: "lockstep",
                "the TLS certificate's files changed but do not load, so the certificate in use is kept: configuration key `{key}`: {detail}"
            ),
        }
    }
}

/// How long before its end a certificate's expiry is worth a warning at startup.
const EXPIRY_WARNING_SECONDS: i64 = 30 * 24 * 3600;

/// What to warn about a certificate valid during `validity` at `now`: not yet valid, expired,
/// or expiring within 30 days.
pub(crate) fn expiry_warning(validity: Validity, now: i64) -> Option<String> {
    let days = |seconds: i64| seconds / 86_400;
    if now < validity.not_before {
        Some(format!(
            "the TLS certificate is not valid yet (for {} more days): clients will refuse it",
            days(validity.not_before - now) + 1
        ))
    } else if now >= validity.not_after {
        Some(format!(
            "the TLS certificate expired {} days ago: clients will refuse it; renew it (a renewed certificate is taken without a restart, see tls.reload_interval)",
            days(now - validity.not_after)
        ))
    } else if validity.not_after - now < EXPIRY_WARNING_SECONDS {
        Some(format!(
            "the TLS certificate expires in {} days; renew it before then",
            days(validity.not_after - now)
        ))
    } else {
        None
    }
}

/// The validity of a DER certificate, read from its `tbsCertificate` (RFC 5280, 4.1): `None`
/// when the bytes are not shaped as expected. Only the server's own certificate is read, once.
pub(crate) fn validity(certificate: &[u8]) -> Option<Validity> {
    const SEQUENCE: u8 = 0x30;
    let (SEQUENCE, certificate, _) = der(certificate)? else {
        return None;
    };
    let (SEQUENCE, tbs, _) = der(certificate)? else {
        return None;
    };
    let (tag, _, mut rest) = der(tbs)?;
    if tag == 0xa0 {
        // The explicit version came first; the serial number follows.
        rest = der(rest)?.2;
    }
    // The signature algorithm, then the issuer.
    rest = der(der(rest)?.2)?.2;
    let (SEQUENCE, validity, _) = der(rest)? else {
        return None;
    };
    let (before_tag, before, rest) = der(validity)?;
    let (after_tag, after, _) = der(rest)?;
    Some(Validity {
        not_before: time(before_tag, before)?,
        not_after: time(after_tag, after)?,
    })
}

/// One DER element: its tag, its content and what follows it.
fn der(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, input) = input.split_first()?;
    let (&first, mut input) = input.split_first()?;
    let length = if first < 0x80 {
        usize::from(first)
    } else {
        let count = usize::from(first & 0x7f);
        if count == 0 || count > 4 {
            return None;
        }
        let (bytes, rest) = input.split_at_checked(count)?;
        input = rest;
        bytes
            .iter()
            .fold(0usize, |length, byte| (length << 8) | usize::from(*byte))
    };
    let (content, rest) = input.split_at_checked(length)?;
    Some((tag, content, rest))
}

/// A UTCTime (`YYMMDDHHMMSSZ`, years 1950-2049) or GeneralizedTime (`YYYYMMDDHHMMSSZ`), as
/// RFC 5280 has them, in seconds since the Unix epoch.
fn time(tag: u8, text: &[u8]) -> Option<i64> {
    let text = std::str::from_utf8(text).ok()?.strip_suffix('Z')?;
    if !text.bytes().all(|byte| byte.is_ascii_digit()) {
        return None;
    }
    let number = |range: std::ops::Range<usize>| text.get(range)?.parse::<i64>().ok();
    let (year, rest) = match (tag, text.len()) {
        (0x17, 12) => {
            let year = number(0..2)?;
            (if year < 50 { 2000 + year } else { 1900 + year }, 2)
        }
        (0x18, 14) => (number(0..4)?, 4),
        _ => return None,
    };
    let field = |index: usize| number(rest + 2 * index..rest + 2 * index + 2);
    let (month, day) = (field(0)?, field(1)?);
    let (hour, minute, second) = (field(2)?, field(3)?, field(4)?);
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    Some(days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second)
}

/// Days from 1970-01-01 to the given date of the proleptic Gregorian calendar.
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let day_of_year = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::CertificateDer;

    fn fixture(name: &str) -> Vec<CertificateDer<'static>> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/tls")
            .join(name);
        replication::tls::certificates(&path).unwrap()
    }

    #[test]
    fn the_validity_of_the_fixture_certificates_is_read() {
        // 2000-01-01T00:00:00Z, 2126-01-01T00:00:00Z and 2001-01-01T00:00:00Z (`date -d ... +%s`).
        let (start, end, expired_end) = (946_684_800, 4_922_899_200, 978_307_200);
        assert_eq!(
            validity(&fixture("server.pem")[0]),
            Some(Validity {
                not_before: start,
                not_after: end
            })
        );
        assert_eq!(
            validity(&fixture("ca.pem")[0]),
            Some(Validity {
                not_before: start,
                not_after: end
            })
        );
        assert_eq!(
            validity(&fixture("server-expired.pem")[0]),
            Some(Validity {
                not_before: start,
                not_after: expired_end
            })
        );
    }

    #[test]
    fn times_of_both_kinds_are_read_and_bad_ones_are_not() {
        assert_eq!(time(0x17, b"700101000000Z"), Some(0));
        assert_eq!(time(0x17, b"491231235959Z"), Some(2_524_607_999));
        assert_eq!(time(0x18, b"20240229120000Z"), Some(1_709_208_000));
        for (tag, text) in [
            (0x17, &b"700101000000"[..]),
            (0x17, b"20240229120000Z"),
            (0x18, b"2024022912000Z"),
            (0x18, b"20241301000000Z"),
            (0x18, b"2024-2-29120000Z"),
            (0x04, b"700101000000Z"),
        ] {
            assert_eq!(time(tag, text), None, "{text:?}");
        }
    }

    #[test]
    fn truncated_or_foreign_bytes_have_no_validity() {
        let certificate = fixture("server.pem")[0].to_vec();
        for length in 0..certificate.len() {
            assert_eq!(validity(&certificate[..length]), None, "{length}");
        }
        assert_eq!(validity(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]), None);
        assert_eq!(validity(b"not a certificate"), None);
    }

    #[test]
    fn a_certificate_near_or_past_its_end_is_worth_a_warning() {
        let validity = Validity {
            not_before: 1_000_000,
            not_after: 100_000_000,
        };
        assert_eq!(expiry_warning(validity, 50_000_000), None);
        let soon = expiry_warning(validity, 100_000_000 - 86_400 * 3).unwrap();
        assert!(soon.contains("expires in 3 days"), "{soon}");
        let past = expiry_warning(validity, 100_000_000 + 86_400 * 10).unwrap();
        assert!(past.contains("expired 10 days ago"), "{past}");
        let early = expiry_warning(validity, 0).unwrap();
        assert!(early.contains("not valid yet"), "{early}");
    }
}
