//! The model's own Jinja chat template (GGUF `tokenizer.chat_template` or `tokenizer_config.json`'s
//! `chat_template`), rendered with minijinja the way `transformers.apply_chat_template` does:
//! `trim_blocks` and `lstrip_blocks` on, Python string methods (`.strip()`, `.startswith()`) via
//! minijinja-contrib's pycompat, and the `raise_exception` and `strftime_now` globals.
//!
//! Message text is the client's, not markup: [`ChatTemplate::render_pieces`] cuts the rendered
//! prompt where a message spells a special token (`<|im_start|>`), so that the tokenizer encodes
//! that text as plain text and only the template's own markup becomes control tokens.

use std::time::{SystemTime, UNIX_EPOCH};

use minijinja::{context, Environment, ErrorKind};
use serde::{Deserialize, Serialize};

use crate::{EngineError, Result};

/// One chat message as the template sees it: `message['role']`, `message['content']`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant`, or whatever roles the template knows.
    pub role: String,
    /// The message text.
    pub content: String,
}

impl ChatMessage {
    /// A message with the given role and content.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self { role: role.into(), content: content.into() }
    }
}

/// A compiled chat template together with the BOS/EOS strings it may reference.
#[derive(Debug)]
pub struct ChatTemplate {
    /// Holds the one template, named [`TEMPLATE_NAME`], compiled once in `new`.
    env: Environment<'static>,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

const TEMPLATE_NAME: &str = "chat";

/// A piece of a rendered chat prompt, in order; see [`ChatTemplate::render_pieces`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PromptPiece {
    /// Template output (with message text): special-token text in it is the special token.
    Markup(String),
    /// Message text that spells a special token: encoded as plain text, never as the token.
    Literal(String),
}

/// The error `raise_exception` raises, found again in the error chain after rendering so that a
/// template's complaint about the messages becomes a client error rather than a server one.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct TemplateException(String);

impl ChatTemplate {
    /// Compiles `source`. `bos_token`/`eos_token` are the texts templates see as `bos_token` and
    /// `eos_token` (e.g. `"<s>"`), if the model has them.
    pub fn new(source: &str, bos_token: Option<String>, eos_token: Option<String>) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned(TEMPLATE_NAME, source.to_string())
            .map_err(|e| EngineError::ChatTemplate(format!("cannot compile the template: {e}")))?;
        Ok(Self { env, bos_token, eos_token })
    }

    /// Renders `messages`; with `add_generation_prompt` the result ends with the header of an
    /// assistant turn. A template that calls `raise_exception` (e.g. roles do not alternate)
    /// yields `InvalidRequest`; any other failure yields `ChatTemplate`.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let template = self.env.get_template(TEMPLATE_NAME).map_err(|e| EngineError::ChatTemplate(e.to_string()))?;
        let ctx = context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.as_deref().unwrap_or(""),
            eos_token => self.eos_token.as_deref().unwrap_or(""),
        };
        template.render(ctx).map_err(|e| {
            let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
            while let Some(err) = source {
                if let Some(raised) = err.downcast_ref::<TemplateException>() {
                    return EngineError::InvalidRequest(format!(
                        "`messages` rejected by the model's chat template: {raised}"
                    ));
                }
                source = err.source();
            }
            EngineError::ChatTemplate(format!("cannot render the template: {e}"))
        })
    }

    /// Renders `messages` like [`Self::render`], cut into pieces so that message text spelling one
    /// of `specials` (the tokenizer's special-token texts) comes out as a [`PromptPiece::Literal`].
    ///
    /// When no message spells a special token (the usual case) the result is one `Markup` piece
    /// holding exactly what `render` returns. Otherwise each such text is swapped for a placeholder
    /// (a private-use character that appears in no message, around an index) before rendering,
    /// and the rendered text is cut at the placeholders. A template that mangles a placeholder
    /// (slices the content, say) gets `InvalidRequest` rather than an unsafe prompt.
    pub fn render_pieces(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        specials: &[String],
    ) -> Result<Vec<PromptPiece>> {
        let spells_special = |text: &str| specials.iter().any(|s| !s.is_empty() && text.contains(s.as_str()));
        if !messages.iter().any(|m| spells_special(&m.content)) {
            return Ok(vec![PromptPiece::Markup(self.render(messages, add_generation_prompt)?)]);
        }
        let unsafe_prompt = || {
            EngineError::InvalidRequest(
                "`messages` spell special tokens in a way this model's chat template cannot keep apart from its markup"
                    .into(),
            )
        };
        let marker = ('\u{E000}'..='\u{F8FF}')
            .find(|&c| !messages.iter().any(|m| m.content.contains(c)))
            .ok_or_else(unsafe_prompt)?;
        let mut literals = Vec::new();
        let escaped: Vec<ChatMessage> = messages
            .iter()
            .map(|m| ChatMessage::new(m.role.clone(), escape_specials(&m.content, specials, marker, &mut literals)))
            .collect();
        let rendered = self.render(&escaped, add_generation_prompt)?;
        let mut pieces = Vec::new();
        // Parts alternate: markup, placeholder index, markup, ..., markup.
        for (i, part) in rendered.split(marker).enumerate() {
            if i % 2 == 0 {
                if !part.is_empty() {
                    pieces.push(PromptPiece::Markup(part.to_string()));
                }
                continue;
            }
            let literal = part.parse::<usize>().ok().and_then(|n| literals.get(n)).ok_or_else(unsafe_prompt)?;
            pieces.push(PromptPiece::Literal(literal.clone()));
        }
        if rendered.matches(marker).count() % 2 != 0 {
            return Err(unsafe_prompt());
        }
        Ok(pieces)
    }
}

