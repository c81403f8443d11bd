//! `ModelRunner`: turns a scheduler `Batch` into the model's packed inputs, runs the step, and
//! returns the logits of the rows to sample.

use candle_core::{DType, Device, Tensor};

use super::llama::{LayerCache, Llama, StepInput};
use crate::error::{EngineError, Result};
use crate::scheduler::{Batch, Scheduler};

/// The model plus its KV cache pools.
#[derive(Debug)]
pub struct ModelRunner {
    model: Llama,
    cache: Vec<LayerCache>,
    block_size: usize,
}

/// Logits of one step: row `i` belongs to the `i`-th sampling sequence of the batch.
#[derive(Debug)]
pub struct StepLogits {
    /// `[num_sampled, vocab]`, f32, on the host.
    pub rows: Vec<Vec<f32>>,
}

impl ModelRunner {
    /// Wraps a loaded model and allocates `num_blocks` KV blocks of `block_size` tokens of `kv_dtype`
    /// per layer.
    pub fn new(model: Llama, num_blocks: usize, block_size: usize, kv_dtype: DType) -> Result<Self> {
        let cache = model.allocate_cache(num_blocks, block_size, kv_dtype)?;
        Ok(Self { model, cache, block_size })
    }

    /// The model.
    pub fn model(&self) -> &Llama {
        &self.model
    }

    /// Runs `batch` (whose sequences are in `scheduler`, with blocks for all their new tokens).
    pub fn execute(&mut self, batch: &Batch, scheduler: &Scheduler) -> Result<StepLogits> {
        let input = self.prepare(batch, scheduler)?;
        // On the CPU the step runs on a rayon worker, so that the kernels' parallel loops fork
        // inside the pool rather than each being handed over from this thread, which then sleeps
        // until the loop is done (a wake-up per loop, dozens per layer).
        let logits = if self.model.device().is_cpu() {
            rayon::scope(|_| self.model.forward(&input, &self.cache))?
        } else {
            self.model.forward(&input, &self.cache)?
        };
        let rows = if batch.seqs.iter().any(|s| s.sample) { logits.to_vec2::<f32>()? } else { Vec::new() };
        Ok(StepLogits { rows })
    }

    fn prepare(&self, batch: &Batch, scheduler: &Scheduler) -> Result<StepInput> {
        let n = batch.num_tokens;
        let mut token_ids = Vec::with_capacity(n);
        let mut positions = Vec::with_capacity(n);
        let mut slot_mapping = Vec::with_capacity(n);
        let mut cu_seqlens_q = Vec::with_capacity(batch.seqs.len() + 1);
        let mut seq_lens = Vec::with_capacity(batch.seqs.len());
        let mut sample_rows = Vec::new();
        let mut tables: Vec<&[u32]> = Vec::with_capacity(batch.seqs.len());
        cu_seqlens_q.push(0u32);
        for s in &batch.seqs {
            let seq = scheduler
                .sequence(s.id)
                .ok_or_else(|| EngineError::Model(format!("scheduled sequence {} is unknown", s.id)))?;
            let table = &seq.block_table;
            for pos in s.start..s.start + s.len {
                token_ids.push(seq.token_ids[pos]);
                positions.push(pos as u32);
                let slot = table
                    .slot(pos, self.block_size)
                    .ok_or_else(|| EngineError::Model(format!("sequence {} has no block for position {pos}", s.id)))?;
                slot_mapping.push(slot);
            }
            cu_seqlens_q.push(token_ids.len() as u32);
            seq_lens.push((s.start + s.len) as u32);
            if s.sample {
                sample_rows.push(token_ids.len() as u32 - 1);
            }
            tables.push(table.blocks());
        }
        if sample_rows.is_empty() {
            // The forward always gathers at least one row; it is thrown away.
            sample_rows.push(0);
        }
        let max_blocks = tables.iter().map(|t| t.len()).max().unwrap_or(0).max(1);
        let mut block_tables = vec![0u32; tables.len() * max_blocks];
        for (row, t) in block_tables.chunks_mut(max_blocks).zip(&tables) {
            row[..t.len()].copy_from_slice(t);
        }
        let dev = self.model.device();
        let u32s = |v: Vec<u32>, dev: &Device| -> Result<Tensor> {
            let len = v.len();
            Ok(Tensor::from_vec(v, len, dev)?)
        };
        Ok(StepInput {
            token_ids: u32s(token_ids, dev)?,
            positions: u32s(positions, dev)?,
            slot_mapping: u32s(slot_mapping, dev)?,
            block_tables: Tensor::from_vec(block_tables, (tables.len(), max_blocks), dev)?,
            cu_seqlens_q: u32s(cu_seqlens_q, dev)?,
            seq_lens: u32s(seq_lens, dev)?,
            sample_rows: u32s(sample_rows, dev)?,
        })
    }
}
