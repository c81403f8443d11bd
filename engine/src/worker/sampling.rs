//! The worker's sampling half: what a step reads back of its sampled rows ([`Readout`]), and how
//! each row's token is chosen from what came back (an argmax, a head of the distribution, or the
//! whole row).

use std::collections::{HashMap, HashSet};

use candle_core::Tensor;

use crate::error::{EngineError, Result};
use crate::model::{Readout, StepLogits};
use crate::sampling::{SampleContext, Sampled, Sampler, SamplingParams};
use crate::scheduler::Batch;
use crate::sequence::{RequestId, Sequence};
use crate::structured::Constraint;

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

    /// Chooses the token of every sampled row of `batch` from what the step read back. Rows that
    /// need the host sampler on their whole row are copied from the device together (one read
    /// back) and sampled in parallel: each row's choice depends on its own request alone.
    pub(super) fn sample_step(&mut self, batch: &Batch, logits: &StepLogits) -> SampledStep {
        let mut out = SampledStep {
            tokens: Vec::with_capacity(logits.len()),
            failed: Vec::new(),
            readouts: ReadoutCounts::default(),
        };
        // A structured output's tokens are chosen among those its grammar allows next. The masks
        // first, in parallel: inside a JSON string one walks most of the token trie.
        let constrained: HashSet<RequestId> = batch
            .seqs
            .iter()
            .filter(|s| s.sample && self.requests.get(&s.id).is_some_and(|state| state.grammar.is_some()))
            .map(|s| s.id)
            .collect();
        let mut grammars: Vec<GrammarMask> = Vec::new();
        if !constrained.is_empty() {
            grammars.extend(
                self.requests.iter_mut().filter(|(id, _)| constrained.contains(id)).filter_map(|(id, state)| {
                    Some(GrammarMask { id: *id, grammar: state.grammar.as_mut()?, mask: None })
                }),
            );
        }
        if grammars.len() > 1 {
            use rayon::prelude::*;
            grammars.par_iter_mut().for_each(GrammarMask::compute);
        } else {
            grammars.iter_mut().for_each(GrammarMask::compute);
        }
        let mut masks: HashMap<RequestId, Result<Vec<u32>>> =
            grammars.into_iter().filter_map(|g| Some((g.id, g.mask?))).collect();
        // Then what the step read back settles (argmaxes, heads); the rest waits for its row.
        let mut rows: Vec<RowChoice> = Vec::with_capacity(logits.len());
        for (i, s) in batch.seqs.iter().filter(|s| s.sample).enumerate() {
            let (Some(seq), Some(state)) = (self.scheduler.sequence(s.id), self.requests.get_mut(&s.id)) else {
                continue;
            };
            let allowed = match masks.remove(&s.id).transpose() {
                Ok(allowed) => allowed,
                Err(e) => {
                    out.failed.push((s.id, e));
                    continue;
                }
            };
            let mut ctx = context(seq, &state.params, &self.eos);
            ctx.allowed = allowed.as_deref();
            let (params, sampler) = (&state.params, &mut state.sampler);
            let choice = match logits {
                StepLogits::Rows(_) => Choice::Row { after_head: false },
                // Only asked for when every row is plain greedy: the argmax is the sampler's choice.
                StepLogits::Ids(ids) => match ids.get(i) {
                    Some(&token) => Choice::Argmax(token),
                    None => continue,
                },
                StepLogits::Heads { heads, .. } => {
                    let Some(head) = heads.get(i) else { continue };
                    if Sampler::is_plain_argmax(params, &ctx) {
                        // The sampler untouched, as for `StepLogits::Ids`.
                        let token = head.top.first().filter(|c| c.1 > f32::NEG_INFINITY).map_or(0, |c| c.0);
                        Choice::Head(Sampled { token, logprob: None })
                    } else if !Sampler::samples_from_head(params, head.top.len()) {
                        Choice::Row { after_head: false }
                    } else {
                        match sampler.sample_head(head, params, &ctx) {
                            Some(choice) => Choice::Head(choice),
                            None => Choice::Row { after_head: true },
                        }
                    }
                }
            };
            rows.push(RowChoice { id: s.id, index: i, allowed, choice });
        }
        // The whole rows still needed: on the host already, or copied from the device at once.
        let fetched = match logits {
            StepLogits::Heads { logits, .. } => {
                let wanted: Vec<u32> = rows.iter().filter(|r| r.needs_row()).map(|r| r.index as u32).collect();
                fetch_rows(logits, &wanted).unwrap_or_else(|e| {
                    let error = format!("reading the step's logits failed: {e}");
                    for r in rows.iter().filter(|r| r.needs_row()) {
                        out.failed.push((r.id, EngineError::Model(error.clone())));
                    }
                    rows.retain(|r| !r.needs_row());
                    Vec::new()
                })
            }
            _ => Vec::new(),
        };
        let mut fetched = fetched.iter();
        let needed: HashSet<RequestId> = rows.iter().filter(|r| r.needs_row()).map(|r| r.id).collect();
        let mut states: HashMap<RequestId, (&mut Sampler, &SamplingParams)> = HashMap::new();
        if !needed.is_empty() {
            states.extend(
                self.requests
                    .iter_mut()
                    .filter(|(id, _)| needed.contains(id))
                    .map(|(id, state)| (*id, (&mut state.sampler, &state.params))),
            );
        }
        let mut tasks: Vec<HostRow> = Vec::new();
        for (r, row) in rows.iter().enumerate() {
            let Choice::Row { after_head } = row.choice else { continue };
            let logits = match logits {
                StepLogits::Rows(all) => all.get(row.index),
                _ => fetched.next(),
            };
            let (Some(logits), Some((sampler, params)), Some(seq)) =
                (logits, states.remove(&row.id), self.scheduler.sequence(row.id))
            else {
                continue;
            };
            let ctx = SampleContext { allowed: row.allowed.as_deref(), ..context(seq, params, &self.eos) };
            tasks.push(HostRow { row: r, sampler, params, ctx, logits, after_head, choice: None });
        }
        if tasks.len() > 1 {
            use rayon::prelude::*;
            tasks.par_iter_mut().for_each(HostRow::sample);
        } else {
            tasks.iter_mut().for_each(HostRow::sample);
        }
        let mut host: Vec<Option<Sampled>> = vec![None; rows.len()];
        for task in tasks {
            host[task.row] = task.choice;
        }
        let counts = &mut out.readouts;
        for (row, sampled) in rows.into_iter().zip(host) {
            let choice = match row.choice {
                Choice::Argmax(token) => {
                    counts.device_argmax += 1;
                    Sampled { token, logprob: None }
                }
                Choice::Head(choice) => {
                    counts.device_head += 1;
                    choice
                }
                Choice::Row { .. } => {
                    let Some(choice) = sampled else { continue };
                    counts.host += 1;
                    if matches!(logits, StepLogits::Heads { .. }) {
                        counts.fetched_rows += 1;
                    }
                    choice
                }
            };
            out.tokens.push((row.id, choice));
        }
        out
    }
}

