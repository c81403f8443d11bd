//! Decode steps at fixed batch sizes, replayed on CUDA as graphs.
//!
//! At small batch a decode step is bound by the host, not the GPU: a few hundred kernel launches,
//! each with candle's bookkeeping around it, take longer to issue than the GPU takes to run them.
//! A CUDA graph records a step's launches once and replays them with one call, as vLLM does
//! (`vllm/worker/model_runner.py`, `CUDAGraphRunner`). That needs a step whose shapes and device
//! addresses never change, so here a decode step (every sequence runs one token and samples) is
//! padded to a *bucket* batch size ([`bucket_for`]) and its inputs live in buffers allocated once:
//!
//! - `meta` holds the bucket's token ids, positions, slots, context lengths, sampled rows and
//!   `cu_seqlens_q` back to back; `tables` the block tables, as wide as the longest sequence the
//!   engine admits. Each step writes them before the replay (two small copies).
//! - Padding rows run token 0 at position 0 with the padding slot ([`sluice_kernels::PAD_SLOT`]:
//!   nothing is stored) over one position of block 0; their logits are never read.
//! - The step writes its logits and their argmax into `logits` and `ids`, which outlive it; every
//!   tensor made during the step is freed inside the graph.
//!
//! The first step of a bucket runs eagerly (loading kernels and filling candle's cache of layout
//! uploads, which a capture may not do) and its result is used; the bucket is then captured, and
//! its later steps replay. If a capture fails, graphs are turned off and steps run as before.
//!
//! On the CPU there is nothing to capture: the same padded steps run eagerly, which tests the
//! padding and the buffers (the CPU kernels give a row the same bits at any batch size, so the
//! tokens must be exactly those of the unpadded path).

use std::collections::HashMap;

use candle_core::{DType, Tensor};
use sluice_kernels::PAD_SLOT;

use super::llama::{LayerCache, Llama, StepInput};
use super::readout::device_argmax;
use super::runner::{block_tables, HostStep};
use crate::error::{EngineError, Result};
use crate::scheduler::{Batch, Scheduler};

/// The largest bucket; larger decode steps run eagerly (and are bound by the GPU, not launches).
pub const MAX_GRAPH_BATCH: usize = 512;

/// The bucket a decode step of `n` sequences is padded to: 1, 2 or 4, then a multiple of 8 (as
/// vLLM's capture sizes), so a step has at most 7 padding rows.
pub fn bucket_for(n: usize) -> usize {
    if n <= 4 {
        n.next_power_of_two()
    } else {
        n.div_ceil(8) * 8
    }
}

/// Counters of the decode-graph path, for stats and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GraphCounts {
    /// Buckets captured as graphs.
    pub captured: u64,
    /// Steps replayed from a graph.
    pub replayed: u64,
    /// Padded steps run eagerly (each bucket's first step; every step on the CPU).
    pub eager: u64,
}

/// The padded decode path: its buffers, one graph per captured bucket, and its counters.
#[derive(Debug)]
pub struct DecodeGraphs {
    /// Largest bucket served.
    max_batch: usize,
    /// Columns of the block tables.
    width: usize,
    /// Tokens per KV block.
    block_size: usize,
    /// `[6 * max_batch + 1]` u32: see [`DecodeGraphs::step_input`].
    meta: Tensor,
    /// `[max_batch * width]` u32: the block tables, `width` per row.
    tables: Tensor,
    /// `[max_batch, vocab]` f32: a captured or replayed step's logits (no rows when nothing is
    /// captured).
    logits: Tensor,
    /// `[max_batch]` u32: their argmax.
    ids: Tensor,
    /// Whether a captured step takes the argmax (off when greedy rows are read whole, see
    /// [`DecodeGraphs::without_argmax`]).
    argmax: bool,
    graphs: HashMap<usize, capture::Graph>,
    /// Whether buckets are captured (on CUDA, until a capture fails).
    capture: bool,
    capture_failed: bool,
    counts: GraphCounts,
}

