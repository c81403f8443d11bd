//! The model layer: hyper-parameters, weight loading, the Llama forward and the runner that feeds
//! it a scheduler batch.

mod config;
mod cpu_weights;
mod graphs;
mod kernel_check;
mod linear;
mod llama;
mod loader;
mod normed;
mod ops;
mod qmatmul;
mod readout;
mod runner;

pub use config::{Llama3RopeScaling, LlamaConfig};
pub use cpu_weights::{CpuActivations, CpuWeights};
pub use graphs::{bucket_for, DecodeGraphs, GraphCounts, MAX_GRAPH_BATCH};
pub use kernel_check::{check_gemv, check_qkv_rope_cache};
pub use linear::Linear;
pub use llama::{LayerCache, Llama, LoadOptions, StepInput};
pub use loader::{read_gguf, ModelFormat, QuantizedWeight, WeightSource};
pub use qmatmul::{GgufBlocks, GpuWeights, QLinear};
pub use readout::{readable, DeviceSampling, Readout, StepLogits, HEAD_SIZE};
pub use runner::ModelRunner;
pub use sluice_kernels::matmul::{PackedLinear, Quantized, WeightFormat};
