//! Structured outputs on the real model: with a JSON `response_format` the output parses as JSON
//! and matches the schema, whatever the sampling, and other requests in the batch are untouched.

mod common;

use serde_json::{json, Value};
use sluice_engine::{
    Completion, DeviceSampling, Engine, EngineError, FinishReason, Request, ResponseFormat, SamplingParams,
};

fn params(format: ResponseFormat) -> SamplingParams {
    SamplingParams { max_tokens: 160, response_format: format, ..SamplingParams::default() }
}

fn person_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 24},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "city": {"type": "string", "enum": ["Paris", "London", "Tokyo"]}
        },
        "required": ["name", "age", "city"],
        "additionalProperties": false
    })
}

fn run(engine: &Engine, prompt: &str, params: SamplingParams) -> Completion {
    engine.generate(Request::user(prompt).with_params(params)).expect("generation succeeds")
}

/// The completion's text as JSON; it must have ended because the value was complete.
fn json_of(c: &Completion) -> Value {
    assert_eq!(c.finish.reason, FinishReason::Stop, "the value was cut short: {:?}", c.text);
    serde_json::from_str(&c.text).unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", c.text))
}

fn assert_person(v: &Value) {
    let o = v.as_object().unwrap_or_else(|| panic!("not an object: {v}"));
    assert_eq!(o.len(), 3, "{v}");
    assert!(o["name"].as_str().is_some_and(|n| n.chars().count() <= 24), "{v}");
    assert!(o["age"].as_u64().is_some_and(|a| a <= 150), "{v}");
    assert!(["Paris", "London", "Tokyo"].contains(&o["city"].as_str().unwrap_or("")), "{v}");
}

#[test]
fn json_object_and_json_schema_outputs_parse_and_match() {
    let engine = common::shared_engine();
    let any = run(engine, "Describe the sea as a JSON object.", params(ResponseFormat::JsonObject));
    assert!(json_of(&any).is_object(), "{:?}", any.text);
    let schema = ResponseFormat::JsonSchema { schema: person_schema() };
    let person = run(engine, "Invent a person.", params(schema.clone()));
    assert_person(&json_of(&person));
    // Free text from the same prompt is not JSON: the format is what made it so.
    let free = run(engine, "Invent a person.", SamplingParams { max_tokens: 40, ..SamplingParams::default() });
    assert!(serde_json::from_str::<Value>(&free.text).is_err(), "{:?}", free.text);
    // Sampled, with several seeds: every draw stays inside the schema.
    for seed in 0..4 {
        let sampled = SamplingParams { temperature: 1.0, seed: Some(seed), ..params(schema.clone()) };
        assert_person(&json_of(&run(engine, "Invent a person.", sampled)));
    }
}

#[test]
fn structured_rows_read_from_the_device_path_give_the_same_output() {
    let host = common::shared_engine();
    let device = common::engine_with(|c| c.device_sampling = DeviceSampling::Device);
    let schema = ResponseFormat::JsonSchema { schema: person_schema() };
    for p in [params(schema.clone()), SamplingParams { temperature: 0.8, seed: Some(3), ..params(schema) }] {
        let (a, b) = (run(host, "Invent a person.", p.clone()), run(&device, "Invent a person.", p));
        assert_eq!(a.token_ids, b.token_ids);
        assert_person(&json_of(&b));
    }
}

#[test]
fn a_batch_mixing_structured_and_free_requests_keeps_the_free_ones_unchanged() {
    let engine = common::engine_with(|_| {});
    let prompts = common::prompts();
    let free = |p: &str| Request::user(p).with_params(common::greedy(20));
    let alone: Vec<Vec<u32>> = prompts[..6].iter().map(|p| engine.generate(free(p)).unwrap().token_ids).collect();
    let schema = ResponseFormat::JsonSchema { schema: person_schema() };
    let mut streams = Vec::new();
    for p in &prompts[..6] {
        streams.push((false, engine.submit(free(p)).unwrap()));
        streams.push((
            true,
            engine.submit(Request::user("Invent a person.").with_params(params(schema.clone()))).unwrap(),
        ));
    }
    let mut free_outputs = Vec::new();
    for (structured, s) in streams {
        let c = s.collect_blocking().unwrap();
        if structured {
            assert_person(&json_of(&c));
        } else {
            free_outputs.push(c.token_ids);
        }
    }
    assert_eq!(free_outputs, alone);
    common::wait_for_empty_pool(&engine);
}

