# prepull: build, test, demo, release, image. `make demo` and `make test` set
# up the machine themselves (Debian packages when root, the harness binaries
# built from the Go module proxy into BIN_DIR); they need root to run.
GO        ?= go
BIN_DIR   ?= /var/cache/prepull-ci/bin
CONTAINERD_VERSION ?= v2.4.2
# runc for the harness's CRI pods: Debian's 1.1.5 cannot start them here.
RUNC_VERSION ?= v1.5.3
# ko builds the DaemonSet image without a Docker engine.
KO_VERSION ?= v0.19.1
# The version matrix: EKS still ships containerd 1.7 for older Kubernetes.
CONTAINERD17_VERSION ?= v1.7.35
# kubelet for the kubelet e2e test: k8s.io/kubernetes from the module proxy
# with its staging modules at their published versions (STAGING_VERSION).
KUBERNETES_VERSION ?= v1.37.2
BIN_DIR_17 ?= /var/cache/prepull-ci/bin-1.7
# Core and fault end-to-end tests that run again against containerd 1.7.
MATRIX_TESTS := TestPullSetReadyForKubelet|TestOneBadImageOthersComplete|TestErrorsAreOneClearLine|TestTagMovesToNewDigest|TestFault
VERSION   ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS   := -s -w -X main.version=$(VERSION)
PKGS      := ./...
# Debian packages the tests and the demo use: the reference registry
# (distribution 2.8), systemd-analyze for the units, pigz/isal so containerd
# decompresses the way the deploy recipes install it, e2fsprogs for loop
# filesystems in fault tests, gcc/pkg-config/libseccomp-dev to build runc,
# file for the release test, ca-certificates for the image's CA bundle.
DEBS      := docker-registry systemd pigz isal e2fsprogs xfsprogs gcc libc6-dev pkg-config libseccomp-dev file ca-certificates
.PHONY: build test test-matrix demo lint deps harness-deps harness-deps-1.7 kubelet-dep clean

build:
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags "$(LDFLAGS)" -o bin/prepull ./cmd/prepull

# The whole suite: unit and end-to-end tests with the race detector against
# containerd 2.x, then the core and fault end-to-end tests against 1.7.
test: deps harness-deps ko-dep harness-deps-1.7 kubelet-dep
	PREPULL_TEST_BIN_DIR=$(BIN_DIR) $(GO) test -race -count=1 -timeout 25m $(PKGS)
	$(MAKE) test-matrix
	$(MAKE) fuzz FUZZTIME=60000x

test-matrix: harness-deps-1.7
	PREPULL_TEST_BIN_DIR=$(BIN_DIR_17) $(GO) test -race -count=1 -timeout 20m -run '$(MATRIX_TESTS)' ./cmd/prepull

demo: deps build harness-deps
	PREPULL_TEST_BIN_DIR=$(BIN_DIR) $(GO) run ./internal/harness/demo --prepull bin/prepull --manifest deploy/examples/demo.yaml

lint:
	@test -z "$$(gofmt -l . | tee /dev/stderr)" || (echo "gofmt needed" && exit 1)
	$(GO) vet $(PKGS)

