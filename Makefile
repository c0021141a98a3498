# detour: make demo (a namespace gateway with real clients), make test,
# make bench, make deb.
GO      ?= go
BIN     := bin/detour
VERSION ?= $(shell git describe --always --dirty 2>/dev/null || echo dev)
# Fuzzing budget per target, in executions (about 15-30 s each here). A
# count, not a duration: Go 1.26's fuzz coordinator can report "context
# deadline exceeded" when a -fuzztime deadline lands while it minimizes a
# new input (go.dev/issue/75804); a count has no deadline to race.
FUZZEXECS ?= 300000
# make bench's soak: connection churn for this long, then detour's RSS,
# goroutines and descriptors back to their baseline (40 s in make test).
SOAK ?= 5m

.PHONY: all build deps demo test unit e2e fuzz deb clean

all: build

build:
	$(GO) build -trimpath -ldflags "-X main.version=$(VERSION)" -o $(BIN) ./cmd/detour

deps:
	@bash scripts/install-deps.sh

demo: deps build
	bash scripts/demo.sh $(BIN)

# Unit tests, then the end-to-end tests in network namespaces (root only;
# they skip with a message otherwise).
test: deps unit fuzz e2e

unit:
	@test -z "$$(gofmt -l .)" || { echo "gofmt needed:"; gofmt -l .; exit 1; }
	$(GO) vet ./...
	$(GO) test -race -count=1 ./cmd/... ./internal/... ./ports/... ./redirect/... ./sniff/... ./tunnel/...
	DETOUR_TEST_GOROUTINES=1 $(GO) test -race -count=1 ./tunnel/

# Each fuzz target (package:target) for FUZZEXECS executions; the seed
# corpora (sniff/testdata, tunnel/proxyport/testdata, internal/socksudp/testdata,
# tunnel/upstream/testdata) already ran as unit
# tests. A hang fails at -timeout.
FUZZTARGETS := sniff:FuzzTLS sniff:FuzzHTTP sniff:FuzzParse \
	sniff:FuzzQUIC sniff:FuzzQUICFrames sniff:FuzzDNS \
	tunnel/proxyport:FuzzRequest tunnel/proxyport:FuzzSOCKS \
	internal/socksudp:FuzzHeader \
	tunnel/upstream:FuzzSOCKS5Reply tunnel/upstream:FuzzHTTPConnectReply
fuzz:
	@for t in $(FUZZTARGETS); do \
		p=$${t%%:*}; f=$${t#*:}; \
		echo "go test -run '^$$' -fuzz '^$$f$$' -fuzztime $(FUZZEXECS)x ./$$p"; \
		$(GO) test -run '^$$' -fuzz "^$$f$$" -fuzztime $(FUZZEXECS)x -fuzzminimizetime 5s -timeout 5m ./$$p || exit 1; \
	done

e2e:
	$(GO) test -count=1 -timeout 15m ./test/...
	@left=$$(ip netns list 2>/dev/null | grep -E '^dt[0-9a-f]{8}-' || true); \
	 test -z "$$left" || { echo "namespaces left behind: $$left"; exit 1; }

# Benchmarks (root, ~10 minutes, more when other work disturbs it and
# repetitions are added; BENCH_QUICK=1 for ~2): detour against
# kernel forwarding and redsocks in namespaces (test/bench). Prints a table;
# the raw numbers go to test/bench/out/. BENCH_FLAGS passes options, e.g.
# BENCH_FLAGS='-candidates kernel,detour-redirect -reps 5'.
bench: build
	@bash scripts/install-deps.sh --bench
	$(GO) build -o bin/bench ./test/bench
	./bin/bench -detour $(BIN) $(BENCH_FLAGS)
	$(GO) test -count=1 -run '^TestSoak$$' -timeout 60m ./test/ -args -soak $(SOAK)
	@left=$$(ip netns list 2>/dev/null | grep -E '^db[0-9a-f]{8}-' || true); \
	 test -z "$$left" || { echo "namespaces left behind: $$left"; exit 1; }

# The Debian package bin/detour_VERSION_amd64.deb (scripts/build-deb.sh:
# dpkg-deb, reproducible; DEB_VERSION, DEB_ARCH override). The e2e test
# TestDebPackage installs it (CI only, or DETOUR_TEST_DEB=1).
deb:
	bash scripts/build-deb.sh bin

clean:
	rm -rf bin
