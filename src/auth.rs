//! Authentication of connections: shared-secret tokens (1-RTT), resumption
//! tickets (0-RTT), anonymous dialers. Pure: every call takes the wall clock
//! as Unix microseconds; the node calls it from the handshake.
//!
//! # Full handshake (1-RTT)
//! The dialer's first flight carries `handshake_auth` with a timestamp, a
//! fresh 16-byte nonce and one signature per token it holds:
//! `HMAC-SHA256(token, "atbus-v1 client" ‖ transcript)` where the transcript
//! is, in order, `u32-LE length ‖ bytes` of the dialer's name and of the
//! acceptor's name, the timestamp (`i64` LE), the nonce, the dialer's
//! incarnation (`u64` LE) and one flag byte (bit 0 latency path, bit 1
//! anonymous). The acceptor accepts when one signature verifies under one of
//! its tokens, the timestamp is within its clock-skew window and the nonce
//! was not seen before (bounded cache). Its reply carries its own nonce and a
//! proof `HMAC(token, "atbus-v1 proof" ‖ transcript ‖ acceptor nonce)`: the
//! dialer knows it reached a holder of the token. Application data flows
//! after the reply.
//!
//! # Resumption (0-RTT)
//! Both sides derive a resumption secret
//! `HMAC(token, "atbus-v1 resume" ‖ transcript ‖ acceptor nonce)`. The reply
//! also carries a ticket: the secret, both names, the acceptor's incarnation
//! and an expiry, sealed (ChaCha20-Poly1305) under the acceptor's ticket key,
//! which rotates every ticket lifetime (the previous key still opens tickets
//! until they expire). On reconnect the dialer sends the ticket and a binder
//! `HMAC(secret, "atbus-v1 binder" ‖ transcript ‖ ticket)` and its
//! application data right behind, without waiting. The acceptor opens the
//! ticket, checks names, expiry, binder, timestamp and nonce; a replayed
//! flight has a nonce already seen and is refused before any of its data is
//! read. Each accepted connection gets a new ticket; a ticket is used once.
//!
//! Secrets never appear in logs or errors.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};

use crate::proto::HandshakeAuth;

/// Tokens signed with in one handshake at most.
pub const MAX_SIGNATURES: usize = 8;
/// Bytes of a handshake nonce.
pub const NONCE_LEN: usize = 16;
const SECRET_LEN: usize = 32;
const TICKETS_PER_PEER: usize = 4;

const LABEL_CLIENT: &[u8] = b"atbus-v1 client";
const LABEL_PROOF: &[u8] = b"atbus-v1 proof";
const LABEL_RESUME: &[u8] = b"atbus-v1 resume";
const LABEL_BINDER: &[u8] = b"atbus-v1 binder";

/// Authentication settings of a node.
#[derive(Clone, PartialEq, Eq)]
pub struct AuthConfig {
    /// Shared secrets. Empty: the node accepts named peers without
    /// credentials (a trusted network). Otherwise a named peer must sign its
    /// handshake with one of them, and a peer this node dials must prove it
    /// holds one. Several at once allow rotation: add the new one everywhere,
    /// then remove the old one ([`crate::node::Node::set_tokens`]).
    /// Published in the node's discovery record (`tokens`), never sent in a
    /// handshake: keep the discovery store access-controlled.
    pub tokens: Vec<String>,
    /// Largest difference between a dialer's clock and ours.
    pub clock_skew: Duration,
    /// Handshake nonces remembered at most (replay protection). When full,
    /// the oldest goes and timestamps up to its own are refused from then on.
    pub replay_cache: usize,
    /// Dial with a resumption ticket when one is held (stream links).
    pub zero_rtt: bool,
    /// How long an issued ticket is valid; also the ticket-key rotation
    /// period.
    pub ticket_lifetime: Duration,
    /// Dial without a name: the acceptor's listener must allow anonymous
    /// peers, gives this node a temporary name, and lets it talk only to
    /// the acceptor itself.
    pub anonymous: bool,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            tokens: Vec::new(),
            clock_skew: Duration::from_secs(300),
            replay_cache: 65_536,
            zero_rtt: true,
            ticket_lifetime: Duration::from_secs(3600),
            anonymous: false,
        }
    }
}

impl fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthConfig")
            .field("tokens", &format_args!("[{} redacted]", self.tokens.len()))
            .field("clock_skew", &self.clock_skew)
            .field("replay_cache", &self.replay_cache)
            .field("zero_rtt", &self.zero_rtt)
            .field("ticket_lifetime", &self.ticket_lifetime)
            .field("anonymous", &self.anonymous)
            .finish()
    }
}

