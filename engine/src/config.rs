//! `EngineConfig`: everything needed to build an [`crate::Engine`].

use std::path::PathBuf;

use candle_core::{DType, Device};

use crate::breaker::BreakerConfig;
use crate::error::{EngineError, Result};
use crate::model::{CpuActivations, CpuWeights, DeviceSampling, GpuWeights};
use crate::scheduler::SchedulerConfig;

/// The KV cache's size on the CPU when `kv_cache_memory` is not given: 1 GiB.
pub const DEFAULT_CPU_KV_CACHE_MEMORY: usize = 1 << 30;

/// Which device the model runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    /// The CPU (all cores, through candle's thread pool).
    #[default]
    Cpu,
    /// A CUDA GPU by ordinal (needs the `cuda` feature).
    Cuda(usize),
}

impl DeviceSpec {
    /// Parses `cpu`, `cuda` or `cuda:N`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            _ => {
                s.strip_prefix("cuda:").and_then(|n| n.parse().ok()).map(Self::Cuda).ok_or_else(|| {
                    EngineError::InvalidRequest(format!("`device` must be cpu, cuda or cuda:N, got `{s}`"))
                })
            }
        }
    }

    /// Opens the device. Asking for CUDA in a build or on a machine without it is an error, never a
    /// silent fall-back to the CPU.
    pub fn open(self) -> Result<Device> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda(ordinal) => Device::new_cuda(ordinal)
                .map_err(|e| EngineError::Load(format!("cannot open CUDA device {ordinal}: {e}"))),
        }
    }
}

/// Configuration of an engine.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineConfig {
    /// A `.gguf` file or a Hugging Face folder.
    pub model: PathBuf,
    /// Where to run.
    pub device: DeviceSpec,
    /// Weight, activation and KV cache dtype. Quantized GGUF weights are dequantized to it at load
    /// on the CPU when the packed kernels do not keep them (candle's quantized CPU matmul does not
    /// batch), and on CUDA with `GpuWeights::Dense` or a ggml type candle has no kernel for.
    pub dtype: DType,
    /// On the CPU with f32 activations: how projection weights are stored for the packed matmul
    /// kernels (`Native` keeps GGUF's Q4_1/Q8_0 exactly: compact, and with f32's results under f32
    /// activations).
    pub cpu_weights: CpuWeights,
    /// On the CPU: how activations meet int8/int4 weights (`Auto`: int8 with AVX-512 VNNI, a
    /// faster path whose outputs are within int8 rounding of `F32`'s exact ones).
    pub cpu_activations: CpuActivations,
    /// Element type of the KV cache; `None` means `dtype`. On the CPU with f32 activations it may
    /// also be f16 or bf16: half the bytes attention reads per step (+7% output tok/s at
    /// concurrency 32 on the default model), keys and values rounded as they are stored (as
    /// llama.cpp stores them). On CUDA it must equal `dtype`.
    pub kv_cache_dtype: Option<DType>,
    /// Off the CPU: whether GGUF-quantized projection weights stay quantized (candle's `QMatMul`
    /// kernels) or are dequantized to `dtype` at load.
    pub gpu_weights: GpuWeights,
    /// Where sampled rows are read: from the device (plain greedy rows' argmaxes, other rows'
    /// heads of the distribution, a whole row only when needed) or whole on the host. `Auto`: from
    /// the device off the CPU, on the host on the CPU.
    pub device_sampling: DeviceSampling,
    /// Decode steps (every sequence one token) padded to fixed batch sizes and, on CUDA, captured
    /// once per size as a CUDA graph and replayed: one launch a step instead of hundreds. If a
    /// capture fails the engine says so in its log and runs steps eagerly. On the CPU the padded
    /// steps run eagerly, which only serves to test the padding. Off in `EngineConfig::new` (whose device is
    /// the CPU); `sluice serve` and `sluice-bench` turn it on for CUDA devices.
    pub cuda_graphs: bool,
    /// Off the CPU: whether dense projections of up to eight rows (decode steps at small batch)
    /// run on Sluice's GEMV kernel, a warp per output column so that every SM streams the weight,
    /// rather than cuBLAS, whose tiles leave most of the GPU idle at one row. The kernel is checked
    /// against a reference at load; if it fails there, cuBLAS serves every batch. On by default;
    /// GGUF weights kept quantized (`GpuWeights::Quantized`) take candle's kernels either way.
    pub gemv: bool,
    /// Tokens per KV block.
    pub block_size: usize,
    /// Bytes of memory for the KV cache pools (all layers, K and V). `None`: 1 GiB on the CPU
    /// ([`DEFAULT_CPU_KV_CACHE_MEMORY`]); on CUDA what `gpu_memory_utilization` leaves once the
    /// weights are loaded.
    pub kv_cache_memory: Option<usize>,
    /// On CUDA, when `kv_cache_memory` is `None`: the share of the GPU's whole memory this engine
    /// may fill (weights, KV cache and one step's activations), in (0, 1], as vLLM's flag.
    pub gpu_memory_utilization: f32,
    /// Longest prompt + output; defaults to the model's trained context.
    pub max_model_len: Option<usize>,
    /// Batching and queueing.
    pub scheduler: SchedulerConfig,
    /// Seed for requests that do not carry one (each request gets `seed + its id`).
    pub seed: u64,
    /// When repeated step failures open the circuit breaker, and for how long.
    pub breaker: BreakerConfig,
}

