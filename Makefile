# make demo   build, train and serve the default Shapes model (http://127.0.0.1:8000)
# make test   the whole test suite
# make test-quick  every test not marked slow (under 3 minutes on 2 cores), for the edit-run loop
# make test-busy   the whole suite with the second core kept busy (a test of the suite's own timing)
# make test-random the whole suite in a random order (pytest-random-order); SEED=N repeats an order
# make bench    folder-captioning throughput, the encoder's backends, training throughput, the service
#               under load and a 5-minute soak (about 50 min), written to benchmarks/RESULTS.md
# make compare  decoder variants on Shapes (24 min on a 2-core AMD EPYC), written to benchmarks/RESULTS.md
# make lint     ruff (lint and format), mypy over the packages, hadolint on the Dockerfiles

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install demo model test test-quick test-busy test-random lint bench compare clean

$(BIN)/captioner: requirements.txt requirements-dev.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

install: $(BIN)/captioner

demo: install
	$(BIN)/captioner demo

model: install
	$(BIN)/captioner demo --no-serve

test: install
	$(BIN)/python -m pytest -q -p no:cacheprovider

test-quick: install
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not slow"

test-busy: install
	$(BIN)/python -c "while True: pass" & busy=$$!; trap "kill $$busy" EXIT; $(BIN)/python -m pytest -q -p no:cacheprovider

test-random: install
	seed=$${SEED:-$$(date +%s)}; echo "test order seed $$seed (the same order again: make test-random SEED=$$seed)"; \
	$(BIN)/python -m pytest -q -p no:cacheprovider --random-order-seed=$$seed

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/hadolint --failure-threshold style docker/Dockerfile docker/Dockerfile.cuda docker/Dockerfile.model

bench: model
	$(BIN)/python benchmarks/caption_throughput.py --out benchmarks/RESULTS.md
	$(BIN)/python benchmarks/backends.py --out benchmarks/RESULTS.md
	$(BIN)/python benchmarks/training_throughput.py --out benchmarks/RESULTS.md
	$(BIN)/python benchmarks/service_load.py --out benchmarks/RESULTS.md

compare: model
	$(BIN)/python benchmarks/compare_decoders.py --out benchmarks/RESULTS.md

clean:
	rm -rf $(VENV) *.egg-info
