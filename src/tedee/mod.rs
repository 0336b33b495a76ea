//! The `tedee` credentials provider's parts (tedee-cloud.md Part A): [`api`] speaks Tedee's
//! cloud API, one call at a time, with every answer checked; [`policy`] decides when a call
//! may go (the hub's hourly budget, 429 pauses, backoff, a refused key), sans-IO; [`store`]
//! keeps the registration and each lock's certificate under `state_dir/tedee/`.

pub mod api;
pub mod cli;
pub mod policy;
pub mod provider;
pub mod store;