impl EngineConfig {
    /// Defaults for `model`: CPU, f32, 16-token blocks, the KV cache sized by the device's rule.
    pub fn new(model: impl Into<PathBuf>) -> Self {
        Self {
            model: model.into(),
            device: DeviceSpec::Cpu,
            dtype: DType::F32,
            cpu_weights: CpuWeights::Native,
            cpu_activations: CpuActivations::Auto,
            kv_cache_dtype: None,
            gpu_weights: GpuWeights::Quantized,
            device_sampling: DeviceSampling::Auto,
            cuda_graphs: false,
            gemv: true,
            block_size: 16,
            kv_cache_memory: None,
            gpu_memory_utilization: 0.9,
            max_model_len: None,
            scheduler: SchedulerConfig::default(),
            seed: 0,
            breaker: BreakerConfig::default(),
        }
    }

    /// Checks the values that do not depend on the model.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(EngineError::InvalidRequest(m.to_string()));
        let s = &self.scheduler;
        if self.block_size == 0 || self.block_size > 1024 {
            return bad("`block_size` must be in 1..=1024");
        }
        if !matches!(self.dtype, DType::F32 | DType::F16 | DType::BF16) {
            return bad("`dtype` must be f32, f16 or bf16");
        }
        let kv = self.kv_dtype();
        if !matches!(kv, DType::F32 | DType::F16 | DType::BF16) {
            return bad("`kv_cache_dtype` must be f32, f16 or bf16");
        }
        if kv != self.dtype && !(self.device == DeviceSpec::Cpu && self.dtype == DType::F32) {
            return bad("a `kv_cache_dtype` other than `dtype` needs the CPU with f32 activations");
        }
        let u = self.gpu_memory_utilization;
        if !(u > 0.0 && u <= 1.0) {
            return Err(EngineError::InvalidRequest(format!("`gpu_memory_utilization` must be in (0, 1], got {u}")));
        }
        if self.kv_cache_memory == Some(0) {
            return bad("`kv_cache_memory` must be at least 1 byte");
        }
        if s.max_batch_size == 0 || s.max_num_seqs == 0 || s.max_batch_tokens == 0 || s.max_waiting == 0 {
            return bad("`max_batch_size`, `max_num_seqs`, `max_batch_tokens` and `max_waiting` must be at least 1");
        }
        self.breaker.validate()
    }

    /// The KV cache's element type, `kv_cache_dtype` or its default.
    pub fn kv_dtype(&self) -> DType {
        self.kv_cache_dtype.unwrap_or(self.dtype)
    }

    /// The default model's path: `$SLUICE_MODEL`, else `models/SmolLM2-135M-Instruct.Q4_1.gguf`
    /// under the workspace root.
    pub fn default_model_path() -> PathBuf {
        std::env::var_os("SLUICE_MODEL").map(PathBuf::from).unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/SmolLM2-135M-Instruct.Q4_1.gguf")
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv_cache_dtype_defaults_and_limits() {
        let mut c = EngineConfig::new("model.gguf");
        assert_eq!(c.kv_dtype(), DType::F32, "the activation dtype by default");
        c.kv_cache_dtype = Some(DType::F16);
        assert_eq!(c.kv_dtype(), DType::F16);
        c.validate().unwrap();
        c.kv_cache_dtype = Some(DType::F32);
        c.dtype = DType::BF16;
        assert!(c.validate().is_err(), "bf16 activations over an f32 cache");
        c.kv_cache_dtype = None;
        assert_eq!(c.kv_dtype(), DType::BF16);
        c.validate().unwrap();
        c.device = DeviceSpec::Cuda(0);
        c.dtype = DType::F32;
        c.kv_cache_dtype = Some(DType::F16);
        assert!(c.validate().is_err(), "CUDA needs the cache in the activation dtype");
        c.kv_cache_dtype = Some(DType::U8);
        assert!(c.validate().is_err());
    }

    #[test]
    fn gpu_memory_utilization_and_kv_cache_memory_limits() {
        let mut c = EngineConfig::new("model.gguf");
        assert_eq!((c.gpu_memory_utilization, c.kv_cache_memory), (0.9, None));
        for ok in [1.0, 0.05] {
            c.gpu_memory_utilization = ok;
            c.validate().unwrap();
        }
        for bad in [0.0, -0.5, 1.01, f32::NAN] {
            c.gpu_memory_utilization = bad;
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains("`gpu_memory_utilization`"), "{bad}: {e}");
        }
        c.gpu_memory_utilization = 0.9;
        c.kv_cache_memory = Some(0);
        assert!(c.validate().unwrap_err().to_string().contains("`kv_cache_memory`"));
    }
}
