# detour: make demo (a namespace gateway with real clients), make test.
GO      ?= go
BIN     := bin/detour
VERSION ?= $(shell git describe --always --dirty 2>/dev/null || echo dev)
FUZZTIME ?= 20s

.PHONY: all build deps demo test unit e2e fuzz lint clean

all: build

build:
	$(GO) build -trimpath -ldflags "-X main.version=$(VERSION)" -o $(BIN) ./cmd/detour

deps:
	@bash scripts/install-deps.sh

demo: deps build
	bash scripts/demo.sh $(BIN)

# Unit tests, then the end-to-end tests in network namespaces (root only;
# they skip with a message otherwise).
test: deps unit e2e

unit:
	@test -z "$$(gofmt -l .)" || { echo "gofmt needed:"; gofmt -l .; exit 1; }
	$(GO) vet ./...
	$(GO) test -race -count=1 ./cmd/... ./redirect/... ./sniff/... ./tunnel/...

e2e:
	$(GO) test -count=1 -timeout 15m ./test/...
	@left=$$(ip netns list 2>/dev/null | grep -E '^dt[0-9a-f]{8}-' || true); \
	 test -z "$$left" || { echo "namespaces left behind: $$left"; exit 1; }

clean:
	rm -rf bin
