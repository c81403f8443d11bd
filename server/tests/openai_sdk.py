"""Drives a running sluice with the official `openai` SDK, unchanged but for base_url and api_key.

Usage: python openai_sdk.py BASE_URL API_KEY MODEL. Exits non-zero on the first failed check.
"""

import sys

import openai

base_url, api_key, model = sys.argv[1:4]
client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=120)
france = [{"role": "user", "content": "What is the capital of France?"}]


def expect_error(cls, call, **attrs):
    try:
        call()
    except cls as e:
        for name, value in attrs.items():
            assert getattr(e, name) == value, f"{cls.__name__}.{name}: {getattr(e, name)!r} != {value!r}"
        return
    raise AssertionError(f"expected {cls.__name__}")


# Models.
assert [m.id for m in client.models.list().data] == [model]

# Chat, whole.
whole = client.chat.completions.create(model=model, messages=france, temperature=0, max_tokens=20)
assert whole.choices[0].message.content == "The capital of France is Paris.", whole
assert whole.choices[0].finish_reason == "stop"
assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens

# Chat, streamed, with usage.
parts, finish, usage = [], None, None
stream = client.chat.completions.create(
    model=model, messages=france, temperature=0, max_tokens=20, stream=True, stream_options={"include_usage": True}
)
for chunk in stream:
    usage = chunk.usage or usage
    for choice in chunk.choices:
        parts.append(choice.delta.content or "")
        finish = choice.finish_reason or finish
assert "".join(parts) == whole.choices[0].message.content, parts
assert finish == "stop" and usage.completion_tokens == whole.usage.completion_tokens

# n choices with logprobs; content parts; stop strings.
many = client.chat.completions.create(
    model=model, messages=france, n=2, temperature=0.9, seed=3, max_tokens=5, logprobs=True, top_logprobs=2
)
assert [c.index for c in many.choices] == [0, 1]
assert all(len(c.logprobs.content) >= 1 and len(c.logprobs.content[0].top_logprobs) == 2 for c in many.choices)
parts_msg = [{"role": "user", "content": [{"type": "text", "text": "What is the capital of France?"}]}]
stopped = client.chat.completions.create(model=model, messages=parts_msg, temperature=0, max_tokens=20, stop="Paris")
assert stopped.choices[0].message.content == "The capital of France is ", stopped

# Completions, whole and streamed.
completion = client.completions.create(model=model, prompt="The capital of France is", max_tokens=6, temperature=0)
assert completion.choices[0].text and completion.choices[0].finish_reason in ("stop", "length")
streamed = client.completions.create(
    model=model, prompt="The capital of France is", max_tokens=6, temperature=0, stream=True
)
assert "".join(c.choices[0].text for c in streamed if c.choices) == completion.choices[0].text

# Errors, as the SDK's own classes.
wrong_key = openai.OpenAI(base_url=base_url, api_key="sk-wrong", max_retries=0)
expect_error(openai.AuthenticationError, lambda: wrong_key.models.list(), status_code=401, code="invalid_api_key")
expect_error(
    openai.BadRequestError,
    lambda: client.chat.completions.create(model=model, messages=france, temperature=5),
    status_code=400,
    param="temperature",
)
expect_error(
    openai.BadRequestError, lambda: client.chat.completions.create(model=model, messages=[]), param="messages"
)
expect_error(
    openai.NotFoundError,
    lambda: client.chat.completions.create(model="gpt-4o", messages=france),
    code="model_not_found",
)
# Structured output: a pydantic model as the response format, parsed by the SDK itself.
import pydantic


class Person(pydantic.BaseModel):
    name: str
    age: int


parsed = client.chat.completions.parse(
    model=model,
    messages=[{"role": "user", "content": "Invent a person."}],
    response_format=Person,
    temperature=0,
    max_tokens=80,
)
person = parsed.choices[0].message.parsed
assert isinstance(person, Person) and person.name, parsed
assert parsed.usage.prompt_tokens_details.cached_tokens >= 0, parsed.usage
print("all SDK checks passed")
