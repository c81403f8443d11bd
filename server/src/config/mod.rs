//! One typed configuration, [`ServerConfig`], from flags, `SLUICE_*` environment variables and an
//! optional TOML file (`--config`), in that order of precedence, then defaults; validated at
//! start-up with messages that name the setting.
//!
//! [`Settings`] is the raw form, every field optional: clap fills it from flags and environment,
//! serde from the file (same names, snake_case; unknown keys are an error, to catch typos).

mod units;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use sluice_engine::{BreakerConfig, DType, DeviceSpec, EngineConfig, SchedulerConfig};

pub use units::{ByteSize, HumanDuration};

use crate::auth::ApiKey;
use crate::filter::input::InjectionMode;
use crate::filter::output::Redaction;
use crate::logging::LogFormat;
use crate::rate_limit::RateLimitConfig;

/// A setting that is missing, unreadable or out of range; the message names it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// Raw settings as given; see [`ServerConfig`] for the resolved, validated form.
#[derive(Debug, Clone, Default, clap::Args, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// TOML file with any of these settings (snake_case keys); flags and environment override it.
    #[arg(long, env = "SLUICE_CONFIG", value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Model to serve: a .gguf file or a Hugging Face folder [default: models/SmolLM2-135M-Instruct.Q4_1.gguf].
    #[arg(long, env = "SLUICE_MODEL", value_name = "PATH")]
    pub model: Option<PathBuf>,
    /// Name clients use in `model` [default: the model file's stem].
    #[arg(long, env = "SLUICE_SERVED_MODEL_NAME", value_name = "NAME")]
    pub served_model_name: Option<String>,
    /// Address to listen on [default: 127.0.0.1].
    #[arg(long, env = "SLUICE_HOST")]
    pub host: Option<String>,
    /// Port to listen on; 0 picks a free one [default: 8080].
    #[arg(long, env = "SLUICE_PORT")]
    pub port: Option<u16>,
    /// Device: cpu, cuda or cuda:N [default: cpu].
    #[arg(long, env = "SLUICE_DEVICE")]
    pub device: Option<String>,
    /// Weight and activation dtype: f32, f16 or bf16 [default: f32].
    #[arg(long, env = "SLUICE_DTYPE")]
    pub dtype: Option<String>,
    /// CPU weight storage: native (a GGUF's Q4_1/Q8_0 kept exactly), f32, bf16, int8 or int4 [default: native].
    #[arg(long, env = "SLUICE_CPU_WEIGHTS")]
    pub cpu_weights: Option<String>,
    /// How CPU activations meet int8/int4 weights: auto (int8 with AVX-512 VNNI), f32 (exact) or
    /// int8 (integer dot products, within int8 rounding of exact) [default: auto].
    #[arg(long, env = "SLUICE_CPU_ACTIVATIONS")]
    pub cpu_activations: Option<String>,
    /// KV cache element type: auto (the dtype), f32, f16 or bf16 (f16/bf16 under f32 activations on
    /// the CPU only) [default: auto].
    #[arg(long, env = "SLUICE_KV_CACHE_DTYPE")]
    pub kv_cache_dtype: Option<String>,
    /// On CUDA, GGUF weights: quantized (kept as stored, on candle's quantized kernels, for
    /// Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/Q2_K-Q6_K) or dense (dequantized to the dtype) [default: quantized].
    #[arg(long, env = "SLUICE_GPU_WEIGHTS")]
    pub gpu_weights: Option<String>,
    /// On CUDA without --kv-cache-memory: the share of the GPU's memory to fill with weights, KV
    /// cache and activations, in (0, 1] [default: 0.9].
    #[arg(long, env = "SLUICE_GPU_MEMORY_UTILIZATION", value_name = "FRACTION")]
    pub gpu_memory_utilization: Option<f32>,
    /// On CUDA: capture decode steps as CUDA graphs (one per padded batch size, replayed with one
    /// launch); a failed capture is logged and steps run eagerly [default: true].
    #[arg(long, env = "SLUICE_CUDA_GRAPHS", value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub cuda_graphs: Option<bool>,
    /// On CUDA: dense projections of up to eight rows (small decode batches) on Sluice's GEMV
    /// kernel, checked against a reference at start-up, with each RMS norm folded into the
    /// projection after it; `false` runs every projection on cuBLAS [default: true].
    #[arg(long, env = "SLUICE_GEMV", value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub gemv: Option<bool>,
    /// Where sampled rows are read: auto (off the CPU from the device: greedy argmaxes, and for
    /// sampled requests the 128 most likely tokens, the whole row only when needed; on the CPU whole
    /// rows), device (from the device on the CPU too, for tests) or host (every row copied whole and
    /// sampled by the CPU's sampler) [default: auto].
    #[arg(long, env = "SLUICE_DEVICE_SAMPLING")]
    pub device_sampling: Option<String>,
    /// Start a batch when this many requests wait [default: 32].
    #[arg(long, env = "SLUICE_MAX_BATCH_SIZE", value_name = "N")]
    pub max_batch_size: Option<usize>,
    /// ...or when the oldest has waited this long [default: 5ms].
    #[arg(long, env = "SLUICE_BATCH_TIMEOUT", value_name = "DURATION")]
    pub batch_timeout: Option<HumanDuration>,
    /// Token budget of one engine step (decodes + prompt chunks) [default: 512].
    #[arg(long, env = "SLUICE_MAX_BATCH_TOKENS", value_name = "N")]
    pub max_batch_tokens: Option<usize>,
    /// Sequences running at once [default: 128].
    #[arg(long, env = "SLUICE_MAX_NUM_SEQS", value_name = "N")]
    pub max_num_seqs: Option<usize>,
    /// Bound of the waiting queue; past it requests get 503 [default: 1024].
    #[arg(long, env = "SLUICE_MAX_WAITING", value_name = "N")]
    pub max_waiting: Option<usize>,
    /// Memory for the KV cache, e.g. 512MiB or 2GiB [default: 1GiB on the CPU; on CUDA what
    /// --gpu-memory-utilization leaves].
    #[arg(long, env = "SLUICE_KV_CACHE_MEMORY", value_name = "SIZE")]
    pub kv_cache_memory: Option<ByteSize>,
    /// Reuse the KV cache of whole blocks a new request's prompt starts with (a shared system
    /// prompt, earlier turns of a conversation, a repeated request); `false` computes every
    /// prompt in full [default: true].
    #[arg(long, env = "SLUICE_PREFIX_CACHING", value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub prefix_caching: Option<bool>,
    /// Tokens per KV cache block [default: 16].
    #[arg(long, env = "SLUICE_BLOCK_SIZE", value_name = "N")]
    pub block_size: Option<usize>,
    /// Longest prompt + output in tokens [default: the model's context].
    #[arg(long, env = "SLUICE_MAX_MODEL_LEN", value_name = "N")]
    pub max_model_len: Option<usize>,
    /// Seed for requests that carry none [default: 0].
    #[arg(long, env = "SLUICE_SEED")]
    pub seed: Option<u64>,
    /// Consecutive failed model steps that open the circuit breaker (503 until it recovers) [default: 3].
    #[arg(long, env = "SLUICE_BREAKER_THRESHOLD", value_name = "N")]
    pub breaker_threshold: Option<u32>,
    /// How long the open breaker refuses requests before a probe step may run [default: 10s].
    #[arg(long, env = "SLUICE_BREAKER_COOLDOWN", value_name = "DURATION")]
    pub breaker_cooldown: Option<HumanDuration>,
    /// Longest prompt accepted, in tokens (never past the context) [default: 8000].
    #[arg(long, env = "SLUICE_MAX_PROMPT_TOKENS", value_name = "N")]
    pub max_prompt_tokens: Option<usize>,
    /// Largest request body; past it requests get 413 [default: 4MiB].
    #[arg(long, env = "SLUICE_BODY_LIMIT", value_name = "SIZE")]
    pub body_limit: Option<ByteSize>,
    /// A request still running after this long ends with an error [default: 300s].
    #[arg(long, env = "SLUICE_REQUEST_TIMEOUT", value_name = "DURATION")]
    pub request_timeout: Option<HumanDuration>,
    /// On SIGTERM/SIGINT, in-flight requests get this long to finish [default: 30s].
    #[arg(long, env = "SLUICE_SHUTDOWN_GRACE", value_name = "DURATION")]
    pub shutdown_grace: Option<HumanDuration>,
    /// Idle time before a keep-alive comment on an event stream [default: 10s].
    #[arg(long, env = "SLUICE_SSE_KEEP_ALIVE", value_name = "DURATION")]
    pub sse_keep_alive: Option<HumanDuration>,
    /// Comma-separated API keys; with none (and no key file) the API is open.
    #[arg(long, env = "SLUICE_API_KEYS", value_name = "KEYS", value_delimiter = ',', hide_env_values = true)]
    pub api_keys: Option<Vec<String>>,
    /// File of API keys, one per line: `KEY [NAME] [priority=N] [rpm=N] [tpm=N]` (`#` starts a comment); added to --api-keys.
    #[arg(long, env = "SLUICE_API_KEY_FILE", value_name = "FILE")]
    pub api_key_file: Option<PathBuf>,
    /// Bearer key that `/metrics` requires (separate from the API keys) [default: none, `/metrics` is open].
    #[arg(long, env = "SLUICE_METRICS_KEY", value_name = "KEY", hide_env_values = true)]
    pub metrics_key: Option<String>,
    /// Requests per minute per API key (unless its line sets `rpm=`) or, without a key, per client address; 0: unlimited [default: 0].
    #[arg(long, env = "SLUICE_RATE_LIMIT_RPM", value_name = "N")]
    pub rate_limit_rpm: Option<u32>,
    /// Tokens per minute (prompt + `max_tokens` (256 without one) up front, unused part refunded, any excess charged as generated), per key or client address; 0: unlimited [default: 0].
    #[arg(long, env = "SLUICE_RATE_LIMIT_TPM", value_name = "N")]
    pub rate_limit_tpm: Option<u64>,
    /// Behind a trusted proxy: take the client address for rate limits from `X-Forwarded-For` [default: false].
    #[arg(long, env = "SLUICE_TRUSTED_PROXY", value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub trusted_proxy: Option<bool>,
    /// How long a deterministic answer stays in the response cache [default: 1h].
    #[arg(long, env = "SLUICE_RESPONSE_CACHE_TTL", value_name = "DURATION")]
    pub response_cache_ttl: Option<HumanDuration>,
    /// Bytes of answers the response cache holds (LRU); 0 turns it off [default: 256MiB].
    #[arg(long, env = "SLUICE_RESPONSE_CACHE_SIZE", value_name = "SIZE")]
    pub response_cache_size: Option<ByteSize>,
    /// How long an `Idempotency-Key` is remembered; 0 ignores the header [default: 1h].
    #[arg(long, env = "SLUICE_IDEMPOTENCY_TTL", value_name = "DURATION")]
    pub idempotency_ttl: Option<HumanDuration>,
    /// Bytes of responses kept for `Idempotency-Key` replays (LRU; a longer response is not kept,
    /// and a retry of it runs again); 0 ignores the header [default: 64MiB].
    #[arg(long, env = "SLUICE_IDEMPOTENCY_STORE_SIZE", value_name = "SIZE")]
    pub idempotency_store_size: Option<ByteSize>,
    /// Instruction-override patterns in user messages: off, flag (count and log) or block (400) [default: flag].
    #[arg(long, env = "SLUICE_INJECTION_MODE", value_enum)]
    pub injection_mode: Option<InjectionMode>,
    /// Redact generated text: off, on, or a list of api_key, card, email [default: off].
    #[arg(long, env = "SLUICE_REDACT", value_name = "KINDS")]
    pub redact: Option<Redaction>,
    /// Log format: text (for a terminal) or json (one object per line) [default: text].
    #[arg(long, env = "SLUICE_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// Log filter, in `tracing` EnvFilter syntax (e.g. info or sluice_server=debug) [default: info].
    #[arg(long, env = "SLUICE_LOG", value_name = "FILTER")]
    pub log_level: Option<String>,
}

