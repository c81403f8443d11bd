//! `ModelRunner`: turns a scheduler `Batch` into the model's packed inputs, runs the step, and
//! returns what the sampler needs of the rows to sample: their logits, only their argmax when
//! every one is plain greedy, or each row's head (most likely tokens and softmax sums).

use candle_core::{DType, Tensor};
use sluice_kernels::sampling::{split_row, top_candidates, MAX_CANDIDATES};

use super::graphs::{DecodeGraphs, GraphCounts};
use super::llama::{LayerCache, Llama, StepInput};
use super::readout::{
    check_argmax, check_heads, device_argmax, readable, DeviceSampling, Readout, StepLogits, HEAD_SIZE,
};
use crate::error::{EngineError, Result};
use crate::sampling::RowHead;
use crate::scheduler::{Batch, Scheduler};

/// The model plus its KV cache pools.
#[derive(Debug)]
pub struct ModelRunner {
    model: Llama,
    cache: Vec<LayerCache>,
    block_size: usize,
    // Whether sampled rows are read back as argmaxes and heads (else as whole rows).
    device_sampling: bool,
    // Whether heads may be read: device sampling is on and `top_candidates` passed its check on
    // this device (see `check_heads`).
    heads: bool,
    // Decode steps at fixed batch sizes, replayed as CUDA graphs (see `graphs`), when asked for.
    graphs: Option<DecodeGraphs>,
    // What `graphs` had done when it was dropped after a failed capture.
    graph_counts: GraphCounts,
}

impl ModelRunner {
    /// Wraps a loaded model and allocates `num_blocks` KV blocks of `block_size` tokens of `kv_dtype`
    /// per layer.
    pub fn new(model: Llama, num_blocks: usize, block_size: usize, kv_dtype: DType) -> Result<Self> {
        let cache = model.allocate_cache(num_blocks, block_size, kv_dtype)?;
        let device_sampling = !model.device().is_cpu();
        // Until `with_device_sampling` checks the kernels, argmaxes are taken on the device
        // unchecked (off the CPU) and heads are not read at all.
        let heads = false;
        Ok(Self {
            model,
            cache,
            block_size,
            device_sampling,
            heads,
            graphs: None,
            graph_counts: GraphCounts::default(),
        })
    }

    /// Runs decode steps of up to `max_num_seqs` sequences (whose block tables hold at most
    /// `max_blocks_per_seq` blocks) padded to fixed batch sizes, replayed as CUDA graphs on CUDA;
    /// on the CPU the padded steps run eagerly (which only tests the padding). Call it after
    /// [`ModelRunner::with_device_sampling`]: without device sampling the steps take no argmax.
    pub fn with_decode_graphs(mut self, max_num_seqs: usize, max_blocks_per_seq: usize) -> Result<Self> {
        let graphs = DecodeGraphs::new(&self.model, max_num_seqs, max_blocks_per_seq, self.block_size)?;
        // Without device sampling (asked for, or `argmax_rows` failed its check) greedy rows are
        // read whole: the graphs need no argmax.
        self.graphs = Some(if self.device_sampling { graphs } else { graphs.without_argmax() });
        Ok(self)
    }

    /// On CUDA with decode graphs: captures every bucket now (see [`DecodeGraphs::capture_all`]),
    /// on the thread that will run the steps; returns how many. If a capture fails, graphs are
    /// off from then on and steps run eagerly.
    pub fn capture_decode_graphs(&mut self) -> Result<usize> {
        let Some(graphs) = self.graphs.as_mut() else { return Ok(0) };
        let captured = graphs.capture_all(&self.model, &self.cache);
        if graphs.failed() {
            self.graph_counts = graphs.counts();
            self.graphs = None;
        }
        captured
    }

    /// What the decode-graph path has done (all zeros when it is off).
    pub fn graph_counts(&self) -> GraphCounts {
        self.graphs.as_ref().map_or(self.graph_counts, DecodeGraphs::counts)
    }

    /// Sets where sampled rows are read (by default as [`DeviceSampling::Auto`]).
    pub fn with_device_sampling(mut self, policy: DeviceSampling) -> Self {
        let asked = match policy {
            DeviceSampling::Auto => !self.model.device().is_cpu(),
            DeviceSampling::Device => true,
            DeviceSampling::Host => false,
        };
        self.device_sampling = asked && check_argmax(self.model.device(), self.model.vocab_size());
        self.heads = self.device_sampling && check_heads(self.model.device(), self.model.vocab_size());
        self
    }

