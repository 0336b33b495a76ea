#!/usr/bin/env bash
# Run every lockbridge test on a fresh Debian or Ubuntu machine, as root.
#
# Installs what the tests need (system packages with apt-get, Python tools into .venv), then
# checks formatting and lints, reproduces the independent PTLS vectors, and runs the whole test
# suite. A missing tool is an error that names the install step; nothing is skipped.
# `tests/run.sh --install-only` stops after the installs (benches/report uses it).
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\n==> %s\n' "$*"; }

# --- system packages ---------------------------------------------------------------------
apt_packages=()
command -v python3 >/dev/null || apt_packages+=(python3)
python3 -m venv --help >/dev/null 2>&1 || apt_packages+=(python3-venv)
command -v cc >/dev/null || apt_packages+=(gcc libc6-dev)
command -v pkg-config >/dev/null || apt_packages+=(pkg-config)
# bluer links libdbus; the BlueZ tests run a private dbus-daemon with BlueZoo.
pkg-config --exists dbus-1 2>/dev/null || apt_packages+=(libdbus-1-dev)
command -v dbus-daemon >/dev/null || apt_packages+=(dbus)
# dbus-monitor: the BLE tests and benchmark count the D-Bus calls lockbridge makes.
command -v dbus-monitor >/dev/null || apt_packages+=(dbus-bin)
# BlueZoo's sd-bus binding needs libsystemd at run time.
ldconfig -p 2>/dev/null | grep -q 'libsystemd\.so\.0' || apt_packages+=(libsystemd0)
command -v kill >/dev/null || apt_packages+=(procps)
# An independent CoAP/DTLS client for the cloud endpoint's tests.
command -v coap-client-openssl >/dev/null || apt_packages+=(libcoap3-bin)
command -v openssl >/dev/null || apt_packages+=(openssl)
command -v gnutls-cli >/dev/null || apt_packages+=(gnutls-bin)
# The unit test rates the systemd unit's hardening with systemd-analyze.
command -v systemd-analyze >/dev/null || apt_packages+=(systemd)
# The MQTT bridge's tests run a real broker and talk to it with mosquitto's own clients.
command -v mosquitto >/dev/null || [[ -x /usr/sbin/mosquitto ]] || apt_packages+=(mosquitto)
command -v mosquitto_sub >/dev/null || apt_packages+=(mosquitto-clients)
# The Debian package: cargo-deb computes its dependencies with dpkg-shlibdeps; lintian checks it.
command -v dpkg-shlibdeps >/dev/null || apt_packages+=(dpkg-dev)
command -v lintian >/dev/null || apt_packages+=(lintian)
# The Raspberry Pi (arm64) build: Debian's cross gcc and arm64 libdbus, and Debian's own Rust,
# whose standard library for arm64 is a package (libstd-rust-web-dev:arm64) rather than a rustup
# download; qemu-user runs the arm64 binary in the tests.
if ! dpkg --print-foreign-architectures | grep -qx arm64; then
    if [[ $(id -u) -ne 0 ]]; then
        echo "tests/run.sh: the arm64 build needs: dpkg --add-architecture arm64 (as root)" >&2
        exit 1
    fi
    say "enabling arm64 packages (dpkg --add-architecture arm64)"
    dpkg --add-architecture arm64
