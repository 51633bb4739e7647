//! `graft-client`: a typed async client for graftd.
//! Wraps the generated tonic clients; callers build requests with [`GenerateOptions`] and
//! get domain-friendly results back. Transport errors and server statuses stay `tonic::Status`
//! so callers can match on the code.

use graft_proto::v1::{
    self as pb, generation_client::GenerationClient, ChatMessage, GenerateRequest,
    SamplingParameters,
};
use tonic::{transport::Channel, Status, Streaming};

pub use graft_proto::v1 as proto;

/// Connection to one graftd.
#[derive(Clone)]
pub struct GraftClient {
    generation: GenerationClient<Channel>,
}

/// Sampling options for a request; `None` leaves the server's default.
#[derive(Debug, Clone, Default)]
pub struct GenerateOptions {
    pub max_new_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i32>,
    pub repetition_penalty: Option<f32>,
    pub stop: Vec<String>,
    pub seed: Option<u64>,
    pub logprobs: bool,
    pub adapter: Option<String>,
}

impl GenerateOptions {
    /// Greedy decoding of at most `max_new_tokens`.
    pub fn greedy(max_new_tokens: u32) -> Self {
        Self {
            max_new_tokens: Some(max_new_tokens),
            temperature: Some(0.0),
            ..Default::default()
        }
    }

    fn parameters(&self) -> SamplingParameters {
        SamplingParameters {
            max_new_tokens: self.max_new_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            repetition_penalty: self.repetition_penalty,
            stop: self.stop.clone(),
            seed: self.seed,
            logprobs: self.logprobs,
        }
    }

    /// A request for a raw prompt.
    pub fn prompt(&self, prompt: impl Into<String>) -> GenerateRequest {
        GenerateRequest {
            prompt: prompt.into(),
            adapter: self.adapter.clone().unwrap_or_default(),
            parameters: Some(self.parameters()),
            ..Default::default()
        }
    }

    /// A request for chat messages `(role, content)`.
    pub fn chat<R: Into<String>, C: Into<String>>(
        &self,
        messages: impl IntoIterator<Item = (R, C)>,
    ) -> GenerateRequest {
        GenerateRequest {
            messages: messages
                .into_iter()
                .map(|(role, content)| ChatMessage {
                    role: role.into(),
                    content: content.into(),
                })
                .collect(),
            adapter: self.adapter.clone().unwrap_or_default(),
            parameters: Some(self.parameters()),
            ..Default::default()
        }
    }
}

/// Errors of connecting.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("invalid address {0:?}: {1}")]
    Address(String, String),
    #[error("cannot connect to {0}: {1}")]
    Transport(String, tonic::transport::Error),
}

impl GraftClient {
    /// Connects to `addr` (`http://host:port`; a bare `host:port` gets `http://`).
    pub async fn connect(addr: &str) -> Result<Self, ConnectError> {
        let uri = if addr.contains("://") {
            addr.to_string()
        } else {
            format!("http://{addr}")
        };
        let endpoint = Channel::from_shared(uri.clone())
            .map_err(|e| ConnectError::Address(addr.into(), e.to_string()))?;
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| ConnectError::Transport(uri, e))?;
        Ok(Self::from_channel(channel))
    }

    pub fn from_channel(channel: Channel) -> Self {
        Self {
            generation: GenerationClient::new(channel),
        }
    }

    /// The raw generated client, for calls this wrapper does not cover.
    pub fn generation(&self) -> GenerationClient<Channel> {
        self.generation.clone()
    }

    pub async fn generate(&self, req: GenerateRequest) -> Result<pb::GenerateResponse, Status> {
        Ok(self.generation.clone().generate(req).await?.into_inner())
    }

    pub async fn generate_stream(
        &self,
        req: GenerateRequest,
    ) -> Result<Streaming<pb::GenerateStreamResponse>, Status> {
        Ok(self
            .generation
            .clone()
            .generate_stream(req)
            .await?
            .into_inner())
    }
}