/// What the HTTP layer needs: everything but the engine's and the listener's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiConfig {
    /// The model's name in requests and in `/v1/models`.
    pub served_model_name: String,
    /// Accepted bearer keys and their settings; empty means the API is open.
    pub api_keys: Vec<ApiKey>,
    /// The key `/metrics` requires; `None`: open.
    pub metrics_key: Option<ApiKey>,
    /// Default requests and tokens per minute, and whether to believe `X-Forwarded-For`.
    pub rate_limit: RateLimitConfig,
    /// Longest prompt in tokens (also capped by the model's context).
    pub max_prompt_tokens: usize,
    /// Bytes of answers the response cache holds; 0: off.
    pub response_cache_size: usize,
    /// How long a cached answer lives.
    pub response_cache_ttl: Duration,
    /// How long an idempotency key is remembered; zero: keys are ignored.
    pub idempotency_ttl: Duration,
    /// Bytes of responses kept for idempotency replays; zero: keys are ignored.
    pub idempotency_store_size: usize,
    /// What instruction-override patterns in user messages do.
    pub injection_mode: InjectionMode,
    /// What generated text is redacted of.
    pub redact: Redaction,
    /// Largest request body in bytes.
    pub body_limit: usize,
    /// Longest a request may run, streaming included.
    pub request_timeout: Duration,
    /// Idle time before a keep-alive comment on an event stream.
    pub sse_keep_alive: Duration,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            served_model_name: "model".into(),
            api_keys: Vec::new(),
            metrics_key: None,
            rate_limit: RateLimitConfig::default(),
            max_prompt_tokens: 8000,
            response_cache_size: 256 << 20,
            response_cache_ttl: Duration::from_secs(3600),
            idempotency_ttl: Duration::from_secs(3600),
            idempotency_store_size: 64 << 20,
            injection_mode: InjectionMode::Flag,
            redact: Redaction::default(),
            body_limit: 4 << 20,
            request_timeout: Duration::from_secs(300),
            sse_keep_alive: Duration::from_secs(10),
        }
    }
}

