//! lockbridge — a gateway between Bluetooth smart locks and the Internet.
//!
//! # Architecture map
//!
//! ```text
//!  lock (BLE or sim)  ⇄  link  ⇄  driver  ⇄  ptls::Client        (gateway side)
//!                                              ⇅ frames, events, timers
//!  sim::model::Lock  ⇄  ptls::Server ×3  ⇄  sim::serve  ⇄  sim socket   (lock side)
//! ```
//!
//! - [`ptls`] — the lock protocol (`ptls-spec.md`), **sans-IO**: frame codec, handshake
//!   messages, key schedule, AES-128-GCM records, flights, timers; [`ptls::Client`] and
//!   [`ptls::Server`] take `now` and an RNG as inputs and never do I/O. [`ptls::pair`] joins
//!   two endpoints through a seeded faulty link on a virtual clock for tests and benchmarks.
//! - [`fault`] — the seeded link fault model (loss, duplication, reordering, delay, cut after
//!   frame N) shared by the pair harness and the simulator's socket server.
//! - [`sim`] — the lock simulator: [`sim::model::Lock`] (bolt, motor, jams, battery, pull
//!   spring, trusted time, registration, connection limit, idle disconnect, event log) behind
//!   one `ptls::Server` per connection; [`sim::serve`] serves a world over the sim socket
//!   ([`sim::wire`], design §4.1); [`sim::init`] writes a ready world.
//! - [`link`] — byte pipes to a lock, no protocol logic: the [`link::Link`] trait and the sim
//!   socket client [`link::sim::SimLink`].
//! - [`driver`] — runs one `ptls::Client` over one `Link` on the real (tokio) clock.
//! - [`keys`] — P-256 key files (PEM, 0600 enforced) and base64 public points.
//! - [`authority`] — issues access certificates (spec §8) and signed time (spec §7).
//! - [`demo`] — `lockbridge demo`: a world, the simulator and a client, step by step.
//! - [`telemetry`] — logging through the `log` facade.

pub mod authority;
pub mod command;
pub mod config;
pub mod control;
pub mod credentials;
pub mod daemon;
pub mod demo;
pub mod driver;
pub mod fault;
pub mod idstore;
pub mod keys;
pub mod ledger;
pub mod link;
pub mod ptls;
pub mod registry;
pub mod session;
pub mod sim;
pub mod slots;
pub mod supervisor;
pub mod systemd;
pub mod telemetry;
