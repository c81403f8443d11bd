//! [`ApiJson`]: the JSON body extractor of every route. Unlike axum's `Json` (422, plain text), it
//! answers in OpenAI's envelope: 400 naming the field for wrong types and missing fields, 400 for
//! malformed JSON, 413 past the body limit. The body's content type is not checked, as clients
//! such as `curl -d` send JSON labelled as a form.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use serde::de::DeserializeOwned;
use serde_json::error::Category;

use crate::error::ApiError;
use crate::state::AppState;

/// A request body parsed as JSON into `T`.
#[derive(Debug, Clone)]
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state).await.map_err(|e| match e.status() {
            StatusCode::PAYLOAD_TOO_LARGE => ApiError::BodyTooLarge(state.config().body_limit),
            _ => ApiError::InvalidRequest { message: format!("Could not read the request body: {e}"), param: None },
        })?;
        parse(&bytes).map(Self)
    }
}

/// Parses `bytes` as one JSON value of type `T`, naming the field at fault on failure.
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        json_error(&path, e.into_inner())
    })?;
    de.end().map_err(|e| json_error(".", e))?;
    Ok(value)
}

fn json_error(path: &str, e: serde_json::Error) -> ApiError {
    // serde_json appends " at line 1 column 42"; the field's name says more.
    let text = e.to_string();
    let detail = text.rsplit_once(" at line ").map_or(text.as_str(), |(head, _)| head);
    match e.classify() {
        // serde reads a struct from an array too; say what the body should be instead.
        Category::Data if path.starts_with('[') => {
            ApiError::InvalidRequest { message: "The request body must be a JSON object.".into(), param: None }
        }
        Category::Data if path != "." && path != "?" => ApiError::InvalidRequest {
            message: format!("Invalid value for `{path}`: {detail}"),
            param: Some(path.to_string()),
        },
        // A missing field: its name is in backticks, and becomes `param`.
        Category::Data => ApiError::invalid(format!("Invalid request body: {detail}")),
        Category::Syntax | Category::Eof | Category::Io => ApiError::InvalidRequest {
            message: format!("We could not parse the JSON body of your request ({detail}). Send valid JSON."),
            param: None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openai::ChatCompletionRequest;

    fn param(json: &str) -> Option<String> {
        match parse::<ChatCompletionRequest>(json.as_bytes()) {
            Err(ApiError::InvalidRequest { param, .. }) => param,
            other => panic!("{json}: expected InvalidRequest, got {other:?}"),
        }
    }

    #[test]
    fn wrong_types_name_the_field() {
        let m = r#""messages": [{"role": "user", "content": "hi"}]"#;
        assert_eq!(param(&format!(r#"{{{m}, "temperature": "hot"}}"#)).as_deref(), Some("temperature"));
        assert_eq!(param(&format!(r#"{{{m}, "max_tokens": -1}}"#)).as_deref(), Some("max_tokens"));
        assert_eq!(param(&format!(r#"{{{m}, "stop": 5}}"#)).as_deref(), Some("stop"));
        assert_eq!(param(&format!(r#"{{{m}, "stream": "yes"}}"#)).as_deref(), Some("stream"));
        assert_eq!(param(r#"{"messages": [{"role": 1, "content": "x"}]}"#).as_deref(), Some("messages[0].role"));
        assert_eq!(param(r#"{"messages": [{"role": "user", "content": 7}]}"#).as_deref(), Some("messages[0].content"));
        assert_eq!(param(r#"{"model": "m"}"#).as_deref(), Some("messages"));
    }

    #[test]
    fn malformed_json_is_a_plain_400() {
        for bad in [r#"{"messages": ["#, "not json", r#"{"messages": []} trailing"#, ""] {
            assert_eq!(param(bad), None, "{bad}");
        }
    }

    #[test]
    fn unknown_fields_and_nulls_are_accepted() {
        let r: ChatCompletionRequest = parse(
            br#"{"messages": [{"role": "user", "content": "hi"}], "temperature": null, "tools": [], "response_format": {"type": "text"}}"#,
        )
        .unwrap();
        assert_eq!(r.temperature, None);
    }
}
