//! Reading a model from disk: a GGUF file or a Hugging Face folder, into one form.
//!
//! Weights are handed out one tensor at a time under their Hugging Face names
//! (`model.layers.3.self_attn.q_proj.weight`), dense, in the dtype and on the device asked for.
//! GGUF's Q/K projections are stored permuted for interleaved RoPE; they are permuted back here so
//! that the model has one RoPE path (the half-split one, as in Hugging Face) for both formats.

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use half::f16;
use sluice_kernels::matmul::Quantized;

use super::config::LlamaConfig;
use super::qmatmul::GgufBlocks;
use crate::error::{EngineError, Result};

/// Where the model comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelFormat {
    /// One `.gguf` file (weights, tokenizer and chat template in its metadata).
    Gguf(PathBuf),
    /// A Hugging Face folder: `config.json`, `*.safetensors`, `tokenizer.json`,
    /// `tokenizer_config.json`.
    HfDir(PathBuf),
}

impl ModelFormat {
    /// Tells the format from the path: a folder is a Hugging Face folder, a file is GGUF.
    pub fn detect(path: &Path) -> Result<Self> {
        if path.is_dir() {
            Ok(Self::HfDir(path.to_path_buf()))
        } else if path.is_file() {
            Ok(Self::Gguf(path.to_path_buf()))
        } else {
            Err(EngineError::Load(format!(
                "model path `{}` does not exist (run `make model` for the default model)",
                path.display()
            )))
        }
    }
}

/// An open model: its hyper-parameters and access to its weights.
pub struct WeightSource {
    config: LlamaConfig,
    inner: Inner,
}

enum Inner {
    Gguf { content: gguf_file::Content, reader: BufReader<File> },
    Safetensors { tensors: HashMap<String, Tensor> },
}

impl std::fmt::Debug for WeightSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WeightSource").field("config", &self.config).finish_non_exhaustive()
    }
}

/// Opens a GGUF file and reads its metadata (not its tensors yet).
pub fn read_gguf(path: &Path) -> Result<(gguf_file::Content, BufReader<File>)> {
    let file = File::open(path).map_err(|e| EngineError::Load(format!("cannot open `{}`: {e}", path.display())))?;
    let mut reader = BufReader::new(file);
    let content = gguf_file::Content::read(&mut reader)
        .map_err(|e| EngineError::Load(format!("`{}` is not a readable GGUF file: {e}", path.display())))?;
    Ok((content, reader))
}

impl WeightSource {
    /// Opens a GGUF file whose metadata was read with [`read_gguf`].
    pub fn gguf(content: gguf_file::Content, reader: BufReader<File>) -> Result<Self> {
        let config = LlamaConfig::from_gguf(&content)?;
        Ok(Self { config, inner: Inner::Gguf { content, reader } })
    }