/// `text` with each special-token text in it (leftmost, longest first) replaced by
/// `{marker}{index}{marker}`, its text pushed to `literals` at `index`.
fn escape_specials(text: &str, specials: &[String], marker: char, literals: &mut Vec<String>) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        let longest = specials.iter().filter(|s| !s.is_empty() && rest.starts_with(s.as_str())).max_by_key(|s| s.len());
        match longest {
            Some(special) => {
                out.push(marker);
                out.push_str(&literals.len().to_string());
                out.push(marker);
                literals.push(special.clone());
                rest = &rest[special.len()..];
            }
            None => {
                out.push(c);
                rest = &rest[c.len_utf8()..];
            }
        }
    }
    out
}

/// `raise_exception(msg)`: Hugging Face templates call it to reject the messages.
fn raise_exception(msg: String) -> std::result::Result<String, minijinja::Error> {
    let err = minijinja::Error::new(ErrorKind::InvalidOperation, msg.clone());
    Err(err.with_source(TemplateException(msg)))
}

/// `strftime_now(fmt)`: the current UTC time, formatted with the common `%` codes
/// (`%Y %y %m %d %B %b %A %a %H %M %S %%`; others are kept verbatim). Llama 3 prompts use it.
fn strftime_now(fmt: String) -> String {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    format_time(secs, &fmt)
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const WEEKDAYS: [&str; 7] = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"];

/// Formats a Unix time (UTC) with a subset of `strftime`.
fn format_time(unix_secs: u64, fmt: &str) -> String {
    let days = (unix_secs / 86_400) as i64;
    let secs_of_day = unix_secs % 86_400;
    // Howard Hinnant's days-to-civil algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    // INVARIANT: the algorithm yields `month` in 1..=12; `rem_euclid(7)` is in 0..7; the names are
    // ASCII, so `[..3]` below is a char boundary.
    let month_name = MONTHS[(month - 1) as usize];
    // 1970-01-01 was a Thursday (index 3 from Monday).
    let weekday = WEEKDAYS[((days + 3).rem_euclid(7)) as usize];
    let mut out = String::with_capacity(fmt.len() + 16);
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year % 100)),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('B') => out.push_str(month_name),
            Some('b') => out.push_str(&month_name[..3]),
            Some('A') => out.push_str(weekday),
            Some('a') => out.push_str(&weekday[..3]),
            Some('H') => out.push_str(&format!("{:02}", secs_of_day / 3600)),
            Some('M') => out.push_str(&format!("{:02}", secs_of_day / 60 % 60)),
            Some('S') => out.push_str(&format!("{:02}", secs_of_day % 60)),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SmolLM2-135M-Instruct's `tokenizer.chat_template`.
    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    fn smollm2() -> ChatTemplate {
        ChatTemplate::new(SMOLLM2, None, Some("<|im_end|>".into())).unwrap()
    }

    #[test]
    fn smollm2_adds_default_system_prompt() {
        let rendered = smollm2().render(&[ChatMessage::new("user", "Hi")], true).unwrap();
        assert_eq!(
            rendered,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging \
             Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn smollm2_keeps_given_system_prompt_without_generation_prompt() {
        let messages = [
            ChatMessage::new("system", "Be brief."),
            ChatMessage::new("user", "Hi"),
            ChatMessage::new("assistant", "Hello!"),
        ];
        let rendered = smollm2().render(&messages, false).unwrap();
        assert_eq!(
            rendered,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
             <|im_start|>assistant\nHello!<|im_end|>\n"
        );
    }

    #[test]
    fn raise_exception_is_an_invalid_request() {
        let source = "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}\
                      {{ raise_exception('Conversation roles must alternate user/assistant') }}\
                      {% endif %}{{ m['content'] }}{% endfor %}";
        let template = ChatTemplate::new(source, None, None).unwrap();
        let messages = [ChatMessage::new("user", "a"), ChatMessage::new("user", "b")];
        let err = template.render(&messages, false).unwrap_err();
        match err {
            EngineError::InvalidRequest(msg) => {
                assert!(msg.contains("roles must alternate"), "{msg}");
                assert!(msg.contains("`messages`"), "{msg}");
            }
            other => panic!("expected InvalidRequest, got {other:?}"),
        }
        assert_eq!(template.render(&messages[..1], false).unwrap(), "a");
    }

    #[test]
    fn other_render_failures_are_template_errors() {
        let template = ChatTemplate::new("{{ messages[0]['content'] + 1 }}", None, None).unwrap();
        let err = template.render(&[ChatMessage::new("user", "a")], false).unwrap_err();
        assert!(matches!(err, EngineError::ChatTemplate(_)), "{err:?}");
        let err = ChatTemplate::new("{% for %}", None, None).unwrap_err();
        assert!(matches!(err, EngineError::ChatTemplate(_)), "{err:?}");
    }

    #[test]
    fn python_string_methods_and_special_tokens_work() {
        let source = "{{ bos_token }}{% for m in messages %}{% if m.content.startswith('!') %}\
                      cmd{% endif %}[{{ m['content'].strip() }}]{% endfor %}{{ eos_token }}";
        let template = ChatTemplate::new(source, Some("<s>".into()), Some("</s>".into())).unwrap();
        let messages = [ChatMessage::new("user", "  padded \n"), ChatMessage::new("user", "!x")];
        assert_eq!(template.render(&messages, false).unwrap(), "<s>[padded]cmd[!x]</s>");
    }

    #[test]
    fn blocks_are_trimmed_like_transformers() {
        let source = "{% for m in messages %}\n    {% if true %}\n{{ m.content }}\n    {% endif %}\n{% endfor %}";
        let template = ChatTemplate::new(source, None, None).unwrap();
        let messages = [ChatMessage::new("user", "a"), ChatMessage::new("user", "b")];
        assert_eq!(template.render(&messages, false).unwrap(), "a\nb\n");
    }

    #[test]
    fn strftime_formats_dates() {
        // 2024-07-26 14:05:09 UTC, a Friday.
        assert_eq!(format_time(1_722_002_709, "%d %b %Y, %A %H:%M:%S %%"), "26 Jul 2024, Friday 14:05:09 %");
        assert_eq!(format_time(0, "%Y-%m-%d %a %B %y"), "1970-01-01 Thu January 70");
        let template = ChatTemplate::new("{{ strftime_now('%Y') }}", None, None).unwrap();
        assert_eq!(template.render(&[], false).unwrap().len(), 4);
    }
}
