//! CoAP resources (design §6) for one authenticated DTLS peer.
//!
//! `GET /.well-known/core`, `GET /gateway`, `GET /locks`, `GET /locks/{id}`,
//! `POST /locks/{id}/lock|unlock|pull` with an optional JSON body
//! `{"mode": "...", "request_id": "..."}`. The client's PSK identity is the command origin, so
//! `[[permissions]]` rules with `origin = IDENTITY` decide what it may do. A repeated CoAP
//! message id is answered from a small cache; a command that takes longer than the ACK timeout
//! gets an empty ACK at once and a separate response with the outcome.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use coap_lite::{
    BlockHandler, BlockHandlerConfig, CoapRequest, CoapResponse, ContentFormat, MessageClass,
    MessageType, ObserveOption, Packet, RequestType, ResponseType,
};
use serde::Deserialize;
use webrtc_dtls::conn::DTLSConn;

use super::dtls::{NewPeer, Notice, verify};
use super::{Endpoint, Membership};
use crate::command::{Action, Mode, Outcome, Reason, Step, check_id};
use crate::registry::GatewayEvent;
use crate::supervisor::Request;
use crate::tasks::AbortOnDrop;

/// Answer before the client's ACK timeout (2 s) would make it retransmit.
const PIGGYBACK_LIMIT: Duration = Duration::from_millis(1500);
/// Confirmable separate responses: RFC 7252's ACK_TIMEOUT and MAX_RETRANSMIT.
const ACK_TIMEOUT: Duration = Duration::from_secs(2);
const MAX_RETRANSMIT: u32 = 4;

/// What a request asks for, read from its method, path and payload before anything runs.
#[derive(Debug, PartialEq)]
pub enum Route {
    Core,
    Gateway,
    Locks,
    Lock(String),
    Command {
        lock: String,
        action: Action,
        mode: Option<Mode>,
        request_id: Option<String>,
    },
}

impl Route {
    /// The resource a request names, or the response code and reason it is refused with.
    /// `segments` are the Uri-Path options, each one segment (a `/` inside one is part of
    /// it); empty segments are ignored.
    pub fn parse(
        method: RequestType,
        segments: &[&str],
        payload: &[u8],
    ) -> Result<Route, (ResponseType, String)> {
        let refuse = |status, why: &str| Err((status, why.to_string()));
        let segments: Vec<&str> = segments.iter().copied().filter(|s| !s.is_empty()).collect();
        if !matches!(method, RequestType::Get | RequestType::Post) {
            return refuse(ResponseType::MethodNotAllowed, "use GET or POST");
        }
        match (method, segments.as_slice()) {
            (RequestType::Get, [".well-known", "core"]) => Ok(Route::Core),
            (RequestType::Get, ["gateway"]) => Ok(Route::Gateway),
            (RequestType::Get, ["locks"]) => Ok(Route::Locks),
            (RequestType::Get, ["locks", id]) => Ok(Route::Lock(id.to_string())),
            (RequestType::Post, ["locks", id, action]) => {
                let Ok(action) = action.parse::<Action>() else {
                    return refuse(ResponseType::NotFound, "unknown action");
                };
                if action == Action::Read {
                    return refuse(ResponseType::MethodNotAllowed, "use GET to read");
                }
                let body: CommandBody = if payload.is_empty() {
                    CommandBody::default()
                } else {
                    serde_json::from_slice(payload)
                        .map_err(|e| (ResponseType::BadRequest, format!("bad payload: {e}")))?
                };
                if let Some(id) = &body.request_id {
                    check_id(id).map_err(|e| (ResponseType::BadRequest, format!("request_{e}")))?;
                }
                Ok(Route::Command {
                    lock: id.to_string(),
                    action,
                    mode: body.mode,
                    request_id: body.request_id,
                })
            }
            (_, ["locks", ..] | ["gateway"] | [".well-known", "core"]) => {
                refuse(ResponseType::MethodNotAllowed, "method not allowed")
            }
            _ => refuse(ResponseType::NotFound, "no such resource"),
        }
    }

    /// The lock the route names, if any.
    fn lock(&self) -> Option<&str> {
        match self {
            Route::Lock(id) | Route::Command { lock: id, .. } => Some(id),
            Route::Core | Route::Gateway | Route::Locks => None,
        }
    }
}

/// Options lockbridge acts on whose numbers are odd (critical, RFC 7252 §5.4.1): Uri-Host,
/// Uri-Port, Uri-Path, Uri-Query, Accept, Block2, Block1. If-Match and If-None-Match are not
/// implemented, so they are refused like any other critical option not listed.
const CRITICAL_UNDERSTOOD: [u16; 7] = [3, 7, 11, 15, 17, 23, 27];
/// Proxy-Uri and Proxy-Scheme: lockbridge is no proxy.
const PROXY_OPTIONS: [u16; 2] = [35, 39];

/// What a message is, read before any resource runs (RFC 7252 §4.2–§5.8).
#[derive(Debug, PartialEq)]
pub enum Triage {
    /// An acknowledgement (`reset` false) or reset of a message of ours.
    Answer { mid: u16, reset: bool },
    /// An empty confirmable message (a CoAP ping): answered with a reset.
    Ping,
    /// Not a request, or not one this endpoint answers: ignored.
    Ignore,
    /// Rejected with a reset: a non-confirmable request with a critical option lockbridge
    /// does not understand.
    Reject,
    /// A request refused with this code and reason.
    Refuse(ResponseType, String),
    /// A request: its method and path segments.
    Request {
        method: RequestType,
        segments: Vec<String>,
    },
}