    /// Opens a Hugging Face folder's `config.json` and `*.safetensors`.
    pub fn hf_dir(dir: &Path) -> Result<Self> {
        let config_path = dir.join("config.json");
        let json = std::fs::read_to_string(&config_path)
            .map_err(|e| EngineError::Load(format!("cannot read `{}`: {e}", config_path.display())))?;
        let config = LlamaConfig::from_hf_json(&json)?;
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(EngineError::Load(format!("no *.safetensors file in `{}`", dir.display())));
        }
        let mut tensors = HashMap::new();
        for file in &files {
            let part = candle_core::safetensors::load(file, &Device::Cpu)
                .map_err(|e| EngineError::Load(format!("cannot read `{}`: {e}", file.display())))?;
            tensors.extend(part);
        }
        Ok(Self { config, inner: Inner::Safetensors { tensors } })
    }

    /// The model's hyper-parameters.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// True if the weight exists (e.g. `lm_head.weight` for untied models).
    pub fn contains(&self, hf_name: &str) -> bool {
        match &self.inner {
            Inner::Gguf { content, .. } => gguf_name(hf_name).is_some_and(|n| content.tensor_infos.contains_key(&n)),
            Inner::Safetensors { tensors } => tensors.contains_key(hf_name),
        }
    }

    /// The weight named `hf_name` kept as its file stores it, if the file is GGUF and the tensor is
    /// Q4_1 or Q8_0 (which the packed CPU kernels hold exactly); `None` for any other weight.
    pub fn get_quantized(&mut self, hf_name: &str) -> Result<Option<QuantizedWeight>> {
        let Some(q) = self.gguf_tensor(hf_name, |t| matches!(t, GgmlDType::Q4_1 | GgmlDType::Q8_0))? else {
            return Ok(None);
        };
        let (n, k) = q.shape().dims2()?;
        let weight = QuantizedWeight { weight: decode_blocks(q.dtype(), &q.data()?, n, k)?, n, k };
        Ok(Some(match self.rope_heads(hf_name) {
            Some(heads) => weight.permute_rows(&unpermuted_row_order(n, heads)),
            None => weight,
        }))
    }

    /// The weight named `hf_name` as the GGUF file's raw blocks, Q/K rows put in the Hugging Face
    /// order as [`WeightSource::get`] does, if the file is GGUF and the tensor's ggml type is one
    /// candle's CUDA quantized matmul covers ([`GgufBlocks::supported`]); `None` otherwise.
    pub fn get_blocks(&mut self, hf_name: &str) -> Result<Option<GgufBlocks>> {
        let Some(q) = self.gguf_tensor(hf_name, GgufBlocks::supported)? else { return Ok(None) };
        let (n, k) = q.shape().dims2()?;
        let blocks = GgufBlocks::new(q.dtype(), q.data()?.into_owned(), n, k)?;
        Ok(Some(match self.rope_heads(hf_name) {
            Some(heads) => blocks.permute_rows(&unpermuted_row_order(n, heads)),
            None => blocks,
        }))
    }

    /// The GGUF tensor for `hf_name` as the file stores it, if the file is GGUF, holds it, and its
    /// ggml type is one `accept`s.
    fn gguf_tensor(&mut self, hf_name: &str, accept: impl Fn(GgmlDType) -> bool) -> Result<Option<QTensor>> {
        let Inner::Gguf { content, reader } = &mut self.inner else { return Ok(None) };
        let Some(name) = gguf_name(hf_name) else { return Ok(None) };
        let Some(info) = content.tensor_infos.get(&name) else { return Ok(None) };
        if !accept(info.ggml_dtype) {
            return Ok(None);
        }
        Ok(Some(content.tensor(reader, &name, &Device::Cpu)?))
    }

    /// The heads whose rows GGUF permuted for its rope layout in weight `hf_name` (the Q and K
    /// projections), `None` for any other weight.
    fn rope_heads(&self, hf_name: &str) -> Option<usize> {
        if hf_name.ends_with("q_proj.weight") {
            Some(self.config.num_heads)
        } else if hf_name.ends_with("k_proj.weight") {
            Some(self.config.num_kv_heads)
        } else {
            None
        }
    }

    /// The dtype a weight is stored in, where the file says so without converting (safetensors).
    pub fn stored_dtype(&self, hf_name: &str) -> Option<DType> {
        match &self.inner {
            Inner::Safetensors { tensors } => tensors.get(hf_name).map(Tensor::dtype),
            Inner::Gguf { .. } => None,
        }
    }

    /// The weight named `hf_name` (Hugging Face naming), dense, as `dtype` on `device`.
    pub fn get(&mut self, hf_name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        let missing = || EngineError::Load(format!("weight `{hf_name}` is missing"));
        let tensor = match &mut self.inner {
            Inner::Gguf { content, reader } => {
                let name = gguf_name(hf_name).ok_or_else(missing)?;
                if !content.tensor_infos.contains_key(&name) {
                    return Err(missing());
                }
                let q = content.tensor(reader, &name, &Device::Cpu)?;
                let dense = q.dequantize(&Device::Cpu)?;
                match self.rope_heads(hf_name) {
                    Some(heads) => unpermute_rope_rows(&dense, heads)?,
                    None => dense,
                }
            }
            // Cloning shares the storage; a tied embedding is read twice (as itself and the head).
            Inner::Safetensors { tensors } => tensors.get(hf_name).cloned().ok_or_else(missing)?,
        };
        Ok(tensor.to_dtype(dtype)?.to_device(device)?)
    }
}

