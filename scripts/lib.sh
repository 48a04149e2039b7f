# Shared by scripts/demo, scripts/test and scripts/bench. Sourced, not run.

# Installs Debian packages with apt-get (as root, or through sudo).
apt_install() {
    local sudo=""
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "error: $* missing, and this is not a Debian/Ubuntu machine (no apt-get): install the equivalent of Debian's $* with your package manager, then run this again" >&2
        exit 1
    fi
    if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
    echo "installing $* (apt-get)..." >&2
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null
}

# Installs Debian's etcd-server and etcd-client when etcd or etcdctl is missing.
ensure_etcd() {
    if command -v etcd >/dev/null 2>&1 && command -v etcdctl >/dev/null 2>&1; then
        return 0
    fi
    apt_install etcd-server etcd-client
    # Debian's package starts etcd as a service on 2379; the scripts use their own ports and leave it be.
}

# Installs Debian's protobuf-compiler when protoc is missing: the etcd-client crate (the tests' and
# benchmarks' client) compiles etcd's protos with it at build time (the proxy itself uses a vendored protoc).
ensure_protoc() {
    if command -v protoc >/dev/null 2>&1 || [ -n "${PROTOC:-}" ]; then
        return 0
    fi
    apt_install protobuf-compiler
}

# Installs curl when missing: the client-port tests read etcd's /version, /health and /metrics
# through the proxy with curl, as operators and kubeadm's preflight do (HTTP/1.1, and over TLS).
ensure_curl() {
    if command -v curl >/dev/null 2>&1; then
        return 0
    fi
    apt_install curl
}

# Installs Debian's haproxy when missing: the pass-through bench (benches/passthrough.rs) runs it
# in `mode tcp` on a free loopback port as the floor of any hop. Only the binary is used.
ensure_haproxy() {
    if command -v haproxy >/dev/null 2>&1; then
        return 0
    fi
    apt_install haproxy
    # The package may start a service with its default config (no listener); the bench runs its own.
}

# Installs Debian's valgrind (callgrind, callgrind_annotate) when missing: instructions per call of
# the proxy (`cargo bench --bench passthrough -- --instructions`).
ensure_valgrind() {
    if command -v valgrind >/dev/null 2>&1 && command -v callgrind_annotate >/dev/null 2>&1; then
        return 0
    fi
    apt_install valgrind
}

# Installs Debian's prometheus (with promtool) when missing: the dashboard test evaluates every
# query of deploy/grafana/etcd-squeeze.json in a real Prometheus and lints a scrape with promtool.
ensure_prometheus() {
    if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then
        return 0
    fi
    apt_install prometheus
    # The package may start a service on :9090; the tests run their own on free ports.
}

# Prints a free loopback TCP port.
free_port() {
    local port
    while :; do
        port=$(( (RANDOM % 20000) + 30000 ))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "$port"
            return 0
        fi
    done
}

# wait_healthy NAME URL PID LOG: waits until `etcdctl endpoint health` succeeds against URL (about
# 30 s at most) while process PID is alive; on failure names the component and prints its log.
# The scheme is stripped: etcdctl 3.4 sends an http:// endpoint verbatim as the HTTP/2 :authority,
# which h2 (the proxy's HTTP/2 library) refuses.
wait_healthy() {
    local name="$1" url="$2" pid="$3" log="$4"
    for _ in $(seq 1 100); do
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "$name exited before it became healthy; its log ($log):" >&2
            tail -n 40 "$log" >&2
            return 1
        fi
        if ETCDCTL_API=3 etcdctl --endpoints="${url#http://}" --dial-timeout=200ms --command-timeout=200ms endpoint health >/dev/null 2>&1; then
            return 0
        fi
        sleep 0.1
    done
    echo "timed out waiting for $name at $url; its log ($log):" >&2
    tail -n 40 "$log" >&2
    return 1
}

# The robustness rows the integration tests append (integration-tests/robustness.rs).
ROBUSTNESS_ROWS=target/tmp/robustness.md

# Prints the robustness table: one row per fault run, with its header.
print_robustness_table() {
    if [ ! -s "$ROBUSTNESS_ROWS" ]; then
        return 0
    fi
    echo
    echo "Linearizability under faults (integration-tests/robustness.rs; docs/reliability.md explains the columns):"
    echo "| fault | config | operations | unknown outcomes | watch events checked | linearizable | watch guarantees | values altered |"
    echo "|---|---|---:|---:|---:|---|---|---:|"
    sort "$ROBUSTNESS_ROWS"
}