impl DecodeGraphs {
    /// Buffers for decode steps of up to `max_num_seqs` sequences (capped at [`MAX_GRAPH_BATCH`])
    /// over block tables of up to `max_blocks_per_seq` blocks of `block_size` tokens, on `model`'s
    /// device.
    pub fn new(model: &Llama, max_num_seqs: usize, max_blocks_per_seq: usize, block_size: usize) -> Result<Self> {
        let max_batch = bucket_for(max_num_seqs.clamp(1, MAX_GRAPH_BATCH));
        let width = max_blocks_per_seq.max(1);
        let dev = model.device();
        let capture = dev.is_cuda();
        // Only a capture writes its outputs into buffers; eager padded steps return their own.
        let out_rows = if capture { max_batch } else { 0 };
        Ok(Self {
            max_batch,
            width,
            block_size,
            meta: Tensor::zeros(6 * max_batch + 1, DType::U32, dev)?,
            tables: Tensor::zeros(max_batch * width, DType::U32, dev)?,
            logits: Tensor::zeros((out_rows, model.vocab_size()), DType::F32, dev)?,
            ids: Tensor::zeros(out_rows, DType::U32, dev)?,
            argmax: true,
            graphs: HashMap::new(),
            capture,
            capture_failed: false,
            counts: GraphCounts::default(),
        })
    }

    /// Captured steps leave the argmax out (for a runner that reads greedy rows whole: one launch
    /// fewer a step, and a step that does not depend on `argmax_rows`); [`DecodeGraphs::run`] then
    /// gives no ids.
    pub fn without_argmax(mut self) -> Self {
        self.argmax = false;
        self
    }

    /// What the path has done so far.
    pub fn counts(&self) -> GraphCounts {
        self.counts
    }

    /// Whether a capture failed (graphs are then off; the runner stops using this path on CUDA).
    pub fn failed(&self) -> bool {
        self.capture_failed
    }

    /// Whether `batch` is a decode step this path serves: every sequence runs one token and samples
    /// it, there are at most `max_batch` of them, and every block table fits.
    pub fn fits(&self, batch: &Batch, scheduler: &Scheduler) -> bool {
        !batch.seqs.is_empty()
            && batch.seqs.len() <= self.max_batch
            && batch.seqs.iter().all(|s| {
                s.len == 1
                    && s.sample
                    && scheduler.sequence(s.id).is_some_and(|seq| seq.block_table.len() <= self.width)
            })
    }

    /// Runs `batch` (which [`DecodeGraphs::fits`]) padded to its bucket: replays the bucket's graph,
    /// or runs the step eagerly and then captures it. Returns the batch's `[n, vocab]` f32 logits
    /// and, when `want_ids` (or a graph gave them anyway) and the argmax is on, their `[n]`
    /// argmaxes; both may be views of buffers the next step overwrites.
    pub fn run(
        &mut self,
        model: &Llama,
        cache: &[LayerCache],
        batch: &Batch,
        scheduler: &Scheduler,
        want_ids: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let n = batch.seqs.len();
        let bucket = bucket_for(n);
        self.write_inputs(batch, scheduler, bucket)?;
        if let Some(graph) = self.graphs.get(&bucket) {
            match graph.launch() {
                Ok(()) => {
                    self.counts.replayed += 1;
                    return Ok((self.logits.narrow(0, 0, n)?, self.captured_ids(n)?));
                }
                Err(e) => self.give_up(bucket, &e),
            }
        }
        let out = if self.capture {
            // Eagerly, exactly as the capture will record it, with candle's layout uploads cached so
            // that the capture finds them on the device.
            {
                let _uploads = capture::cache_uploads(model.device());
                self.step_into_buffers(model, cache, bucket)?;
            }
            match self.record(model, cache, bucket) {
                Ok(graph) => {
                    tracing::info!(bucket, "decode step captured as a CUDA graph");
                    self.graphs.insert(bucket, graph);
                    self.counts.captured += 1;
                }
                Err(e) => self.give_up(bucket, &e),
            }
            (self.logits.narrow(0, 0, n)?, self.captured_ids(n)?)
        } else {
            let logits = model.forward(&self.step_input(bucket)?, cache)?;
            let ids = if want_ids && self.argmax { Some(device_argmax(&logits)?.narrow(0, 0, n)?) } else { None };
            (logits.narrow(0, 0, n)?, ids)
        };
        self.counts.eager += 1;
        Ok(out)
    }

