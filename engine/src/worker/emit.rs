//! Handing a new token out: through the request's grammar, detokenizer and stop strings to its
//! stream, and the request's end when the token finishes it.

use std::time::Instant;

use super::{RequestState, Worker};
use crate::metrics::{self, FinishRecord};
use crate::sequence::{RequestId, Sequence};
use crate::stream::{Finish, FinishReason, StreamEvent, Timings, TokenEvent, Usage};

impl Worker {
    /// Turns a new token into a stream event, and finishes the request when it should stop.
    pub(super) fn emit(&mut self, id: RequestId, token: u32, logprob: Option<crate::sampling::TokenLogprob>) {
        // A structured output's grammar moves past the token first; it ends the request when the
        // JSON value is complete.
        let advanced = self.requests.get_mut(&id).and_then(|s| s.grammar.as_mut()).map(|g| {
            let result = g.advance(token);
            result.map(|()| g.is_finished())
        });
        let grammar_done = match advanced {
            Some(Err(e)) => {
                tracing::error!(error = %e, request = id, token, "the structured output's grammar refused a token");
                self.fail(id, e);
                return;
            }
            Some(Ok(done)) => done,
            None => false,
        };
        let (Some(seq), Some(state)) = (self.scheduler.sequence(id), self.requests.get_mut(&id)) else {
            return;
        };
        let now = Instant::now();
        match state.last_token_at.replace(now) {
            Some(last) => metrics::record_inter_token(now.saturating_duration_since(last)),
            None => metrics::record_first_token(seq.num_prompt_tokens, now.saturating_duration_since(seq.arrival)),
        }
        state.first_token_at.get_or_insert(now);
        let params = &state.params;
        let is_eos = !params.ignore_eos && self.eos.contains(&token);
        let is_stop_token = params.stop_token_ids.contains(&token);
        let mut text = String::new();
        let mut finish = None;
        let mut stop_string = None;
        if is_eos || is_stop_token {
            finish = Some(FinishReason::Stop);
        } else {
            match state.detokenizer.push(&self.tokenizer, token) {
                Ok(delta) => {
                    let out = state.stop.push(&delta);
                    text = out.text;
                    if let Some(matched) = out.stopped {
                        finish = Some(FinishReason::Stop);
                        stop_string = Some(matched);
                    }
                }
                Err(e) => tracing::warn!(error = %e, token, "cannot detokenize"),
            }
        }
        if finish.is_none() && grammar_done {
            // The JSON value is complete: nothing may follow it.
            finish = Some(FinishReason::Stop);
        }
        if finish.is_none() && seq.num_output_tokens() >= params.max_tokens {
            finish = Some(FinishReason::Length);
        }
        if finish.is_some() && stop_string.is_none() {
            // Release what was held back: an unfinished character, a partial stop string.
            if let Ok(rest) = state.detokenizer.flush(&self.tokenizer) {
                let out = state.stop.push(&rest);
                text.push_str(&out.text);
            }
            text.push_str(&state.stop.flush());
        }
        let alive = state.tx.send(StreamEvent::Token(TokenEvent { token_id: token, text, logprob })).is_ok();
        if let Some(reason) = finish {
            let finish = Finish { reason, stop_string, usage: usage(seq), timings: timings(seq, state, now) };
            metrics::record_finish(&FinishRecord {
                reason: reason.as_str(),
                prompt_tokens: finish.usage.prompt_tokens,
                generated_tokens: finish.usage.completion_tokens,
                queue: finish.timings.queue,
                time_to_first_token: finish.timings.time_to_first_token,
                total: finish.timings.total,
            });
            // The blocks go back, and the stats say so, before the caller hears of the end: a
            // caller that reads the stats once its request is done finds its blocks in the pool.
            self.scheduler.remove(id);
            let state = self.requests.remove(&id);
            self.publish_stats(true);
            // A caller gone by now misses nothing it could use.
            if let Some(state) = state {
                let _ = state.tx.send(StreamEvent::Finished(finish));
            }
        } else if !alive {
            // The caller dropped its stream between steps and the abort is still in the channel.
            metrics::record_abort();
            self.abort(id);
        }
    }
}

fn usage(seq: &Sequence) -> Usage {
    Usage {
        prompt_tokens: seq.num_prompt_tokens,
        completion_tokens: seq.num_output_tokens(),
        cached_tokens: seq.num_cached_tokens,
    }
}

fn timings(seq: &Sequence, state: &RequestState, now: Instant) -> Timings {
    let since = |t: Option<Instant>| t.map(|t| t.saturating_duration_since(seq.arrival)).unwrap_or_default();
    Timings {
        queue: since(state.admitted_at),
        time_to_first_token: since(state.first_token_at),
        total: now.saturating_duration_since(seq.arrival),
        preemptions: seq.num_preemptions,
    }
}
