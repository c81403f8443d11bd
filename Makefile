# Sluice: the two commands a new user needs are `make run` and `make test`.
# Every target installs what it needs (the default model is fetched on first use).

MODEL ?= models/SmolLM2-135M-Instruct.Q4_1.gguf
CARGO ?= cargo
# Python environment holding the official `openai` SDK, for the server's SDK test.
VENV ?= .venv

.PHONY: model venv run test lint check-cuda bench examples clean-model

# Fetch and verify the default model (skipped when present).   e.g. `make model`
model: $(MODEL)

$(MODEL):
	scripts/fetch-model.sh models

# Install the `openai` Python SDK into $(VENV) (skipped when present).   e.g. `make venv`
venv: $(VENV)/.openai-installed

# The `*` in $(VENV)/.gitignore keeps the environment out of git.
$(VENV)/.openai-installed:
	python3 -m venv $(VENV)
	echo '*' > $(VENV)/.gitignore
	$(VENV)/bin/pip install --quiet --disable-pip-version-check openai
	touch $@

# Serve the default model.   e.g. `make run` (then follow the printed instructions)
run: $(MODEL)
	$(CARGO) run --release -p sluice-server --bin sluice -- serve --model $(MODEL)

# Run every test on the real default model.   e.g. `make test`
test: $(MODEL) venv
	SLUICE_TEST_PYTHON=$(abspath $(VENV))/bin/python $(CARGO) test --workspace

# Formatting and lints, as CI checks them.   e.g. `make lint`
lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# Compile and lint the `cuda` build and its tests with no GPU (nvcc 13.0 from pinned wheels).   e.g. `make check-cuda`
# One cargo call: a second with other targets would resolve features anew and rebuild candle's CUDA kernels.
check-cuda:
	eval "$$(scripts/cuda-toolkit.sh)" && \
	$(CARGO) clippy --workspace --all-targets --features cuda -- -D warnings

# In-process engine throughput at concurrency 1 and 32.   e.g. `make bench`
bench: $(MODEL)
	$(CARGO) run --release -p sluice-bench -- engine --model $(MODEL) --concurrency 1 --num-requests 4
	$(CARGO) run --release -p sluice-bench -- engine --model $(MODEL) --concurrency 32 --num-requests 64

# Run the library examples.   e.g. `make examples`
examples: $(MODEL)
	$(CARGO) run --release -p sluice-engine --example generate -- "What is the capital of France?"

# Remove the downloaded model.   e.g. `make clean-model`
clean-model:
	rm -f $(MODEL)