    /// Captures every bucket up to the largest, each from a step of padding rows only (which
    /// stores nothing in the cache), so that no request meets a capture later; returns how many
    /// were captured. If a bucket fails (its step or its capture: out of memory, say), the buckets
    /// below it keep their graphs and larger decode steps run unpadded and eagerly; if the first
    /// fails, graphs are off (as after a failed capture in [`DecodeGraphs::run`]). Nothing to do
    /// off CUDA. Must run on the thread that will replay the graphs.
    pub fn capture_all(&mut self, model: &Llama, cache: &[LayerCache]) -> Result<usize> {
        let (mut captured, mut last_ok) = (0, 0);
        let mut bucket = 1;
        while self.capture && bucket <= self.max_batch {
            if !self.graphs.contains_key(&bucket) {
                match self.capture_padding_step(model, cache, bucket) {
                    Ok(graph) => {
                        self.graphs.insert(bucket, graph);
                        self.counts.captured += 1;
                        captured += 1;
                    }
                    Err(e) if last_ok > 0 => {
                        tracing::warn!(
                            bucket,
                            error = %e,
                            largest = last_ok,
                            "a decode graph failed at start-up; larger decode steps run eagerly"
                        );
                        self.max_batch = last_ok;
                        break;
                    }
                    Err(e) => {
                        self.give_up(bucket, &e);
                        break;
                    }
                }
            }
            last_ok = bucket;
            bucket = bucket_for(bucket + 1);
        }
        Ok(captured)
    }

    /// The bucket's graph, captured after an eager step of padding rows (as [`DecodeGraphs::run`]
    /// runs a first step before its capture).
    fn capture_padding_step(&self, model: &Llama, cache: &[LayerCache], bucket: usize) -> Result<capture::Graph> {
        self.write_rows([&[]; 4], &[], bucket)?;
        {
            let _uploads = capture::cache_uploads(model.device());
            self.step_into_buffers(model, cache, bucket)?;
        }
        self.record(model, cache, bucket)
    }

    /// The `[bucket, vocab]` logits of a decode step of padding rows only, run eagerly: the step
    /// [`capture_all`] runs before each capture, which must store nothing in the cache.
    ///
    /// [`capture_all`]: DecodeGraphs::capture_all
    pub fn padding_step(&self, model: &Llama, cache: &[LayerCache], bucket: usize) -> Result<Tensor> {
        self.write_rows([&[]; 4], &[], bucket)?;
        model.forward(&self.step_input(bucket)?, cache)
    }

    /// Turns graphs off after a capture or replay failed: decode steps run eagerly from now on.
    fn give_up(&mut self, bucket: usize, e: &EngineError) {
        tracing::warn!(bucket, error = %e, "CUDA graph failed; decode steps run eagerly from now on");
        self.capture = false;
        self.capture_failed = true;
        self.graphs.clear();
    }

    /// The bucket's step on the fixed inputs, its logits and argmax written into the buffers
    /// that outlive it (every tensor it makes is dropped before it returns).
    fn step_into_buffers(&self, model: &Llama, cache: &[LayerCache], bucket: usize) -> Result<()> {
        let logits = model.forward(&self.step_input(bucket)?, cache)?;
        self.logits.slice_set(&logits, 0, 0)?;
        if self.argmax {
            self.ids.slice_set(&device_argmax(&logits)?, 0, 0)?;
        }
        Ok(())
    }

    /// The first `n` ids a captured step wrote, if it takes the argmax.
    fn captured_ids(&self, n: usize) -> Result<Option<Tensor>> {
        Ok(if self.argmax { Some(self.ids.narrow(0, 0, n)?) } else { None })
    }

    /// Captures the bucket's step ([`DecodeGraphs::step_into_buffers`]) without running it.
    fn record(&self, model: &Llama, cache: &[LayerCache], bucket: usize) -> Result<capture::Graph> {
        capture::record(model.device(), || self.step_into_buffers(model, cache, bucket))
    }

