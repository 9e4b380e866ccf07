//! End-to-end encryption of streams with TLS 1.3 (rustls, ring provider).
//!
//! An encrypted stream carries one TLS session between the two nodes: every
//! message on it, both ways, is TLS bytes, and its packets have the
//! `ENCRYPTED` flag, so a relay forwards them without reading them and the
//! receiver knows to decrypt. The node whose name sorts first is the TLS
//! client. Each plaintext message goes into the session as a varint length
//! and its bytes; the receiver cuts the decrypted bytes back into messages.
//! Data sent before the handshake finishes waits inside the session, so the
//! first message costs one round trip more than on a plain stream.
//!
//! Both sides present certificates (mutual TLS) signed by the configured CA
//! and naming the node (DNS subject alternative name = node name); a peer
//! whose certificate names another node is refused. `atbus cert` makes a CA
//! and node certificates.
//!
//! Pure: bytes in, bytes out; the node drives it from the peer's home shard.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ClientConnection, Connection, RootCertStore, ServerConfig, ServerConnection};

use crate::stream::StreamId;

/// The one-byte message a TLS server side sends to ask the client side to
/// start (no TLS record starts with a zero byte).
const START: u8 = 0;
/// Ciphertext is handed to the stream layer in messages of at most this.
const CHUNK: usize = 64 * 1024;
/// A batch this large is encrypted at once (TLS's largest record).
const RECORD: usize = 16 * 1024;

/// Why end-to-end TLS could not be set up or went wrong.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate, key or CA file could not be read or parsed.
    #[error("{what} {path}: {reason}")]
    File {
        /// Which file.
        what: &'static str,
        /// Its path.
        path: String,
        /// What failed.
        reason: String,
    },
    /// rustls refused the configuration or the peer.
    #[error("TLS: {0}")]
    Rustls(#[from] rustls::Error),
    /// The peer's certificate does not name the peer.
    #[error("the peer's certificate does not name {0:?}")]
    WrongName(String),
    /// A name that is not a valid DNS name.
    #[error("{0:?} cannot be a TLS name")]
    BadName(String),
    /// The decrypted bytes do not hold whole length-prefixed messages.
    #[error("malformed plaintext framing")]
    Framing,
    /// Certificate generation failed.
    #[error("certificate generation: {0}")]
    Generate(String),
}

/// Which streams are encrypted end to end.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum E2eStreams {
    /// Every application stream.
    All,
    /// These streams only.
    Only(BTreeSet<StreamId>),
}

/// A node's end-to-end TLS: its certificate and key, the CA it trusts, and
/// which streams it encrypts when it starts them.
#[derive(Clone)]
pub struct TlsContext {
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
    streams: E2eStreams,
    /// The same identity for `quic://` (ALPN `atbus/3`, 0-RTT resumption).
    quic_client: quinn_proto::ClientConfig,
    quic_server: Arc<quinn_proto::ServerConfig>,
}

/// ALPN of libatbus over QUIC.
pub const QUIC_ALPN: &[u8] = b"atbus/3";

