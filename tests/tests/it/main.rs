//! One integration binary: the real server on 127.0.0.1:0, the real client.

mod adapters;
mod bad_input;
mod blob_store;
mod classification;
mod cli;
mod deploy;
mod eval_graders;
mod full_finetune;
mod generation;
mod hostile;
mod isolation;
mod kv;
mod lm_head_job;
mod openai;
mod openai_compat;
mod openai_training;
mod ops;
mod postgres;
mod preference;
mod prompt_methods;
mod replicas;
mod structured;
mod tenancy;
mod tls;
mod training;
mod weight_methods;