/// A projection weight `[n, k]` (out, in) kept in its file's quantisation (see
/// [`WeightSource::get_quantized`]).
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizedWeight {
    /// Codes and scales, row-major.
    pub weight: Quantized,
    /// Output features (rows).
    pub n: usize,
    /// Input features.
    pub k: usize,
}

impl QuantizedWeight {
    /// The rows of `parts` one after another (e.g. Q, K and V into one projection), if they all
    /// share the input width and the quantisation; `None` otherwise.
    pub fn stack(parts: Vec<Self>) -> Option<Self> {
        let k = parts.first()?.k;
        let mut n = 0;
        let mut stacked: Option<Quantized> = None;
        for part in parts {
            if part.k != k {
                return None;
            }
            n += part.n;
            stacked = Some(match (stacked, part.weight) {
                (None, w) => w,
                (Some(Quantized::Int8 { mut codes, mut scales }), Quantized::Int8 { codes: c, scales: s }) => {
                    codes.extend(c);
                    scales.extend(s);
                    Quantized::Int8 { codes, scales }
                }
                (Some(Quantized::Int4 { mut codes, mut d, mut m }), Quantized::Int4 { codes: c, d: dd, m: mm }) => {
                    codes.extend(c);
                    d.extend(dd);
                    m.extend(mm);
                    Quantized::Int4 { codes, d, m }
                }
                _ => return None,
            });
        }
        Some(Self { weight: stacked?, n, k })
    }

    /// Reorders rows: row `r` of the result is row `from[r]` of `self`.
    fn permute_rows(self, from: &[usize]) -> Self {
        let (k, groups) = (self.k, self.k.div_ceil(32));
        fn gather<T: Copy>(v: &[T], width: usize, from: &[usize]) -> Vec<T> {
            from.iter().flat_map(|&r| &v[r * width..][..width]).copied().collect()
        }
        let weight = match &self.weight {
            Quantized::Int8 { codes, scales } => {
                Quantized::Int8 { codes: gather(codes, k, from), scales: gather(scales, groups, from) }
            }
            Quantized::Int4 { codes, d, m } => Quantized::Int4 {
                codes: gather(codes, k, from),
                d: gather(d, groups, from),
                m: gather(m, groups, from),
            },
        };
        Self { weight, ..self }
    }
}

/// Decodes GGUF blocks of a `[n, k]` Q4_1 or Q8_0 tensor (32 weights a block, along `k`) into
/// codes and per-block scales, as candle's dequantisation reads them.
fn decode_blocks(dtype: GgmlDType, bytes: &[u8], n: usize, k: usize) -> Result<Quantized> {
    let blocks = n * k / 32;
    let bad = |what: &str| EngineError::Load(format!("{what} tensor of shape [{n}, {k}] has {} bytes", bytes.len()));
    if !k.is_multiple_of(32) {
        return Err(bad("a quantised"));
    }
    let half = |b: &[u8]| f16::from_le_bytes([b[0], b[1]]);
    match dtype {
        GgmlDType::Q4_1 => {
            if bytes.len() != blocks * 20 {
                return Err(bad("a Q4_1"));
            }
            let (mut codes, mut d, mut m) = (Vec::with_capacity(n * k), Vec::with_capacity(blocks), Vec::new());
            for block in bytes.chunks_exact(20) {
                d.push(half(&block[0..2]));
                m.push(half(&block[2..4]));
                let qs = &block[4..20];
                codes.extend(qs.iter().map(|q| q & 0x0F));
                codes.extend(qs.iter().map(|q| q >> 4));
            }
            Ok(Quantized::Int4 { codes, d, m })
        }
        GgmlDType::Q8_0 => {
            if bytes.len() != blocks * 34 {
                return Err(bad("a Q8_0"));
            }
            let (mut codes, mut scales) = (Vec::with_capacity(n * k), Vec::with_capacity(blocks));
            for block in bytes.chunks_exact(34) {
                scales.push(half(&block[0..2]).to_f32());
                codes.extend(block[2..].iter().map(|&q| q as i8));
            }
            Ok(Quantized::Int8 { codes, scales })
        }
        other => Err(EngineError::Load(format!("no packed CPU format keeps {other:?} exactly"))),
    }
}

