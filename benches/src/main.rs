//! `sluice-bench`: Sluice's bench harness.
//!
//! # Layout
//! - `workload`: seeded synthetic chat prompts of real text.
//! - `dataset`: ShareGPT-format JSON files as workloads (`--dataset`).
//! - `arrival`: open-loop send times, Poisson or gamma (`--request-rate`, `--burstiness`).
//! - `engine_bench`: the workload in-process through the engine crate (`sluice-bench engine`).
//! - `client`: one streamed request to an OpenAI-compatible server, measured, with retries.
//! - `sse`: the event-stream parser the client reads with.
//! - `serve_bench`: the workload over HTTP, closed or open loop (`sluice-bench serve`).
//! - `report`: percentiles, throughput, goodput, the table and the JSON, shared by both modes.
//! - `plot`: throughput against latency across a sweep, and latency CDFs (`--plot`).

mod arrival;
mod client;
mod dataset;
mod engine_bench;
mod plot;
mod report;
mod serve_bench;
mod sse;
mod workload;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use sluice_engine::{DType, DeviceSpec, Engine, EngineConfig, Request, ResponseFormat, SamplingParams};

use crate::client::{Endpoint, RetryPolicy, Target};
use crate::plot::Run;
use crate::report::{Setup, Slo, Summary};
use crate::workload::WorkItem;

#[derive(Parser)]
#[command(name = "sluice-bench", about = "Throughput and latency benchmarks for Sluice")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// In-process engine throughput (no HTTP): closed loop at a fixed concurrency.
    Engine(EngineArgs),
    /// Load against any OpenAI-compatible server over HTTP, streamed; closed or open loop.
    Serve(ServeArgs),
}

/// What both modes report and how.
#[derive(Args)]
struct Output {
    /// Run these concurrency levels one after another (closed loop), or these caps on requests in
    /// flight (with --request-rate), and report each: e.g. `--sweep 1,8,32`.
    #[arg(long, value_delimiter = ',')]
    sweep: Vec<usize>,
    /// Goodput objectives: requests/s meeting all of them, e.g. `ttft=500ms,tpot=50ms` (also `e2e`).
    #[arg(long)]
    slo: Option<Slo>,
    /// Also write the summary (an array of them for a sweep) as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Draw throughput against latency and the latency distributions to this .svg or .png file.
    #[arg(long)]
    plot: Option<PathBuf>,
}

