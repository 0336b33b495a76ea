//! lockbridge — a gateway between Bluetooth smart locks and the Internet.
pub mod authority;
pub mod demo;
pub mod driver;
pub mod fault;
pub mod keys;
pub mod link;
pub mod ptls;
pub mod sim;
pub mod telemetry;