/// Why a handshake was refused (the text goes to the log and to the peer;
/// it never contains a secret).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// The dialer sent no signature and this node has tokens.
    #[error("no credentials: this node requires a token")]
    MissingCredentials,
    /// No signature verifies under any token of this node.
    #[error("no signature matches a token of this node")]
    BadSignature,
    /// The dialer's clock is too far from ours.
    #[error("timestamp {offset_seconds:+} s from this node's clock, outside the {window_seconds} s window")]
    ClockSkew {
        /// Dialer's clock minus ours.
        offset_seconds: i64,
        /// The allowed difference.
        window_seconds: u64,
    },
    /// The nonce was seen before (or is older than the evicted ones).
    #[error("nonce already seen: replayed handshake")]
    Replayed,
    /// The credentials do not have the expected shape.
    #[error("malformed credentials: {0}")]
    Malformed(&'static str),
    /// A resumption ticket that does not open, expired, or names others.
    #[error("resumption ticket refused: {0}")]
    Ticket(&'static str),
    /// An anonymous dialer on a listener that does not allow them.
    #[error("anonymous peers are not allowed on this listener")]
    AnonymousForbidden,
    /// The acceptor sent no proof although we signed with tokens.
    #[error("peer did not prove it holds a shared token")]
    NoProof,
    /// The acceptor's proof does not verify.
    #[error("peer's proof does not match")]
    BadProof,
}

/// Wall clock, Unix microseconds.
pub fn now_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// The bytes every MAC of one handshake covers (see the module docs).
#[derive(Clone, Debug)]
pub struct Transcript(Vec<u8>);

impl Transcript {
    /// `dialer` is empty for an anonymous dialer.
    pub fn new(
        dialer: &str,
        acceptor: &str,
        timestamp: i64,
        nonce: &[u8],
        incarnation: u64,
        latency_path: bool,
        anonymous: bool,
    ) -> Self {
        let mut t = Vec::with_capacity(dialer.len() + acceptor.len() + nonce.len() + 32);
        for part in [dialer.as_bytes(), acceptor.as_bytes()] {
            t.extend_from_slice(&u32::try_from(part.len()).unwrap_or(u32::MAX).to_le_bytes());
            t.extend_from_slice(part);
        }
        t.extend_from_slice(&timestamp.to_le_bytes());
        t.extend_from_slice(nonce);
        t.extend_from_slice(&incarnation.to_le_bytes());
        t.push(u8::from(latency_path) | (u8::from(anonymous) << 1));
        Self(t)
    }
}

fn mac(key: &[u8], label: &[u8], parts: &[&[u8]]) -> hmac::Tag {
    let key = hmac::Key::new(hmac::HMAC_SHA256, key);
    let mut ctx = hmac::Context::with_key(&key);
    ctx.update(label);
    for part in parts {
        ctx.update(part);
    }
    ctx.sign()
}

fn mac_matches(key: &[u8], label: &[u8], parts: &[&[u8]], tag: &[u8]) -> bool {
    let key = hmac::Key::new(hmac::HMAC_SHA256, key);
    let mut msg = Vec::with_capacity(label.len() + parts.iter().map(|p| p.len()).sum::<usize>());
    msg.extend_from_slice(label);
    for part in parts {
        msg.extend_from_slice(part);
    }
    hmac::verify(&key, &msg, tag).is_ok()
}

/// Remembers nonces of accepted handshakes until their timestamps leave the
/// skew window. Bounded: evicting a nonce early raises a floor, and
/// timestamps at or below the floor are refused, so an evicted nonce can
/// never be replayed.
#[derive(Debug)]
pub struct ReplayCache {
    capacity: usize,
    window: i64,
    seen: HashMap<[u8; NONCE_LEN], i64>,
    order: VecDeque<([u8; NONCE_LEN], i64)>,
    floor: i64,
}

impl ReplayCache {
    /// Holds at most `capacity` nonces; accepts timestamps within
    /// `window` of the clock.
    pub fn new(capacity: usize, window: Duration) -> Self {
        Self {
            capacity: capacity.max(1),
            window: i64::try_from(window.as_micros()).unwrap_or(i64::MAX),
            seen: HashMap::new(),
            order: VecDeque::new(),
            floor: i64::MIN,
        }
    }

    /// Checks the timestamp against `now` and records the nonce; refuses a
    /// nonce seen before.
    pub fn admit(&mut self, nonce: &[u8], timestamp: i64, now: i64) -> Result<(), AuthError> {
        let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| AuthError::Malformed("nonce length"))?;
        let offset = timestamp.saturating_sub(now);
        if offset.unsigned_abs() > self.window.unsigned_abs() {
            return Err(AuthError::ClockSkew {
                offset_seconds: offset / 1_000_000,
                window_seconds: self.window.unsigned_abs() / 1_000_000,
            });
        }
        // Entries whose timestamps left the window are refused by the check
        // above anyway: forget them.
        while let Some(&(old, ts)) = self.order.front() {
            if ts.saturating_add(self.window) >= now {
                break;
            }
            self.order.pop_front();
            self.seen.remove(&old);
        }
        if timestamp <= self.floor || self.seen.contains_key(&nonce) {
            return Err(AuthError::Replayed);
        }
        while self.seen.len() >= self.capacity {
            let Some((old, ts)) = self.order.pop_front() else {
                break;
            };
            self.seen.remove(&old);
            self.floor = self.floor.max(ts);
        }
        self.seen.insert(nonce, timestamp);
        self.order.push_back((nonce, timestamp));
        Ok(())
    }

    /// Nonces remembered now.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    /// Whether no nonce is remembered.
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

/// What a ticket holds once opened.
#[derive(Clone, Debug, PartialEq, Eq)]
struct TicketBody {
    issued: i64,
    expires: i64,
    acceptor_incarnation: u64,
    secret: [u8; SECRET_LEN],
    dialer: String,
    acceptor: String,
}

impl TicketBody {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.dialer.len() + self.acceptor.len());
        out.push(1);
        out.extend_from_slice(&self.issued.to_le_bytes());
        out.extend_from_slice(&self.expires.to_le_bytes());
        out.extend_from_slice(&self.acceptor_incarnation.to_le_bytes());
        out.extend_from_slice(&self.secret);
        for name in [&self.dialer, &self.acceptor] {
            out.extend_from_slice(&u16::try_from(name.len()).unwrap_or(u16::MAX).to_le_bytes());
            out.extend_from_slice(name.as_bytes());
        }
        out
    }

    fn decode(mut b: &[u8]) -> Option<Self> {
        fn take<'a>(b: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
            if b.len() < n {
                return None;
            }
            let (head, rest) = b.split_at(n);
            *b = rest;
            Some(head)
        }
        fn u64le(b: &mut &[u8]) -> Option<u64> {
            Some(u64::from_le_bytes(take(b, 8)?.try_into().ok()?))
        }
        fn name(b: &mut &[u8]) -> Option<String> {
            let len = u16::from_le_bytes(take(b, 2)?.try_into().ok()?);
            String::from_utf8(take(b, usize::from(len))?.to_vec()).ok()
        }
        if take(&mut b, 1)? != [1] {
            return None;
        }
        let issued = u64le(&mut b)? as i64;
        let expires = u64le(&mut b)? as i64;
        let acceptor_incarnation = u64le(&mut b)?;
        let secret = take(&mut b, SECRET_LEN)?.try_into().ok()?;
        let dialer = name(&mut b)?;
        let acceptor = name(&mut b)?;
        b.is_empty().then_some(Self {
            issued,
            expires,
            acceptor_incarnation,
            secret,
            dialer,
            acceptor,
        })
    }
}

