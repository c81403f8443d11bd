//! The worker's sampling half: what a step reads back of its sampled rows ([`Readout`]), and how
//! each row's token is chosen from what came back (an argmax, a head of the distribution, or the
//! whole row).

use crate::error::{EngineError, Result};
use crate::model::{readable, Readout, StepLogits};
use crate::sampling::{RowHead, SampleContext, Sampled, Sampler, SamplingParams};
use crate::scheduler::Batch;
use crate::sequence::{RequestId, Sequence};

use super::{RequestState, Worker};

/// The tokens of one step's sampled rows.
pub(super) struct SampledStep {
    /// Each sampling sequence still known, with its choice, in batch order.
    pub tokens: Vec<(RequestId, Sampled)>,
    /// Requests whose token could not be chosen (a row not read back, a grammar that failed), with
    /// the error they end with.
    pub failed: Vec<(RequestId, EngineError)>,
    /// Where the tokens' rows came from.
    pub readouts: ReadoutCounts,
}

/// Tokens by where their row came from (the `sluice_sampled_tokens_total` labels), and rows
/// copied whole from the device.
#[derive(Default)]
pub(super) struct ReadoutCounts {
    pub device_argmax: u64,
    pub device_head: u64,
    pub host: u64,
    pub fetched_rows: u64,
}

impl Worker {
    /// With device sampling: [`Readout::Argmax`] when every row sampled in `batch` is plain greedy
    /// (so the sampler would only take the argmax), else [`Readout::Heads`] (when the runner's
    /// check of heads passed). Otherwise [`Readout::Logits`].
    pub(super) fn readout(&self, batch: &Batch) -> Readout {
        if !self.runner.device_sampling() {
            return Readout::Logits;
        }
        let rows: Vec<_> = batch
            .seqs
            .iter()
            .filter(|s| s.sample)
            // Gone (aborted): its row is not used.
            .map(|s| self.scheduler.sequence(s.id).zip(self.requests.get(&s.id)))
            .collect();
        let plain = |row: &Option<(&Sequence, &RequestState)>| match row {
            Some((seq, state)) => Sampler::is_plain_argmax(&state.params, &context(seq, &state.params, &self.eos)),
            None => true,
        };
        if rows.iter().all(plain) {
            return Readout::Argmax;
        }
        if !self.runner.device_heads() {
            return Readout::Logits;
        }
        let inv_temps = rows
            .iter()
            .map(|row| match row {
                Some((_, state)) if !state.params.is_greedy() => 1.0 / state.params.temperature,
                _ => 1.0,
            })
            .collect();
        Readout::Heads { k: self.runner.head_size(), inv_temps }
    }

    /// Chooses the token of every sampled row of `batch` from what the step read back.
    pub(super) fn sample_step(&mut self, batch: &Batch, logits: &StepLogits) -> SampledStep {
        let mut out = SampledStep {
            tokens: Vec::with_capacity(logits.len()),
            failed: Vec::new(),
            readouts: ReadoutCounts::default(),
        };
        let counts = &mut out.readouts;
        for (i, s) in batch.seqs.iter().filter(|s| s.sample).enumerate() {
            let (Some(seq), Some(state)) = (self.scheduler.sequence(s.id), self.requests.get_mut(&s.id)) else {
                continue;
            };
            // A structured output's tokens are chosen among those its grammar allows next.
            let allowed = match state.grammar.as_mut().map(|g| g.allowed()).transpose() {
                Ok(allowed) => allowed,
                Err(e) => {
                    out.failed.push((s.id, e));
                    continue;
                }
            };
            let mut ctx = context(seq, &state.params, &self.eos);
            ctx.allowed = allowed.as_deref();
            let choice = match logits {
                StepLogits::Rows(rows) => {
                    let Some(row) = rows.get(i) else { continue };
                    counts.host += 1;
                    state.sampler.sample(row, &state.params, &ctx)
                }
                // Only asked for when every row is plain greedy: the argmax is the sampler's choice.
                StepLogits::Ids(ids) => {
                    let Some(&token) = ids.get(i) else { continue };
                    counts.device_argmax += 1;
                    Sampled { token, logprob: None }
                }
                StepLogits::Heads { heads, logits } => {
                    let Some(head) = heads.get(i) else { continue };
                    match sample_from_head(state, head, logits, i, &ctx) {
                        Ok((choice, whole_row)) => {
                            if whole_row {
                                counts.host += 1;
                                counts.fetched_rows += 1;
                            } else {
                                counts.device_head += 1;
                            }
                            choice
                        }
                        Err(e) => {
                            out.failed
                                .push((s.id, EngineError::Model(format!("reading the step's logits failed: {e}"))));
                            continue;
                        }
                    }
                }
            };
            out.tokens.push((s.id, choice));
        }
        out
    }
}

/// The token of sampled row `i` of a [`StepLogits::Heads`] step: a plain greedy row's is the head's
/// first token (the sampler untouched, as for [`StepLogits::Ids`]); a row the head can serve is
/// sampled from it, and from its whole row (`logits[i]`, copied back) when the head does not
/// settle it; any other row goes through the host sampler on its whole row. Returns the choice and
/// whether the whole row was copied.
fn sample_from_head(
    state: &mut RequestState,
    head: &RowHead,
    logits: &candle_core::Tensor,
    i: usize,
    ctx: &SampleContext,
) -> Result<(Sampled, bool)> {
    let params = &state.params;
    if Sampler::is_plain_argmax(params, ctx) {
        let token = head.top.first().filter(|c| c.1 > f32::NEG_INFINITY).map_or(0, |c| c.0);
        return Ok((Sampled { token, logprob: None }, false));
    }
    let row = || -> Result<Vec<f32>> { Ok(readable(&logits.get(i)?)?.to_vec1::<f32>()?) };
    if !Sampler::samples_from_head(params, head.top.len()) {
        return Ok((state.sampler.sample(&row()?, params, ctx), true));
    }
    match state.sampler.sample_head(head, params, ctx) {
        Some(choice) => Ok((choice, false)),
        None => Ok((state.sampler.sample_row_after_head(&row()?, params, ctx), true)),
    }
}

/// What the sampler needs to know about `seq` besides its logits: its tokens, and EOS suppressed
/// while the output is shorter than `min_tokens`.
fn context<'a>(seq: &'a Sequence, params: &SamplingParams, eos: &'a [u32]) -> SampleContext<'a> {
    let suppress: &[u32] = if seq.num_output_tokens() < params.min_tokens { eos } else { &[] };
    SampleContext { prompt_tokens: seq.prompt_tokens(), output_tokens: seq.output_tokens(), suppress, allowed: None }
}