    /// Whether a step whose sampled rows are all plain greedy should ask for [`Readout::Argmax`].
    pub fn device_sampling(&self) -> bool {
        self.device_sampling
    }

    /// Whether a step with other sampled rows should ask for [`Readout::Heads`] (else
    /// [`Readout::Logits`]).
    pub fn device_heads(&self) -> bool {
        self.heads
    }

    /// Tokens per row of a [`Readout::Heads`] step: [`HEAD_SIZE`], or the vocabulary if smaller.
    pub fn head_size(&self) -> usize {
        HEAD_SIZE.min(self.model.vocab_size()).min(MAX_CANDIDATES)
    }

    /// The model.
    pub fn model(&self) -> &Llama {
        &self.model
    }

    /// Runs `batch` (whose sequences are in `scheduler`, with blocks for all their new tokens) and
    /// reads its sampled rows back as `readout` asks (nothing when no row is sampled).
    pub fn execute(&mut self, batch: &Batch, scheduler: &Scheduler, readout: Readout) -> Result<StepLogits> {
        if let Some(graphs) = self.graphs.as_mut().filter(|g| g.fits(batch, scheduler)) {
            let out = graphs.run(&self.model, &self.cache, batch, scheduler, readout == Readout::Argmax);
            if graphs.failed() {
                // Padded eager steps only cost more than the plain ones.
                self.graph_counts = graphs.counts();
                self.graphs = None;
            }
            // The graph's outputs are views of larger buffers: compact what is read back whole.
            let (logits, ids) = out?;
            let (logits, ids) = match readout {
                Readout::Logits => (readable(&logits)?, None),
                Readout::Argmax => (logits, ids.map(|ids| readable(&ids)).transpose()?),
                Readout::Heads { .. } => (logits, None),
            };
            return self.read(&logits, ids.as_ref(), &readout);
        }
        let input = self.prepare(batch, scheduler)?;
        // On the CPU the step runs on a rayon worker, so that the kernels' parallel loops fork
        // inside the pool rather than each being handed over from this thread, which then sleeps
        // until the loop is done (a wake-up per loop, dozens per layer).
        let logits = if self.model.device().is_cpu() {
            rayon::scope(|_| self.model.forward(&input, &self.cache))?
        } else {
            self.model.forward(&input, &self.cache)?
        };
        if !batch.seqs.iter().any(|s| s.sample) {
            return Ok(StepLogits::Rows(Vec::new()));
        }
        self.read(&logits, None, &readout)
    }

    /// `logits` (`[num_sampled, vocab]` f32, where the step left them) as `readout` asks; `ids`,
    /// when given, are their argmaxes already taken. What is read back whole must be compact.
    fn read(&self, logits: &Tensor, ids: Option<&Tensor>, readout: &Readout) -> Result<StepLogits> {
        Ok(match readout {
            Readout::Logits => StepLogits::Rows(logits.to_vec2::<f32>()?),
            Readout::Argmax => StepLogits::Ids(match ids {
                Some(ids) => ids.to_vec1::<u32>()?,
                None => device_argmax(logits)?.to_vec1::<u32>()?,
            }),
            Readout::Heads { k, inv_temps } => {
                let inv_temps = Tensor::from_slice(inv_temps, inv_temps.len(), logits.device())?;
                let out = top_candidates(logits, &inv_temps, *k)?.to_vec2::<f32>()?;
                let heads = out
                    .iter()
                    .map(|row| {
                        let (top, sum_exp, sum_exp_t) = split_row(row, *k);
                        RowHead { top, sum_exp, sum_exp_t }
                    })
                    .collect();
                StepLogits::Heads { heads, logits: logits.clone() }
            }
        })
    }

    fn prepare(&self, batch: &Batch, scheduler: &Scheduler) -> Result<StepInput> {
        let HostStep { token_ids, positions, slot_mapping, cu_seqlens_q, seq_lens, mut sample_rows, tables } =
            HostStep::new(batch, scheduler, self.block_size)?;
        if sample_rows.is_empty() {
            // The forward computes the LM head for at least one row; it is thrown away.
            sample_rows.push(0);
        }
        let every_row_sampled = is_every_row(&sample_rows, token_ids.len());
        let (block_tables, max_blocks) = block_tables(&tables, tables.len());
        // One upload for all of it (off the CPU each upload is an allocation and a copy), then
        // views: the ops read a tensor's elements from its layout's offset.
        let parts = [token_ids, positions, slot_mapping, block_tables, cu_seqlens_q, seq_lens, sample_rows];
        let lens: Vec<usize> = parts.iter().map(Vec::len).collect();
        let all = Tensor::from_vec(parts.concat(), lens.iter().sum::<usize>(), self.model.device())?;
        let mut views = Vec::with_capacity(parts.len());
        let mut at = 0;
        for len in lens {
            views.push(all.narrow(0, at, len)?);
            at += len;
        }
        let [token_ids, positions, slot_mapping, block_tables, cu_seqlens_q, seq_lens, sample_rows] =
            <[Tensor; 7]>::try_from(views).map_err(|_| EngineError::Model("step metadata: seven parts".into()))?;
        Ok(StepInput {
            token_ids,
            positions,
            slot_mapping,
            block_tables: block_tables.reshape((tables.len(), max_blocks))?,
            cu_seqlens_q,
            seq_lens,
            sample_rows,
            every_row_sampled,
        })
    }
}