impl std::fmt::Debug for TlsContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsContext")
            .field("streams", &self.streams)
            .finish_non_exhaustive()
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl TlsContext {
    /// From PEM files: the node's certificate chain, its private key, and
    /// the CA certificate(s) peers must be signed by.
    pub fn from_files(cert: &Path, key: &Path, ca: &Path, streams: E2eStreams) -> Result<Self, TlsError> {
        let read = |what: &'static str, path: &Path| {
            std::fs::read(path).map_err(|e| TlsError::File {
                what,
                path: path.display().to_string(),
                reason: e.to_string(),
            })
        };
        Self::from_pem(
            &read("certificate", cert)?,
            &read("key", key)?,
            &read("CA", ca)?,
            streams,
        )
        .map_err(|e| match e {
            TlsError::File { what, reason, .. } => TlsError::File {
                what,
                path: match what {
                    "certificate" => cert,
                    "key" => key,
                    _ => ca,
                }
                .display()
                .to_string(),
                reason,
            },
            other => other,
        })
    }

    /// From PEM text (see [`TlsContext::from_files`]).
    pub fn from_pem(cert: &[u8], key: &[u8], ca: &[u8], streams: E2eStreams) -> Result<Self, TlsError> {
        let bad = |what: &'static str, reason: String| TlsError::File {
            what,
            path: String::new(),
            reason,
        };
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert)
            .collect::<Result<_, _>>()
            .map_err(|e| bad("certificate", e.to_string()))?;
        if chain.is_empty() {
            return Err(bad("certificate", "no certificate in the file".into()));
        }
        let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| bad("key", e.to_string()))?;
        let mut roots = RootCertStore::empty();
        for ca in CertificateDer::pem_slice_iter(ca) {
            let ca = ca.map_err(|e| bad("CA", e.to_string()))?;
            roots.add(ca).map_err(|e| bad("CA", e.to_string()))?;
        }
        if roots.is_empty() {
            return Err(bad("CA", "no certificate in the file".into()));
        }
        let roots = Arc::new(roots);
        let server = || -> Result<ServerConfig, TlsError> {
            let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
                .build()
                .map_err(|e| bad("CA", e.to_string()))?;
            Ok(ServerConfig::builder_with_provider(provider())
                .with_protocol_versions(&[&rustls::version::TLS13])?
                .with_client_cert_verifier(verifier)
                .with_single_cert(chain.clone(), key.clone_key())?)
        };
        let client = || -> Result<ClientConfig, TlsError> {
            Ok(ClientConfig::builder_with_provider(provider())
                .with_protocol_versions(&[&rustls::version::TLS13])?
                .with_root_certificates(roots.clone())
                .with_client_auth_cert(chain.clone(), key.clone_key())?)
        };
        let quic_err = |e: quinn_proto::crypto::rustls::NoInitialCipherSuite| bad("certificate", e.to_string());
        let mut quic_client = client()?;
        quic_client.alpn_protocols = vec![QUIC_ALPN.to_vec()];
        quic_client.enable_early_data = true;
        let quic_client = quinn_proto::crypto::rustls::QuicClientConfig::try_from(quic_client).map_err(quic_err)?;
        let mut quic_server = server()?;
        quic_server.alpn_protocols = vec![QUIC_ALPN.to_vec()];
        quic_server.max_early_data_size = u32::MAX;
        let quic_server = quinn_proto::crypto::rustls::QuicServerConfig::try_from(quic_server).map_err(quic_err)?;
        let mut transport = quinn_proto::TransportConfig::default();
        // Bulk between two servers: larger windows than the defaults, and
        // keep-alives so that an idle link stays up (the bus pings too).
        transport
            .stream_receive_window(quinn_proto::VarInt::from_u32(8 << 20))
            .receive_window(quinn_proto::VarInt::from_u32(16 << 20))
            .send_window(16 << 20)
            .keep_alive_interval(Some(std::time::Duration::from_secs(5)));
        let transport = Arc::new(transport);
        let mut quic_client = quinn_proto::ClientConfig::new(Arc::new(quic_client));
        quic_client.transport_config(transport.clone());
        let mut quic_server = quinn_proto::ServerConfig::with_crypto(Arc::new(quic_server));
        quic_server.transport_config(transport);
        Ok(Self {
            client: Arc::new(client()?),
            server: Arc::new(server()?),
            streams,
            quic_client,
            quic_server: Arc::new(quic_server),
        })
    }

    /// QUIC client configuration (this node's certificate, the CA).
    pub fn quic_client(&self) -> quinn_proto::ClientConfig {
        self.quic_client.clone()
    }

    /// QUIC server configuration.
    pub fn quic_server(&self) -> Arc<quinn_proto::ServerConfig> {
        self.quic_server.clone()
    }

    /// Whether this node encrypts `stream_id` when it sends on it first.
    pub fn encrypts(&self, stream_id: StreamId) -> bool {
        stream_id >= 0
            && match &self.streams {
                E2eStreams::All => true,
                E2eStreams::Only(set) => set.contains(&stream_id),
            }
    }
}

