//! The engine's one error type.

/// Everything that can go wrong inside the engine. Messages that concern a request name the field
/// in backticks (``"`top_p` must be in (0, 1]"``) so that a server can return them to the client.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The model files could not be read or are not a supported Llama-family model.
    #[error("cannot load model: {0}")]
    Load(String),
    /// The tokenizer could not be built or failed to encode/decode.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The chat template could not be compiled or rendered.
    #[error("chat template: {0}")]
    ChatTemplate(String),
    /// The request is malformed or out of range; the message names the field.
    #[error("{0}")]
    InvalidRequest(String),
    /// The waiting queue is at its bound; the caller should retry later (back-pressure).
    #[error("the waiting queue is full ({0} requests); retry later")]
    QueueFull(usize),
    /// The circuit breaker is open after repeated model step failures; retry after the remaining
    /// cool-down.
    #[error("model execution is failing and the circuit breaker is open; retry in {:.1} s", .0.as_secs_f64())]
    BreakerOpen(std::time::Duration),
    /// The engine thread is gone (shut down or crashed).
    #[error("the engine has stopped")]
    EngineStopped,
    /// A model step failed (tensor error, out of memory...).
    #[error("model execution failed: {0}")]
    Model(String),
    /// An error from candle that was not mapped to anything more specific.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// An I/O error while reading model files.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// The engine's result type.
pub type Result<T> = std::result::Result<T, EngineError>;