/// Read what `packet` is.
pub fn triage(packet: &Packet) -> Triage {
    let mid = packet.header.message_id;
    let confirmable = packet.header.get_type() == MessageType::Confirmable;
    match packet.header.get_type() {
        MessageType::Acknowledgement => return Triage::Answer { mid, reset: false },
        MessageType::Reset => return Triage::Answer { mid, reset: true },
        MessageType::Confirmable | MessageType::NonConfirmable => {}
    }
    let method = match packet.header.code {
        MessageClass::Empty if confirmable => return Triage::Ping,
        MessageClass::Request(m) => m,
        // A method code lockbridge does not know (0.08–0.31).
        MessageClass::Reserved(c) if c < 0x20 => {
            return Triage::Refuse(ResponseType::MethodNotAllowed, "unknown method".into());
        }
        MessageClass::Empty | MessageClass::Response(_) | MessageClass::Reserved(_) => {
            return Triage::Ignore;
        }
    };
    for (&number, _) in packet.options() {
        if PROXY_OPTIONS.contains(&number) {
            return Triage::Refuse(
                ResponseType::ProxyingNotSupported,
                "lockbridge is not a proxy".into(),
            );
        }
        if number % 2 == 1 && !CRITICAL_UNDERSTOOD.contains(&number) {
            if !confirmable {
                return Triage::Reject;
            }
            return Triage::Refuse(
                ResponseType::BadOption,
                format!("critical option {number} is not supported"),
            );
        }
    }
    let mut segments = Vec::new();
    for s in packet
        .get_option(coap_lite::CoapOption::UriPath)
        .into_iter()
        .flatten()
    {
        match std::str::from_utf8(s) {
            Ok(s) => segments.push(s.to_string()),
            Err(_) => {
                return Triage::Refuse(ResponseType::BadRequest, "Uri-Path is not UTF-8".into());
            }
        }
    }
    Triage::Request { method, segments }
}

/// Commands a peer sent recently, by message id, with their answer (RFC 7252 §4.5): a
/// duplicate — confirmable or not — gets that answer again and never runs the command twice.
/// Entries live as long as the client may repeat the message (EXCHANGE_LIFETIME, or
/// NON_LIFETIME for a non-confirmable one); safe methods are not kept, since answering a
/// repeated GET again is harmless.
#[derive(Default)]
struct Recent {
    entries: VecDeque<(u16, std::time::Instant, Option<Vec<u8>>)>,
}

/// RFC 7252 §4.8.2.
const EXCHANGE_LIFETIME: Duration = Duration::from_secs(247);
const NON_LIFETIME: Duration = Duration::from_secs(145);
/// Commands remembered per peer: above any rate a lock can serve over a lifetime.
const RECENT_COMMANDS: usize = 256;

impl Recent {
    /// `Some(answer)` when `mid` was seen within its lifetime (`None` inside: no answer yet).
    fn seen(&mut self, mid: u16, now: std::time::Instant) -> Option<Option<&[u8]>> {
        while self.entries.front().is_some_and(|e| e.1 <= now) {
            self.entries.pop_front();
        }
        self.entries
            .iter()
            .find(|e| e.0 == mid && e.1 > now)
            .map(|e| e.2.as_deref())
    }

    fn remember(&mut self, mid: u16, confirmable: bool, answer: Option<Vec<u8>>) {
        let lifetime = if confirmable {
            EXCHANGE_LIFETIME
        } else {
            NON_LIFETIME
        };
        self.entries
            .push_back((mid, std::time::Instant::now() + lifetime, answer));
        if self.entries.len() > RECENT_COMMANDS {
            self.entries.pop_front();
        }
    }
}

/// Observations a peer may hold at once; a registration beyond it is served as a plain GET
/// (RFC 7641 §4.1).
const MAX_OBSERVATIONS: usize = 16;

/// Block-wise request bodies (RFC 7959 Block1) a peer may have in progress at once.
const MAX_BLOCK1: usize = 4;
/// How long block-wise state is kept without a next block.
const BLOCK_EXPIRY: Duration = Duration::from_secs(30);

/// One authenticated peer, shared by its request loop and the tasks it starts (separate
/// responses, observations).
pub(super) struct Peer {
    dtls: Arc<DTLSConn>,
    pub(super) identity: String,
    pub(super) source: std::net::IpAddr,
    /// Message ids of the messages we originate.
    next_mid: std::sync::atomic::AtomicU16,
    /// Confirmable messages of ours waiting for their ACK, by message id.
    awaiting_ack: Mutex<std::collections::HashMap<u16, Arc<tokio::sync::Notify>>>,
    /// The latest notifications' message ids and tokens, so that a reset ends its observation.
    notified: Mutex<VecDeque<(u16, Vec<u8>)>>,
}

impl Peer {
    fn mid(&self) -> u16 {
        self.next_mid
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    /// A notification went out with message id `mid` for the observation `token`.
    fn note_notification(&self, mid: u16, token: &[u8]) {
        let mut n = self.notified.lock().unwrap_or_else(|p| p.into_inner());
        n.push_back((mid, token.to_vec()));
        // Enough for every observation's latest few: a reset answers the one just sent.
        if n.len() > 4 * MAX_OBSERVATIONS {
            n.pop_front();
        }
    }

    /// The observation a notification with message id `mid` belonged to.
    fn notified_token(&self, mid: u16) -> Option<Vec<u8>> {
        let n = self.notified.lock().unwrap_or_else(|p| p.into_inner());
        n.iter()
            .rev()
            .find(|(m, _)| *m == mid)
            .map(|(_, t)| t.clone())
    }

    /// The client acknowledged (or reset) one of our messages.
    fn acknowledged(&self, mid: u16) {
        let waiting = self
            .awaiting_ack
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&mid);
        if let Some(n) = waiting {
            log::debug!(
                "coap: {} ({}): separate response {mid} acknowledged",
                self.source,
                self.identity
            );
            n.notify_one();
        }
    }

