//! `Engine`: the handle a caller holds. It loads the model, starts the engine thread, tokenizes
//! and validates requests on the caller's thread, and hands back a [`TokenStream`] per request.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam_channel::Sender;
use tokio::sync::mpsc;

use crate::breaker::BreakerState;
use crate::chat_template::ChatTemplate;
use crate::config::{EngineConfig, DEFAULT_CPU_KV_CACHE_MEMORY};
use crate::error::{EngineError, Result};
use crate::kv_cache::{activation_reserve, gpu_memory, graph_reserve, KvBudget};
use crate::model::{
    bucket_for, check_gemv, read_gguf, GpuWeights, Llama, LoadOptions, ModelFormat, ModelRunner, WeightSource,
    MAX_GRAPH_BATCH,
};
use crate::request::{Prompt, Request};
use crate::scheduler::Scheduler;
use crate::sequence::{RequestId, Sequence};
use crate::stats::EngineStats;
use crate::stream::TokenStream;
use crate::structured::{Constraint, Grammars, ResponseFormat};
use crate::tokenizer::Tokenizer;
use crate::worker::{RequestState, Worker};

/// Messages to the engine thread.
#[derive(Debug)]
pub(crate) enum Command {
    /// A new request, tokenized and validated.
    Submit(Box<Submission>),
    /// Abort a request wherever it is (sent when its `TokenStream` is dropped).
    Abort(RequestId),
    /// Finish the current step and stop; requests still in flight get an error.
    Shutdown,
}

/// A request on its way to the engine thread.
#[derive(Debug)]
pub(crate) struct Submission {
    pub seq: Sequence,
    pub state: RequestState,
}

/// State shared between the handle and the engine thread.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    // A std mutex, not a tokio one: it is held for a copy, never across an await or a model step.
    pub stats: Mutex<EngineStats>,
    // Submitted but not yet admitted (or gone). Checked on submit for back-pressure, so a full
    // queue is refused on the caller's thread without a round trip to the engine.
    pub queued: AtomicUsize,
    // Model steps still to fail on purpose (`Engine::inject_step_failures`).
    #[cfg(feature = "fault-injection")]
    pub injected_failures: std::sync::atomic::AtomicU32,
}

impl Shared {
    /// Takes one injected failure, if any is left.
    #[cfg(feature = "fault-injection")]
    pub(crate) fn take_injected_failure(&self) -> bool {
        self.injected_failures.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1)).is_ok()
    }
}

/// Facts about the loaded model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelInfo {
    /// A name for the model (its GGUF `general.name` or folder name).
    pub name: String,
    /// Longest prompt + output, in tokens.
    pub max_model_len: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// KV blocks in the pool.
    pub num_kv_blocks: usize,
    /// Tokens per KV block.
    pub block_size: usize,
    /// Whether dense projections of up to eight rows run on Sluice's GEMV kernel (`EngineConfig::gemv`,
    /// off the CPU, once the kernel passed its check on the device).
    pub gemv: bool,
}

/// A running engine. Cheap to share behind an `Arc`; `submit` may be called from any thread.
#[derive(Debug)]
pub struct Engine {
    commands: Sender<Command>,
    shared: Arc<Shared>,
    tokenizer: Arc<Tokenizer>,
    template: Option<ChatTemplate>,
    info: ModelInfo,
    config: EngineConfig,
    next_id: AtomicU64,
    thread: Option<JoinHandle<()>>,
    // Structured outputs' grammar compiler (an error is kept as its text), built in the background
    // at start (about 0.2 s for a 49k vocabulary) or by the first request that needs it.
    grammars: Arc<OnceLock<std::result::Result<Grammars, String>>>,
}