    /// The bucket's inputs as views into the buffers. `meta` holds, `bucket` entries each: token
    /// ids, positions, slots, context lengths, sampled rows; then `cu_seqlens_q` (`bucket + 1`).
    fn step_input(&self, bucket: usize) -> Result<StepInput> {
        let part = |i: usize, len: usize| self.meta.narrow(0, i * bucket, len);
        Ok(StepInput {
            token_ids: part(0, bucket)?,
            positions: part(1, bucket)?,
            slot_mapping: part(2, bucket)?,
            seq_lens: part(3, bucket)?,
            sample_rows: part(4, bucket)?,
            // `write_rows` sets them to 0..bucket.
            every_row_sampled: true,
            cu_seqlens_q: part(5, bucket + 1)?,
            block_tables: self.tables.narrow(0, 0, bucket * self.width)?.reshape((bucket, self.width))?,
        })
    }

    /// Writes `batch`'s rows, then padding, into the bucket's inputs: one copy for `meta` and one
    /// for as many table columns as the longest sequence uses.
    fn write_inputs(&self, batch: &Batch, scheduler: &Scheduler, bucket: usize) -> Result<()> {
        let step = HostStep::new(batch, scheduler, self.block_size)?;
        let n = step.seq_lens.len();
        if step.token_ids.len() != n || n > bucket {
            return Err(EngineError::Model(format!(
                "{} tokens of {n} sequences are no decode step",
                step.token_ids.len()
            )));
        }
        self.write_rows([&step.token_ids, &step.positions, &step.slot_mapping, &step.seq_lens], &step.tables, bucket)
    }

    /// Writes `n` rows (token ids, positions, slots and context lengths, `n` each; their block
    /// tables), then padding, into the bucket's inputs. With no rows the step is all padding: it
    /// stores nothing in the cache.
    fn write_rows(&self, rows: [&[u32]; 4], tables: &[&[u32]], bucket: usize) -> Result<()> {
        let n = rows[3].len();
        if rows.iter().any(|r| r.len() != n) || tables.len() != n || n > bucket {
            return Err(EngineError::Model(format!("{n} rows do not fit a decode step of {bucket}")));
        }
        let mut meta = vec![0u32; 6 * bucket + 1];
        for (i, part) in rows.into_iter().enumerate() {
            meta[i * bucket..i * bucket + n].copy_from_slice(part);
        }
        for i in 0..bucket {
            if i >= n {
                // Padding: token 0 at position 0, stored nowhere, attending to block 0's first slot.
                meta[2 * bucket + i] = PAD_SLOT;
                meta[3 * bucket + i] = 1;
            }
            meta[4 * bucket + i] = i as u32;
            meta[5 * bucket + i + 1] = i as u32 + 1;
        }
        let (rows, used) = block_tables(tables, bucket);
        if used > self.width {
            return Err(EngineError::Model(format!("a block table of {used} blocks is wider than {}", self.width)));
        }
        let dev = self.meta.device();
        let len = meta.len();
        self.meta.narrow(0, 0, len)?.slice_set(&Tensor::from_vec(meta, len, dev)?, 0, 0)?;
        let target = self.tables.narrow(0, 0, bucket * self.width)?.reshape((bucket, self.width))?;
        target.slice_set(&Tensor::from_vec(rows, (bucket, used), dev)?, 1, 0)?;
        Ok(())
    }
}

/// Graph capture on CUDA; without the `cuda` feature there is nothing to capture (and the runner
/// never asks, since the device is then the CPU).
#[cfg(feature = "cuda")]
mod capture {
    use std::thread::ThreadId;

    use candle_core::cuda_backend::cudarc::driver::sys::{
        CUgraphInstantiate_flags, CUstreamCaptureMode, CUstreamCaptureStatus,
    };
    use candle_core::cuda_backend::cudarc::driver::{result, CudaGraph};
    use candle_core::Device;

    use crate::error::{EngineError, Result};

    /// A captured step, and the thread that captured it: it was recorded on that thread's
    /// per-thread stream, and replays there only.
    pub struct Graph {
        graph: CudaGraph,
        thread: ThreadId,
    }

