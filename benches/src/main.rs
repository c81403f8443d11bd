//! `sluice-bench`: Sluice's bench harness.
//!
//! # Layout
//! - `workload`: seeded synthetic chat prompts of real text.
//! - `engine_bench`: the workload in-process through the engine crate (`sluice-bench engine`).
//! - `report`: percentiles, throughput, the table and the JSON.

mod engine_bench;
mod report;
mod workload;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use sluice_engine::{DType, DeviceSpec, Engine, EngineConfig, Request, WeightFormat};

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
    /// Workload seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Device: cpu, cuda or cuda:N (cuda needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Weight and activation dtype: f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// CPU projection weights for the packed kernels: f32, bf16 or int8.
    #[arg(long, default_value = "f32")]
    cpu_weights: String,
    /// Tokens per engine step (decodes plus prompt chunks).
    #[arg(long)]
    max_batch_tokens: Option<usize>,
    /// Sequences running at once.
    #[arg(long)]
    max_num_seqs: Option<usize>,
    /// KV cache size in MiB.
    #[arg(long, default_value_t = 1024)]
    kv_cache_mib: usize,
    /// Also write the summary as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

fn parse_dtype(s: &str) -> anyhow::Result<DType> {
    match s {
        "f32" => Ok(DType::F32),
        "f16" => Ok(DType::F16),
        "bf16" => Ok(DType::BF16),
        _ => anyhow::bail!("--dtype must be f32, f16 or bf16, got {s}"),
    }
}

fn engine_bench(args: EngineArgs) -> anyhow::Result<()> {
    let mut config = EngineConfig::new(&args.model);
    config.device = DeviceSpec::parse(&args.device)?;
    config.dtype = parse_dtype(&args.dtype)?;
    config.kv_cache_memory = args.kv_cache_mib << 20;
    config.cpu_weights = match args.cpu_weights.as_str() {
        "f32" => WeightFormat::F32,
        "bf16" => WeightFormat::Bf16,
        "int8" => WeightFormat::Int8,
        other => anyhow::bail!("--cpu-weights must be f32, bf16 or int8, got {other}"),
    };
    if let Some(t) = args.max_batch_tokens {
        config.scheduler.max_batch_tokens = t;
    }
    if let Some(n) = args.max_num_seqs {
        config.scheduler.max_num_seqs = n;
    }
    let engine = Arc::new(Engine::new(config).with_context(|| format!("loading {}", args.model.display()))?);
    // Warm-up: the first step touches every weight page and sizes candle's buffers.
    engine.generate(Request::user("Hello").max_tokens(4))?;
    let tokenizer = engine.tokenizer();
    let count = |text: &str| tokenizer.encode(text, false).map(|ids| ids.len()).unwrap_or(0);
    let lengths = (args.min_prompt_len, args.max_prompt_len);
    let items = workload::synthetic(args.num_requests, lengths, args.max_tokens, args.seed, &count);
    let (results, wall) = engine_bench::run(&engine, &items, args.concurrency);
    let summary = report::Summary::new("engine", args.concurrency, &results, wall);
    println!("{}", summary.table());
    for r in results.iter().filter_map(|r| r.error.as_ref()).take(5) {
        eprintln!("failed request: {r}");
    }
    if let Some(path) = args.json {
        std::fs::write(&path, serde_json::to_string_pretty(&summary)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Engine(args) => engine_bench(args),
    }
}