impl Engine {
    /// Loads the model (blocking: seconds for the default model) and starts the engine thread.
    pub fn new(config: EngineConfig) -> Result<Self> {
        config.validate()?;
        let device = config.device.open()?;
        let started = Instant::now();
        let (mut source, tokenizer, template, name) = open_model(&config)?;
        let model_config = source.config().clone();
        tracing::info!(model = %config.model.display(), layers = model_config.num_layers, "loading weights");
        let quantized_matmul = !device.is_cpu() && config.gpu_weights == GpuWeights::Quantized;
        let gemv = !device.is_cpu() && config.gemv && check_gemv(&device, config.dtype);
        let options = LoadOptions {
            dtype: config.dtype,
            device,
            cpu_weights: config.cpu_weights,
            cpu_activations: config.cpu_activations,
            quantized_matmul,
            gemv,
            gpu_layout: false,
        };
        let model = Llama::load(&mut source, &options, &|done, total| {
            tracing::info!("loading weights: layer {done}/{total}");
        })?;
        drop(source);
        let max_model_len = config.max_model_len.unwrap_or(model_config.max_position_embeddings);
        if max_model_len > model_config.max_position_embeddings {
            return Err(EngineError::InvalidRequest(format!(
                "`max_model_len` {max_model_len} is over the model's context of {}",
                model_config.max_position_embeddings
            )));
        }
        let kv_dtype = config.kv_dtype();
        let per_block = model_config.kv_bytes_per_token(kv_dtype.size_in_bytes()) * config.block_size;
        let budget = kv_budget(&config, &model)?;
        let num_blocks = budget.bytes() / per_block;
        if num_blocks == 0 {
            let hint = match budget {
                KvBudget::Gpu { .. } => {
                    "; lower the other uses of the GPU, raise `gpu_memory_utilization` or set `kv_cache_memory`"
                }
                _ => "",
            };
            return Err(EngineError::InvalidRequest(format!(
                "the KV cache holds no block ({per_block} bytes each): {budget}{hint}"
            )));
        }
        tracing::info!(projection_bytes = model.projection_bytes(), "KV cache: {budget}");
        let vocab_size = model.vocab_size();
        let mut runner = ModelRunner::new(model, num_blocks, config.block_size, kv_dtype)?
            .with_device_sampling(config.device_sampling);
        if config.cuda_graphs {
            let max_blocks_per_seq = max_model_len.div_ceil(config.block_size);
            runner = runner.with_decode_graphs(config.scheduler.max_num_seqs, max_blocks_per_seq)?;
        }
        // The pools and buffers were filled on this thread's stream; the engine thread runs on
        // its own, which does not wait for this one.
        runner.model().device().synchronize()?;
        tracing::info!(
            blocks = num_blocks,
            block_size = config.block_size,
            seconds = started.elapsed().as_secs_f32(),
            "model loaded"
        );
        let info = ModelInfo {
            name,
            max_model_len,
            vocab_size,
            num_kv_blocks: num_blocks,
            block_size: config.block_size,
            gemv,
        };
        let tokenizer = Arc::new(tokenizer);
        let scheduler = Scheduler::new(config.scheduler.clone(), num_blocks, config.block_size);
        let shared = Arc::new(Shared::default());
        let (tx, rx) = crossbeam_channel::unbounded();
        let mut worker = Worker::new(runner, scheduler, config.breaker, tokenizer.clone(), shared.clone(), rx);
        // The engine thread first captures the decode graphs (on CUDA with `cuda_graphs`; they
        // replay only on the thread that captured them), and the engine is ready once it has.
        let (ready_tx, ready_rx) = crossbeam_channel::bounded(1);
        let thread = std::thread::Builder::new().name("sluice-engine".into()).spawn(move || {
            let ready = worker.capture_decode_graphs();
            let start = ready.is_ok();
            let _ = ready_tx.send(ready);
            if start {
                worker.run()
            }
        })?;
        ready_rx.recv().map_err(|_| EngineError::Model("the engine thread stopped while starting".into()))??;
        let grammars = Arc::new(OnceLock::new());
        let (cell, tok) = (grammars.clone(), tokenizer.clone());
        std::thread::Builder::new().name("sluice-grammars".into()).spawn(move || {
            cell.get_or_init(|| Grammars::new(&tok).map_err(|e| e.to_string()));
        })?;
        Ok(Self {
            commands: tx,
            shared,
            tokenizer,
            template,
            info,
            config,
            next_id: AtomicU64::new(0),
            thread: Some(thread),
            grammars,
        })
    }

    /// Facts about the loaded model.
    pub fn model_info(&self) -> &ModelInfo {
        &self.info
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The model's chat template, if it has one.
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.template.as_ref()
    }

    /// A snapshot of the engine's state.
    pub fn stats(&self) -> EngineStats {
        self.shared.stats.lock().map(|s| *s).unwrap_or_default()
    }

    /// The circuit breaker around model execution. While it is open
    /// (`breaker().retry_after(now)` is `Some`), `submit` refuses new requests with
    /// [`EngineError::BreakerOpen`].
    pub fn breaker(&self) -> BreakerState {
        self.shared.stats.lock().map(|s| s.breaker).unwrap_or_default()
    }

    /// Makes the next `n` model steps fail as a real fault would (every sequence in the step gets
    /// an error, the circuit breaker counts it). For tests of failure handling.
    #[cfg(feature = "fault-injection")]
    pub fn inject_step_failures(&self, n: u32) {
        self.shared.injected_failures.store(n, Ordering::Release);
    }