#[derive(Args)]
struct EngineArgs {
    /// Model: a .gguf file or a Hugging Face folder.
    #[arg(long, env = "SLUICE_MODEL", default_value = "models/SmolLM2-135M-Instruct.Q4_1.gguf")]
    model: PathBuf,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// Requests in all.
    #[arg(long, default_value_t = 64)]
    num_requests: usize,
    /// Tokens generated per request (EOS ignored).
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// Shortest user message, in tokens (the chat template adds about 20).
    #[arg(long, default_value_t = 30)]
    min_prompt_len: usize,
    /// Longest user message, in tokens.
    #[arg(long, default_value_t = 250)]
    max_prompt_len: usize,
    /// Tokens of text that every prompt starts with (a shared system prompt or document), before
    /// its own `--min-prompt-len..--max-prompt-len` tokens.
    #[arg(long, default_value_t = 0)]
    shared_prefix_len: usize,
    /// Workload seed (level `i` of a sweep draws its prompts with seed + i, so no level finds the
    /// last one's prompts in the prefix cache).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Device: cpu, cuda or cuda:N (cuda needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Weight and activation dtype: f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// CPU projection weights for the packed kernels: native (GGUF Q4_1/Q8_0 kept exactly), f32,
    /// bf16, int8 or int4.
    #[arg(long, default_value = "native")]
    cpu_weights: String,
    /// How activations meet int8/int4 weights: auto (int8 with AVX-512 VNNI), f32 or int8.
    #[arg(long, default_value = "auto")]
    cpu_activations: String,
    /// KV cache element type: auto (the dtype), f32, f16 or bf16.
    #[arg(long, default_value = "auto")]
    kv_cache_dtype: String,
    /// Tokens per engine step (decodes plus prompt chunks).
    #[arg(long)]
    max_batch_tokens: Option<usize>,
    /// Sequences running at once.
    #[arg(long)]
    max_num_seqs: Option<usize>,
    /// KV cache size in MiB [default: 1024 on the CPU; on CUDA what --gpu-memory-utilization leaves].
    #[arg(long)]
    kv_cache_mib: Option<usize>,
    /// On CUDA without --kv-cache-mib: the share of the GPU's memory to fill, in (0, 1].
    #[arg(long, default_value_t = 0.9)]
    gpu_memory_utilization: f32,
    /// On CUDA, GGUF weights: quantized (candle's quantized kernels) or dense (dequantized).
    #[arg(long, default_value = "quantized")]
    gpu_weights: String,
    /// On CUDA: replay decode steps as CUDA graphs (one per padded batch size); `false` runs every
    /// step eagerly. Ignored on the CPU.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1,
          default_missing_value = "true", value_name = "BOOL")]
    cuda_graphs: bool,
    /// Reuse the KV cache of whole blocks a prompt shares with an earlier one (the chat template's
    /// system prompt and the workload's instruction, here).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    prefix_caching: bool,
    /// Off the CPU: dense projections of up to eight rows on Sluice's GEMV kernel (`false`: cuBLAS
    /// at every batch).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    gemv: bool,
    /// Where sampled rows are read: auto (from the device off the CPU: argmaxes, heads of the
    /// distribution), device or host (every row copied whole).
    #[arg(long, default_value = "auto")]
    device_sampling: String,
    /// Sampling temperature of every request (0: greedy).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Nucleus sampling of every request, in (0, 1].
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Every request asks for a JSON object (`response_format` `json_object`): each ends when its
    /// object is complete, and each step computes the grammar's token mask.
    #[arg(long)]
    json_object: bool,
    #[command(flatten)]
    output: Output,
}

#[derive(Args)]
struct ServeArgs {
    /// The server, e.g. `http://127.0.0.1:8080` (a trailing `/v1` is accepted).
    #[arg(long)]
    url: String,
    /// API key, sent as `Authorization: Bearer`.
    #[arg(long, env = "OPENAI_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Model name; by default the first one `GET /v1/models` lists.
    #[arg(long)]
    model: Option<String>,
    /// The route requests go to.
    #[arg(long, value_enum, default_value_t = Endpoint::Chat)]
    endpoint: Endpoint,
    /// Closed loop: requests in flight at once.
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// Open loop: requests sent per second on average, whatever is still running (`inf`: all at once).
    #[arg(long)]
    request_rate: Option<f64>,
    /// Shape of the gamma distribution of inter-arrival gaps: 1 is Poisson, lower is burstier.
    #[arg(long, default_value_t = 1.0)]
    burstiness: f64,
    /// Most requests in flight: caps the open loop (and sets the closed loop's concurrency).
    #[arg(long)]
    max_concurrency: Option<usize>,
    /// Requests in all.
    #[arg(long, default_value_t = 64)]
    num_requests: usize,
    /// Tokens to generate per request (default 128, or the dataset's reply lengths).
    #[arg(long)]
    max_tokens: Option<usize>,
    /// Send `ignore_eos: true` so every request generates its max tokens (Sluice and vLLM honour it).
    #[arg(long)]
    ignore_eos: bool,
    /// A ShareGPT-format JSON file as the workload instead of the synthetic one.
    #[arg(long)]
    dataset: Option<PathBuf>,
    /// Shortest synthetic prompt, in approximate tokens (4 per 3 words).
    #[arg(long, default_value_t = 30)]
    min_prompt_len: usize,
    /// Longest synthetic prompt, in approximate tokens.
    #[arg(long, default_value_t = 250)]
    max_prompt_len: usize,
    /// Tokens of text that every prompt starts with (a shared system prompt or document), before
    /// its own `--min-prompt-len..--max-prompt-len` tokens.
    #[arg(long, default_value_t = 0)]
    shared_prefix_len: usize,
    /// Seed of the workload and of the arrival times (level `i` of a sweep draws its prompts with
    /// seed + i, so no level finds the last one's prompts in the server's prefix cache).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Longest one request may take, retries included, in seconds.
    #[arg(long, default_value_t = 300.0)]
    timeout: f64,
    /// Longest the whole run (each level of a sweep) may take, in seconds; then it stops.
    #[arg(long, default_value_t = 3600.0)]
    max_duration: f64,
    /// Re-sends per request after a 429 or 503 (exponential backoff with jitter, or `Retry-After`).
    #[arg(long, default_value_t = 3)]
    max_retries: u32,
    /// No progress bar (it is shown only on a terminal anyway).
    #[arg(long)]
    quiet: bool,
    #[command(flatten)]
    output: Output,
}