/// The resolved, validated configuration of `sluice serve`.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Host to bind.
    pub host: String,
    /// Port to bind (0: any free port).
    pub port: u16,
    /// The engine's configuration.
    pub engine: EngineConfig,
    /// The HTTP layer's configuration.
    pub api: ApiConfig,
    /// How long in-flight requests get on shutdown.
    pub shutdown_grace: Duration,
    /// Log format.
    pub log_format: LogFormat,
    /// Log filter directive.
    pub log_level: String,
}

impl Settings {
    /// `self`, with every unset field taken from `file`.
    fn or(self, file: Settings) -> Settings {
        Settings {
            config: self.config,
            model: self.model.or(file.model),
            served_model_name: self.served_model_name.or(file.served_model_name),
            host: self.host.or(file.host),
            port: self.port.or(file.port),
            device: self.device.or(file.device),
            dtype: self.dtype.or(file.dtype),
            cpu_weights: self.cpu_weights.or(file.cpu_weights),
            cpu_activations: self.cpu_activations.or(file.cpu_activations),
            kv_cache_dtype: self.kv_cache_dtype.or(file.kv_cache_dtype),
            gpu_weights: self.gpu_weights.or(file.gpu_weights),
            gpu_memory_utilization: self.gpu_memory_utilization.or(file.gpu_memory_utilization),
            cuda_graphs: self.cuda_graphs.or(file.cuda_graphs),
            gemv: self.gemv.or(file.gemv),
            device_sampling: self.device_sampling.or(file.device_sampling),
            max_batch_size: self.max_batch_size.or(file.max_batch_size),
            batch_timeout: self.batch_timeout.or(file.batch_timeout),
            max_batch_tokens: self.max_batch_tokens.or(file.max_batch_tokens),
            max_num_seqs: self.max_num_seqs.or(file.max_num_seqs),
            max_waiting: self.max_waiting.or(file.max_waiting),
            kv_cache_memory: self.kv_cache_memory.or(file.kv_cache_memory),
            prefix_caching: self.prefix_caching.or(file.prefix_caching),
            block_size: self.block_size.or(file.block_size),
            max_model_len: self.max_model_len.or(file.max_model_len),
            seed: self.seed.or(file.seed),
            breaker_threshold: self.breaker_threshold.or(file.breaker_threshold),
            breaker_cooldown: self.breaker_cooldown.or(file.breaker_cooldown),
            max_prompt_tokens: self.max_prompt_tokens.or(file.max_prompt_tokens),
            body_limit: self.body_limit.or(file.body_limit),
            request_timeout: self.request_timeout.or(file.request_timeout),
            shutdown_grace: self.shutdown_grace.or(file.shutdown_grace),
            sse_keep_alive: self.sse_keep_alive.or(file.sse_keep_alive),
            api_keys: self.api_keys.or(file.api_keys),
            api_key_file: self.api_key_file.or(file.api_key_file),
            metrics_key: self.metrics_key.or(file.metrics_key),
            rate_limit_rpm: self.rate_limit_rpm.or(file.rate_limit_rpm),
            rate_limit_tpm: self.rate_limit_tpm.or(file.rate_limit_tpm),
            trusted_proxy: self.trusted_proxy.or(file.trusted_proxy),
            response_cache_ttl: self.response_cache_ttl.or(file.response_cache_ttl),
            response_cache_size: self.response_cache_size.or(file.response_cache_size),
            idempotency_ttl: self.idempotency_ttl.or(file.idempotency_ttl),
            idempotency_store_size: self.idempotency_store_size.or(file.idempotency_store_size),
            injection_mode: self.injection_mode.or(file.injection_mode),
            redact: self.redact.or(file.redact),
            log_format: self.log_format.or(file.log_format),
            log_level: self.log_level.or(file.log_level),
        }
    }
}

