//! Greedy continuations of token-id prompts with their top logprobs, one JSON object per line, to
//! compare the engine with a reference implementation (step 2 of the GPU proof, `benches/GPU.md`).
//!
//! `greedy_logprobs MODEL DEVICE DTYPE MAX_TOKENS [GPU_WEIGHTS] [--cuda-graphs] [--together] < prompts.jsonl`,
//! each input line a JSON array of token ids (`GPU_WEIGHTS`: quantized or dense, for a GGUF model
//! on CUDA); each output line `{"tokens": [..], "logprobs": [..], "top": [[[id, logprob], ..], ..]}`,
//! in the input's order. Prompts run one at a time (the batch-1 path), or with `--together` all
//! submitted at once (batched steps). `--cuda-graphs` turns on `EngineConfig::cuda_graphs`.

use std::io::BufRead;

use anyhow::Context;
use sluice_engine::{DType, DeviceSpec, Engine, EngineConfig, Request, SamplingParams};

/// Alternatives reported per position.
const TOP: usize = 5;

fn main() -> anyhow::Result<()> {
    // The engine's warnings (a failed CUDA graph capture, say) on stderr, or what `RUST_LOG` asks for.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut flag = |name: &str| match args.iter().position(|a| a == name) {
        Some(i) => {
            args.remove(i);
            true
        }
        None => false,
    };
    let (cuda_graphs, together) = (flag("--cuda-graphs"), flag("--together"));
    let (model, device, dtype, max_tokens, gpu_weights) = match args.as_slice() {
        [m, d, t, n] => (m, d, t, n, "quantized"),
        [m, d, t, n, w] => (m, d, t, n, w.as_str()),
        _ => anyhow::bail!(
            "usage: greedy_logprobs MODEL DEVICE DTYPE MAX_TOKENS [GPU_WEIGHTS] [--cuda-graphs] [--together] < prompts.jsonl"
        ),
    };
    let mut config = EngineConfig::new(model);
    config.device = DeviceSpec::parse(device)?;
    let config_device_is_cpu = config.device == DeviceSpec::Cpu;
    config.dtype = match dtype.as_str() {
        "f32" => DType::F32,
        "f16" => DType::F16,
        "bf16" => DType::BF16,
        other => anyhow::bail!("DTYPE must be f32, f16 or bf16, got {other}"),
    };
    config.gpu_weights = gpu_weights.parse().map_err(anyhow::Error::msg)?;
    config.cuda_graphs = cuda_graphs;
    let engine = Engine::new(config).with_context(|| format!("loading {model}"))?;
    let params = SamplingParams {
        max_tokens: max_tokens.parse().context("MAX_TOKENS")?,
        logprobs: Some(TOP),
        ignore_eos: true,
        ..SamplingParams::default()
    };
    let mut prompts = Vec::new();
    for line in std::io::stdin().lock().lines() {
        let prompt: Vec<u32> = serde_json::from_str(&line?).context("a prompt line must be a JSON array of ids")?;
        prompts.push(Request::tokens(prompt).with_params(params.clone()));
    }
    let done = if together {
        let streams = prompts.into_iter().map(|r| engine.submit(r)).collect::<Result<Vec<_>, _>>()?;
        streams.into_iter().map(|s| s.collect_blocking()).collect::<Result<Vec<_>, _>>()?
    } else {
        prompts.into_iter().map(|r| engine.generate(r)).collect::<Result<Vec<_>, _>>()?
    };
    for done in done {
        let logprobs: Vec<f32> = done.logprobs.iter().map(|lp| lp.logprob).collect();
        let top: Vec<&[(u32, f32)]> = done.logprobs.iter().map(|lp| lp.top.as_slice()).collect();
        println!("{}", serde_json::json!({ "tokens": done.token_ids, "logprobs": logprobs, "top": top }));
    }
    if cuda_graphs {
        let g = engine.stats().decode_graphs;
        eprintln!("decode graphs: {} captured, {} replayed, {} padded eager steps", g.captured, g.replayed, g.eager);
        // On a GPU, a run that asked for graphs and replayed none proves nothing about them.
        anyhow::ensure!(
            config_device_is_cpu || g.replayed > 0,
            "--cuda-graphs: no decode step was replayed from a CUDA graph (see the warnings above)"
        );
    }
    Ok(())
}