fn parse_dtype(s: &str) -> anyhow::Result<DType> {
    match s {
        "f32" => Ok(DType::F32),
        "f16" => Ok(DType::F16),
        "bf16" => Ok(DType::BF16),
        _ => anyhow::bail!("a dtype must be f32, f16 or bf16, got {s}"),
    }
}

/// The levels to run: the sweep's, or the one given.
fn levels(sweep: &[usize], one: usize) -> anyhow::Result<Vec<usize>> {
    let levels = if sweep.is_empty() { vec![one] } else { sweep.to_vec() };
    anyhow::ensure!(!levels.contains(&0), "concurrency levels must be >= 1");
    Ok(levels)
}

/// Writes the JSON and the plot of `runs` as `output` asks.
fn write_outputs(output: &Output, runs: &[Run]) -> anyhow::Result<()> {
    if let Some(path) = &output.json {
        let json = match runs {
            [(one, _)] => serde_json::to_string_pretty(one)?,
            _ => serde_json::to_string_pretty(&runs.iter().map(|(s, _)| s).collect::<Vec<_>>())?,
        };
        std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &output.plot {
        plot::write(path, runs).with_context(|| format!("plotting to {}", path.display()))?;
    }
    Ok(())
}

fn engine_bench(args: EngineArgs) -> anyhow::Result<()> {
    let mut config = EngineConfig::new(&args.model);
    config.device = DeviceSpec::parse(&args.device)?;
    config.dtype = parse_dtype(&args.dtype)?;
    config.kv_cache_memory = args.kv_cache_mib.map(|mib| mib << 20);
    config.gpu_memory_utilization = args.gpu_memory_utilization;
    config.gpu_weights = args.gpu_weights.parse().map_err(anyhow::Error::msg)?;
    config.cuda_graphs = args.cuda_graphs && config.device != DeviceSpec::Cpu;
    let cuda_graphs = config.cuda_graphs;
    let on_device = config.device != DeviceSpec::Cpu;
    config.scheduler.prefix_caching = args.prefix_caching;
    config.gemv = args.gemv;
    config.device_sampling = args.device_sampling.parse().map_err(anyhow::Error::msg)?;
    // Requests carry no seed: each gets the engine's seed plus its id, so a sampled run repeats.
    let response_format = if args.json_object { ResponseFormat::JsonObject } else { ResponseFormat::Text };
    let sampling = SamplingParams {
        temperature: args.temperature,
        top_p: args.top_p,
        response_format,
        ..SamplingParams::default()
    };
    sampling.validate(usize::MAX).map_err(anyhow::Error::msg)?;
    config.cpu_weights = args.cpu_weights.parse().map_err(anyhow::Error::msg)?;
    config.cpu_activations = args.cpu_activations.parse().map_err(anyhow::Error::msg)?;
    config.kv_cache_dtype = match args.kv_cache_dtype.as_str() {
        "auto" => None,
        other => Some(parse_dtype(other)?),
    };
    if let Some(t) = args.max_batch_tokens {
        config.scheduler.max_batch_tokens = t;
    }
    if let Some(n) = args.max_num_seqs {
        config.scheduler.max_num_seqs = n;
    }
    let levels = levels(&args.output.sweep, args.concurrency)?;
    let engine = Arc::new(Engine::new(config).with_context(|| format!("loading {}", args.model.display()))?);
    // Warm-up: the first step touches every weight page and sizes candle's buffers.
    engine.generate(Request::user("Hello").max_tokens(4))?;
    let tokenizer = engine.tokenizer();
    let count = |text: &str| tokenizer.encode(text, false).map(|ids| ids.len()).unwrap_or(0);
    let lengths = (args.min_prompt_len, args.max_prompt_len);
    let mut runs = Vec::new();
    for (level, concurrency) in levels.into_iter().enumerate() {
        let seed = args.seed.wrapping_add(level as u64);
        let items =
            workload::synthetic(args.num_requests, lengths, args.shared_prefix_len, args.max_tokens, seed, &count);
        let (results, wall) = engine_bench::run(&engine, &items, concurrency, &sampling);
        let setup = Setup {
            mode: "engine".into(),
            model: args.model.display().to_string(),
            concurrency,
            request_rate: None,
            slo: args.output.slo.clone().unwrap_or_default(),
        };
        let summary = Summary::new(&setup, &results, wall);
        println!("{}", summary.table());
        runs.push((summary, results));
    }
    let stats = engine.stats();
    println!(
        "engine: {} steps, {} prompt and {} generated tokens, {} of them chosen by the device argmax, {} preemptions",
        stats.steps, stats.prompt_tokens, stats.generated_tokens, stats.device_argmax_tokens, stats.preemptions
    );
    if stats.prefix_cache_queries > 0 {
        println!(
            "prefix cache: {} of {} prompt tokens found cached ({:.1}%)",
            stats.prefix_cache_hits,
            stats.prefix_cache_queries,
            100.0 * stats.prefix_cache_hits as f64 / stats.prefix_cache_queries as f64
        );
    }
    if stats.head_tokens + stats.fetched_rows > 0 {
        println!(
            "device sampling: {} tokens from heads of the distribution, {} rows copied whole",
            stats.head_tokens, stats.fetched_rows
        );
    }
    let t = stats.step_times;
    println!(
        "engine thread per step (µs): {:.0} in all = schedule {:.0} + model {:.0} + sampling {:.0} + tokens out {:.0} \
         + other {:.0}",
        t.mean_us(t.total),
        t.mean_us(t.schedule),
        t.mean_us(t.model),
        t.mean_us(t.sample),
        t.mean_us(t.emit),
        t.mean_us(t.total.saturating_sub(t.schedule + t.model + t.sample + t.emit))
    );
    if on_device {
        let gemv = if engine.model_info().gemv { "Sluice's GEMV kernel" } else { "cuBLAS" };
        println!("projections of up to eight rows: {gemv}");
    }
    if cuda_graphs {
        let g = stats.decode_graphs;
        println!(
            "decode graphs: {} buckets captured, {} steps replayed, {} padded steps run eagerly",
            g.captured, g.replayed, g.eager
        );
    }
    write_outputs(&args.output, &runs)
}

/// The serve workload of sweep level `level`: the dataset's, or synthetic prompts measured in
/// approximate tokens, drawn with the seed plus the level.
fn serve_items(args: &ServeArgs, level: usize) -> anyhow::Result<Vec<WorkItem>> {
    let seed = args.seed.wrapping_add(level as u64);
    // Client side there is no tokenizer; English runs at about 4 tokens per 3 words.
    let approx_tokens = |text: &str| (text.split_whitespace().count() * 4).div_ceil(3);
    anyhow::ensure!(args.max_tokens != Some(0), "--max-tokens must be >= 1");
    anyhow::ensure!(
        args.dataset.is_none() || args.shared_prefix_len == 0,
        "--shared-prefix-len shapes synthetic prompts; a --dataset brings its own"
    );
    match &args.dataset {
        Some(path) => dataset::sharegpt(path, args.num_requests, seed, args.max_tokens, &approx_tokens),
        None => {
            let lengths = (args.min_prompt_len, args.max_prompt_len);
            let max_tokens = args.max_tokens.unwrap_or(128);
            Ok(workload::synthetic(
                args.num_requests,
                lengths,
                args.shared_prefix_len,
                max_tokens,
                seed,
                &approx_tokens,
            ))
        }
    }
}

fn progress_bar(len: usize, quiet: bool, label: String) -> ProgressBar {
    if quiet || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(len as u64), ProgressDrawTarget::stderr());
    let style = ProgressStyle::with_template("{prefix:>12} [{bar:40}] {pos}/{len} requests, {elapsed_precise}")
        .map(|s| s.progress_chars("=> "))
        .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    bar.set_prefix(label);
    bar
}