    /// Whether the engine thread is still running: false once it has stopped or died (a panic
    /// leaves no chance to publish `stats().alive = false`).
    pub fn is_alive(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Turns a prompt into token ids (chat template, then tokenizer). In chat messages, text that
    /// spells a special token is encoded as plain text; a raw text prompt is the caller's own
    /// markup, so special-token text in it is the special token (as in vLLM).
    pub fn tokenize_prompt(&self, prompt: &Prompt) -> Result<Vec<u32>> {
        let ids = match prompt {
            Prompt::Tokens(ids) => {
                let vocab = self.info.vocab_size as u32;
                if let Some(bad) = ids.iter().find(|&&id| id >= vocab) {
                    return Err(EngineError::InvalidRequest(format!(
                        "`prompt` token id {bad} is outside the vocabulary ({vocab})"
                    )));
                }
                ids.clone()
            }
            Prompt::Text(text) => self.tokenizer.encode(text, true)?,
            Prompt::Chat(messages) => {
                let template = self.template.as_ref().ok_or_else(|| {
                    EngineError::InvalidRequest("this model has no chat template; send a `prompt` instead".into())
                })?;
                if messages.is_empty() {
                    return Err(EngineError::InvalidRequest("`messages` must not be empty".into()));
                }
                // Message text that spells a special token is encoded as plain text, never as
                // the control token; the template writes the BOS itself when the model wants one.
                let pieces = template.render_pieces(messages, true, self.tokenizer.special_texts())?;
                self.tokenizer.encode_pieces(&pieces)?
            }
        };
        if ids.is_empty() {
            return Err(EngineError::InvalidRequest("`prompt` is empty".into()));
        }
        Ok(ids)
    }

    /// Submits a request; tokens come back on the returned stream.
    ///
    /// Fails at once, without queueing, on a bad request (`InvalidRequest`, naming the field),
    /// when the waiting queue is full (`QueueFull`) and while the circuit breaker is open
    /// (`BreakerOpen`, with the remaining cool-down).
    pub fn submit(&self, request: Request) -> Result<TokenStream> {
        let prompt = self.tokenize_prompt(&request.prompt)?;
        self.submit_tokens(prompt, request)
    }

    /// Compiles a structured `format` now (and keeps it for the submissions that follow), or says
    /// why it cannot be: for callers on an async runtime, to run where blocking is allowed before
    /// submitting (compiling a schema takes milliseconds; the first one may wait for the
    /// grammar compiler's start-up).
    pub fn prepare_response_format(&self, format: &ResponseFormat) -> Result<()> {
        self.constraint(format).map(drop)
    }

    /// The grammar state a structured `format` starts from (`None` for free text): compiled here,
    /// on the caller's thread, so a schema that cannot be compiled is refused at submission.
    fn constraint(&self, format: &ResponseFormat) -> Result<Option<Constraint>> {
        if !format.is_structured() {
            return Ok(None);
        }
        let grammars = self.grammars.get_or_init(|| Grammars::new(&self.tokenizer).map_err(|e| e.to_string()));
        match grammars {
            Ok(g) => g.constraint(format),
            Err(e) => {
                Err(EngineError::InvalidRequest(format!("`response_format`: structured outputs are unavailable: {e}")))
            }
        }
    }

    /// Like [`Engine::submit`] for a prompt already tokenized (its `request.prompt` is ignored).
    pub fn submit_tokens(&self, prompt: Vec<u32>, request: Request) -> Result<TokenStream> {
        let params = request.params;
        params.validate(self.info.vocab_size)?;
        let total = prompt.len() + params.max_tokens;
        if total > self.info.max_model_len {
            return Err(EngineError::InvalidRequest(format!(
                "this model's maximum context length is {} tokens, but the prompt ({} tokens) plus `max_tokens` ({}) asks for {total}",
                self.info.max_model_len,
                prompt.len(),
                params.max_tokens
            )));
        }
        let needed_blocks = (total - 1).div_ceil(self.info.block_size);
        if needed_blocks > self.info.num_kv_blocks {
            return Err(EngineError::InvalidRequest(format!(
                "the prompt plus `max_tokens` needs {} tokens of KV cache, more than the {} it holds",
                total - 1,
                self.info.num_kv_blocks * self.info.block_size
            )));
        }
        let grammar = self.constraint(&params.response_format)?;
        if let Some(retry_after) = self.breaker().retry_after(Instant::now()) {
            return Err(EngineError::BreakerOpen(retry_after));
        }
        let limit = self.config.scheduler.max_waiting;
        if self.shared.queued.fetch_add(1, Ordering::AcqRel) >= limit {
            self.shared.queued.fetch_sub(1, Ordering::AcqRel);
            return Err(EngineError::QueueFull(limit));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::unbounded_channel();
        let num_prompt = prompt.len();
        let seed = self.config.seed.wrapping_add(id);
        let state = RequestState::new(params.clone(), seed, &self.tokenizer, &prompt, grammar, tx);
        let seq = Sequence::new(id, prompt, params.max_tokens, request.priority, Instant::now(), id);
        if self.commands.send(Command::Submit(Box::new(Submission { seq, state }))).is_err() {
            self.shared.queued.fetch_sub(1, Ordering::AcqRel);
            return Err(EngineError::EngineStopped);
        }
        Ok(TokenStream::new(id, num_prompt, rx, self.commands.clone()))
    }

    /// Submits a request and waits for the whole completion (blocking; not for async contexts).
    pub fn generate(&self, request: Request) -> Result<crate::stream::Completion> {
        self.submit(request)?.collect_blocking()
    }

    /// Stops the engine thread after its current step; unfinished requests get an error.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let _ = self.commands.send(Command::Shutdown);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The KV cache's bytes: `kv_cache_memory` when given; else what `gpu_memory_utilization` leaves
/// on a GPU, measured now that `model`'s weights are on it; else the CPU's default.
fn kv_budget(config: &EngineConfig, model: &Llama) -> Result<KvBudget> {
    if let Some(bytes) = config.kv_cache_memory {
        return Ok(KvBudget::Given(bytes));
    }
    let Some(memory) = gpu_memory(model.device())? else {
        return Ok(KvBudget::CpuDefault(DEFAULT_CPU_KV_CACHE_MEMORY));
    };
    let (vocab, dtype_size) = (model.vocab_size(), config.dtype.size_in_bytes());
    let mut reserve = activation_reserve(model.config(), vocab, &config.scheduler, dtype_size);
    if config.cuda_graphs {
        let max_batch = bucket_for(config.scheduler.max_num_seqs.clamp(1, MAX_GRAPH_BATCH));
        reserve += graph_reserve(model.config(), vocab, max_batch, dtype_size);
    }
    Ok(KvBudget::gpu(memory, config.gpu_memory_utilization, reserve))
}

/// Opens the weights, tokenizer and chat template of the model at `config.model`.
fn open_model(config: &EngineConfig) -> Result<(WeightSource, Tokenizer, Option<ChatTemplate>, String)> {
    match ModelFormat::detect(&config.model)? {
        ModelFormat::Gguf(path) => {
            let (content, reader) = read_gguf(&path)?;
            let tokenizer = Tokenizer::from_gguf(&content)?;
            let name = content
                .metadata
                .get("general.name")
                .and_then(|v| v.to_string().ok().cloned())
                .unwrap_or_else(|| file_stem(&path));
            let template = match content.metadata.get("tokenizer.chat_template").map(|v| v.to_string()) {
                Some(Ok(source)) => Some(ChatTemplate::new(source, bos_text(&tokenizer), eos_text(&tokenizer))?),
                _ => None,
            };
            Ok((WeightSource::gguf(content, reader)?, tokenizer, template, name))
        }
        ModelFormat::HfDir(dir) => {
            let config_path = dir.join("tokenizer_config.json");
            let tc = config_path.is_file().then_some(config_path.as_path());
            let tokenizer = Tokenizer::from_file(&dir.join("tokenizer.json"), tc)?;
            let template = match tc.map(std::fs::read_to_string).transpose()? {
                Some(json) => {
                    let v: serde_json::Value = serde_json::from_str(&json)
                        .map_err(|e| EngineError::Load(format!("tokenizer_config.json: {e}")))?;
                    match v.get("chat_template").and_then(|t| t.as_str()) {
                        Some(src) => Some(ChatTemplate::new(src, bos_text(&tokenizer), eos_text(&tokenizer))?),
                        None => None,
                    }
                }
                None => None,
            };
            Ok((WeightSource::hf_dir(&dir)?, tokenizer, template, file_stem(&dir)))
        }
    }
}

fn bos_text(t: &Tokenizer) -> Option<String> {
    t.bos_token_id().and_then(|id| t.id_to_token(id))
}

fn eos_text(t: &Tokenizer) -> Option<String> {
    t.eos_token_id().and_then(|id| t.id_to_token(id))
}

fn file_stem(p: &std::path::Path) -> String {
    p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into())
}
