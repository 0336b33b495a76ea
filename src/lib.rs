//! lockbridge — a gateway between Bluetooth smart locks and the Internet.
//!
//! # Architecture map
//!
//! ```text
//!  control socket (cli) ──┐
//!  CoAP/DTLS (cloud) ─────┼► supervisor ─► session::shell ⇄ session::core (one per lock) · ptls::Client ─► link (BlueZ | sim) ─► lock
//!  MQTT bridge (mqtt) ────┘  │ registry (state, events) ─► CoAP Observe, MQTT state
//!                            │ ledger + idstore · slots
//!  sim::model::Lock ⇄ ptls::Server (one per connection) ⇄ sim::serve ⇄ sim socket
//! ```
//!
//! - [`ptls`] — the lock protocol (`ptls-spec.md`), **sans-IO**: frame codec, handshake
//!   messages, key schedule, AES-128-GCM records, flights, timers; [`ptls::Client`] and
//!   [`ptls::Server`] take `now` and an RNG as inputs and never do I/O. [`ptls::pair`] joins
//!   two endpoints through a seeded faulty link on a virtual clock for tests and benchmarks.
//! - [`fault`] — the seeded link fault model (loss, duplication, reordering, delay, BLE
//!   connection events and what opening a link costs, cut after frame N) shared by the pair
//!   harness and the simulator.
//! - [`sim`] — the lock simulator: [`sim::model::Lock`] behind one `ptls::Server` per
//!   connection; [`sim::serve`] serves a world over the sim socket ([`sim::wire`]), with
//!   [`sim::chaos`]'s seeded faults on single locks (loss bursts, disconnects, reboots, lost
//!   clocks), and [`sim::ble`] as BLE peripherals through BlueZ.
//! - [`link`] — byte pipes to a lock: the [`link::Link`] trait, [`link::sim::SimLink`] and
//!   [`link::ble::BleLink`] (BlueZ through `bluer`, opened by [`link::ble::BleConnector`],
//!   which also scans for Tedee locks for `lockbridge scan`); each connector remembers what a
//!   first connection found (the lock's characteristics, and over BlueZ its address).
//! - [`session`] — one per lock: [`session::core`] decides, **sans-IO** like `ptls` (commands
//!   with their outcome rules, slots, handshake and trusted time, state from notifications,
//!   link policies, reconnect backoff; one timer table); [`session::shell`] is its one async
//!   loop, carrying out what the core asks on the link, the `ptls::Client`, the ledger and the
//!   registry.
//! - [`supervisor`] — owns the sessions; permissions, ids, deadlines, routing, bounded queues,
//!   graceful shutdown. [`registry`] is the lock state front ends read and the event stream;
//!   [`ledger`] scopes ids to their origin, de-duplicates them and delivers steps;
//!   [`idstore`] makes ids durable and survives damage;
//!   [`slots`] schedules connection slots; [`command`] is the command/outcome model.
//! - [`policy`] — who may do what (origins, lock globs, actions, address ranges, weekly
//!   windows), the one answer every front end asks, with the time as an argument.
//! - [`config`] — the daemon's TOML + environment configuration; [`credentials`] — the
//!   certificate and signed-time providers; [`keys`] — key files and the one reader of every
//!   secret file; [`authority`] — issuing.
//! - [`tedee`] — Tedee's cloud, the `tedee` credentials provider: [`tedee::provider`] (what
//!   sessions read without waiting, and the one task that calls the cloud), [`tedee::api`] (one
//!   checked call at a time, every answer bounded), [`tedee::policy`] (the hourly budget, 429
//!   pauses, backoff, a refused key; sans-IO), [`tedee::store`] (the registration and per-lock
//!   state, written atomically) and [`tedee::cli`] (`lockbridge tedee
//!   check|locks|register|unregister`; `tedee fetch` goes through the control socket to the
//!   running provider).
//! - [`backoff`] — the one doubling, jittered retry delay (MQTT reconnects, Tedee calls);
//!   [`clock`] — the only reads of the monotonic and wall clocks outside the simulator.
//! - [`cloud`] — CoAP over DTLS 1.2: [`cloud::dtls`] (own UDP demultiplexer around webrtc-dtls:
//!   a task and deadline per handshake, caps per endpoint, address and identity, final-flight
//!   resend, a second handshake beside a live session, records screened before webrtc-dtls sees
//!   them; [`cloud::dtls::record`] reads records, [`cloud::dtls::verify`] checks the client's
//!   Finished and record tags), [`cloud::certs`] (the gateway's certificate, client
//!   certificates by CA or pinned key) and [`cloud::coap`] (messages triaged by RFC 7252, the
//!   resources, with the client's identity as the command origin; bounded per-peer state).
//! - [`mqtt`] — the MQTT bridge on rumqttc: state, availability, events and metrics out,
//!   commands in with results on `<root>/locks/<lock>/result`, Home Assistant discovery;
//!   [`mqtt::client`] hides the protocol version and reconnects with backoff.
//! - [`ctl`] — `lockbridge ctl`, the CoAP-over-DTLS client.
//! - [`daemon`] — `lockbridge run`: one cancellation token and one task set for everything it
//!   starts; [`control`] — the local control socket; [`tasks`] —
//!   front-end tasks restarted when they panic; [`systemd`] — sd_notify and the watchdog;
//!   [`telemetry`] — logging; [`demo`] — `lockbridge demo`.

// No event kind may be dropped by a silent `_`: every match on our enums names what it ignores.
#![cfg_attr(not(test), warn(clippy::wildcard_enum_match_arm))]

pub mod authority;
pub mod backoff;
pub mod clock;
pub mod cloud;
pub mod command;
pub mod config;
pub mod control;
pub mod credentials;
pub mod ctl;
pub mod daemon;
pub mod demo;
pub mod fault;
pub mod idstore;
pub mod keys;
pub mod ledger;
pub mod link;
pub mod mqtt;
pub mod policy;
pub mod ptls;
pub mod registry;
pub mod session;
pub mod sim;
pub mod slots;
pub mod supervisor;
pub mod systemd;
pub mod tasks;
pub mod tedee;
pub mod telemetry;
