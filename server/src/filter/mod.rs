//! Checks on what goes into the model and what comes out of it.
//!
//! - `input`: control characters removed from prompt text; instruction-override patterns in user
//!   messages flagged (metrics and a log line) or blocked (400), by `--injection-mode`.
//! - `output`: optional redaction (`--redact`) of API keys, card numbers and e-mail addresses in
//!   generated text, streams included.
//!
//! [`screen`] is the one call a route makes on a parsed request.

pub mod input;
pub mod output;

use crate::config::ApiConfig;
use crate::error::ApiError;
use crate::validate::GenerateRequest;

/// Applies the input checks to `req` and refuses what the output filter could not honour:
/// logprobs show each token's raw text, so they are refused while redaction is on.
pub fn screen(config: &ApiConfig, mut req: GenerateRequest) -> Result<GenerateRequest, ApiError> {
    input::check(config.injection_mode, &mut req.prompts)?;
    if !config.redact.is_off() && req.params.logprobs.is_some() {
        return Err(ApiError::invalid(
            "`logprobs` is not available on this server: it redacts generated text, and logprobs would show it unredacted",
        ));
    }
    Ok(req)
}