    /// Send a confirmable message, retransmitting with exponential backoff until it is
    /// acknowledged or MAX_RETRANSMIT retransmissions went unanswered.
    async fn send_confirmable(&self, mut packet: Packet) {
        packet.header.set_type(MessageType::Confirmable);
        let mid = self.mid();
        packet.header.message_id = mid;
        let Ok(bytes) = packet.to_bytes() else { return };
        let acked = Arc::new(tokio::sync::Notify::new());
        self.awaiting_ack
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(mid, acked.clone());
        let mut timeout = ACK_TIMEOUT;
        for _ in 0..=MAX_RETRANSMIT {
            if self.dtls.write(&bytes, None).await.is_err() {
                break;
            }
            if tokio::time::timeout(timeout, acked.notified())
                .await
                .is_ok()
            {
                return;
            }
            timeout *= 2;
        }
        self.awaiting_ack
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&mid);
        log::info!(
            "coap: {} ({}): a separate response was never acknowledged",
            self.source,
            self.identity
        );
    }
}

/// Run one peer: handshake with a deadline, then serve requests until it goes idle or leaves.
pub async fn serve_peer(peer: NewPeer, endpoint: Arc<Endpoint>) {
    let identity = Arc::new(Mutex::new(None));
    let config = endpoint.dtls_config(&peer.suites, identity.clone());
    let psk = config.psk.is_some();
    let conn: Arc<dyn webrtc_util::Conn + Send + Sync> = peer.conn.clone();
    // Boxed: the handshake's state is large and would otherwise stay allocated in this task's
    // future for the whole session (per-peer memory, issue target ≤ 32 KiB).
    let handshake = Box::pin(DTLSConn::new(conn, config, false, None));
    let dtls = match tokio::time::timeout(endpoint.limits.handshake_timeout, handshake).await {
        Ok(Ok(c)) => Arc::new(c),
        Ok(Err(e)) => {
            peer.conn.close();
            log::info!("coap: {}: handshake refused: {e}", peer.addr);
            return;
        }
        Err(_) => {
            peer.conn.close();
            log::info!(
                "coap: {}: handshake not finished within {:?}; dropped",
                peer.addr,
                endpoint.limits.handshake_timeout
            );
            return;
        }
    };
    // webrtc-dtls does not check the client's Finished: nothing is served before it is.
    let exported = dtls.connection_state().await.marshal_binary().await;
    let checked = match exported.ok().and_then(|e| verify::master_secret(&e)) {
        Some(master) => peer.conn.established(&master, psk),
        None => Err(verify::FinishedError::NoMasterSecret),
    };
    if let Err(e) = checked {
        endpoint
            .stats
            .bad_finished
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        log::warn!("coap: {}: handshake refused: {e}", peer.addr);
        peer.conn.close();
        return;
    }
    peer.state.set_established();
    let _ = peer
        .notices
        .send(Notice::Established(peer.addr, peer.generation));
    let identity = identity
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
        .unwrap_or_default();
    log::info!("coap: {} authenticated as {identity:?}", peer.addr);
    // Peers per address and per identity are capped: this one in, that group's oldest out.
    let _membership = Membership::join(&endpoint, &peer, &identity);
    let peer_ctx = Arc::new(Peer {
        dtls: dtls.clone(),
        identity: identity.clone(),
        source: peer.addr.ip(),
        next_mid: std::sync::atomic::AtomicU16::new(rand_core::RngCore::next_u32(
            &mut rand_core::OsRng,
        ) as u16),
        awaiting_ack: Mutex::new(std::collections::HashMap::new()),
        notified: Mutex::new(VecDeque::new()),
    });
    let mut recent = Recent::default();
    // Observations (RFC 7641) by token, ended when the peer leaves — also when its task is
    // aborted (the peer replaced or evicted), which is why they abort on drop.
    let mut observers: std::collections::HashMap<Vec<u8>, AbortOnDrop> =
        std::collections::HashMap::new();
    // Separate responses still being worked on; ended when the peer leaves.
    let mut pending = tokio::task::JoinSet::new();
    // Responses larger than one block (a lock list) go out block-wise, and request bodies may
    // come in blocks (RFC 7959). Only requests for existing resources get here, so its state
    // is bounded by the resources; [`MAX_BLOCK1`] bounds the bodies in progress.
    let mut blocks: BlockHandler<std::net::SocketAddr> = BlockHandler::new(BlockHandlerConfig {
        cache_expiry_duration: BLOCK_EXPIRY,
        ..BlockHandlerConfig::default()
    });
    let mut block1: std::collections::HashMap<Vec<String>, std::time::Instant> =
        std::collections::HashMap::new();
    let mut buf = vec![0u8; 2048];
    loop {
        while pending.try_join_next().is_some() {}
        let read = tokio::select! {
            r = dtls.read(&mut buf, Some(endpoint.limits.idle_timeout)) => r,
            _ = endpoint.shutdown.cancelled() => {
                log::debug!("coap: {} ({identity}): shutting down; closing", peer.addr);
                break;
            }
        };
        let n = match read {
            Ok(n) => n,
            // A record larger than any request: ignored, like any malformed message.
            Err(webrtc_dtls::Error::ErrBufferTooSmall) => continue,
            Err(e) => {
                log::debug!("coap: {} ({identity}): {e}; closing", peer.addr);
                break;
            }
        };
        let Some(packet) = read_message(&buf[..n]) else {
            continue; // ignored, as RFC 7252 asks for malformed messages
        };
        let mid = packet.header.message_id;
        let confirmable = packet.header.get_type() == MessageType::Confirmable;
        let (method, segments) = match triage(&packet) {
            Triage::Answer { mid, reset } => {
                peer_ctx.acknowledged(mid);
                if reset {
                    // A reset of a notification ends its observation (RFC 7641 §3.6).
                    if let Some(token) = peer_ctx.notified_token(mid) {
                        observers.remove(&token);
                    }
                }
                continue;
            }
            Triage::Ping | Triage::Reject => {
                let _ = dtls.write(&reset(mid), None).await;
                continue;
            }
            Triage::Ignore => continue,
            Triage::Refuse(status, why) => {
                if let Some(response) = CoapResponse::new(&packet) {
                    let bytes = error(response, status, &why).to_bytes().unwrap_or_default();
                    let _ = dtls.write(&bytes, None).await;
                }
                continue;
            }
            Triage::Request { method, segments } => (method, segments),
        };
        // A repeated command gets its first answer; it never runs twice.
        let idempotent = method == RequestType::Get;
        if !idempotent {
            match recent.seen(mid, std::time::Instant::now()) {
                Some(Some(answer)) if confirmable => {
                    let _ = dtls.write(answer, None).await;
                    continue;
                }
                Some(_) => continue,
                None => {}
            }
        }
        let segment_refs: Vec<&str> = segments.iter().map(String::as_str).collect();
        let mut request = CoapRequest::from_packet(packet, peer.addr);
        // Is it a resource this identity may see? Only then does anything keep state for it.
        let target =
            Route::parse(method, &segment_refs, &[]).and_then(|route| match route.lock() {
                Some(lock) if !endpoint.may_see(&peer_ctx, lock) => {
                    Err((ResponseType::NotFound, "unknown lock".to_string()))
                }
                _ => Ok(route),
            });
        let refused = match target {
            Err((status, why)) => Some((status, why)),
            Ok(_) => check_block1(&mut request, &mut block1),
        };
        if let Some((status, why)) = refused {
            let Some(response) = request.response.clone() else {
                continue;
            };
            let bytes = error(response, status, &why).to_bytes().unwrap_or_default();
            let _ = dtls.write(&bytes, None).await;
            if !idempotent {
                recent.remember(mid, confirmable, Some(bytes));
            }
            continue;
        }
        let from_cache = blocks.intercept_request(&mut request).unwrap_or(false);
        if !from_cache {
            let reply = match handle(&endpoint, &peer_ctx, &segment_refs, request.clone()).await {
                Some(Reply::Now(p)) => p,
                Some(Reply::Later { ack, outcome }) => {
                    pending.spawn(outcome);
                    // Remember the empty ACK so a repeated request gets it again instead of
                    // starting a second command.
                    let ack = ack.and_then(|a| a.to_bytes().ok());
                    if let Some(bytes) = &ack {
                        let _ = dtls.write(bytes, None).await;
                    }
                    recent.remember(mid, confirmable, ack);
                    continue;
                }
                None => continue,
            };
            if let Some(r) = request.response.as_mut() {
                r.message = reply;
            }
            observe(
                &endpoint,
                &peer_ctx,
                &segment_refs,
                &mut request,
                &mut observers,
            );
            let _ = blocks.intercept_response(&mut request);
        }
        let Some(Ok(bytes)) = request.response.as_ref().map(|r| r.message.to_bytes()) else {
            continue;
        };
        let _ = dtls.write(&bytes, None).await;
        if !idempotent {
            recent.remember(mid, confirmable, Some(bytes));
        }
    }
    drop(observers);
    pending.abort_all();
    let _ = dtls.close().await;
}