struct TicketKey {
    id: u32,
    created: i64,
    key: LessSafeKey,
}

/// The acceptor's ticket keys: the current one seals, the current and the
/// previous one open. Rotated every `period`.
pub struct TicketKeys {
    period: i64,
    current: TicketKey,
    previous: Option<TicketKey>,
}

impl TicketKeys {
    fn new(rng: &SystemRandom, period: Duration, now: i64) -> Self {
        Self {
            period: i64::try_from(period.as_micros()).unwrap_or(i64::MAX).max(1),
            current: Self::fresh(rng, fastrand::u32(..), now),
            previous: None,
        }
    }

    fn fresh(rng: &SystemRandom, id: u32, now: i64) -> TicketKey {
        let mut bytes = [0u8; 32];
        let _ = rng.fill(&mut bytes);
        let key = match UnboundKey::new(&aead::CHACHA20_POLY1305, &bytes) {
            Ok(k) => k,
            // 32 bytes is ChaCha20-Poly1305's key length: cannot fail.
            Err(_) => unreachable!("ChaCha20-Poly1305 takes 32-byte keys"),
        };
        TicketKey {
            id,
            created: now,
            key: LessSafeKey::new(key),
        }
    }

    fn rotate(&mut self, rng: &SystemRandom, now: i64) {
        if now.saturating_sub(self.current.created) >= self.period {
            let next = Self::fresh(rng, self.current.id.wrapping_add(1), now);
            self.previous = Some(std::mem::replace(&mut self.current, next));
        }
    }

    fn seal(&mut self, rng: &SystemRandom, body: &TicketBody, now: i64) -> Vec<u8> {
        self.rotate(rng, now);
        let mut nonce = [0u8; 12];
        let _ = rng.fill(&mut nonce);
        let id = self.current.id.to_le_bytes();
        let mut sealed = body.encode();
        if self
            .current
            .key
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(id), &mut sealed)
            .is_err()
        {
            return Vec::new();
        }
        let mut out = Vec::with_capacity(16 + sealed.len());
        out.extend_from_slice(&id);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        out
    }

    fn open(&mut self, rng: &SystemRandom, ticket: &[u8], now: i64) -> Result<TicketBody, AuthError> {
        self.rotate(rng, now);
        if ticket.len() < 16 {
            return Err(AuthError::Ticket("too short"));
        }
        let (id, rest) = ticket.split_at(4);
        let (nonce, sealed) = rest.split_at(12);
        let id: [u8; 4] = id.try_into().map_err(|_| AuthError::Ticket("too short"))?;
        let key_id = u32::from_le_bytes(id);
        let key = [Some(&self.current), self.previous.as_ref()]
            .into_iter()
            .flatten()
            .find(|k| k.id == key_id)
            .ok_or(AuthError::Ticket("issued under a retired key"))?;
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| AuthError::Ticket("bad nonce"))?;
        let mut buf = sealed.to_vec();
        let plain = key
            .key
            .open_in_place(nonce, Aad::from(id), &mut buf)
            .map_err(|_| AuthError::Ticket("does not open under this node's key"))?;
        TicketBody::decode(plain).ok_or(AuthError::Ticket("undecodable"))
    }
}