/// One encrypted stream's TLS session, as seen by one side.
pub struct E2eStream {
    conn: Connection,
    peer: String,
    /// Decrypted bytes not yet a whole message.
    plain: BytesMut,
    verified: bool,
    /// Length-prefixed plaintext not yet given to TLS: messages sealed in
    /// one burst share records (a 64 B message alone would cost a record,
    /// its 22 bytes of overhead and an AEAD call).
    batch: Vec<u8>,
    /// Plaintext messages and bytes sealed so far.
    pub sealed: (u64, u64),
}

impl std::fmt::Debug for E2eStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("E2eStream")
            .field("peer", &self.peer)
            .field("handshaking", &self.conn.is_handshaking())
            .finish_non_exhaustive()
    }
}

impl E2eStream {
    /// The session between `me` and `peer`; the name that sorts first is
    /// the client. Returns the messages to send now (the client's hello, or
    /// the server's request that the client start).
    pub fn start(ctx: &TlsContext, me: &str, peer: &str) -> Result<(Self, Vec<Bytes>), TlsError> {
        let conn: Connection = if me < peer {
            let name = ServerName::try_from(peer.to_string()).map_err(|_| TlsError::BadName(peer.into()))?;
            ClientConnection::new(ctx.client.clone(), name)?.into()
        } else {
            ServerConnection::new(ctx.server.clone())?.into()
        };
        let mut stream = Self {
            conn,
            peer: peer.to_string(),
            plain: BytesMut::new(),
            verified: false,
            batch: Vec::new(),
            sealed: (0, 0),
        };
        // rustls holds plaintext written during the handshake; the stream
        // layer's windows bound what reaches here.
        stream.conn.set_buffer_limit(None);
        let out = if stream.is_client() {
            stream.output()
        } else {
            vec![Bytes::from_static(&[START])]
        };
        Ok((stream, out))
    }

    fn is_client(&self) -> bool {
        matches!(self.conn, Connection::Client(_))
    }

    /// Whether the handshake is still running.
    pub fn is_handshaking(&self) -> bool {
        self.conn.is_handshaking()
    }

    /// Seals one plaintext message. It joins the current batch; the
    /// ciphertext comes out of [`E2eStream::flush`], or here once the batch
    /// holds a full record's worth.
    pub fn seal(&mut self, message: &[u8]) -> Result<Vec<Bytes>, TlsError> {
        let mut prefix = [0u8; 10];
        let n = {
            let mut buf = &mut prefix[..];
            prost::encoding::encode_varint(message.len() as u64, &mut buf);
            10 - buf.len()
        };
        self.batch.extend_from_slice(&prefix[..n]);
        self.batch.extend_from_slice(message);
        self.sealed.0 += 1;
        self.sealed.1 += message.len() as u64;
        if self.batch.len() >= RECORD {
            return self.flush();
        }
        Ok(Vec::new())
    }

    /// Encrypts the batch; returns the ciphertext to send (empty while the
    /// handshake runs: it goes out once the handshake is done).
    pub fn flush(&mut self) -> Result<Vec<Bytes>, TlsError> {
        // During the handshake the batch stays here (bounded by
        // [`E2eStream::is_full`]) rather than inside rustls.
        if !self.batch.is_empty() && !self.conn.is_handshaking() {
            let batch = std::mem::take(&mut self.batch);
            self.conn.writer().write_all(&batch).map_err(|_| TlsError::Framing)?;
            // Keep the allocation for the next batch.
            self.batch = batch;
            self.batch.clear();
        }
        Ok(self.output())
    }

    /// Whether the handshake is running and a record's worth of plaintext
    /// waits: the sender must wait too.
    pub fn is_full(&self) -> bool {
        self.conn.is_handshaking() && self.batch.len() >= RECORD
    }

