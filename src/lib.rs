//! lockbridge — a gateway between Bluetooth smart locks and the Internet.
pub mod ptls;
pub mod fault;