impl ServerConfig {
    /// Merges `settings` (flags and environment) over the file it names, applies the defaults
    /// and validates every value.
    pub fn load(settings: Settings) -> Result<Self, ConfigError> {
        let settings = match &settings.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| ConfigError(format!("`config`: cannot read {}: {e}", path.display())))?;
                let file: Settings = toml::from_str(&text).map_err(|e| {
                    ConfigError(format!("`config`: {} is not a valid settings file: {e}", path.display()))
                })?;
                settings.or(file)
            }
            None => settings,
        };
        let engine = engine_config(&settings)?;
        let api = api_config(&settings, &engine.model)?;
        let log_level = settings.log_level.unwrap_or_else(|| "info".into());
        tracing_subscriber::EnvFilter::try_new(&log_level)
            .map_err(|e| ConfigError(format!("`log_level`: `{log_level}` is not a valid filter: {e}")))?;
        let host = settings.host.unwrap_or_else(|| "127.0.0.1".into());
        if host.trim().is_empty() {
            return Err(ConfigError("`host` must not be empty".into()));
        }
        Ok(Self {
            host,
            port: settings.port.unwrap_or(8080),
            engine,
            api,
            shutdown_grace: settings.shutdown_grace.map_or(Duration::from_secs(30), |d| d.0),
            log_format: settings.log_format.unwrap_or_default(),
            log_level,
        })
    }
}