/// The row order [`unpermute_rope_rows`] makes: HF row `r` is GGUF row `from[r]`.
fn unpermuted_row_order(rows: usize, heads: usize) -> Vec<usize> {
    let head_dim = rows / heads;
    let half = head_dim / 2;
    (0..rows)
        .map(|r| {
            let (h, within) = (r / head_dim, r % head_dim);
            let (pair, i) = (within / half, within % half);
            h * head_dim + i * 2 + pair
        })
        .collect()
}

/// GGUF stores Q and K rows permuted so that RoPE can rotate adjacent pairs; this undoes it:
/// `[heads, head_dim/2, 2, in] → [heads, 2, head_dim/2, in]`, back to the half-split layout.
fn unpermute_rope_rows(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    let half = out / heads / 2;
    Ok(w.reshape((heads, half, 2, inp))?.transpose(1, 2)?.contiguous()?.reshape((out, inp))?)
}

/// The GGUF name of a weight given its Hugging Face name.
fn gguf_name(hf_name: &str) -> Option<String> {
    let fixed = match hf_name {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(n) = fixed {
        return Some(n.to_string());
    }
    let rest = hf_name.strip_prefix("model.layers.")?;
    let (layer, name) = rest.split_once('.')?;
    let suffix = match name {
        "input_layernorm.weight" => "attn_norm.weight",
        "self_attn.q_proj.weight" => "attn_q.weight",
        "self_attn.k_proj.weight" => "attn_k.weight",
        "self_attn.v_proj.weight" => "attn_v.weight",
        "self_attn.o_proj.weight" => "attn_output.weight",
        "post_attention_layernorm.weight" => "ffn_norm.weight",
        "mlp.gate_proj.weight" => "ffn_gate.weight",
        "mlp.up_proj.weight" => "ffn_up.weight",
        "mlp.down_proj.weight" => "ffn_down.weight",
        _ => return None,
    };
    Some(format!("blk.{layer}.{suffix}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gguf_names_map_from_hf_names() {
        assert_eq!(gguf_name("model.layers.12.self_attn.k_proj.weight").as_deref(), Some("blk.12.attn_k.weight"));
        assert_eq!(gguf_name("model.embed_tokens.weight").as_deref(), Some("token_embd.weight"));
        assert_eq!(gguf_name("model.layers.0.mystery.weight"), None);
    }

    #[test]
    fn unpermute_inverts_the_gguf_permutation() -> Result<()> {
        // 2 heads of dim 4, 3 inputs: HF rows 0..8; GGUF's permutation is
        // reshape(heads, 2, hd/2, in).swap(1, 2).
        let hf = Tensor::arange(0f32, 24., &Device::Cpu)?.reshape((8, 3))?;
        let gguf = hf.reshape((2, 2, 2, 3))?.transpose(1, 2)?.contiguous()?.reshape((8, 3))?;
        let back = unpermute_rope_rows(&gguf, 2)?;
        assert_eq!(back.to_vec2::<f32>()?, hf.to_vec2::<f32>()?);
        // The row order used on quantised weights is the same permutation.
        let order = unpermuted_row_order(8, 2);
        let rows = gguf.to_vec2::<f32>()?;
        let gathered: Vec<Vec<f32>> = order.iter().map(|&r| rows[r].clone()).collect();
        assert_eq!(gathered, hf.to_vec2::<f32>()?);
        Ok(())
    }

    #[test]
    fn stacking_needs_one_format_and_width() {
        let int8 = |n: usize, k: usize| QuantizedWeight {
            weight: Quantized::Int8 { codes: vec![1; n * k], scales: vec![0.5; n * k / 32] },
            n,
            k,
        };
        let int4 = QuantizedWeight {
            weight: Quantized::Int4 { codes: vec![1; 64], d: vec![f16::ONE; 2], m: vec![f16::ZERO; 2] },
            n: 2,
            k: 32,
        };
        let both = QuantizedWeight::stack(vec![int8(2, 32), int8(3, 32)]).unwrap();
        assert_eq!((both.n, both.k), (5, 32));
        assert!(QuantizedWeight::stack(vec![int8(2, 32), int8(2, 64)]).is_none(), "widths differ");
        assert!(QuantizedWeight::stack(vec![int8(2, 32), int4]).is_none(), "formats differ");
    }
}
