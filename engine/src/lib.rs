//! # Sluice engine
//!
//! A dynamic-batching inference engine for Llama-family models on candle, with a paged KV cache.
//!
//! # Layout
//! - `error`: the crate's one error enum.
//! - `sequence`: `Sequence`, the scheduler's state for one request.
//! - `kv_cache`: `BlockManager` and `BlockTable`, the paged KV cache's bookkeeping.
//! - `scheduler`: `Scheduler::schedule(now) -> Batch`, a pure state machine (queue, batching, preemption).
//! - `sampling`: `SamplingParams` and the per-sequence `Sampler` (penalties, top-k/p, min-p, logprobs).
//! - `tokenizer`: the tokenizer built from GGUF metadata or `tokenizer.json`, and incremental detokenization.
//! - `chat_template`: the model's own Jinja chat template rendered with minijinja.
//! - `stop`: stop-string matching with hold-back of text that may still become a stop string.
//! - `breaker`: `CircuitBreaker`, a pure state machine around model execution (open, half-open, closed).
//! - `metrics`: the engine's metric names (vLLM's, `sluice_` prefix) and their recording.

pub mod breaker;
pub mod chat_template;
pub mod config;
mod engine;
pub mod error;
pub mod kv_cache;
pub mod metrics;
pub mod model;
pub mod request;
pub mod sampling;
pub mod scheduler;
pub mod sequence;
pub mod stats;
pub mod stop;
pub mod stream;
pub mod structured;
pub mod tokenizer;
mod worker;

pub use breaker::{BreakerConfig, BreakerState};
pub use candle_core::DType;
pub use chat_template::ChatMessage;
pub use config::{DeviceSpec, EngineConfig};
pub use engine::{Engine, ModelInfo};
pub use error::{EngineError, Result};
pub use model::{CpuActivations, CpuWeights, DeviceSampling, GpuWeights, GraphCounts, WeightFormat};
pub use request::{Prompt, Request};
pub use sampling::{SamplingParams, TokenLogprob};
pub use scheduler::SchedulerConfig;
pub use sequence::RequestId;
pub use stats::{EngineStats, StepTimes};
pub use stream::{Completion, Finish, FinishReason, StreamEvent, Timings, TokenEvent, TokenStream, Usage};
pub use structured::ResponseFormat;
pub use tokenizer::Tokenizer;
