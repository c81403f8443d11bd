//! `GET /openapi.json`, generated from the same types and handlers the routes use.

use axum::Json;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::{chat, completions, health, models, tokenize};
use crate::openai;

/// The API description.
#[derive(OpenApi)]
#[openapi(
    info(title = "Sluice", description = "OpenAI-compatible LLM inference server"),
    paths(
        chat::create,
        completions::create,
        models::list,
        models::retrieve,
        tokenize::tokenize,
        tokenize::detokenize,
        health::health,
        health::live,
        crate::metrics::render,
    ),
    components(schemas(openai::ChatCompletionChunk, openai::ErrorResponse, openai::ErrorBody)),
    modifiers(&BearerKey)
)]
pub struct ApiDoc;

/// Declares the `api_key` bearer scheme the API routes use.
struct BearerKey;

impl Modify for BearerKey {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// Serves the OpenAPI document.
#[utoipa::path(get, path = "/openapi.json", tag = "operations", responses((status = 200, description = "This document")))]
pub async fn spec() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}
