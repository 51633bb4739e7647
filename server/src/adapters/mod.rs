//! Adapters: their file formats (`formats`: PEFT LoRA and prompt learning, each a reader and
//! a writer), and the registry that stores versions, keeps hot ones in memory under a
//! budget and hands out leases (`registry`), and the live versions of each name cached from
//! the database (`versions`); what ExportAdapter writes (`export`: a version's own files, or
//! a fully fine-tuned model as GGUF).
//! Boundary: the math of applying an adapter lives in `model::adapter`; this module owns
//! formats, names, versions, files and residency.

pub mod export;
pub mod formats;
pub mod registry;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod versions;

pub use export::ExportFormat;
/// The PEFT file formats by their old name.
pub use formats as peft;
pub use registry::{
    AdapterLease, AdapterRef, AdapterRegistry, RegistryConfig, RegistryError, Resolved,
};