/// A step's packed inputs on the host, before they are laid out for the device.
pub(super) struct HostStep<'a> {
    /// The tokens, sequence after sequence.
    pub token_ids: Vec<u32>,
    /// Each token's position in its sequence.
    pub positions: Vec<u32>,
    /// The cache slot each token's K/V is written to.
    pub slot_mapping: Vec<u32>,
    /// `num_seqs + 1` row offsets.
    pub cu_seqlens_q: Vec<u32>,
    /// Each sequence's context length after the step.
    pub seq_lens: Vec<u32>,
    /// The rows whose logits are wanted (each sampling sequence's last).
    pub sample_rows: Vec<u32>,
    /// Each sequence's block table.
    pub tables: Vec<&'a [u32]>,
}

impl<'a> HostStep<'a> {
    /// `batch`'s inputs, from its sequences in `scheduler` (blocks of `block_size` tokens).
    pub fn new(batch: &Batch, scheduler: &'a Scheduler, block_size: usize) -> Result<Self> {
        let (n, seqs) = (batch.num_tokens, batch.seqs.len());
        let mut step = Self {
            token_ids: Vec::with_capacity(n),
            positions: Vec::with_capacity(n),
            slot_mapping: Vec::with_capacity(n),
            cu_seqlens_q: Vec::with_capacity(seqs + 1),
            seq_lens: Vec::with_capacity(seqs),
            sample_rows: Vec::new(),
            tables: Vec::with_capacity(seqs),
        };
        step.cu_seqlens_q.push(0u32);
        for s in &batch.seqs {
            let seq = scheduler
                .sequence(s.id)
                .ok_or_else(|| EngineError::Model(format!("scheduled sequence {} is unknown", s.id)))?;
            let table = &seq.block_table;
            for pos in s.start..s.start + s.len {
                step.token_ids.push(seq.token_ids[pos]);
                step.positions.push(pos as u32);
                let slot = table
                    .slot(pos, block_size)
                    .ok_or_else(|| EngineError::Model(format!("sequence {} has no block for position {pos}", s.id)))?;
                step.slot_mapping.push(slot);
            }
            step.cu_seqlens_q.push(step.token_ids.len() as u32);
            step.seq_lens.push((s.start + s.len) as u32);
            if s.sample {
                step.sample_rows.push(step.token_ids.len() as u32 - 1);
            }
            step.tables.push(table.blocks());
        }
        Ok(step)
    }
}

/// Whether `sample_rows` is `0..num_tokens`, in order.
fn is_every_row(sample_rows: &[u32], num_tokens: usize) -> bool {
    sample_rows.iter().copied().eq(0..num_tokens as u32)
}

/// `tables` as `rows` rows (those past `tables` zeros) as wide as the longest (at least 1), and
/// that width.
pub(super) fn block_tables(tables: &[&[u32]], rows: usize) -> (Vec<u32>, usize) {
    let width = tables.iter().map(|t| t.len()).max().unwrap_or(0).max(1);
    let mut flat = vec![0u32; rows * width];
    for (row, t) in flat.chunks_mut(width).zip(tables) {
        row[..t.len()].copy_from_slice(t);
    }
    (flat, width)
}

#[cfg(test)]
mod tests {
    use super::is_every_row;

    #[test]
    fn every_row_means_each_row_once_in_order() {
        assert!(is_every_row(&[0], 1) && is_every_row(&[0, 1, 2], 3));
        // A prefill's last row, a row left out, rows out of order, a row past the end.
        assert!(!is_every_row(&[4], 5) && !is_every_row(&[0, 2], 3) && !is_every_row(&[1, 0], 2));
        assert!(!is_every_row(&[0, 1], 1) && !is_every_row(&[0], 2));
    }
}
