# The two commands a fresh machine needs: `make run` and `make test`.

.PHONY: run test guests bench lint

# Builds everything and starts a one-node cluster with the hello app serving.
run: guests
	cargo build --release
	./target/release/shoal up --apply examples/hello/app.toml

# Runs every test: unit, crate integration and end-to-end (real processes). The metrics test
# checks the exposition format with promtool, from Debian's prometheus package; the dashboard's
# drives Debian's Chromium through its chromedriver; the OCI tests push to and pull from Debian's
# docker-registry (the CNCF distribution registry) on loopback; the etcd backend's run real etcd
# members (Debian's etcd-server) on loopback, and its client is built with protoc.
test:
	rustup target add wasm32-wasip2
	command -v promtool >/dev/null || (apt-get update && apt-get install -y --no-install-recommends prometheus)
	command -v chromedriver >/dev/null || (apt-get update && apt-get install -y chromium chromium-driver)
	command -v docker-registry >/dev/null || (apt-get update && apt-get install -y docker-registry)
	command -v etcd >/dev/null || (apt-get update && apt-get install -y etcd-server)
	command -v protoc >/dev/null || (apt-get update && apt-get install -y protobuf-compiler)
	cargo test --workspace

guests:
	rustup target add wasm32-wasip2
	cargo build --release --locked --target wasm32-wasip2 --manifest-path examples/Cargo.toml

# Measurements behind BENCHMARKS.md: gateway vs `wasmtime serve`, deploy latency, idle
# memory, cross-node hop, failover, density, scale from zero, autoscaling, neighbours, instance reuse,
# scheduler throughput, the cost of a config lookup, acknowledged applies (on redb and on a
# three-member etcd). Needs wasmtime 48 (wrk and etcd are installed from Debian if missing).
bench: guests
	command -v wrk >/dev/null || (apt-get update && apt-get install -y wrk)
	command -v etcd >/dev/null || (apt-get update && apt-get install -y etcd-server)
	cargo bench --bench gateway
	cargo bench --bench cluster
	cargo bench --bench lifecycle
	cargo bench --bench elasticity
	cargo bench --bench pools
	cargo bench --bench neighbours
	cargo bench --bench hotpath
	cargo bench --bench config
	cargo bench --bench keyvalue
	cargo bench -p shoal-scheduler
	cargo bench -p shoal-control --bench applies
	BENCH_STORE=etcd cargo bench -p shoal-control --bench applies

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings
