//! TLS for the SQL ports (Postgres wire, Flight SQL): one certificate
//! chain and key, read once at start so a bad file fails the start.

use std::io::BufReader;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;

#[derive(Clone)]
pub struct SqlTls {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    pub acceptor: tokio_rustls::TlsAcceptor,
}

impl SqlTls {
    pub fn load(cert: &Path, key: &Path) -> anyhow::Result<Self> {
        let cert_pem = std::fs::read(cert)
            .with_context(|| format!("MEDALLION_SQL_TLS_CERT: reading {}", cert.display()))?;
        let key_pem = std::fs::read(key)
            .with_context(|| format!("MEDALLION_SQL_TLS_KEY: reading {}", key.display()))?;
        let chain = rustls_pemfile::certs(&mut BufReader::new(cert_pem.as_slice()))
            .collect::<Result<Vec<_>, _>>()
            .context("MEDALLION_SQL_TLS_CERT: not a PEM certificate chain")?;
        anyhow::ensure!(
            !chain.is_empty(),
            "MEDALLION_SQL_TLS_CERT: {} holds no certificate",
            cert.display()
        );
        let private = rustls_pemfile::private_key(&mut BufReader::new(key_pem.as_slice()))
            .context("MEDALLION_SQL_TLS_KEY: not a PEM private key")?
            .with_context(|| {
                format!(
                    "MEDALLION_SQL_TLS_KEY: {} holds no private key",
                    key.display()
                )
            })?;
        let config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(chain, private)
            .context("MEDALLION_SQL_TLS_KEY does not match MEDALLION_SQL_TLS_CERT")?;
        Ok(SqlTls {
            cert_pem,
            key_pem,
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
        })
    }
}
