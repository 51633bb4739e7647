//! Training on request: datasets (`dataset`; labelled rows in `classes`, preference rows in
//! `preference`, trained by the pair objectives of `pairs`), the methods a job can train (`methods`) and
//! their trainable parameters behind one [`trainable::Trainable`] (`lora_vars`,
//! `prompt_vars`), the optimizer (`optim`), what a run is asked (`spec`), the SFT loop with
//! checkpoints (`trainer`), and
//! the job runner that owns job state, persists events and registers results (`jobs`).
//! Boundary: the trainer knows the model and files; the runner knows the database, the
//! registry and the engine; only the fronts (`grpc/`, `http/`) know wire
//! forms.

pub mod classes;
pub mod dataset;
pub mod full_vars;
pub mod graders;
pub mod head_vars;
pub mod jobs;
pub mod lora_vars;
pub mod methods;
pub mod optim;
pub mod pairs;
pub mod ppo;
pub mod preference;
pub mod prompt_vars;
pub mod rl;
pub mod rl_job;
pub mod rollouts;
pub mod sequences;
pub mod spec;
mod strict_json;
pub mod trainable;
pub mod trainer;
pub mod upload;
pub mod weight_vars;