    /// Takes back the messages sealed but not yet encrypted (the session is
    /// being dropped: they can go again on a new one).
    pub fn take_batch(&mut self) -> Vec<Bytes> {
        let mut batch = Bytes::from(std::mem::take(&mut self.batch));
        let mut messages = Vec::new();
        while !batch.is_empty() {
            let mut peek = &batch[..];
            let Ok(len) = prost::encoding::decode_varint(&mut peek) else {
                break;
            };
            let header = batch.len() - peek.len();
            let Ok(len) = usize::try_from(len) else { break };
            if peek.len() < len {
                break;
            }
            batch.advance(header);
            messages.push(batch.split_to(len));
            self.sealed.0 = self.sealed.0.saturating_sub(1);
            self.sealed.1 = self.sealed.1.saturating_sub(len as u64);
        }
        messages
    }

    /// Whether sealed plaintext waits for [`E2eStream::flush`].
    pub fn has_batch(&self) -> bool {
        !self.batch.is_empty()
    }

    /// Takes in one message of TLS bytes from the peer; returns the
    /// plaintext messages it completed and the messages to send back.
    pub fn open(&mut self, data: &[u8]) -> Result<(Vec<Bytes>, Vec<Bytes>), TlsError> {
        if data == [START] {
            // The server side asks us (the client) to start: our hello
            // went out when this session was made.
            return Ok((Vec::new(), self.output()));
        }
        let mut input = data;
        let mut chunk = [0u8; 16 * 1024];
        while !input.is_empty() {
            match self.conn.read_tls(&mut input) {
                Ok(0) => break,
                Ok(_) => {}
                Err(_) => return Err(TlsError::Framing),
            }
            // The alert for the peer, if any, is lost with the session.
            self.conn.process_new_packets()?;
            if !self.verified && !self.conn.is_handshaking() {
                self.check_peer_name()?;
                self.verified = true;
            }
            // Drain the plaintext now: rustls holds only so much of it.
            loop {
                match self.conn.reader().read(&mut chunk) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => self.plain.extend_from_slice(&chunk[..n]),
                }
            }
        }
        let mut messages = Vec::new();
        loop {
            let mut peek = &self.plain[..];
            let Ok(len) = prost::encoding::decode_varint(&mut peek) else {
                if self.plain.len() >= 10 {
                    return Err(TlsError::Framing);
                }
                break;
            };
            let header = self.plain.len() - peek.len();
            let Ok(len) = usize::try_from(len) else {
                return Err(TlsError::Framing);
            };
            if peek.len() < len {
                break;
            }
            self.plain.advance(header);
            messages.push(self.plain.split_to(len).freeze());
        }
        Ok((messages, self.output()))
    }

    fn check_peer_name(&self) -> Result<(), TlsError> {
        let wrong = || TlsError::WrongName(self.peer.clone());
        let cert = self
            .conn
            .peer_certificates()
            .and_then(|c| c.first())
            .ok_or_else(wrong)?;
        let name = ServerName::try_from(self.peer.as_str()).map_err(|_| TlsError::BadName(self.peer.clone()))?;
        let cert = webpki::EndEntityCert::try_from(cert).map_err(|_| wrong())?;
        cert.verify_is_valid_for_subject_name(&name).map_err(|_| wrong())
    }

    /// TLS bytes waiting to go out, in messages of at most [`CHUNK`].
    fn output(&mut self) -> Vec<Bytes> {
        let mut out = Vec::new();
        let mut buf = Vec::new();
        while self.conn.wants_write() {
            match self.conn.write_tls(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        let mut buf = Bytes::from(buf);
        while !buf.is_empty() {
            out.push(buf.split_to(buf.len().min(CHUNK)));
        }
        out
    }
}

/// A CA and certificates for nodes, PEM encoded.
#[derive(Debug)]
pub struct Issued {
    /// The CA certificate (what every node trusts).
    pub ca_cert: String,
    /// Per node: (name, certificate, private key).
    pub nodes: Vec<(String, String, String)>,
}

impl Issued {
    /// The TLS context of node `name` (one of those issued).
    pub fn context(&self, name: &str, streams: E2eStreams) -> Result<TlsContext, TlsError> {
        let (_, cert, key) = self
            .nodes
            .iter()
            .find(|(n, _, _)| n == name)
            .ok_or_else(|| TlsError::BadName(name.to_string()))?;
        TlsContext::from_pem(cert.as_bytes(), key.as_bytes(), self.ca_cert.as_bytes(), streams)
    }
}

/// Makes a CA and one certificate per node name (subject alternative name =
/// the node name), each with its own key.
pub fn issue(ca_name: &str, names: &[String]) -> Result<Issued, TlsError> {
    let fail = |e: rcgen::Error| TlsError::Generate(e.to_string());
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(fail)?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, ca_name.to_string());
    ca_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let ca_key = rcgen::KeyPair::generate().map_err(fail)?;
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).map_err(fail)?;
    let mut nodes = Vec::new();
    for name in names {
        if crate::discovery::validate::dns_subdomain(name).is_err() || ServerName::try_from(name.as_str()).is_err() {
            return Err(TlsError::BadName(name.clone()));
        }
        let mut params = rcgen::CertificateParams::new(vec![name.clone()]).map_err(fail)?;
        params.distinguished_name.push(rcgen::DnType::CommonName, name.clone());
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = rcgen::KeyPair::generate().map_err(fail)?;
        let cert = params.signed_by(&key, &ca).map_err(fail)?;
        nodes.push((name.clone(), cert.pem(), key.serialize_pem()));
    }
    Ok(Issued {
        ca_cert: ca.pem(),
        nodes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contexts(names: &[&str]) -> Vec<TlsContext> {
        let owned: Vec<String> = names.iter().map(ToString::to_string).collect();
        let issued = issue("test-ca", &owned).expect("issue");
        names
            .iter()
            .map(|n| issued.context(n, E2eStreams::All).expect("context"))
            .collect()
    }

    /// Delivers every message of `out` to `to`, returning what `to` sends
    /// back and the plaintext it got.
    fn feed(to: &mut E2eStream, out: Vec<Bytes>) -> Result<(Vec<Bytes>, Vec<Bytes>), TlsError> {
        let (mut plain, mut back) = (Vec::new(), Vec::new());
        for m in out {
            let (p, b) = to.open(&m)?;
            plain.extend(p);
            back.extend(b);
        }
        Ok((plain, back))
    }

    /// Runs both sides until neither has anything to send; returns the
    /// plaintext each received.
    fn settle(a: &mut E2eStream, b: &mut E2eStream, mut to_b: Vec<Bytes>) -> (Vec<Bytes>, Vec<Bytes>) {
        let (mut got_a, mut got_b) = (Vec::new(), Vec::new());
        for _ in 0..10 {
            let (p, mut to_a) = feed(b, std::mem::take(&mut to_b)).expect("b opens");
            got_b.extend(p);
            to_a.extend(b.flush().expect("flush"));
            let (p, mut back) = feed(a, to_a).expect("a opens");
            got_a.extend(p);
            back.extend(a.flush().expect("flush"));
            to_b = back;
            if to_b.is_empty() {
                break;
            }
        }
        (got_a, got_b)
    }

    #[test]
    fn messages_cross_both_ways_and_the_bytes_are_not_plaintext() {
        let ctx = contexts(&["alpha", "beta"]);
        let (mut a, mut out) = E2eStream::start(&ctx[0], "alpha", "beta").expect("a");
        let secret = b"attack at dawn, bring the cheese";
        out.extend(a.seal(secret).expect("seal"));
        out.extend(a.flush().expect("flush"));
        let (mut b, back) = E2eStream::start(&ctx[1], "beta", "alpha").expect("b");
        // beta is the server: it asks alpha to start, which alpha already did.
        let (_, extra) = feed(&mut a, back).expect("start request");
        out.extend(extra);
        for m in &out {
            assert!(!m.windows(secret.len()).any(|w| w == secret), "plaintext on the wire");
        }
        let (_, got_b) = settle(&mut a, &mut b, out);
        assert_eq!(got_b, vec![Bytes::from_static(secret)]);
        let mut to_a = b.seal(b"ack").expect("seal");
        to_a.extend(b.flush().expect("flush"));
        let (got_a, _) = feed(&mut a, to_a).expect("open");
        assert_eq!(got_a, vec![Bytes::from_static(b"ack")]);
        // Many messages, split anywhere by the chunking, come out whole.
        let big = vec![7u8; 200_000];
        let mut out = Vec::new();
        for i in 0..50u8 {
            out.extend(a.seal(&[i; 33]).expect("seal"));
        }
        out.extend(a.seal(&big).expect("seal"));
        out.extend(a.flush().expect("flush"));
        let (got, _) = feed(&mut b, out).expect("open");
        assert_eq!(got.len(), 51);
        assert_eq!(&got[50][..], &big[..]);
        assert_eq!(&got[3][..], &[3u8; 33][..]);
    }

    #[test]
    fn a_certificate_naming_someone_else_is_refused() {
        // "mallory" holds a valid certificate for "mallory", and claims to
        // be "beta".
        let ctx = contexts(&["alpha", "mallory"]);
        let (mut a, out) = E2eStream::start(&ctx[0], "alpha", "beta").expect("a");
        let (mut m, _) = E2eStream::start(&ctx[1], "beta", "alpha").expect("m");
        let (_, back) = feed(&mut m, out).expect("server side takes the hello");
        let err = feed(&mut a, back).expect_err("alpha must refuse");
        assert!(
            err.to_string().contains("certificate") || err.to_string().contains("TLS"),
            "{err}"
        );
    }

    #[test]
    fn a_client_certificate_naming_someone_else_is_refused() {
        // "mallory" claims to be "alpha" towards "beta" with its own valid
        // certificate: beta (the server side) checks the name.
        let ctx = contexts(&["mallory", "beta"]);
        let (mut m, out) = E2eStream::start(&ctx[0], "alpha", "beta").expect("m");
        let (mut b, _) = E2eStream::start(&ctx[1], "beta", "alpha").expect("b");
        let (_, back) = feed(&mut b, out).expect("hello");
        let (_, finish) = feed(&mut m, back).expect("mallory finishes");
        let err = feed(&mut b, finish).expect_err("beta must refuse");
        assert!(matches!(err, TlsError::WrongName(ref n) if n == "alpha"), "{err}");
    }

    #[test]
    fn a_foreign_ca_is_refused() {
        let ours = contexts(&["alpha"]);
        let theirs = contexts(&["beta"]);
        let (mut a, out) = E2eStream::start(&ours[0], "alpha", "beta").expect("a");
        let (mut b, _) = E2eStream::start(&theirs[0], "beta", "alpha").expect("b");
        let (_, back) = feed(&mut b, out).expect("hello");
        assert!(feed(&mut a, back).is_err());
    }

    #[test]
    fn unencrypted_batch_can_be_taken_back() {
        let ctx = contexts(&["alpha", "beta"]);
        let (mut a, _) = E2eStream::start(&ctx[0], "alpha", "beta").expect("a");
        for m in [&b"one"[..], b"", &[9u8; 300][..]] {
            assert!(a.seal(m).expect("seal").is_empty(), "held during the handshake");
        }
        let back = a.take_batch();
        assert_eq!(
            back,
            vec![Bytes::from_static(b"one"), Bytes::new(), Bytes::from(vec![9u8; 300])]
        );
        assert!(!a.has_batch());
        assert_eq!(a.sealed, (0, 0));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let ctx = contexts(&["alpha", "beta"]);
        let (mut b, _) = E2eStream::start(&ctx[1], "beta", "alpha").expect("b");
        assert!(b.open(b"\x16\x03\x01\x00\x05hello").is_err());
        let (mut a, _) = E2eStream::start(&ctx[0], "alpha", "beta").expect("a");
        assert!(a.open(&[0xff; 64]).is_err());
    }
}