/// At least one, or an error naming the setting.
fn positive(name: &str, value: Option<usize>, default: usize) -> Result<usize, ConfigError> {
    match value.unwrap_or(default) {
        0 => Err(ConfigError(format!("`{name}` must be at least 1"))),
        v => Ok(v),
    }
}

fn engine_config(s: &Settings) -> Result<EngineConfig, ConfigError> {
    let model = s.model.clone().unwrap_or_else(EngineConfig::default_model_path);
    if !model.exists() {
        return Err(ConfigError(format!(
            "`model`: nothing at {} (give a .gguf file or a Hugging Face folder; `make model` fetches the default)",
            model.display()
        )));
    }
    let mut config = EngineConfig::new(model);
    let device = s.device.as_deref().unwrap_or("cpu");
    config.device = DeviceSpec::parse(device).map_err(|e| ConfigError(e.to_string()))?;
    let dtype = |name: &str, value: &str| match value {
        "f32" => Ok(DType::F32),
        "f16" => Ok(DType::F16),
        "bf16" => Ok(DType::BF16),
        other => Err(ConfigError(format!("`{name}` must be f32, f16 or bf16, got `{other}`"))),
    };
    config.dtype = dtype("dtype", s.dtype.as_deref().unwrap_or("f32"))?;
    config.kv_cache_dtype = match s.kv_cache_dtype.as_deref() {
        None | Some("auto") => None,
        Some(other) => Some(dtype("kv_cache_dtype", other)?),
    };
    if let Some(w) = &s.cpu_weights {
        config.cpu_weights = w.parse().map_err(|e| ConfigError(format!("`cpu_weights`: {e}")))?;
    }
    if let Some(a) = &s.cpu_activations {
        config.cpu_activations = a.parse().map_err(|e| ConfigError(format!("`cpu_activations`: {e}")))?;
    }
    if let Some(w) = &s.gpu_weights {
        config.gpu_weights = w.parse().map_err(|e| ConfigError(format!("`gpu_weights`: {e}")))?;
    }
    if let Some(u) = s.gpu_memory_utilization {
        config.gpu_memory_utilization = u;
    }
    // Graphs are a CUDA thing; on the CPU the engine would only pad steps (its test mode).
    config.cuda_graphs = s.cuda_graphs.unwrap_or(true) && config.device != DeviceSpec::Cpu;
    config.gemv = s.gemv.unwrap_or(true);
    if let Some(d) = &s.device_sampling {
        config.device_sampling = d.parse().map_err(|e| ConfigError(format!("`device_sampling`: {e}")))?;
    }
    let defaults = SchedulerConfig::default();
    config.scheduler = SchedulerConfig {
        max_batch_size: positive("max_batch_size", s.max_batch_size, defaults.max_batch_size)?,
        batch_timeout: s.batch_timeout.map_or(defaults.batch_timeout, |d| d.0),
        max_batch_tokens: positive("max_batch_tokens", s.max_batch_tokens, defaults.max_batch_tokens)?,
        max_num_seqs: positive("max_num_seqs", s.max_num_seqs, defaults.max_num_seqs)?,
        max_waiting: positive("max_waiting", s.max_waiting, defaults.max_waiting)?,
        prefix_caching: s.prefix_caching.unwrap_or(defaults.prefix_caching),
    };
    config.kv_cache_memory = match s.kv_cache_memory {
        Some(bytes) => Some(positive("kv_cache_memory", Some(bytes.0), 0)?),
        None => None,
    };
    config.block_size = positive("block_size", s.block_size, config.block_size)?;
    if s.max_model_len == Some(0) {
        return Err(ConfigError("`max_model_len` must be at least 1".into()));
    }
    config.max_model_len = s.max_model_len;
    config.seed = s.seed.unwrap_or(0);
    config.breaker = BreakerConfig {
        threshold: s.breaker_threshold.unwrap_or(config.breaker.threshold),
        cooldown: s.breaker_cooldown.map_or(config.breaker.cooldown, |d| d.0),
    };
    config.validate().map_err(|e| ConfigError(e.to_string()))?;
    Ok(config)
}