# The Debian packages above: installed when missing (as root); otherwise
# stop with the one command that installs them.
deps:
	@missing=""; for p in $(DEBS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" != 0 ]; then \
			echo "missing Debian packages:$$missing; run: sudo apt-get update && sudo apt-get install -y --no-install-recommends$$missing" >&2; exit 1; \
		fi; \
		echo "installing Debian packages:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

# containerd, ctr and the runc shim built from the Go module proxy into
# BIN_DIR, and runc (cgo, seccomp) next to them; cached: a stamp file per
# version, so a version change rebuilds and nothing else does.
harness-deps: deps
	@if [ ! -x $(BIN_DIR)/containerd ] || [ ! -x $(BIN_DIR)/containerd-shim-runc-v2 ] || [ ! -e $(BIN_DIR)/.containerd-$(CONTAINERD_VERSION) ]; then \
		echo "building containerd $(CONTAINERD_VERSION) into $(BIN_DIR) (about a minute, cached)"; \
		mkdir -p $(BIN_DIR) && GOFLAGS= GOBIN=$(BIN_DIR) $(GO) install \
			github.com/containerd/containerd/v2/cmd/containerd@$(CONTAINERD_VERSION) \
			github.com/containerd/containerd/v2/cmd/ctr@$(CONTAINERD_VERSION) \
			github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2@$(CONTAINERD_VERSION) && \
		rm -f $(BIN_DIR)/.containerd-* && touch $(BIN_DIR)/.containerd-$(CONTAINERD_VERSION); \
	fi
	@if [ ! -x $(BIN_DIR)/runc ] || ! $(BIN_DIR)/runc --version | grep -q "^runc version $(RUNC_VERSION:v%=%)$$"; then \
		echo "building runc $(RUNC_VERSION) into $(BIN_DIR)"; \
		mkdir -p $(BIN_DIR) && GOFLAGS= GOBIN=$(BIN_DIR) CGO_ENABLED=1 $(GO) install -tags seccomp \
			github.com/opencontainers/runc@$(RUNC_VERSION); \
	fi

# ko from the Go module proxy into BIN_DIR (cached, rebuilt on a version change).
ko-dep:
	@if [ ! -x $(BIN_DIR)/ko ] || [ ! -e $(BIN_DIR)/.ko-$(KO_VERSION) ]; then \
		echo "building ko $(KO_VERSION) into $(BIN_DIR)"; \
		mkdir -p $(BIN_DIR) && GOFLAGS= GOBIN=$(BIN_DIR) CGO_ENABLED=0 $(GO) install github.com/google/ko@$(KO_VERSION) && \
		rm -f $(BIN_DIR)/.ko-* && touch $(BIN_DIR)/.ko-$(KO_VERSION); \
	fi

# containerd 1.7 from the module proxy. `go install mod@version` refuses it
# (its go.mod has exclude directives), so build inside a copy of the module.
harness-deps-1.7: deps
	@if [ ! -x $(BIN_DIR_17)/containerd ] || ! $(BIN_DIR_17)/containerd --version | grep -q " $(CONTAINERD17_VERSION:v%=%)"; then \
		echo "building containerd $(CONTAINERD17_VERSION) into $(BIN_DIR_17) (several minutes, cached)"; \
		set -e; tmp=$$(mktemp -d); \
		dir=$$(cd $$tmp && GOFLAGS= $(GO) mod download -json github.com/containerd/containerd@$(CONTAINERD17_VERSION) | sed -n 's/.*"Dir": "\(.*\)".*/\1/p'); \
		cp -r $$dir $$tmp/src && chmod -R u+w $$tmp/src && mkdir -p $(BIN_DIR_17) && \
		(cd $$tmp/src && GOFLAGS= $(GO) build -o $(BIN_DIR_17)/containerd ./cmd/containerd) && rm -rf $$tmp; \
	fi

# kubelet from the module proxy into BIN_DIR, cached: a stamp file per
# version. Cold it is 25 minutes of CPU (about 13 minutes on an idle 2-core
# machine; 44 on a loaded one). The module zip of k8s.io/kubernetes has no
# staging/, so build in a copy of it whose go.mod replaces each
# ./staging/src/k8s.io/x with the published k8s.io/x at the matching v0 version.
kubelet-dep:
	@if [ ! -x $(BIN_DIR)/kubelet ] || [ ! -e $(BIN_DIR)/.kubelet-$(KUBERNETES_VERSION) ]; then \
		echo "building kubelet $(KUBERNETES_VERSION) into $(BIN_DIR) (25 CPU-minutes, cached)"; \
		set -e; tmp=$$(mktemp -d); staging=v0.$(word 2,$(subst ., ,$(KUBERNETES_VERSION))).$(word 3,$(subst ., ,$(KUBERNETES_VERSION))); \
		dir=$$(cd $$tmp && GOFLAGS= $(GO) mod download -json k8s.io/kubernetes@$(KUBERNETES_VERSION) | sed -n 's/.*"Dir": "\(.*\)".*/\1/p'); \
		cp -r $$dir $$tmp/src && chmod -R u+w $$tmp/src && cd $$tmp/src && rm -f go.work go.work.sum && \
		for m in $$(sed -n 's|^[[:space:]]*\(k8s.io/[^ ]*\) => ./staging/.*|\1|p' go.mod); do \
			GOWORK=off $(GO) mod edit -replace $$m=$$m@$$staging; \
		done && \
		mkdir -p $(BIN_DIR) && GOWORK=off GOFLAGS=-mod=mod CGO_ENABLED=0 $(GO) build -trimpath \
			-ldflags "-X k8s.io/component-base/version.gitVersion=$(KUBERNETES_VERSION)" -o $(BIN_DIR)/kubelet ./cmd/kubelet && \
		cd / && rm -rf $$tmp && rm -f $(BIN_DIR)/.kubelet-* && touch $(BIN_DIR)/.kubelet-$(KUBERNETES_VERSION); \
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

# Fuzz the manifest parser, the reference normalizer, the ECR host parser and
# the applier (against containerd's),
# FUZZTIME each. make test uses an execution count (60000x, ~10-20 s each):
# with Go 1.26 a duration budget can end in a spurious "context deadline
# exceeded" failure at the deadline (go.dev/issue/75804, fixed in Go 1.27)
# (longer: make fuzz FUZZTIME=5000000x). Findings land in testdata/fuzz/.
FUZZTIME ?= 60000x
# FuzzApply compares prepull's applier with containerd's on generated tars
# (30-60 executions a second here): its own, smaller count.
FUZZTIME_APPLY ?= 2000x
.PHONY: fuzz
fuzz:
	$(GO) test -run '^$$' -fuzz '^FuzzParseManifest$$' -fuzztime $(FUZZTIME) ./manifest
	$(GO) test -run '^$$' -fuzz '^FuzzNormalizeRef$$' -fuzztime $(FUZZTIME) ./manifest
	$(GO) test -run '^$$' -fuzz '^FuzzParseHost$$' -fuzztime $(FUZZTIME) ./ecrauth
	$(GO) test -run '^$$' -fuzz '^FuzzApply$$' -fuzztime $(FUZZTIME_APPLY) ./applier

# Static release binaries for the Image Builder component and the Packer
# recipe (dist/prepull-linux-amd64, dist/prepull-linux-arm64) and their
# SHA256SUMS; the version is stamped in (VERSION=v1.2.3 to choose it).
DIST ?= dist
RELEASE_PLATFORMS ?= linux/amd64 linux/arm64
.PHONY: release
release:
	@mkdir -p $(DIST) && rm -f $(DIST)/prepull-linux-* $(DIST)/SHA256SUMS
	@set -e; for p in $(RELEASE_PLATFORMS); do \
		os=$${p%/*}; arch=$${p#*/}; echo "building $(DIST)/prepull-$$os-$$arch ($(VERSION))"; \
		GOOS=$$os GOARCH=$$arch CGO_ENABLED=0 $(GO) build -trimpath -ldflags "$(LDFLAGS)" -o $(DIST)/prepull-$$os-$$arch ./cmd/prepull; \
	done
	cd $(DIST) && sha256sum prepull-linux-* > SHA256SUMS && cat SHA256SUMS

# The DaemonSet's image, built without a Docker engine: a scratch base with
# the build host's CA bundle (for ECR's and other registries' TLS), made here
# and pushed by digest into IMAGE's repository, then ko adds the static
# binary for each platform and pushes the index as IMAGE. Prints the pushed
# reference with its digest (also written to $(DIST)/image-ref).
# IMAGE_INSECURE=1 for a plain-HTTP registry that is not on loopback.
IMAGE ?=
IMAGE_PLATFORMS ?= linux/amd64,linux/arm64
CA_BUNDLE ?= /etc/ssl/certs/ca-certificates.crt
.PHONY: image ko-dep
image: ko-dep
	@test -n "$(IMAGE)" || { echo "set IMAGE=registry/repository:tag" >&2; exit 2; }
	@test -r $(CA_BUNDLE) || { echo "$(CA_BUNDLE) missing: apt-get install ca-certificates (or set CA_BUNDLE)" >&2; exit 2; }
	@set -e; image='$(IMAGE)'; repo="$${image%:*}"; tag="$${image##*:}"; \
	case "$$tag" in */*) repo="$$image"; tag=latest ;; esac; \
	mkdir -p $(DIST); \
	base=$$(GOFLAGS= $(GO) run ./deploy/image/base --repo "$$repo" --ca-bundle $(CA_BUNDLE) \
		--platforms $(IMAGE_PLATFORMS) $(if $(IMAGE_INSECURE),--insecure)); \
	echo "base $$base"; \
	KO_DOCKER_REPO="$$repo" KO_DEFAULTBASEIMAGE="$$base" KO_CONFIG_PATH=deploy/image VERSION=$(VERSION) \
		$(BIN_DIR)/ko build --bare --tags "$$tag" --platform $(IMAGE_PLATFORMS) --sbom none \
		$(if $(IMAGE_INSECURE),--insecure-registry) --image-refs $(DIST)/image-ref ./cmd/prepull >/dev/null; \
	echo "image $$(cat $(DIST)/image-ref)"