fi
command -v aarch64-linux-gnu-gcc >/dev/null || apt_packages+=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross)
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'ok installed'; }
installed libdbus-1-dev:arm64 || apt_packages+=(libdbus-1-dev:arm64)
installed rustc-web || apt_packages+=(rustc-web)
installed cargo-web || apt_packages+=(cargo-web)
installed libstd-rust-web-dev:arm64 || apt_packages+=(libstd-rust-web-dev:arm64)
command -v qemu-aarch64 >/dev/null || apt_packages+=(qemu-user)
if ((${#apt_packages[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        echo "tests/run.sh: missing ${apt_packages[*]}; run as root or: apt-get install ${apt_packages[*]}" >&2
        exit 1
    fi
    say "installing ${apt_packages[*]}"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${apt_packages[@]}"
fi

if ! command -v cargo >/dev/null; then
    echo "tests/run.sh: cargo not found; install the stable Rust toolchain (1.85 or newer) with rustup, with the rustfmt and clippy components" >&2
    exit 1
fi
for component in fmt clippy; do
    if ! cargo "$component" --version >/dev/null 2>&1; then
        echo "tests/run.sh: cargo $component not found; install it with: rustup component add ${component/fmt/rustfmt}" >&2
        exit 1
    fi
done

# cargo-deb (the packages) and cargo-fuzz (the fuzz targets; without a sanitizer it needs only
# stable's coverage flags) are needed only after the main build: they compile beside it.
mkdir -p target
install_tools() {
    if ! cargo deb --version >/dev/null 2>&1; then
        echo "installing cargo-deb"
        nice -n 5 cargo install --locked cargo-deb
    fi
    if ! cargo fuzz --version >/dev/null 2>&1; then
        echo "installing cargo-fuzz"
        nice -n 5 cargo install --locked cargo-fuzz
    fi
}
wait_tools() {
    if ! wait "$tools_pid"; then
        echo "tests/run.sh: installing cargo-deb or cargo-fuzz failed:" >&2
        tail -n 40 target/install-tools.log >&2
        exit 1
    fi
}
if [[ ${1:-} == --install-only ]]; then
    install_tools
else
    say "installing cargo-deb and cargo-fuzz if missing, beside the build (target/install-tools.log)"
    install_tools >target/install-tools.log 2>&1 &
    tools_pid=$!
fi

# --- Python tools (independent known-answer vectors, BlueZoo) ------------------------------
if [[ ! -x .venv/bin/python ]]; then
    say "creating .venv for the Python tools"
    python3 -m venv .venv
fi
if ! .venv/bin/python -c 'import cryptography, sys; sys.exit(int(cryptography.__version__.split(".")[0]) < 44)' 2>/dev/null; then
    say "installing Python cryptography (>= 44, for deterministic ECDSA)"
    .venv/bin/pip install -q "cryptography>=44"
fi
if [[ ! -x .venv/bin/bluezoo ]]; then
    say "installing BlueZoo (user-space BlueZ emulator for the BlueZ tests)"
    .venv/bin/pip install -q bluezoo
fi

# The benchmark report's plots (benches/report; tests/bench_report.rs renders a recorded run).
if ! .venv/bin/python -c 'import matplotlib' 2>/dev/null; then
    say "installing matplotlib (the benchmark report's plots)"
    .venv/bin/pip install -q matplotlib
fi
if [[ ${1:-} == --install-only ]]; then
    exit 0
fi

# --- checks -------------------------------------------------------------------------------
say "cargo fmt --check"
cargo fmt --check
cargo fmt --check --manifest-path fuzz/Cargo.toml

# One build both checks the lints and makes everything the tests and the amd64 package run:
# clippy-driver wraps rustc for lockbridge's own crates, exactly as `cargo clippy` has it do, but
# in a real build, in the release profile the package ships, so nothing is compiled twice.
say "clippy -D warnings, and the release build of every target"
clippy_driver=$(rustup which clippy-driver 2>/dev/null || command -v clippy-driver)
export RUSTC_WORKSPACE_WRAPPER=$clippy_driver
export CLIPPY_ARGS=-D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__
mkdir -p target
cargo test --release --all-targets --no-run --locked --quiet \
    --message-format=json-render-diagnostics >target/test-build.json

say "PTLS vectors: regenerate independently and compare with the committed file"
.venv/bin/python tests/vectors/gen_ptls_vectors.py --check

wait_tools
# Nothing started in the background outlives this script.
trap 'touch target/fuzz-go; kill $(jobs -p) 2>/dev/null || true' EXIT

say "fuzz targets (coverage-instrumented, their own workspace): built beside the tests, run for ${FUZZ_SECONDS:-20} s each after them, two at a time (target/fuzz.log)"
# Each fuzz target for a bounded time (FUZZ_SECONDS, default 20), from seeds taken from real
# traffic plus every input that once crashed it (fuzz/regressions/); any crash fails the run.
# Two at a time (libFuzzer uses one core), beside the end of the arm64 build and the package
# suites: a fuzz run is bounded in time, not in work.
fuzz_seconds=${FUZZ_SECONDS:-20}
fuzz_one() {
    local target=$1 regressions=()
    [[ -d fuzz/regressions/$target ]] && regressions=("regressions/$target")
    local log="target/fuzz-$target.log"
    if (cd fuzz && cargo fuzz run --sanitizer none --debug-assertions "$target" \
            "corpus/$target" "${regressions[@]}" -- -max_total_time="$fuzz_seconds") >"$log" 2>&1; then
        echo "fuzz $target: ok, $(grep -o 'Done [0-9]* runs' "$log" | tail -n 1 | cut -d' ' -f2) runs"
    else
        echo "fuzz $target: FAILED (the input is in fuzz/artifacts/$target/; make it a regression test)"
        tail -n 40 "$log"
        return 1
    fi
}
fuzz_all() {
    local ok=0 bad=0 i pid target targets pids
    mapfile -t targets < <(cd fuzz && cargo fuzz list)
    for ((i = 0; i < ${#targets[@]}; i += 2)); do
        pids=()
        for target in "${targets[@]:i:2}"; do
            fuzz_one "$target" &
            pids+=($!)
        done
        for pid in "${pids[@]}"; do
            if wait "$pid"; then
                ok=$((ok + 1))
            else
                bad=$((bad + 1))
            fi
        done
    done
    echo "$ok $bad" >target/fuzz-totals
}
cargo run --release --locked --quiet --example fuzz_seeds -- fuzz/corpus
rm -f target/fuzz-go target/fuzz-totals
(
    unset RUSTC_WORKSPACE_WRAPPER CLIPPY_ARGS
    if ! (cd fuzz && nice -n 5 cargo fuzz build --sanitizer none --debug-assertions) \
        >target/fuzz-build.log 2>&1; then
        echo "cargo fuzz build failed:"
        tail -n 40 target/fuzz-build.log
        echo "0 1" >target/fuzz-totals
        exit 1
    fi
    # The targets run once the main suites are done (target/fuzz-go).
    while [[ ! -e target/fuzz-go ]]; do sleep 1; done
    fuzz_all
) >target/fuzz.log 2>&1 &
fuzz_pid=$!

# The suites spend most of their time waiting on the processes they run (daemons, simulators,
# brokers, BlueZoo), so the Debian packages build meanwhile, and two suites run at a time; the
# package suites run once the packages are there. Every suite runs even when one fails.
say "Debian packages (amd64, and arm64 for the Raspberry Pi), built beside the tests"
# The arm64 build is Debian's own Rust: rustup's clippy-driver does not wrap it.
(packaging/build-deb &&
    env -u RUSTC_WORKSPACE_WRAPPER -u CLIPPY_ARGS \
        packaging/build-deb --target aarch64-unknown-linux-gnu) >target/build-deb.log 2>&1 &
deb_pid=$!

say "tests (two suites at a time)"
rm -rf target/test-logs
test_status=0
.venv/bin/python tests/run_suites.py target/test-build.json target/test-logs 2 \
    --except package arm64 || test_status=$?
read -r passed failed <target/test-logs/totals
touch target/fuzz-go

deb_status=0
wait "$deb_pid" || deb_status=$?
if ((deb_status != 0)); then
    echo "packaging/build-deb failed (exit ${deb_status}):"
    tail -n 40 target/build-deb.log
    exit 1
fi
grep '\.deb$' target/build-deb.log

say "package tests"
package_status=0
.venv/bin/python tests/run_suites.py target/test-build.json target/test-logs/package 1 \
    --only package arm64 || package_status=$?
read -r p f <target/test-logs/package/totals
passed=$((passed + p))
failed=$((failed + f))
if ((test_status != 0 || package_status != 0)); then
    echo "tests failed: ${failed} failed, ${passed} passed (each suite's output is in target/test-logs/)"
    exit 1
fi

wait "$fuzz_pid" || true
say "fuzzing"
cat target/fuzz.log
read -r p f <target/fuzz-totals
passed=$((passed + p))
failed=$((failed + f))
echo
echo "${passed} passed, ${failed} failed"
((failed == 0))
