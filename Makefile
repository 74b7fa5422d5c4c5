# The one entry point for people and CI. README names `make run` and `make test`;
# .ci/run calls `make test`.
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

CARGO ?= cargo
export CARGO_TERM_COLOR ?= never

.PHONY: help
help: ## list the recipes
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | column -t -s $$'\t'

.PHONY: libtorch
libtorch: ## install libtorch 2.11.0 (CPU) into ~/.cache/hndsr and link ./.libtorch
	@bash server/scripts/install-libtorch.sh >/dev/null

.PHONY: prereqs
prereqs: libtorch ## check and install everything the build needs
	@command -v $(CARGO) >/dev/null || { echo "error: cargo not found (install Rust 1.95 with rustup)" >&2; exit 1; }
	@command -v python3 >/dev/null || { echo "error: python3 not found" >&2; exit 1; }
	@free=$$(df -Pk . | awk 'NR==2 {print int($$4/1048576)}'); \
	  if [ "$$free" -lt 8 ]; then echo "warning: only $${free} GiB free here; a cold \`make test\` needs about 8 GiB (target/ + ~/.cache)" >&2; fi

.PHONY: run
run: prereqs e2e-binaries images ## local cluster (control plane, registry, a real node) + operator + the quickstart, served on 127.0.0.1:8080 through its Service
	$(CARGO) build --release --locked -p hndsr-operator -p hndsr-e2e --bins
	bash e2e/scripts/local-stack.sh

.PHONY: server
server: prereqs ## only the server, on 127.0.0.1:8080 with the bicubic backend
	$(CARGO) build --release --locked -p hndsr-server --bin hndsr-server
	@echo "hndsr-server on http://127.0.0.1:8080 — try:"
	@echo "  curl -s --data-binary @docs/samples/nile-256.png -H 'content-type: image/png' 'http://127.0.0.1:8080/v1/upscale?scale=4' -o /tmp/up.png"
	./target/release/hndsr-server --listen 127.0.0.1:8080 --backend bicubic

HNDSR_WEIGHTS ?= server/models/hndsr.safetensors

.PHONY: server-hndsr
server-hndsr: prereqs ## the server with the trained HNDSR weights, on 127.0.0.1:8080 (profile: HNDSR_PROFILE, else fast on the CPU; docs/server.md#serving-profiles)
	$(CARGO) build --release --locked -p hndsr-server --bin hndsr-server
	./target/release/hndsr-server --listen 127.0.0.1:8080 --backend hndsr \
	  --weights-path $(HNDSR_WEIGHTS) \
	  --weights-sha256 $$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["sha256"])' $(basename $(HNDSR_WEIGHTS)).json)

.PHONY: e2e-binaries
e2e-binaries: ## build (once, cached in ~/.cache/hndsr/e2e-bin) etcd, kube-*, kubectl, kwok, helm, Prometheus, KEDA, Argo CD from their Go modules
	@command -v go >/dev/null || { echo "error: go not found (Go >= 1.26 builds the e2e control plane)" >&2; exit 1; }
	bash e2e/scripts/build-binaries.sh

.PHONY: host-packages
host-packages: ## install the Debian packages of the images, the real node and Argo CD (podman, runc, debootstrap, containerd, CNI plugins, iptables, redis, git)
	@bash e2e/scripts/host-packages.sh

.PHONY: images
images: prereqs host-packages ## build the hndsr-server, hndsr-operator, pause and fetch images with podman (cached by content; images/build.sh)
	$(CARGO) build --release --locked -p hndsr-server --bin hndsr-server -p hndsr-operator --bin hndsr-operator
	bash images/build.sh

.PHONY: e2e
e2e: e2e-binaries images ## end-to-end tests against a real control plane on 127.0.0.1, a real node among them
	$(CARGO) build --locked -p hndsr-operator -p hndsr-e2e --bins
	$(CARGO) test --locked -p hndsr-e2e

.PHONY: up
up: e2e-binaries ## start the control plane alone (prints KUBECONFIG); `make down` stops it
	$(CARGO) run --locked -q -p hndsr-e2e -- up --detach

.PHONY: down
down: ## stop the control plane started by `make up`
	$(CARGO) run --locked -q -p hndsr-e2e -- down

.PHONY: fmt
fmt: ## format the workspace
	$(CARGO) fmt --all

.PHONY: lint
lint: prereqs ## rustfmt and clippy, warnings are errors
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

.PHONY: generate
generate: prereqs ## regenerate the committed artefacts (CRD YAML, chart CRD, OpenAPI, CRD reference)
	$(CARGO) run --locked -q -p hndsr-crds --bin crdgen -- --out crds/hndsrservice.yaml --chart-out charts/hndsr-operator/crds/hndsrservice.yaml --reference-out docs/crd-reference.md
	$(CARGO) run --locked -q -p hndsr-server --bin hndsr-server -- openapi > docs/openapi.json.tmp
	mv docs/openapi.json.tmp docs/openapi.json

