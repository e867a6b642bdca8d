# prepull: build, test, demo. The tests and the demo need root (they run a
# private containerd with overlayfs) and the harness binaries (make harness-deps).
GO        ?= go
BIN_DIR   ?= /var/cache/prepull-ci/bin
CONTAINERD_VERSION ?= v2.4.2
# The version matrix: EKS still ships containerd 1.7 for older Kubernetes.
CONTAINERD17_VERSION ?= v1.7.35
BIN_DIR_17 ?= /var/cache/prepull-ci/bin-1.7
# Core and fault end-to-end tests that run again against containerd 1.7.
MATRIX_TESTS := TestPullSetReadyForKubelet|TestOneBadImageOthersComplete|TestErrorsAreOneClearLine|TestTagMovesToNewDigest|TestFault
VERSION   ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS   := -s -w -X main.version=$(VERSION)
PKGS      := ./...

.PHONY: build test test-matrix demo lint harness-deps harness-deps-1.7 clean

build:
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags "$(LDFLAGS)" -o bin/prepull ./cmd/prepull

# The whole suite: unit and end-to-end tests with the race detector against
# containerd 2.x, then the core and fault end-to-end tests against 1.7.
test: harness-deps harness-deps-1.7
	PREPULL_TEST_BIN_DIR=$(BIN_DIR) $(GO) test -race -count=1 -timeout 25m $(PKGS)
	$(MAKE) test-matrix
	$(MAKE) fuzz FUZZTIME=60000x

test-matrix: harness-deps-1.7
	PREPULL_TEST_BIN_DIR=$(BIN_DIR_17) $(GO) test -race -count=1 -timeout 20m -run '$(MATRIX_TESTS)' ./cmd/prepull

demo: build harness-deps
	PREPULL_TEST_BIN_DIR=$(BIN_DIR) $(GO) run ./internal/harness/demo --prepull bin/prepull --manifest deploy/examples/demo.yaml

lint:
	@test -z "$$(gofmt -l . | tee /dev/stderr)" || (echo "gofmt needed" && exit 1)
	$(GO) vet $(PKGS)

# containerd and ctr built from the Go module proxy into BIN_DIR (cached).
harness-deps:
	@if [ ! -x $(BIN_DIR)/containerd ] || ! $(BIN_DIR)/containerd --version | grep -q "$(CONTAINERD_VERSION:v%=%)"; then \
		echo "building containerd $(CONTAINERD_VERSION) into $(BIN_DIR)"; \
		mkdir -p $(BIN_DIR) && GOBIN=$(BIN_DIR) $(GO) install \
			github.com/containerd/containerd/v2/cmd/containerd@$(CONTAINERD_VERSION) \
			github.com/containerd/containerd/v2/cmd/ctr@$(CONTAINERD_VERSION); \
	fi
	@command -v docker-registry >/dev/null || (echo "docker-registry missing: apt-get install docker-registry" && exit 1)

# containerd 1.7 from the module proxy. `go install mod@version` refuses it
# (its go.mod has exclude directives), so build inside a copy of the module.
harness-deps-1.7:
	@if [ ! -x $(BIN_DIR_17)/containerd ] || ! $(BIN_DIR_17)/containerd --version | grep -q " $(CONTAINERD17_VERSION:v%=%)"; then \
		echo "building containerd $(CONTAINERD17_VERSION) into $(BIN_DIR_17) (several minutes, cached)"; \
		set -e; tmp=$$(mktemp -d); \
		dir=$$(cd $$tmp && GOFLAGS= $(GO) mod download -json github.com/containerd/containerd@$(CONTAINERD17_VERSION) | sed -n 's/.*"Dir": "\(.*\)".*/\1/p'); \
		cp -r $$dir $$tmp/src && chmod -R u+w $$tmp/src && mkdir -p $(BIN_DIR_17) && \
		(cd $$tmp/src && GOFLAGS= $(GO) build -o $(BIN_DIR_17)/containerd ./cmd/containerd) && rm -rf $$tmp; \
	fi

# Install bin/prepull, the systemd units, /etc/default/prepull and an example
# manifest, then enable prepull.service; ROOT=dir stages under dir instead.
.PHONY: install
install: build
	bin/prepull install $(if $(ROOT),--root $(ROOT))

clean:
	rm -rf bin

# Pull benchmark (issue 6): fresh containerd per contender, caches dropped;
# installs pigz/isal/zstd/docker-registry if missing, then make harness-deps;
# prints the table and writes bench/pull/last-run.md. Needs root; ~20 min.
.PHONY: bench bench-pull
bench: build
	bench/pull/run.sh $(BENCH_ARGS)
bench-pull: bench

# Warm-up benchmark (issue 4): a lazily restored volume modelled with nbdkit
# (copy-on-read + delay) → nbdfuse → loop → ext4; prepull's warm-up vs
# vmtouch -t, find|cat and fio. Needs root and FUSE; installs its packages.
.PHONY: bench-warm
bench-warm:
	@missing=""; for p in nbdkit libnbd-bin fuse3 vmtouch fio bc; do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; fi
	bash bench/warm/run.sh

# Fuzz the manifest parser, the reference normalizer and the ECR host parser,
# FUZZTIME each. make test uses an execution count (60000x, ~10-20 s each):
# with Go 1.26 a duration budget can end in a spurious "context deadline
# exceeded" failure at the deadline (go.dev/issue/75804, fixed in Go 1.27)
# (longer: make fuzz FUZZTIME=5000000x). Findings land in testdata/fuzz/.
FUZZTIME ?= 60000x
.PHONY: fuzz
fuzz:
	$(GO) test -run '^$$' -fuzz '^FuzzParseManifest$$' -fuzztime $(FUZZTIME) ./manifest
	$(GO) test -run '^$$' -fuzz '^FuzzNormalizeRef$$' -fuzztime $(FUZZTIME) ./manifest
	$(GO) test -run '^$$' -fuzz '^FuzzParseHost$$' -fuzztime $(FUZZTIME) ./ecrauth