/// An empty reset for message `mid`.
fn reset(mid: u16) -> Vec<u8> {
    let mut p = Packet::new();
    p.header.set_version(1);
    p.header.set_type(MessageType::Reset);
    p.header.code = MessageClass::Empty;
    p.header.message_id = mid;
    p.to_bytes().unwrap_or_default()
}

/// Bound a block-wise request body: at most [`MAX_BODY`] in all, and at most [`MAX_BLOCK1`]
/// bodies of a peer in progress. The refusal, if any.
fn check_block1(
    request: &mut CoapRequest<std::net::SocketAddr>,
    in_progress: &mut std::collections::HashMap<Vec<String>, std::time::Instant>,
) -> Option<(ResponseType, String)> {
    let raw = request
        .message
        .get_option(coap_lite::CoapOption::Block1)
        .and_then(|values| values.front())?;
    // num (up to 20 bits) ‖ more (1) ‖ szx (3), in 0 to 3 bytes (RFC 7959 §2.2)
    if raw.len() > 3 || raw.last().is_some_and(|b| b & 0x07 == 7) {
        return Some((ResponseType::BadRequest, "malformed Block1 option".into()));
    }
    let block = raw.iter().fold(0u32, |v, b| v << 8 | u32::from(*b));
    let (num, more, size) = (block >> 4, block & 0x08 != 0, 16usize << (block & 0x07));
    let end = (num as usize).saturating_mul(size) + request.message.payload.len();
    if end > MAX_BODY {
        return Some((
            ResponseType::RequestEntityTooLarge,
            format!("request bodies are at most {MAX_BODY} bytes"),
        ));
    }
    let now = std::time::Instant::now();
    in_progress.retain(|_, seen| now.duration_since(*seen) < BLOCK_EXPIRY);
    let path = request.get_path_as_vec().unwrap_or_default();
    if !in_progress.contains_key(&path) && in_progress.len() >= MAX_BLOCK1 {
        return Some((
            ResponseType::ServiceUnavailable,
            format!("at most {MAX_BLOCK1} block-wise requests at a time"),
        ));
    }
    if more {
        in_progress.insert(path, now);
    } else {
        in_progress.remove(&path);
    }
    None
}

/// The largest request body, whole or reassembled from blocks.
const MAX_BODY: usize = 1024;

/// The largest request lockbridge reads. Its own requests are a path and a short JSON body
/// (a few hundred bytes); coap-lite's `BlockHandler` panics on some larger ones (it cannot
/// re-encode one over 1,280 bytes, and divides by zero at exactly 1,140 bytes of options).
pub const MAX_REQUEST_BYTES: usize = 1024;

