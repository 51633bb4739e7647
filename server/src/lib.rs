//! graftd as a library: the binary (`main.rs`), the integration tests and the benchmark
//! harness all start the same server through [`server::start`].
//! Dependency direction: `grpc -> engine -> adapters -> model`; `store` is used by `adapters`; `model` knows nothing of tonic.

pub mod adapters;
pub mod config;
pub mod engine;
pub mod grpc;
pub mod metrics;
pub mod model;
pub mod server;
pub mod store;
pub mod tenancy;
pub mod train;