/// A sampled row of a step: its request, its index among the step's sampled rows, its grammar's
/// mask, and how its token is chosen.
struct RowChoice {
    id: RequestId,
    index: usize,
    allowed: Option<Vec<u32>>,
    choice: Choice,
}

impl RowChoice {
    fn needs_row(&self) -> bool {
        matches!(self.choice, Choice::Row { .. })
    }
}

enum Choice {
    /// The device's argmax.
    Argmax(u32),
    /// Chosen from the row's head.
    Head(Sampled),
    /// The host sampler on the whole row; `after_head` when a walk over its head drew the number
    /// that the walk over the row continues with.
    Row { after_head: bool },
}

/// A sampled row's grammar and the mask of the tokens it allows next: one parallel task.
struct GrammarMask<'a> {
    id: RequestId,
    grammar: &'a mut Constraint,
    mask: Option<Result<Vec<u32>>>,
}

impl GrammarMask<'_> {
    fn compute(&mut self) {
        self.mask = Some(self.grammar.allowed());
    }
}

/// A row for the host sampler, with its request's sampler: one parallel task.
struct HostRow<'a> {
    /// Index in the step's `rows`.
    row: usize,
    sampler: &'a mut Sampler,
    params: &'a SamplingParams,
    ctx: SampleContext<'a>,
    logits: &'a [f32],
    after_head: bool,
    choice: Option<Sampled>,
}

impl HostRow<'_> {
    fn sample(&mut self) {
        self.choice = Some(if self.after_head {
            self.sampler.sample_row_after_head(self.logits, self.params, &self.ctx)
        } else {
            self.sampler.sample(self.logits, self.params, &self.ctx)
        });
    }
}

/// Rows `wanted` of `[rows, vocab]` logits on the device, copied to the host in one read back.
fn fetch_rows(logits: &Tensor, wanted: &[u32]) -> Result<Vec<Vec<f32>>> {
    if wanted.is_empty() {
        return Ok(Vec::new());
    }
    let index = Tensor::new(wanted, logits.device())?;
    // `index_select` gives a compact tensor: nothing to make contiguous before the read.
    Ok(logits.index_select(&index, 0)?.to_vec2::<f32>()?)
}

/// What the sampler needs to know about `seq` besides its logits: its tokens, and EOS suppressed
/// while the output is shorter than `min_tokens`.
fn context<'a>(seq: &'a Sequence, params: &SamplingParams, eos: &'a [u32]) -> SampleContext<'a> {
    let suppress: &[u32] = if seq.num_output_tokens() < params.min_tokens { eos } else { &[] };
    SampleContext { prompt_tokens: seq.prompt_tokens(), output_tokens: seq.output_tokens(), suppress, allowed: None }
}