/// A datagram as a CoAP message, or `None` if it is not one lockbridge can answer: not CoAP,
/// or over [`MAX_REQUEST_BYTES`] as encoded.
pub fn read_message(datagram: &[u8]) -> Option<Packet> {
    let packet = Packet::from_bytes(datagram).ok()?;
    let encoded = packet.to_bytes().ok()?;
    (encoded.len() <= MAX_REQUEST_BYTES).then_some(packet)
}

/// What a request gets.
enum Reply {
    /// A response now (piggybacked on the ACK of a confirmable request).
    Now(Packet),
    /// The lock takes longer: an empty ACK now (for a confirmable request) and a separate
    /// response from `outcome` when the command ends.
    Later {
        ack: Option<Packet>,
        outcome: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
    },
}

/// Register or end an observation of `/locks/{id}` (RFC 7641). A registered client gets the
/// current view with an Observe number now, then a notification on every change — while its
/// permissions still let it read the lock: when they no longer do (a time window closed), it
/// gets a 4.03 notification, which ends the observation. At most [`MAX_OBSERVATIONS`] per
/// peer; a registration beyond that is answered as a plain GET.
fn observe(
    endpoint: &Arc<Endpoint>,
    peer: &Arc<Peer>,
    segments: &[&str],
    request: &mut CoapRequest<std::net::SocketAddr>,
    observers: &mut std::collections::HashMap<Vec<u8>, AbortOnDrop>,
) {
    let Ok(Route::Lock(lock)) = Route::parse(*request.get_method(), segments, &[]) else {
        return;
    };
    let token = request.message.get_token().to_vec();
    match request.get_observe_flag() {
        Some(Ok(ObserveOption::Deregister)) => {
            observers.remove(&token);
        }
        Some(Ok(ObserveOption::Register)) => {
            let Some(response) = request.response.as_mut() else {
                return;
            };
            if response.message.header.code != MessageClass::Response(ResponseType::Content) {
                return; // not found or not allowed: no observation
            }
            observers.retain(|_, task| !task.0.is_finished());
            if !observers.contains_key(&token) && observers.len() >= MAX_OBSERVATIONS {
                log::info!(
                    "coap: {} ({}) holds {MAX_OBSERVATIONS} observations; {lock} served without one",
                    peer.source,
                    peer.identity
                );
                return;
            }
            response.message.set_observe_value(0);
            let events = endpoint.supervisor.registry().subscribe();
            log::info!("coap: {} observes {lock}", peer.identity);
            let task = tokio::spawn(notify(
                endpoint.clone(),
                peer.clone(),
                lock,
                token.clone(),
                events,
            ));
            observers.insert(token, AbortOnDrop(task.abort_handle()));
        }
        _ => {}
    }
}

/// An observation's notifications, until the peer goes, the lock's read permission ends, or
/// the event stream closes.
async fn notify(
    endpoint: Arc<Endpoint>,
    peer: Arc<Peer>,
    lock: String,
    token: Vec<u8>,
    mut events: tokio::sync::broadcast::Receiver<GatewayEvent>,
) {
    let mut seq: u32 = 0;
    loop {
        let view = match events.recv().await {
            Ok(GatewayEvent::LockChanged { lock: v }) if v.id == lock => v,
            Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
            Err(_) => return,
        };
        seq = (seq + 1) & 0x00FF_FFFF;
        let allowed = endpoint.may(&peer, &lock, Action::Read);
        let mut n = Packet::new();
        n.header.set_version(1);
        n.header.set_type(MessageType::NonConfirmable);
        n.header.message_id = peer.mid();
        n.set_token(token.clone());
        n.set_content_format(ContentFormat::ApplicationJSON);
        if allowed {
            n.header.code = MessageClass::Response(ResponseType::Content);
            n.set_observe_value(seq);
            n.payload = serde_json::to_vec(&view).unwrap_or_default();
        } else {
            n.header.code = MessageClass::Response(ResponseType::Forbidden);
            n.payload = serde_json::to_vec(&serde_json::json!({
                "error": "not allowed to read this lock now; the observation ended"
            }))
            .unwrap_or_default();
        }
        let Ok(bytes) = n.to_bytes() else { continue };
        peer.note_notification(n.header.message_id, &token);
        if peer.dtls.write(&bytes, None).await.is_err() || !allowed {
            if !allowed {
                log::info!(
                    "coap: {}'s observation of {lock} ended: no longer allowed",
                    peer.identity
                );
            }
            return;
        }
    }
}

fn json_response(
    mut response: CoapResponse,
    status: ResponseType,
    body: &impl serde::Serialize,
) -> Packet {
    response.set_status(status);
    response
        .message
        .set_content_format(ContentFormat::ApplicationJSON);
    response.message.payload = serde_json::to_vec(body).unwrap_or_default();
    response.message
}

