//! The TLS client of `syslog+tls` sinks (RFC 5425): the receiver's certificate must chain to a
//! CA of the `ca=` file and name `server-name=` (by default the host of the target).

use std::{path::PathBuf, sync::Arc};

use anyhow::{bail, Context as _, Result};
use rustls_pki_types::{pem::PemObject as _, CertificateDer, ServerName};
use tokio_rustls::{rustls, TlsConnector};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsOptions {
    /// PEM file of the CA certificates trusted to sign the receiver's certificate.
    pub ca: PathBuf,
    /// The name the receiver's certificate must carry (DNS name or IP address).
    pub server_name: String,
}

/// Reads the trust anchors now, so a missing or empty CA file fails at start-up.
pub fn connector(options: &TlsOptions) -> Result<(TlsConnector, ServerName<'static>)> {
    let ca = &options.ca;
    let mut roots = rustls::RootCertStore::empty();
    let pem = crate::bounded::read(ca, crate::bounded::CERTIFICATE_FILE_LIMIT)
        .with_context(|| format!("reading the syslog TLS trust anchors (ca=) from {}", ca.display()))?;
    for certificate in CertificateDer::pem_slice_iter(&pem) {
        let certificate = certificate.with_context(|| format!("{}: not a PEM certificate", ca.display()))?;
        roots.add(certificate).with_context(|| format!("{}: a certificate that cannot be a trust anchor", ca.display()))?;
    }
    if roots.is_empty() {
        bail!("{} holds no certificate: ca= needs the PEM of the CA that signs the receiver's certificate", ca.display());
    }
    let server_name = ServerName::try_from(options.server_name.clone()).with_context(|| {
        format!("`{}` is neither a DNS name nor an IP address: set server-name= to the receiver's certificate name", options.server_name)
    })?;
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .context("the TLS provider supports no safe protocol version")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok((TlsConnector::from(Arc::new(config)), server_name))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    use rustls_pki_types::PrivateKeyDer;
    use serde_json::json;
    use tokio::{io::AsyncReadExt as _, net::TcpListener, sync::mpsc};
    use tokio_rustls::TlsAcceptor;

    use super::*;
    use crate::events::sinks::{net, spec::Target, syslog::Header, Counters, Format, Renderer};

    /// A CA (written to `ca.pem`) and a server certificate for `name` that it signed.
    fn pki(dir: &std::path::Path, name: &str) -> (PathBuf, rustls::ServerConfig) {
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_key = KeyPair::generate().unwrap();
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let server_key = KeyPair::generate().unwrap();
        let server = CertificateParams::new(vec![name.to_owned()]).unwrap().signed_by(&server_key, &issuer).unwrap();
        let ca_file = dir.join("ca.pem");
        std::fs::write(&ca_file, ca.pem()).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![server.der().clone()],
                PrivateKeyDer::try_from(server_key.serialize_der()).unwrap(),
            )
            .unwrap();
        (ca_file, config)
    }

    #[tokio::test]
    async fn events_reach_a_tls_receiver_that_the_ca_vouches_for() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, server_config) = pki(dir.path(), "localhost");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tls, server_name) = connector(&TlsOptions { ca, server_name: "localhost".into() }).unwrap();
        let connector = net::Connector::Tls { target: Target { host: "127.0.0.1".into(), port }, tls, server_name };
        let (tx, rx) = mpsc::channel(4);
        let renderer = Renderer { format: Format::Json, syslog: Some(Header::new(16)) };
        tx.send(Arc::new(json!({"kind": "flow", "time": "2026-11-26T23:50:01Z", "node": "n", "verdict": "deny"}).into()))
            .await
            .unwrap();
        drop(tx);
        let counters = Arc::new(Counters::default());
        let sink = tokio::spawn({
            let counters = counters.clone();
            async move { net::run_stream("tls", &connector, rx, &renderer, &counters).await }
        });
        let (tcp, _) = listener.accept().await.unwrap();
        let mut stream = TlsAcceptor::from(Arc::new(server_config)).accept(tcp).await.unwrap();
        let mut received = String::new();
        stream.read_to_string(&mut received).await.unwrap();
        sink.await.unwrap();
        let (len, message) = received.split_once(' ').unwrap();
        assert_eq!(len.parse::<usize>().unwrap(), message.len(), "octet-counted: {received}");
        assert!(message.starts_with("<132>1 2026-11-26T23:50:01.000000Z n zt-agent "), "{message}");
        assert!(message.ends_with(r#"{"kind":"flow","time":"2026-11-26T23:50:01Z","node":"n","verdict":"deny"}"#));
        assert_eq!(counters.snapshot("tls", "syslog+tls", 0).delivered, 1);
    }

    #[tokio::test]
    async fn a_receiver_the_ca_does_not_vouch_for_gets_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (_, server_config) = pki(dir.path(), "localhost");
        let other = tempfile::tempdir().unwrap();
        let (foreign_ca, _) = pki(other.path(), "localhost");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tls, server_name) = connector(&TlsOptions { ca: foreign_ca, server_name: "localhost".into() }).unwrap();
        let connector = net::Connector::Tls { target: Target { host: "127.0.0.1".into(), port }, tls, server_name };
        let (tx, rx) = mpsc::channel(4);
        tx.send(Arc::new(json!({"kind": "flow"}).into())).await.unwrap();
        let counters = Arc::new(Counters::default());
        let sink = tokio::spawn({
            let counters = counters.clone();
            async move {
                let renderer = Renderer { format: Format::Json, syslog: Some(Header::new(16)) };
                net::run_stream("tls", &connector, rx, &renderer, &counters).await
            }
        });
        let (tcp, _) = listener.accept().await.unwrap();
        assert!(TlsAcceptor::from(Arc::new(server_config)).accept(tcp).await.is_err(), "the client must abort the handshake");
        for _ in 0..200 {
            if counters.snapshot("tls", "syslog+tls", 0).errors > 0 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let stats = counters.snapshot("tls", "syslog+tls", 0);
        assert_eq!((stats.delivered, stats.connected), (0, Some(false)), "{stats:?}");
        assert!(stats.errors > 0, "{stats:?}");
        sink.abort();
    }

    #[test]
    fn a_ca_file_without_certificates_is_refused_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let err = connector(&TlsOptions { ca: empty, server_name: "localhost".into() }).err().unwrap();
        assert!(format!("{err:#}").contains("holds no certificate"), "{err:#}");
        let missing = connector(&TlsOptions { ca: dir.path().join("missing.pem"), server_name: "x".into() }).err().unwrap();
        assert!(format!("{missing:#}").contains("missing.pem"), "{missing:#}");
        let device = connector(&TlsOptions { ca: "/dev/zero".into(), server_name: "x".into() }).err().unwrap();
        assert!(format!("{device:#}").ends_with("/dev/zero: not a regular file (a character device)"), "{device:#}");
    }
}
