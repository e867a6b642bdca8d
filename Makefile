# prepull: build, test, demo. The tests and the demo need root (they run a
# private containerd with overlayfs) and the harness binaries (make harness-deps).
GO        ?= go
BIN_DIR   ?= /var/cache/prepull-ci/bin
CONTAINERD_VERSION ?= v2.4.2
VERSION   ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS   := -s -w -X main.version=$(VERSION)
PKGS      := ./...

.PHONY: build test test-short demo lint harness-deps clean

build:
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags "$(LDFLAGS)" -o bin/prepull ./cmd/prepull

# The whole suite: unit and end-to-end tests, with the race detector.
test: harness-deps
	PREPULL_TEST_BIN_DIR=$(BIN_DIR) $(GO) test -race -count=1 -timeout 25m $(PKGS)

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

# Install bin/prepull, the systemd units, /etc/default/prepull and an example
# manifest, then enable prepull.service; ROOT=dir stages under dir instead.
.PHONY: install
install: build
	bin/prepull install $(if $(ROOT),--root $(ROOT))

clean:
	rm -rf bin