fn error(response: CoapResponse, status: ResponseType, why: &str) -> Packet {
    json_response(response, status, &serde_json::json!({ "error": why }))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct CommandBody {
    #[serde(default)]
    mode: Option<Mode>,
    #[serde(default)]
    request_id: Option<String>,
}

/// The response carrying a command's outcome: the outcome's fields, the id, and
/// `"repeated": true` when the id repeated an earlier command (nothing was sent again).
fn outcome_packet(identity: &str, response: CoapResponse, done: Done) -> Packet {
    let Done {
        id,
        outcome,
        repeated,
    } = done;
    if matches!(outcome, Outcome::Denied { .. }) {
        log::warn!("coap: {identity} denied: {outcome:?}");
    }
    let status = status_for(&outcome);
    let mut body = serde_json::to_value(&outcome).unwrap_or_default();
    body["id"] = serde_json::Value::String(id);
    if repeated {
        body["repeated"] = serde_json::Value::Bool(true);
    }
    json_response(response, status, &body)
}

/// A command's terminal report, as a CoAP answer needs it.
struct Done {
    id: String,
    outcome: Outcome,
    repeated: bool,
}

/// The CoAP code for an outcome (design §6).
fn status_for(outcome: &Outcome) -> ResponseType {
    match outcome {
        Outcome::Success { .. } => ResponseType::Changed,
        Outcome::Denied { .. } => ResponseType::Forbidden,
        Outcome::Expired => ResponseType::GatewayTimeout,
        Outcome::Failed { reason, .. } => match reason {
            Reason::UnknownLock => ResponseType::NotFound,
            Reason::BadRequest => ResponseType::BadRequest,
            // Not the lock's answer: the gateway could not get it there (or back).
            Reason::Unreachable
            | Reason::NotRegistered
            | Reason::InvalidCert
            | Reason::ShuttingDown
            | Reason::StateStore
            | Reason::QueueFull => ResponseType::ServiceUnavailable,
            // The lock said no, or the request conflicts with the state of things.
            Reason::Lock(_) | Reason::Jammed | Reason::IdConflict | Reason::InternalError => {
                ResponseType::Conflict
            }
        },
        Outcome::Ambiguous { .. } => ResponseType::ServiceUnavailable,
    }
}

async fn handle(
    endpoint: &Endpoint,
    peer: &Arc<Peer>,
    segments: &[&str],
    request: CoapRequest<std::net::SocketAddr>,
) -> Option<Reply> {
    let response = request.response.clone()?;
    let route = Route::parse(*request.get_method(), segments, &request.message.payload);
    let route = match route {
        Ok(route) => route,
        Err((status, why)) => return Some(Reply::Now(error(response, status, &why))),
    };
    let sup = &endpoint.supervisor;
    let identity = peer.identity.as_str();
    let who = crate::policy::Who::new(identity, Some(peer.source), crate::clock::unix_ms() / 1000);
    let policy = sup.policy();
    let may_read = |lock: &str| policy.allows(&who, lock, Action::Read);
    Some(Reply::Now(match route {
        Route::Core => {
            let mut links = vec![
                "</gateway>;rt=\"lockbridge.gateway\";ct=50".to_string(),
                "</locks>;rt=\"lockbridge.locks\";ct=50".to_string(),
            ];
            for v in sup.registry().all().iter().filter(|v| may_read(&v.id)) {
                links.push(format!("</locks/{}>;rt=\"lockbridge.lock\";ct=50", v.id));
            }
            let mut r = response;
            r.message
                .set_content_format(ContentFormat::ApplicationLinkFormat);
            r.message.payload = links.join(",").into_bytes();
            r.message
        }
        Route::Gateway => {
            use std::sync::atomic::Ordering::Relaxed;
            let mut body = sup.status();
            let endpoint_part = serde_json::json!({
                "uptime_s": endpoint.started.elapsed().as_secs(),
                "dtls_peers": endpoint.stats.peers.load(Relaxed),
                // ClientHellos held back under a flood, and unverified handshakes evicted.
                "dtls_hellos_held_back": endpoint.stats.held_back.load(Relaxed),
                "dtls_handshakes_evicted": endpoint.stats.evicted_unverified.load(Relaxed),
                // What the DTLS layer discarded or ended, by cause.
                "dtls_dropped_forged": endpoint.stats.dropped_forged.load(Relaxed),
                "dtls_dropped_budget": endpoint.stats.dropped_budget.load(Relaxed),
                "dtls_dropped_oversized": endpoint.stats.dropped_oversized.load(Relaxed),
                "dtls_dropped_address_cap": endpoint.stats.dropped_address_cap.load(Relaxed),
                "dtls_evicted_by_cap": endpoint.stats.evicted_by_cap.load(Relaxed),
                "dtls_replaced": endpoint.stats.replaced.load(Relaxed),
                "dtls_bad_finished": endpoint.stats.bad_finished.load(Relaxed),
                // Tasks alive in the daemon's runtime: flat over time unless something leaks.
                "tasks": tokio::runtime::Handle::current().metrics().num_alive_tasks(),
            });
            if let (Some(all), serde_json::Value::Object(more)) =
                (body.as_object_mut(), endpoint_part)
            {
                all.extend(more);
            }
            json_response(response, ResponseType::Content, &body)
        }
        Route::Locks => {
            let visible: Vec<_> = sup
                .registry()
                .all()
                .into_iter()
                .filter(|v| may_read(&v.id))
                .collect();
            json_response(response, ResponseType::Content, &visible)
        }
        Route::Lock(id) => match sup.registry().get(&id) {
            None => error(response, ResponseType::NotFound, "unknown lock"),
            Some(_) if !endpoint.may_see(peer, &id) => {
                error(response, ResponseType::NotFound, "unknown lock")
            }
            Some(_) if !may_read(&id) => {
                log::warn!("coap: {identity} may not read {id}: 4.03");
                error(
                    response,
                    ResponseType::Forbidden,
                    "not allowed to read this lock",
                )
            }
            Some(v) => json_response(response, ResponseType::Content, &v),
        },
        Route::Command {
            lock,
            action,
            mode,
            request_id,
        } => {
            let mut rx = sup.submit(Request {
                id: request_id,
                lock,
                action,
                mode: mode.unwrap_or_default(),
                ttl: None,
                origin: identity.to_string(),
                source: Some(peer.source),
            });
            let wait_outcome = async move {
                while let Some(r) = rx.recv().await {
                    if let Step::Done { outcome } = r.step {
                        return Some(Done {
                            id: r.id,
                            outcome,
                            repeated: r.repeated,
                        });
                    }
                }
                None
            };
            let mut wait_outcome = Box::pin(wait_outcome);
            let finished = tokio::time::timeout(PIGGYBACK_LIMIT, &mut wait_outcome).await;
            match finished {
                Ok(Some(done)) => outcome_packet(identity, response, done),
                Ok(None) => error(response, ResponseType::InternalServerError, "no outcome"),
                Err(_) => {
                    // Separate response (RFC 7252 §5.2.2): an empty ACK now, the outcome as
                    // its own exchange when the command ends.
                    let confirmable = request.message.header.get_type() == MessageType::Confirmable;
                    let ack = confirmable.then(|| {
                        let mut ack = Packet::new();
                        ack.header.set_version(1);
                        ack.header.set_type(MessageType::Acknowledgement);
                        ack.header.code = MessageClass::Empty;
                        ack.header.message_id = request.message.header.message_id;
                        ack
                    });
                    let peer = peer.clone();
                    let outcome = Box::pin(async move {
                        let Some(done) = wait_outcome.await else {
                            return;
                        };
                        let separate = outcome_packet(&peer.identity, response, done);
                        if confirmable {
                            peer.send_confirmable(separate).await;
                        } else {
                            let mut p = separate;
                            p.header.set_type(MessageType::NonConfirmable);
                            p.header.message_id = peer.mid();
                            if let Ok(bytes) = p.to_bytes() {
                                let _ = peer.dtls.write(&bytes, None).await;
                            }
                        }
                    });
                    return Some(Reply::Later { ack, outcome });
                }
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_queue_is_service_unavailable_and_a_busy_lock_a_conflict() {
        assert_eq!(
            status_for(&Outcome::failed(Reason::QueueFull)),
            ResponseType::ServiceUnavailable
        );
        assert_eq!(
            status_for(&Outcome::failed(Reason::Lock(
                crate::ptls::api::result::BUSY
            ))),
            ResponseType::Conflict
        );
    }

    /// Whether coap-lite's BlockHandler panics on this request.
    fn block_handler_panics(packet: Packet) -> bool {
        std::panic::catch_unwind(|| {
            let mut request = CoapRequest::from_packet(packet, ([127, 0, 0, 1], 1).into());
            let mut blocks: BlockHandler<std::net::SocketAddr> =
                BlockHandler::new(BlockHandlerConfig::default());
            let _ = blocks.intercept_request(&mut request);
        })
        .is_err()
    }

    /// A GET with `paths` Uri-Path options of 12 bytes, `tail` more bytes of path, and
    /// `block1` as its Block1 option.
    fn get_with_options(paths: usize, tail: usize, block1: Option<u8>) -> Vec<u8> {
        let mut datagram = vec![0x40, 0x01, 0x12, 0x34];
        for i in 0..paths {
            datagram.push(if i == 0 { 0xBC } else { 0x0C }); // Uri-Path (11), 12 bytes
            datagram.extend([b'x'; 12]);
        }
        datagram.push(if paths == 0 { 0xB0 } else { 0x00 } | tail as u8);
        datagram.extend(std::iter::repeat_n(b'y', tail));
        if let Some(value) = block1 {
            datagram.extend([0xD1, 0x03, value]); // Block1 (27 = 11 + 13 + 3), 1 byte
        }
        datagram
    }

    // Found by fuzzing (coap_request): requests that made coap-lite's BlockHandler panic in
    // the peer's task — one over 1,280 bytes ("Internal error encoding packet") and one of
    // exactly 1,140 bytes with a Block1 option (division by zero).
    #[test]
    fn requests_that_crash_the_block_handler_are_dropped_before_it() {
        let too_large = get_with_options(100, 1, None);
        let exact = get_with_options(87, 1, Some(0x02));
        assert_eq!((too_large.len(), exact.len()), (1306, 1140));
        for datagram in [too_large, exact] {
            let packet = Packet::from_bytes(&datagram).expect("valid CoAP");
            assert!(
                block_handler_panics(packet),
                "coap-lite no longer panics here"
            );
            assert!(read_message(&datagram).is_none());
        }
        let fine = get_with_options(70, 3, Some(0x02));
        assert!(fine.len() <= MAX_REQUEST_BYTES);
        assert!(read_message(&fine).is_some());
    }

    #[test]
    fn routes_and_refusals() {
        // Test paths split on '/' here; on the wire each Uri-Path option is one segment.
        let parse = |m, p: &str, b: &str| {
            let segments: Vec<&str> = p.split('/').collect();
            Route::parse(m, &segments, b.as_bytes())
        };
        assert_eq!(parse(RequestType::Get, "locks", ""), Ok(Route::Locks));
        assert_eq!(
            parse(RequestType::Get, "/locks/front//", ""),
            Ok(Route::Lock("front".into()))
        );
        assert_eq!(
            parse(
                RequestType::Post,
                "locks/front/unlock",
                r#"{"mode":"force","request_id":"r1"}"#
            ),
            Ok(Route::Command {
                lock: "front".into(),
                action: Action::Unlock,
                mode: Some(Mode::Force),
                request_id: Some("r1".into()),
            })
        );
        let status = |r: Result<Route, (ResponseType, String)>| r.unwrap_err().0;
        assert_eq!(
            status(parse(RequestType::Post, "locks/front/read", "")),
            ResponseType::MethodNotAllowed
        );
        assert_eq!(
            status(parse(RequestType::Post, "locks/front/open", "")),
            ResponseType::NotFound
        );
        assert_eq!(
            status(parse(
                RequestType::Post,
                "locks/front/lock",
                "{\"colour\":1}"
            )),
            ResponseType::BadRequest
        );
        assert_eq!(
            status(parse(RequestType::Delete, "gateway", "")),
            ResponseType::MethodNotAllowed
        );
        assert_eq!(
            status(parse(RequestType::Get, "nothing", "")),
            ResponseType::NotFound
        );
        let long = format!(r#"{{"request_id":"{}"}}"#, "r".repeat(65));
        assert_eq!(
            status(parse(RequestType::Post, "locks/front/lock", &long)),
            ResponseType::BadRequest
        );
        assert_eq!(
            status(parse(RequestType::Fetch, "locks", "")),
            ResponseType::MethodNotAllowed
        );
        // Regression: a segment holding '/' was split and matched another resource.
        assert_eq!(
            status(Route::parse(RequestType::Get, &["locks/front"], b"")),
            ResponseType::NotFound
        );
    }

    fn message(t: MessageType, code: MessageClass, options: &[(u16, &[u8])]) -> Packet {
        let mut p = Packet::new();
        p.header.set_type(t);
        p.header.code = code;
        p.header.message_id = 7;
        for (n, v) in options {
            p.add_option(coap_lite::CoapOption::from(*n), v.to_vec());
        }
        p
    }

    #[test]
    fn triage_refuses_what_lockbridge_does_not_understand() {
        let get = MessageClass::Request(RequestType::Get);
        let con = MessageType::Confirmable;
        let non = MessageType::NonConfirmable;
        let path: (u16, &[u8]) = (11, b"locks");
        assert_eq!(
            triage(&message(con, get, &[path, (11, b"a/b")])),
            Triage::Request {
                method: RequestType::Get,
                segments: vec!["locks".into(), "a/b".into()]
            }
        );
        // Regression: a POST unlock with critical option 9 actuated.
        let refused = triage(&message(con, get, &[path, (9, b"x")]));
        assert!(
            matches!(refused, Triage::Refuse(ResponseType::BadOption, _)),
            "{refused:?}"
        );
        assert_eq!(
            triage(&message(non, get, &[path, (9, b"x")])),
            Triage::Reject
        );
        for option in [1, 5, 13, 2049] {
            assert!(matches!(
                triage(&message(con, get, &[(option, b"")])),
                Triage::Refuse(ResponseType::BadOption, _)
            ));
        }
        // Elective options are ignored; understood critical ones pass.
        for option in [3, 6, 7, 12, 15, 17, 23, 27, 60, 258] {
            assert!(
                matches!(
                    triage(&message(con, get, &[(option, b"")])),
                    Triage::Request { .. }
                ),
                "option {option}"
            );
        }
        assert!(matches!(
            triage(&message(con, get, &[(35, b"coap://elsewhere/")])),
            Triage::Refuse(ResponseType::ProxyingNotSupported, _)
        ));
        assert_eq!(
            triage(&message(con, MessageClass::Empty, &[])),
            Triage::Ping
        );
        assert_eq!(
            triage(&message(non, MessageClass::Empty, &[])),
            Triage::Ignore
        );
        assert!(matches!(
            triage(&message(con, MessageClass::Reserved(0x08), &[])),
            Triage::Refuse(ResponseType::MethodNotAllowed, _)
        ));
        assert_eq!(
            triage(&message(MessageType::Reset, MessageClass::Empty, &[])),
            Triage::Answer {
                mid: 7,
                reset: true
            }
        );
        assert!(matches!(
            triage(&message(con, get, &[(11, &[0xFF, 0xFE])])),
            Triage::Refuse(ResponseType::BadRequest, _)
        ));
    }

    #[test]
    fn repeated_commands_are_known_by_message_id_for_their_lifetime() {
        let mut r = Recent::default();
        let now = std::time::Instant::now();
        assert!(r.seen(1, now).is_none());
        r.remember(1, false, Some(b"answer".to_vec()));
        r.remember(2, true, None);
        assert_eq!(r.seen(1, now), Some(Some(&b"answer"[..])));
        assert_eq!(r.seen(2, now), Some(None));
        // A non-confirmable message's id is free again after NON_LIFETIME, a confirmable one's
        // after EXCHANGE_LIFETIME.
        assert!(
            r.seen(1, now + NON_LIFETIME + Duration::from_secs(1))
                .is_none()
        );
        assert!(
            r.seen(2, now + NON_LIFETIME + Duration::from_secs(1))
                .is_some()
        );
        assert!(
            r.seen(2, now + EXCHANGE_LIFETIME + Duration::from_secs(1))
                .is_none()
        );
        // Bounded however many commands come.
        let mut r = Recent::default();
        for mid in 0..10_000u16 {
            r.remember(mid, true, Some(vec![0; 100]));
        }
        assert_eq!(r.entries.len(), RECENT_COMMANDS);
    }

    #[test]
    fn block_wise_bodies_are_bounded_in_size_and_number() {
        let request = |path: &str, block: &[u8], payload: usize| {
            let mut p = message(
                MessageType::Confirmable,
                MessageClass::Request(RequestType::Post),
                &[(11, path.as_bytes()), (27, block)],
            );
            p.payload = vec![b'x'; payload];
            CoapRequest::from_packet(p, ([127, 0, 0, 1], 1).into())
        };
        let mut state = std::collections::HashMap::new();
        // Block 0 of 16 bytes, more to come: accepted, remembered.
        assert!(check_block1(&mut request("a", &[0x08], 16), &mut state).is_none());
        // Block 64 of 16 bytes would go past MAX_BODY.
        let too_far = check_block1(&mut request("a", &[0x04, 0x08], 16), &mut state);
        assert_eq!(
            too_far.map(|r| r.0),
            Some(ResponseType::RequestEntityTooLarge)
        );
        for path in ["b", "c", "d"] {
            assert!(check_block1(&mut request(path, &[0x08], 16), &mut state).is_none());
        }
        let fifth = check_block1(&mut request("e", &[0x08], 16), &mut state);
        assert_eq!(fifth.map(|r| r.0), Some(ResponseType::ServiceUnavailable));
        // The last block of one frees its place.
        assert!(check_block1(&mut request("a", &[0x10], 4), &mut state).is_none());
        assert!(check_block1(&mut request("e", &[0x08], 16), &mut state).is_none());
        let reserved = check_block1(&mut request("f", &[0x0F], 16), &mut state);
        assert_eq!(reserved.map(|r| r.0), Some(ResponseType::BadRequest));
    }
}
