//! Training on request: datasets (`dataset`), trainable LoRA parameters (`lora_vars`), the
//! optimizer (`optim`), the SFT loop with checkpoints (`trainer`), and the job runner that
//! owns job state, persists events and registers results (`jobs`).
//! Boundary: the trainer knows the model and files; the runner knows the database, the
//! registry and the engine; only `grpc/training.rs` knows the proto.

pub mod dataset;
pub mod jobs;
pub mod lora_vars;
pub mod optim;
mod strict_json;
pub mod trainer;
pub mod upload;
