//! graftd as a library: the binary (`main.rs`), the integration tests and the benchmark
//! harness all start the same server through [`server::start`].
//! Dependency direction: `grpc -> engine/train -> adapters -> model`; `grpc/train -> tenancy
//! -> store`; `store` is used by `adapters`, `train` and `tenancy`; `model` knows nothing of tonic.

pub mod adapters;
pub mod api;
pub mod blobs;
pub mod config;
pub mod engine;
pub mod grpc;
pub mod http;
pub mod metrics;
pub mod model;
pub mod names;
pub mod process;
pub mod server;
pub mod store;
pub mod tenancy;
pub mod train;