.PHONY: check-generated
check-generated: generate ## fail when regenerating the committed artefacts changes anything
	@git diff --exit-code -- crds/hndsrservice.yaml charts/hndsr-operator/crds docs/openapi.json docs/crd-reference.md \
	  || { echo "error: generated files are out of date; run 'make generate' and commit" >&2; exit 1; }

CARGO_DENY_VERSION := 0.20.2

.PHONY: deny
deny: ## licences, banned crates and sources (cargo-deny, cached under ~/.cache/hndsr/tools)
	@# cargo-deny runs offline and reads every crate of Cargo.lock, those of
	@# other platforms too, which builds on this one never download.
	@$(CARGO) fetch --locked -q
	@deny=$$(bash server/scripts/install-tool.sh cargo-deny $(CARGO_DENY_VERSION)) && $$deny --offline --log-level error check licenses bans sources

.PHONY: unit
unit: prereqs ## unit, mocked-API and HTTP tests of every crate
	$(CARGO) test --workspace --exclude hndsr-e2e --locked

.PHONY: rules
rules: e2e-binaries ## the chart's alerts as it renders them: promtool check, and promtool unit tests on fixture series
	bash charts/hndsr-operator/tests/check-rules.sh

.PHONY: argocd-health
argocd-health: e2e-binaries ## the chart's Argo CD health check for HndsrService, run offline by Argo CD's Lua engine on fixture objects
	bash charts/hndsr-operator/tests/check-argocd-health.sh

.PHONY: test
test: lint deny check-generated unit rules argocd-health e2e ## every test: lint, licences, generated-file drift, unit/HTTP/mocked-API, alert rules, Argo CD health check, e2e
	@echo "make test: all green"

.PHONY: bench
bench: prereqs ## load-test the release server on 127.0.0.1 and print the figures for docs/benchmarks.md (BENCH_WEIGHTS=W.safetensors adds hndsr rows)
	$(CARGO) build --release --locked -p hndsr-server --bin hndsr-server -p hndsr-loadgen --bin hndsr-loadgen
	bash server/scripts/bench.sh

.PHONY: train
train: prereqs ## train HNDSR from scratch, export + evaluate (knobs: server/scripts/train.sh; hours on CPU)
	bash server/scripts/train.sh

.PHONY: train-realistic
train-realistic: prereqs ## fine-tune the weights for realistic inputs (profile realistic) from the shipped ones, export + evaluate (knobs: server/scripts/train-realistic.sh; about an hour on CPU)
	bash server/scripts/train-realistic.sh

.PHONY: baseline
baseline: prereqs ## HNDSR vs the IMDN baseline vs HNDSR without its spectral branch, same data and steps, side by side on validation (knobs: server/scripts/baseline.sh; about 50 minutes with JOBS=2 THREADS=1 on 2 CPU cores)
	bash server/scripts/baseline.sh

GPU_KIT ?= target/gpu-kit

.PHONY: gpu-kit
gpu-kit: prereqs ## build the GPU checks' stripped binaries into target/gpu-kit (carry it to a CUDA machine, then: bash server/scripts/bench-gpu.sh); GPU_KIT_DATA=1 adds the training images for server/scripts/train-gpu.sh
	$(CARGO) build --release --locked -p hndsr-server --bin hndsr-server -p hndsr-loadgen --bin hndsr-loadgen -p hndsr-train --bin hndsr-train
	$(CARGO) test --release --locked -p hndsr-torch --features cuda-tests --test hndsr_cuda --test cuda --no-run
	@mkdir -p $(GPU_KIT)
	@for b in hndsr-server hndsr-loadgen hndsr-train; do strip -o $(GPU_KIT)/$$b target/release/$$b; done
	@for t in hndsr_cuda cuda; do \
	  f=$$(ls -t target/release/deps/$$t-* | grep -v '\.d$$' | head -1); strip -o $(GPU_KIT)/$$t "$$f"; done
	@if [ "$(GPU_KIT_DATA)" = 1 ]; then bash server/scripts/gpu-kit-data.sh $(GPU_KIT)/data; fi
	@du -sh $(GPU_KIT)

.PHONY: bench-gpu
bench-gpu: ## on a machine with a CUDA GPU and PyTorch 2.11.0: CUDA tests, model latency, server under load (needs `make gpu-kit` first)
	bash server/scripts/bench-gpu.sh

HNDSR_DEVICE ?= cpu
.PHONY: bench-model
bench-model: prereqs ## HNDSR latency per 256²→1024² tile, steps 0/20/50, batch 1/8, on HNDSR_DEVICE (cpu; cuda on a GPU machine)
	$(CARGO) build --release --locked -p hndsr-train
	./target/release/hndsr-train --device $(HNDSR_DEVICE) bench --weights $(HNDSR_WEIGHTS) $(BENCH_ARGS)