#[test]
fn schemas_and_combinations_that_cannot_work_are_refused_at_submission() {
    let engine = common::shared_engine();
    let submit = |p: SamplingParams| engine.submit(Request::user("hi").with_params(p)).map(|_| ()).unwrap_err();
    let invalid = |e: EngineError| match e {
        EngineError::InvalidRequest(m) => m,
        other => panic!("expected an invalid request, got {other:?}"),
    };
    let bad_ref = ResponseFormat::JsonSchema { schema: json!({"$ref": "#/definitions/missing"}) };
    assert!(invalid(submit(params(bad_ref))).contains("response_format"));
    let not_object = ResponseFormat::JsonSchema { schema: json!([1, 2]) };
    assert!(invalid(submit(params(not_object))).contains("response_format"));
    let unsatisfiable = ResponseFormat::JsonSchema { schema: json!({"type": "integer", "minimum": 5, "maximum": 1}) };
    assert!(invalid(submit(params(unsatisfiable))).contains("response_format"));
    let ignore_eos = SamplingParams { ignore_eos: true, ..params(ResponseFormat::JsonObject) };
    assert!(invalid(submit(ignore_eos)).contains("ignore_eos"));
    let min_tokens = SamplingParams { min_tokens: 3, ..params(ResponseFormat::JsonObject) };
    assert!(invalid(submit(min_tokens)).contains("min_tokens"));
    // The engine goes on serving.
    assert_person(&json_of(&run(
        engine,
        "Invent a person.",
        params(ResponseFormat::JsonSchema { schema: person_schema() }),
    )));
}

#[test]
fn structured_requests_survive_preemption_with_the_same_output() {
    // 12 blocks of 16 tokens for 12 sequences of ~35 prompt and up to 60 new tokens: sequences
    // are preempted and recomputed, while their grammars keep their place.
    let tight = common::engine_with(|c| {
        c.kv_cache_memory = Some(12 * 16 * 2 * 30 * 3 * 64 * 4);
        c.scheduler.max_batch_tokens = 48;
    });
    let roomy = common::shared_engine();
    let schema = ResponseFormat::JsonSchema { schema: person_schema() };
    let requests: Vec<SamplingParams> = (0..12)
        .map(|i| match i % 3 {
            0 => params(schema.clone()),
            1 => SamplingParams { temperature: 0.9, seed: Some(i), ..params(schema.clone()) },
            _ => SamplingParams { temperature: 0.7, seed: Some(i), ..params(ResponseFormat::JsonObject) },
        })
        .map(|p| SamplingParams { max_tokens: 60, ..p })
        .collect();
    let prompt = |i: usize| if i % 3 == 2 { "Describe a cat as JSON." } else { "Invent a person." };
    let streams: Vec<_> = requests
        .iter()
        .enumerate()
        .map(|(i, p)| tight.submit(Request::user(prompt(i)).with_params(p.clone())).unwrap())
        .collect();
    let outputs: Vec<Completion> = streams.into_iter().map(|s| s.collect_blocking().unwrap()).collect();
    assert!(tight.stats().preemptions > 0, "the pool was meant to force preemption: {:?}", tight.stats());
    for (i, (p, c)) in requests.iter().zip(&outputs).enumerate() {
        let alone = run(roomy, prompt(i), p.clone());
        assert_eq!(c.token_ids, alone.token_ids, "request {i}: preemption changed a structured output");
        if i % 3 != 2 {
            assert_person(&json_of(c));
        } else if c.finish.reason == FinishReason::Stop {
            assert!(json_of(c).is_object());
        }
    }
    common::wait_for_empty_pool(&tight);
}

#[test]
fn regex_and_choice_formats_hold_the_output_to_them() {
    let engine = common::shared_engine();
    let choices = vec!["positive".to_string(), "negative".to_string(), "neutral".to_string()];
    for seed in 0..3 {
        let p = SamplingParams {
            temperature: 1.0,
            seed: Some(seed),
            ..params(ResponseFormat::Choice { choices: choices.clone() })
        };
        let c = run(engine, "Is 'I love this film' positive or negative?", p);
        assert!(choices.contains(&c.text), "{:?}", c.text);
        assert_eq!(c.finish.reason, FinishReason::Stop);
    }
    let phone = ResponseFormat::Regex { pattern: r"\(\d{3}\) \d{3}-\d{4}".into() };
    let c = run(engine, "Give me a phone number.", params(phone));
    let shape = |s: &str| {
        let b = s.as_bytes();
        b.len() == 14
            && b[0] == b'('
            && b[4] == b')'
            && b[5] == b' '
            && b[9] == b'-'
            && [1, 2, 3, 6, 7, 8, 10, 11, 12, 13].iter().all(|&i| b[i].is_ascii_digit())
    };
    assert!(shape(&c.text), "{:?}", c.text);
    assert_eq!(c.finish.reason, FinishReason::Stop);
    let submit = |f: ResponseFormat| engine.submit(Request::user("hi").with_params(params(f))).map(|_| ()).unwrap_err();
    for bad in [
        ResponseFormat::Regex { pattern: "(unclosed".into() },
        ResponseFormat::Regex { pattern: String::new() },
        ResponseFormat::Choice { choices: Vec::new() },
    ] {
        assert!(matches!(submit(bad.clone()), EngineError::InvalidRequest(_)), "{bad:?}");
    }
}