/// A ticket this node holds for resuming with a peer.
#[derive(Clone, Debug)]
struct HeldTicket {
    ticket: Bytes,
    secret: [u8; SECRET_LEN],
    expires: i64,
    acceptor_incarnation: u64,
}

/// How the acceptor let a dialer in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Grant {
    /// The acceptor has no tokens: named peers come in freely.
    Open,
    /// Signature `index` verified under a token.
    Token {
        /// Index of the accepted signature.
        index: usize,
        /// The token it verified under.
        token: Vec<u8>,
    },
    /// A resumption ticket; its secret.
    Ticket {
        /// The ticket's resumption secret.
        secret: [u8; SECRET_LEN],
    },
    /// An anonymous dialer, with the name it was given.
    Anonymous {
        /// The temporary name it goes by on this node.
        name: String,
    },
}

/// What a dialer must remember until the acceptor's reply.
#[derive(Clone, Debug)]
pub struct Pending {
    transcript: Transcript,
    /// Tokens signed with, in signature order (full handshake).
    tokens: Vec<Vec<u8>>,
    /// The ticket's secret (0-RTT).
    secret: Option<[u8; SECRET_LEN]>,
    /// The acceptor's incarnation as of the ticket (0-RTT).
    pub acceptor_incarnation: Option<u64>,
    /// The dialer asked to be anonymous.
    pub anonymous: bool,
}

impl Pending {
    /// Whether application data may go out before the reply.
    pub fn is_zero_rtt(&self) -> bool {
        self.secret.is_some()
    }
}

/// A node's authentication state, shared by its shards.
pub struct Authority {
    config: AuthConfig,
    tokens: Mutex<Vec<Vec<u8>>>,
    rng: SystemRandom,
    replay: Mutex<ReplayCache>,
    keys: Mutex<TicketKeys>,
    held: Mutex<HashMap<String, Vec<HeldTicket>>>,
    assigned: Mutex<HashMap<String, String>>,
}