    // SAFETY: a CUDA graph may be used from any thread as long as no two threads use it at once
    // (the driver's graph thread-safety rules); `Graph` has no shared handle to it, so whoever owns
    // the `Graph` is its only user. `launch` refuses any thread but the capturing one.
    unsafe impl Send for Graph {}

    impl std::fmt::Debug for Graph {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "Graph({:?})", self.thread)
        }
    }

    impl Graph {
        /// Replays the step on its stream (asynchronously).
        pub fn launch(&self) -> Result<()> {
            if std::thread::current().id() != self.thread {
                return Err(EngineError::Model("a CUDA graph replays only on the thread that captured it".into()));
            }
            self.graph.launch().map_err(|e| EngineError::Model(format!("CUDA graph launch: {e}")))
        }
    }

    /// While the guard lives, candle keeps the small uploads its ops make (layouts) and reuses
    /// them, so a capture that follows the same ops finds them on the device.
    pub fn cache_uploads(device: &Device) -> Option<impl Sized> {
        device.as_cuda_device().ok().map(|d| d.enable_cuda_graph_htod_cache())
    }

    /// Records what `step` launches on `device`'s stream as a graph, without running it.
    pub fn record(device: &Device, step: impl FnOnce() -> Result<()>) -> Result<Graph> {
        let dev = device.as_cuda_device()?;
        let _uploads = dev.enable_cuda_graph_htod_cache();
        let stream = dev.cuda_stream();
        let err = |what: &str, e: &dyn std::fmt::Display| EngineError::Model(format!("CUDA graph {what}: {e}"));
        stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(|e| err("capture", &e))?;
        let recorded = step();
        // An error stored by a drop during the capture (a free on an invalidated capture) would
        // make `end_capture` return before ending it: take it first.
        let stored = stream.context().check_err();
        // No auto-free: everything the step allocates it frees, so a leak fails loudly at replay.
        let graph = stream.end_capture(CUgraphInstantiate_flags(0));
        if !matches!(stream.capture_status(), Ok(CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE)) {
            // Still capturing: end it by hand so the stream is usable again, and drop the graph.
            // SAFETY: the stream is candle's live stream, in capture mode; the graph returned (if
            // any) is ours alone and destroyed once.
            unsafe {
                if let Ok(g) = result::stream::end_capture(stream.cu_stream()) {
                    if !g.is_null() {
                        let _ = result::graph::destroy(g);
                    }
                }
            }
        }
        recorded?;
        stored.map_err(|e| err("capture", &e))?;
        let graph = graph.map_err(|e| err("instantiation", &e))?.ok_or_else(|| err("capture", &"nothing recorded"))?;
        graph.upload().map_err(|e| err("upload", &e))?;
        Ok(Graph { graph, thread: std::thread::current().id() })
    }
}

#[cfg(not(feature = "cuda"))]
mod capture {
    use candle_core::Device;

    use crate::error::{EngineError, Result};

    /// Never made: there is no graph without CUDA.
    #[derive(Debug)]
    pub enum Graph {}

    impl Graph {
        pub fn launch(&self) -> Result<()> {
            match *self {}
        }
    }

    pub fn cache_uploads(_device: &Device) -> Option<impl Sized> {
        None::<()>
    }

    pub fn record(_device: &Device, _step: impl FnOnce() -> Result<()>) -> Result<Graph> {
        Err(EngineError::Model("CUDA graphs need the `cuda` feature".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_every_size_with_little_padding() {
        assert_eq!((1..=9).map(bucket_for).collect::<Vec<_>>(), [1, 2, 4, 4, 8, 8, 8, 8, 16]);
        assert_eq!([17, 24, 25, 64, 65, 257, 512].map(bucket_for), [24, 24, 32, 64, 72, 264, 512]);
        for n in 1..=MAX_GRAPH_BATCH {
            let b = bucket_for(n);
            assert!(b >= n && b - n < 8 && bucket_for(b) == b, "{n} -> {b}");
        }
        let sizes: std::collections::BTreeSet<usize> = (1..=MAX_GRAPH_BATCH).map(bucket_for).collect();
        assert_eq!(sizes.len(), 3 + MAX_GRAPH_BATCH / 8, "1, 2, 4 and every multiple of 8");
    }
}