fn api_config(s: &Settings, model: &Path) -> Result<ApiConfig, ConfigError> {
    let defaults = ApiConfig::default();
    let stem = model.file_stem().map(|n| n.to_string_lossy().into_owned());
    let served_model_name = s.served_model_name.clone().or(stem).unwrap_or(defaults.served_model_name);
    if served_model_name.trim().is_empty() {
        return Err(ConfigError("`served_model_name` must not be empty".into()));
    }
    let mut api_keys: Vec<ApiKey> =
        s.api_keys.iter().flatten().map(|k| k.trim()).filter(|k| !k.is_empty()).map(ApiKey::new).collect();
    if let Some(path) = &s.api_key_file {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("`api_key_file`: cannot read {}: {e}", path.display())))?;
        for (i, line) in text.lines().enumerate() {
            let key = ApiKey::parse_line(line)
                .map_err(|e| ConfigError(format!("`api_key_file`: {} line {}: {e}", path.display(), i + 1)))?;
            api_keys.extend(key);
        }
    }
    let metrics_key = s.metrics_key.as_deref().map(str::trim).filter(|k| !k.is_empty()).map(|k| {
        let mut key = ApiKey::new(k);
        key.name = "metrics".into();
        key
    });
    let rate_limit = RateLimitConfig {
        rpm: s.rate_limit_rpm.unwrap_or(0),
        tpm: s.rate_limit_tpm.unwrap_or(0),
        trusted_proxy: s.trusted_proxy.unwrap_or(false),
    };
    let nonzero = |name: &str, d: Option<HumanDuration>, default: Duration| match d.map_or(default, |d| d.0) {
        d if d.is_zero() => Err(ConfigError(format!("`{name}` must be longer than 0"))),
        d => Ok(d),
    };
    Ok(ApiConfig {
        served_model_name,
        api_keys,
        metrics_key,
        rate_limit,
        max_prompt_tokens: positive("max_prompt_tokens", s.max_prompt_tokens, defaults.max_prompt_tokens)?,
        response_cache_size: s.response_cache_size.map_or(defaults.response_cache_size, |b| b.0),
        response_cache_ttl: nonzero("response_cache_ttl", s.response_cache_ttl, defaults.response_cache_ttl)?,
        idempotency_ttl: s.idempotency_ttl.map_or(defaults.idempotency_ttl, |d| d.0),
        idempotency_store_size: s.idempotency_store_size.map_or(defaults.idempotency_store_size, |b| b.0),
        injection_mode: s.injection_mode.unwrap_or(defaults.injection_mode),
        redact: s.redact.clone().unwrap_or(defaults.redact),
        body_limit: positive("body_limit", s.body_limit.map(|b| b.0), defaults.body_limit)?,
        request_timeout: nonzero("request_timeout", s.request_timeout, defaults.request_timeout)?,
        sse_keep_alive: nonzero("sse_keep_alive", s.sse_keep_alive, defaults.sse_keep_alive)?,
    })
}

#[cfg(test)]
mod tests;