impl fmt::Debug for Authority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authority")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Authority {
    /// State for a node with `config`.
    pub fn new(config: AuthConfig) -> Self {
        let rng = SystemRandom::new();
        let keys = TicketKeys::new(&rng, config.ticket_lifetime, now_micros());
        Self {
            tokens: Mutex::new(config.tokens.iter().map(|t| t.as_bytes().to_vec()).collect()),
            replay: Mutex::new(ReplayCache::new(config.replay_cache, config.clock_skew)),
            keys: Mutex::new(keys),
            held: Mutex::new(HashMap::new()),
            assigned: Mutex::new(HashMap::new()),
            rng,
            config,
        }
    }

    /// The settings it was made with (tokens as at start).
    pub fn config(&self) -> &AuthConfig {
        &self.config
    }

    /// Replaces the tokens (rotation). The ticket keys are replaced too:
    /// a ticket earned with a token that is no longer accepted must not
    /// outlive it (a token is often rotated because it leaked). Dialers
    /// holding tickets fall back to one full handshake.
    pub fn set_tokens(&self, tokens: &[String]) {
        if let Ok(mut t) = self.tokens.lock() {
            *t = tokens.iter().map(|t| t.as_bytes().to_vec()).collect();
        }
        if let Ok(mut keys) = self.keys.lock() {
            *keys = TicketKeys::new(&self.rng, self.config.ticket_lifetime, now_micros());
        }
    }

    fn tokens(&self) -> Vec<Vec<u8>> {
        self.tokens.lock().map(|t| t.clone()).unwrap_or_default()
    }

    fn nonce(&self) -> [u8; NONCE_LEN] {
        let mut n = [0u8; NONCE_LEN];
        if self.rng.fill(&mut n).is_err() {
            // The kernel's random source failing is not recoverable here;
            // fall back to a non-cryptographic but unique-enough value.
            n[..8].copy_from_slice(&fastrand::u64(..).to_le_bytes());
            n[8..].copy_from_slice(&fastrand::u64(..).to_le_bytes());
        }
        n
    }

    /// The dialer's credentials for a connection to `acceptor`.
    pub fn dial(
        &self,
        me: &str,
        acceptor: &str,
        incarnation: u64,
        latency_path: bool,
        allow_zero_rtt: bool,
        now: i64,
    ) -> (HandshakeAuth, Pending) {
        let anonymous = self.config.anonymous;
        let dialer = if anonymous { "" } else { me };
        let nonce = self.nonce();
        let transcript = Transcript::new(dialer, acceptor, now, &nonce, incarnation, latency_path, anonymous);
        let mut auth = HandshakeAuth {
            timestamp_microseconds: now,
            nonce: Bytes::copy_from_slice(&nonce),
            anonymous,
            ..HandshakeAuth::default()
        };
        let mut pending = Pending {
            transcript,
            tokens: Vec::new(),
            secret: None,
            acceptor_incarnation: None,
            anonymous,
        };
        if anonymous {
            return (auth, pending);
        }
        if allow_zero_rtt
            && self.config.zero_rtt
            && let Some(held) = self.take_ticket(acceptor, now)
        {
            auth.binder = Bytes::copy_from_slice(
                mac(&held.secret, LABEL_BINDER, &[&pending.transcript.0, &held.ticket]).as_ref(),
            );
            auth.ticket = held.ticket;
            pending.secret = Some(held.secret);
            pending.acceptor_incarnation = Some(held.acceptor_incarnation);
            return (auth, pending);
        }
        let tokens: Vec<Vec<u8>> = self.tokens().into_iter().take(MAX_SIGNATURES).collect();
        auth.signatures = tokens
            .iter()
            .map(|t| Bytes::copy_from_slice(mac(t, LABEL_CLIENT, &[&pending.transcript.0]).as_ref()))
            .collect();
        pending.tokens = tokens;
        (auth, pending)
    }

    fn take_ticket(&self, acceptor: &str, now: i64) -> Option<HeldTicket> {
        let mut held = self.held.lock().ok()?;
        let list = held.get_mut(acceptor)?;
        list.retain(|t| t.expires > now);
        list.pop()
    }

    /// Forgets every ticket held for `acceptor` (one was refused).
    pub fn drop_tickets(&self, acceptor: &str) {
        if let Ok(mut held) = self.held.lock() {
            held.remove(acceptor);
        }
    }

    /// Tickets held for `acceptor` now.
    pub fn tickets_held(&self, acceptor: &str, now: i64) -> usize {
        self.held
            .lock()
            .map(|h| {
                h.get(acceptor)
                    .map_or(0, |l| l.iter().filter(|t| t.expires > now).count())
            })
            .unwrap_or(0)
    }

    /// The name an anonymous dial to `acceptor` was given.
    pub fn assigned_name(&self, acceptor: &str) -> Option<String> {
        self.assigned.lock().ok()?.get(acceptor).cloned()
    }

    /// Checks a dialer's credentials. `claimed`: the name in its handshake;
    /// `me`: this node; `client_token`: the token allocated to a client of
    /// that name ([`crate::grant`]), then the only one accepted, and
    /// required even if this node has no tokens. Nothing is recorded unless
    /// the credentials verify.
    #[allow(clippy::too_many_arguments)]
    pub fn accept(
        &self,
        auth: Option<&HandshakeAuth>,
        claimed: &str,
        me: &str,
        incarnation: u64,
        latency_path: bool,
        anonymous_allowed: bool,
        client_token: Option<&[u8]>,
        now: i64,
    ) -> Result<Grant, AuthError> {
        let tokens = match client_token {
            Some(token) => vec![token.to_vec()],
            None => self.tokens(),
        };
        let Some(auth) = auth else {
            return if tokens.is_empty() {
                Ok(Grant::Open)
            } else {
                Err(AuthError::MissingCredentials)
            };
        };
        let transcript = Transcript::new(
            claimed,
            me,
            auth.timestamp_microseconds,
            &auth.nonce,
            incarnation,
            latency_path,
            auth.anonymous,
        );
        if auth.anonymous {
            if !anonymous_allowed {
                return Err(AuthError::AnonymousForbidden);
            }
            self.admit(auth, now)?;
            let name = format!(
                "anon-{:016x}",
                u64::from_le_bytes(self.nonce()[..8].try_into().unwrap_or([0; 8]))
            );
            return Ok(Grant::Anonymous { name });
        }
        if !auth.ticket.is_empty() {
            let body = self
                .keys
                .lock()
                .map_err(|_| AuthError::Ticket("key store unavailable"))?
                .open(&self.rng, &auth.ticket, now)?;
            if body.acceptor != me || body.dialer != claimed {
                return Err(AuthError::Ticket("issued to other names"));
            }
            if body.expires <= now {
                return Err(AuthError::Ticket("expired"));
            }
            if !mac_matches(&body.secret, LABEL_BINDER, &[&transcript.0, &auth.ticket], &auth.binder) {
                return Err(AuthError::Ticket("binder does not match"));
            }
            self.admit(auth, now)?;
            return Ok(Grant::Ticket { secret: body.secret });
        }
        if tokens.is_empty() {
            return Ok(Grant::Open);
        }
        if auth.signatures.is_empty() {
            return Err(AuthError::MissingCredentials);
        }
        let found = auth
            .signatures
            .iter()
            .take(MAX_SIGNATURES)
            .enumerate()
            .find_map(|(i, sig)| {
                tokens
                    .iter()
                    .find(|t| mac_matches(t, LABEL_CLIENT, &[&transcript.0], sig))
                    .map(|t| (i, t.clone()))
            });
        let (index, token) = found.ok_or(AuthError::BadSignature)?;
        self.admit(auth, now)?;
        Ok(Grant::Token { index, token })
    }

    fn admit(&self, auth: &HandshakeAuth, now: i64) -> Result<(), AuthError> {
        self.replay
            .lock()
            .map_err(|_| AuthError::Malformed("replay cache unavailable"))?
            .admit(&auth.nonce, auth.timestamp_microseconds, now)
    }

    /// The acceptor's answer to credentials it accepted with `grant`.
    #[allow(clippy::too_many_arguments)]
    pub fn reply(
        &self,
        grant: &Grant,
        dialer_auth: &HandshakeAuth,
        claimed: &str,
        me: &str,
        dialer_incarnation: u64,
        my_incarnation: u64,
        latency_path: bool,
        now: i64,
    ) -> HandshakeAuth {
        let nonce = self.nonce();
        let mut reply = HandshakeAuth {
            nonce: Bytes::copy_from_slice(&nonce),
            ..HandshakeAuth::default()
        };
        let key: Vec<u8> = match grant {
            Grant::Open => return reply,
            Grant::Anonymous { name } => {
                reply.assigned_name = name.clone();
                return reply;
            }
            Grant::Token { index, token } => {
                reply.accepted_signature = i32::try_from(*index).unwrap_or(0);
                token.clone()
            }
            Grant::Ticket { secret } => secret.to_vec(),
        };
        let transcript = Transcript::new(
            claimed,
            me,
            dialer_auth.timestamp_microseconds,
            &dialer_auth.nonce,
            dialer_incarnation,
            latency_path,
            false,
        );
        reply.proof = Bytes::copy_from_slice(mac(&key, LABEL_PROOF, &[&transcript.0, &nonce]).as_ref());
        let mut secret = [0u8; SECRET_LEN];
        secret.copy_from_slice(mac(&key, LABEL_RESUME, &[&transcript.0, &nonce]).as_ref());
        let lifetime = i64::try_from(self.config.ticket_lifetime.as_micros()).unwrap_or(i64::MAX);
        let body = TicketBody {
            issued: now,
            expires: now.saturating_add(lifetime),
            acceptor_incarnation: my_incarnation,
            secret,
            dialer: claimed.to_string(),
            acceptor: me.to_string(),
        };
        if let Ok(mut keys) = self.keys.lock() {
            reply.new_ticket = Bytes::from(keys.seal(&self.rng, &body, now));
            reply.ticket_lifetime_ms = lifetime / 1000;
        }
        reply
    }

    /// Checks the acceptor's reply; keeps the ticket it issued.
    pub fn finish(
        &self,
        pending: &Pending,
        reply: Option<&HandshakeAuth>,
        acceptor: &str,
        acceptor_incarnation: u64,
        now: i64,
    ) -> Result<(), AuthError> {
        if pending.anonymous {
            if let Some(name) = reply.map(|r| r.assigned_name.clone()).filter(|n| !n.is_empty())
                && let Ok(mut assigned) = self.assigned.lock()
            {
                assigned.insert(acceptor.to_string(), name);
            }
            return Ok(());
        }
        let key = match (&pending.secret, pending.tokens.is_empty()) {
            (Some(secret), _) => secret.to_vec(),
            // We hold no tokens: the acceptor need not prove anything.
            (None, true) => return Ok(()),
            (None, false) => {
                let reply = reply.ok_or(AuthError::NoProof)?;
                let index = usize::try_from(reply.accepted_signature).map_err(|_| AuthError::BadProof)?;
                pending.tokens.get(index).ok_or(AuthError::BadProof)?.clone()
            }
        };
        let reply = reply.ok_or(AuthError::NoProof)?;
        if reply.proof.is_empty() {
            return Err(AuthError::NoProof);
        }
        if !mac_matches(&key, LABEL_PROOF, &[&pending.transcript.0, &reply.nonce], &reply.proof) {
            return Err(AuthError::BadProof);
        }
        if self.config.zero_rtt && !reply.new_ticket.is_empty() {
            let mut secret = [0u8; SECRET_LEN];
            secret.copy_from_slice(mac(&key, LABEL_RESUME, &[&pending.transcript.0, &reply.nonce]).as_ref());
            let expires = now.saturating_add(reply.ticket_lifetime_ms.saturating_mul(1000));
            if let Ok(mut held) = self.held.lock() {
                let list = held.entry(acceptor.to_string()).or_default();
                list.retain(|t| t.expires > now);
                if list.len() >= TICKETS_PER_PEER {
                    list.remove(0);
                }
                list.push(HeldTicket {
                    ticket: reply.new_ticket.clone(),
                    secret,
                    expires,
                    acceptor_incarnation,
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: i64 = 1_000_000;

    fn authority(tokens: &[&str]) -> Authority {
        Authority::new(AuthConfig {
            tokens: tokens.iter().map(ToString::to_string).collect(),
            ..AuthConfig::default()
        })
    }

    /// One full handshake between `dialer` (named "a") and `acceptor` ("b").
    fn full(dialer: &Authority, acceptor: &Authority, now: i64) -> Result<Grant, AuthError> {
        let (auth, pending) = dialer.dial("a", "b", 7, false, false, now);
        let grant = acceptor.accept(Some(&auth), "a", "b", 7, false, false, None, now)?;
        let reply = acceptor.reply(&grant, &auth, "a", "b", 7, 9, false, now);
        dialer.finish(&pending, Some(&reply), "b", 9, now)?;
        Ok(grant)
    }

    #[test]
    fn shared_token_lets_in_and_proves_the_acceptor() {
        let (a, b) = (authority(&["s1"]), authority(&["s1"]));
        assert!(matches!(full(&a, &b, 100 * S), Ok(Grant::Token { index: 0, .. })));
    }

    #[test]
    fn wrong_or_missing_token_is_refused() {
        let now = 100 * S;
        assert_eq!(
            full(&authority(&["x"]), &authority(&["s1"]), now),
            Err(AuthError::BadSignature)
        );
        assert_eq!(
            full(&authority(&[]), &authority(&["s1"]), now),
            Err(AuthError::MissingCredentials)
        );
        // An acceptor without tokens cannot prove one to a dialer that has.
        assert_eq!(full(&authority(&["s1"]), &authority(&[]), now), Err(AuthError::NoProof));
        assert_eq!(full(&authority(&[]), &authority(&[]), now), Ok(Grant::Open));
    }

    #[test]
    fn signature_is_bound_to_names_and_incarnation() {
        let (a, b) = (authority(&["s1"]), authority(&["s1"]));
        let now = 100 * S;
        let (auth, _) = a.dial("a", "b", 7, false, true, now);
        assert_eq!(
            b.accept(Some(&auth), "a", "c", 7, false, false, None, now),
            Err(AuthError::BadSignature)
        );
        assert_eq!(
            b.accept(Some(&auth), "z", "b", 7, false, false, None, now),
            Err(AuthError::BadSignature)
        );
        assert_eq!(
            b.accept(Some(&auth), "a", "b", 8, false, false, None, now),
            Err(AuthError::BadSignature)
        );
        assert_eq!(
            b.accept(Some(&auth), "a", "b", 7, true, false, None, now),
            Err(AuthError::BadSignature)
        );
        assert!(b.accept(Some(&auth), "a", "b", 7, false, false, None, now).is_ok());
    }

    #[test]
    fn replayed_nonce_and_skewed_clock_are_refused() {
        let (a, b) = (authority(&["s1"]), authority(&["s1"]));
        let now = 1000 * S;
        let (auth, _) = a.dial("a", "b", 7, false, true, now);
        assert!(b.accept(Some(&auth), "a", "b", 7, false, false, None, now).is_ok());
        assert_eq!(
            b.accept(Some(&auth), "a", "b", 7, false, false, None, now + S),
            Err(AuthError::Replayed)
        );
        let (old, _) = a.dial("a", "b", 7, false, true, now - 301 * S);
        assert!(matches!(
            b.accept(Some(&old), "a", "b", 7, false, false, None, now),
            Err(AuthError::ClockSkew {
                offset_seconds: -301,
                window_seconds: 300
            })
        ));
        let (early, _) = a.dial("a", "b", 7, false, true, now + 299 * S);
        assert!(b.accept(Some(&early), "a", "b", 7, false, false, None, now).is_ok());
    }

    #[test]
    fn rotation_accepts_old_and_new_during_overlap() {
        let now = 100 * S;
        let b = authority(&["old"]);
        let (old_a, new_a) = (authority(&["old"]), authority(&["new"]));
        assert!(full(&old_a, &b, now).is_ok());
        b.set_tokens(&["new".into(), "old".into()]);
        assert!(full(&old_a, &b, now).is_ok());
        assert!(full(&new_a, &b, now).is_ok());
        b.set_tokens(&["new".into()]);
        assert_eq!(full(&old_a, &b, now), Err(AuthError::BadSignature));
        assert!(full(&new_a, &b, now).is_ok());
        // A dialer holding both signs with both and gets in either way.
        let both = authority(&["old", "new"]);
        assert!(matches!(full(&both, &b, now), Ok(Grant::Token { index: 1, .. })));
    }

    #[test]
    fn ticket_resumes_once_and_its_replay_is_refused() {
        let (a, b) = (authority(&["s1"]), authority(&["s1"]));
        let now = 100 * S;
        full(&a, &b, now).expect("full handshake");
        assert_eq!(a.tickets_held("b", now), 1);
        let (auth, pending) = a.dial("a", "b", 7, false, true, now + S);
        assert!(pending.is_zero_rtt());
        assert_eq!(pending.acceptor_incarnation, Some(9));
        assert!(auth.signatures.is_empty());
        let grant = b
            .accept(Some(&auth), "a", "b", 7, false, false, None, now + S)
            .expect("resumed");
        assert!(matches!(grant, Grant::Ticket { .. }));
        let reply = b.reply(&grant, &auth, "a", "b", 7, 9, false, now + S);
        a.finish(&pending, Some(&reply), "b", 9, now + S)
            .expect("proof under the ticket secret");
        // The same flight again: refused.
        assert_eq!(
            b.accept(Some(&auth), "a", "b", 7, false, false, None, now + 2 * S),
            Err(AuthError::Replayed)
        );
        // The new ticket resumes again.
        let (again, p2) = a.dial("a", "b", 7, false, true, now + 3 * S);
        assert!(p2.is_zero_rtt());
        assert!(
            b.accept(Some(&again), "a", "b", 7, false, false, None, now + 3 * S)
                .is_ok()
        );
    }

    #[test]
    fn tickets_are_bound_expire_and_die_with_key_rotation() {
        let b = Authority::new(AuthConfig {
            tokens: vec!["s1".into()],
            ticket_lifetime: Duration::from_secs(10),
            ..AuthConfig::default()
        });
        let a = authority(&["s1"]);
        let now = now_micros();
        full(&a, &b, now).expect("full");
        // Another acceptor (its own keys) cannot open it.
        let (auth, _) = a.dial("a", "b", 7, false, true, now);
        assert!(matches!(
            authority(&["s1"]).accept(Some(&auth), "a", "b", 7, false, false, None, now),
            Err(AuthError::Ticket(_))
        ));
        // Bound to the dialer's name.
        full(&a, &b, now).expect("full");
        let (auth, _) = a.dial("a", "b", 7, false, true, now);
        assert_eq!(
            b.accept(Some(&auth), "z", "b", 7, false, false, None, now),
            Err(AuthError::Ticket("issued to other names"))
        );
        // Expired.
        full(&a, &b, now).expect("full");
        let (auth, _) = a.dial("a", "b", 7, false, true, now);
        assert_eq!(
            b.accept(Some(&auth), "a", "b", 7, false, false, None, now + 11 * S),
            Err(AuthError::Ticket("expired"))
        );
        // Two rotations later the key that sealed it is gone.
        let c = Authority::new(AuthConfig {
            tokens: vec!["s1".into()],
            ticket_lifetime: Duration::from_secs(10),
            ..AuthConfig::default()
        });
        full(&a, &c, now).expect("full");
        let (auth, _) = a.dial("a", "b", 7, false, true, now);
        if let Ok(mut keys) = c.keys.lock() {
            keys.rotate(&c.rng, now + 11 * S);
        }
        assert_eq!(
            c.accept(Some(&auth), "a", "b", 7, false, false, None, now + 22 * S),
            Err(AuthError::Ticket("issued under a retired key"))
        );
    }

    #[test]
    fn rotating_tokens_retires_tickets() {
        let (a, b) = (authority(&["old"]), authority(&["old"]));
        let now = now_micros();
        full(&a, &b, now).expect("full");
        b.set_tokens(&["old".into(), "new".into()]);
        let (auth, _) = a.dial("a", "b", 7, false, true, now);
        assert!(!auth.ticket.is_empty(), "a ticket was held");
        assert_eq!(
            b.accept(Some(&auth), "a", "b", 7, false, false, None, now),
            Err(AuthError::Ticket("issued under a retired key"))
        );
        // A full handshake with a token still accepted works.
        assert!(full(&a, &b, now).is_ok());
    }

    #[test]
    fn anonymous_only_where_allowed_and_gets_a_name() {
        let a = Authority::new(AuthConfig {
            anonymous: true,
            ..AuthConfig::default()
        });
        let b = authority(&["s1"]);
        let now = 100 * S;
        let (auth, pending) = a.dial("client", "b", 7, false, true, now);
        assert!(auth.signatures.is_empty() && auth.anonymous);
        assert_eq!(
            b.accept(Some(&auth), "", "b", 7, false, false, None, now),
            Err(AuthError::AnonymousForbidden)
        );
        let Ok(Grant::Anonymous { name }) = b.accept(Some(&auth), "", "b", 7, false, true, None, now) else {
            panic!("anonymous refused on an anonymous listener");
        };
        assert!(name.starts_with("anon-"));
        let reply = b.reply(
            &Grant::Anonymous { name: name.clone() },
            &auth,
            "",
            "b",
            7,
            9,
            false,
            now,
        );
        a.finish(&pending, Some(&reply), "b", 9, now).expect("finish");
        assert_eq!(a.assigned_name("b"), Some(name));
    }

    #[test]
    fn bounded_replay_cache_never_readmits_an_evicted_nonce() {
        let mut cache = ReplayCache::new(2, Duration::from_secs(300));
        let now = 1000 * S;
        cache.admit(&[1; 16], now - 3, now).expect("1");
        cache.admit(&[2; 16], now - 2, now).expect("2");
        cache.admit(&[3; 16], now - 1, now).expect("3 evicts 1");
        assert_eq!(cache.len(), 2);
        assert_eq!(cache.admit(&[1; 16], now - 3, now), Err(AuthError::Replayed));
        assert_eq!(cache.admit(&[3; 16], now - 1, now), Err(AuthError::Replayed));
        cache.admit(&[4; 16], now, now).expect("newer than the floor");
        // Entries leave once their timestamps are out of the window.
        cache.admit(&[5; 16], now + 400 * S, now + 400 * S).expect("later");
        assert_eq!(cache.len(), 1);
    }

    #[test]
    fn ticket_body_round_trips_and_rejects_garbage() {
        let body = TicketBody {
            issued: 1,
            expires: 2,
            acceptor_incarnation: 3,
            secret: [7; SECRET_LEN],
            dialer: "a".into(),
            acceptor: "b".into(),
        };
        assert_eq!(TicketBody::decode(&body.encode()), Some(body.clone()));
        let encoded = body.encode();
        for cut in 0..encoded.len() {
            assert_eq!(TicketBody::decode(&encoded[..cut]), None);
        }
    }
}
