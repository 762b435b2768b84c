# Two set-up commands for a fresh machine: `make demo` and `make test`. Each builds .venv by itself.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PRESET ?= smol
# the demo runs a preset's short schedule where it has one (configs/<preset>-demo.toml), else the preset itself
DEMO_CONFIG = $(if $(wildcard configs/$(PRESET)-demo.toml),configs/$(PRESET)-demo.toml,$(PRESET))

.PHONY: demo test venv bench bench-baseline bench-study bench-codec bench-split bench-privacy bench-hostile clean proto

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/qtllava demo --config $(DEMO_CONFIG) --out runs/demo-$(PRESET)

test: $(STAMP)
	$(BIN)/python -m pytest

# Every benchmark, in dependency order (the study starts from the baseline's stage-0 base; the privacy suite uses
# the study's checkpoints). Hours on 2 cores: run in the background, each step is resumable.
bench: bench-baseline bench-study bench-codec bench-split bench-privacy bench-hostile

# The 16-bit baseline of a preset (PRESET=smol by default; PRESET=tiny for the from-scratch one). Hours; resumable.
bench-baseline: $(STAMP)
	mkdir -p runs results
	$(BIN)/python benchmarks/baseline.py --config $(PRESET) 2>&1 | tee -a runs/bench-baseline-$(PRESET).log

# Rate-accuracy study of a preset (configs/study/$(PRESET).toml): every configuration from one stage-0 base, several
# seeds; days of background runs on 2 cores for smol; resumable (re-run to continue).
bench-study: $(STAMP)
	mkdir -p runs results
	$(BIN)/python benchmarks/study.py --preset $(PRESET) 2>&1 | tee -a runs/study-$(PRESET).log

bench-codec: $(STAMP)
	$(BIN)/python benchmarks/codec.py

# Split over gRPC on loopback vs in process (tiny), and communication per step over emulated links (tc netem in a
# network namespace where the kernel has it, else an analytic model; see results/split.json "emulation").
bench-split: $(STAMP)
	$(BIN)/python benchmarks/split.py

# Attacks on what crosses the wire, per compressor; Fashion-MNIST comes from Debian's package.
bench-privacy: $(STAMP)
	test -d /usr/share/datasets/fashion-mnist || (apt-get update -qq && apt-get install -y dataset-fashion-mnist) || \
		echo "dataset-fashion-mnist not installed: the fashion image set is skipped"
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/privacy.py

# A hostile-input campaign (2400 requests in ten attack classes) against a real server process on loopback; about a
# minute. Writes results/hostile.json; fails if the server died, hung or accepted a hostile request.
bench-hostile: $(STAMP)
	$(BIN)/python benchmarks/hostile.py

clean:
	rm -rf runs/demo-* data/micro

# Regenerate the checked-in gRPC stubs (generator pinned: grpcio-tools 1.85.1, protobuf >= 7.35).
proto: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. qtllava/wire/split.proto
