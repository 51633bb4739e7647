//! Adapters: their PEFT file format (`peft`), and the registry that stores versions, keeps
//! hot ones in memory under a budget and hands out leases (`registry`).
//! Boundary: the math of applying an adapter lives in `model::lora`; this module owns
//! formats, names, versions, files and residency.

pub mod peft;
pub mod registry;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use registry::{AdapterLease, AdapterRef, AdapterRegistry, RegistryConfig, RegistryError};
