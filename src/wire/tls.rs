//! TLS configuration: toward clients (a certificate and key from PEM files)
//! and toward servers (libpq `sslmode` semantics: `prefer`/`require` encrypt
//! without checking the certificate, `verify-ca`/`verify-full` check it
//! against the CA certificates of `sslrootcert`).

use std::path::Path;
use std::sync::Arc;

use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

use super::WireError;

/// TLS toward a server, from the URL's `sslmode` (libpq's meanings; `allow` is not supported).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SslMode {
    /// Never TLS.
    Disable,
    /// TLS if the server offers it, else plaintext (libpq's default).
    Prefer,
    /// TLS or fail; the certificate is checked only if `sslrootcert` is given.
    Require,
    /// TLS with the certificate chain verified against `sslrootcert`.
    VerifyCa,
    /// As verify-ca, and the certificate must name the host.
    VerifyFull,
}

impl SslMode {
    /// The URL spelling (`verify-full`), e.g. for PGSSLMODE.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    pub(crate) fn parse(s: &str) -> Option<SslMode> {
        Some(match s {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return None,
        })
    }

    /// Whether a server without TLS must be refused.
    pub(crate) fn requires_tls(self) -> bool {
        !matches!(self, SslMode::Disable | SslMode::Prefer)
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Loads a server certificate chain and key for TLS toward clients.
pub(crate) fn server_config(
    cert: &Path,
    key: &Path,
) -> Result<Arc<rustls::ServerConfig>, WireError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| WireError::Tls(format!("cannot read certificate {}: {e}", cert.display())))?
        .collect::<Result<_, _>>()
        .map_err(|e| WireError::Tls(format!("bad certificate {}: {e}", cert.display())))?;
    if certs.is_empty() {
        return Err(WireError::Tls(format!(
            "no certificate in {}",
            cert.display()
        )));
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| WireError::Tls(format!("cannot read private key {}: {e}", key.display())))?;
    let cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| WireError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| WireError::Tls(format!("certificate and key do not fit: {e}")))?;
    Ok(Arc::new(cfg))
}

/// A client config that encrypts without verifying the server certificate,
/// as libpq does for `sslmode=require`.
pub(crate) fn client_config_no_verify() -> Arc<rustls::ClientConfig> {
    let p = provider();
    let cfg = rustls::ClientConfig::builder_with_provider(p.clone())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ChainVerifier {
            provider: p,
            roots: None,
        }))
        .with_no_client_auth();
    Arc::new(cfg)
}

/// The client config for a server connection with `mode` (not `disable`):
/// as libpq, a given root certificate file means the chain is verified
/// (whatever the mode), and `verify-full` also checks the host name.
pub(crate) fn client_config_for(
    mode: SslMode,
    rootcert: Option<&Path>,
) -> Result<Arc<rustls::ClientConfig>, WireError> {
    match rootcert {
        Some(root) => verifying_client_config(root, mode == SslMode::VerifyFull),
        None if matches!(mode, SslMode::VerifyCa | SslMode::VerifyFull) => Err(WireError::Tls(
            format!("sslmode={} needs sslrootcert", mode.as_str()),
        )),
        None => Ok(client_config_no_verify()),
    }
}

/// A client config that verifies the server's certificate chain against the
/// CA certificates in the PEM file `root`, and with `check_host` also that
/// the certificate names the host connected to (`verify-full`).
fn verifying_client_config(
    root: &Path,
    check_host: bool,
) -> Result<Arc<rustls::ClientConfig>, WireError> {
    let roots = Arc::new(root_store(root)?);
    let p = provider();
    let builder = rustls::ClientConfig::builder_with_provider(p.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| WireError::Tls(e.to_string()))?;
    let cfg = if check_host {
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(roots, p)
            .build()
            .map_err(|e| WireError::Tls(format!("{}: {e}", root.display())))?;
        builder.with_webpki_verifier(verifier).with_no_client_auth()
    } else {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(ChainVerifier {
                provider: p,
                roots: Some(roots),
            }))
            .with_no_client_auth()
    };
    Ok(Arc::new(cfg))
}

/// Reads the CA certificates of a PEM file.
pub(crate) fn root_store(path: &Path) -> Result<rustls::RootCertStore, WireError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| WireError::Tls(format!("cannot read {}: {e}", path.display())))?
        .collect::<Result<_, _>>()
        .map_err(|e| WireError::Tls(format!("bad certificate in {}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(WireError::Tls(format!(
            "no PEM certificate in {}",
            path.display()
        )));
    }
    let mut store = rustls::RootCertStore::empty();
    let (added, _) = store.add_parsable_certificates(certs);
    if added == 0 {
        return Err(WireError::Tls(format!(
            "no usable CA certificate in {}",
            path.display()
        )));
    }
    Ok(store)
}

/// Checks the server certificate's chain against `roots` but not its name
/// (`verify-ca`); with no roots, checks nothing (`prefer`/`require`).
/// Handshake signatures are always checked.
#[derive(Debug)]
struct ChainVerifier {
    provider: Arc<rustls::crypto::CryptoProvider>,
    roots: Option<Arc<rustls::RootCertStore>>,
}

impl rustls::client::danger::ServerCertVerifier for ChainVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        if let Some(roots) = &self.roots {
            let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
            rustls::client::verify_server_cert_signed_by_trust_anchor(
                &cert,
                roots,
                intermediates,
                now,
                self.provider.signature_verification_algorithms.all,
            )?;
        }
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