fn seconds(value: f64, flag: &str) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(value)
        .ok()
        .filter(|d| !d.is_zero())
        .with_context(|| format!("`{flag}` must be a positive number of seconds, got {value}"))
}

async fn serve_bench(args: ServeArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.num_requests > 0, "--num-requests must be >= 1");
    let (timeout, max_duration) = (seconds(args.timeout, "--timeout")?, seconds(args.max_duration, "--max-duration")?);
    let closed = args.max_concurrency.unwrap_or(args.concurrency);
    let levels = match args.request_rate {
        None => levels(&args.output.sweep, closed)?,
        Some(_) if args.output.sweep.is_empty() => vec![args.max_concurrency.unwrap_or(0)],
        Some(_) => levels(&args.output.sweep, 0)?,
    };
    let arrivals = match args.request_rate {
        Some(rate) => {
            Some(arrival::schedule(args.num_requests, rate, args.burstiness, args.seed).map_err(anyhow::Error::msg)?)
        }
        None => None,
    };
    serve_items(&args, 0)?; // a bad dataset fails before any connection is made
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .tcp_nodelay(true)
        .build()
        .context("building the HTTP client")?;
    let base_url = client::base_url(&args.url);
    let model = match args.model.clone() {
        Some(m) => m,
        None => client::first_model(&client, &base_url, args.api_key.as_deref()).await.map_err(anyhow::Error::msg)?,
    };
    let target = Arc::new(Target {
        client,
        base_url,
        api_key: args.api_key.clone(),
        model: model.clone(),
        endpoint: args.endpoint,
        ignore_eos: args.ignore_eos,
        retry: RetryPolicy { max_retries: args.max_retries, ..RetryPolicy::default() },
    });
    let mut runs = Vec::new();
    for (level, concurrency) in levels.into_iter().enumerate() {
        let items = Arc::new(serve_items(&args, level)?);
        let load =
            serve_bench::Load { concurrency, arrivals: arrivals.clone(), request_timeout: timeout, max_duration };
        let label = match args.request_rate {
            Some(rate) => format!("{rate} req/s"),
            None => format!("c={concurrency}"),
        };
        let bar = progress_bar(items.len(), args.quiet, label);
        let (results, wall) = serve_bench::run(target.clone(), items.clone(), &load, &bar).await;
        bar.finish_and_clear();
        let setup = Setup {
            mode: "serve".into(),
            model: model.clone(),
            concurrency,
            request_rate: args.request_rate,
            slo: args.output.slo.clone().unwrap_or_default(),
        };
        let summary = Summary::new(&setup, &results, wall);
        println!("{}", summary.table());
        runs.push((summary, results));
    }
    write_outputs(&args.output, &runs)
}

/// The engine's log on stderr: warnings and errors, or what `RUST_LOG` asks for.
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}

fn main() -> anyhow::Result<()> {
    init_logging();
    match Cli::parse().command {
        Command::Engine(args) => engine_bench(args),
        Command::Serve(args) => {
            let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            runtime.block_on(serve_bench(args))
        }
    }
}
