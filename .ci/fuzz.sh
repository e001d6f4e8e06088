#!/usr/bin/env bash
# Runs every cargo-fuzz target under fuzz/ for a bounded time with the
# nightly toolchain, and fails if any of them finds a crash.
#
#   FUZZ_SECONDS   seconds per target (default 30)
#   FUZZ_TARGETS   space-separated subset of targets (default: all)
#
# Seeds come from fuzz/corpus/<target> (read only); what the fuzzer adds
# goes to fuzz/target/fuzz-corpus/<target>, logs to fuzz/target/fuzz-logs,
# crashing inputs to fuzz/artifacts/<target>/ (none of them committed).
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

secs=${FUZZ_SECONDS:-30}
read -r -a targets <<<"${FUZZ_TARGETS:-frame ingress dhcp api specs vnet}"

if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

mkdir -p target
echo "=== building fuzz targets"
# The fuzz crate's dependencies come from the local cache when they are
# there; otherwise from the registry, retried while the registry cannot be
# reached (a name that does not resolve, an index that does not answer),
# so that a passing outage is not taken for a broken build.
build() { cargo +nightly fuzz build >target/fuzz-build.log 2>&1; }
unreachable() {
    grep -qE 'Could not resolve host|unable to update registry|failed to download|spurious network error' \
        target/fuzz-build.log
}
built=false
if CARGO_NET_OFFLINE=true build; then
    built=true
else
    for attempt in 1 2 3 4; do
        if build; then
            built=true
            break
        fi
        unreachable || break
        echo "fuzz: the registry cannot be reached (attempt $attempt); retrying in $((attempt * 15)) s"
        sleep $((attempt * 15))
    done
fi
if ! $built; then
    cat target/fuzz-build.log
    rm -f target/fuzz-build.log
    echo "fuzz: building the targets failed (not a fuzzing crash)"
    exit 2
fi
tail -n 1 target/fuzz-build.log
rm -f target/fuzz-build.log
triple=$(rustc +nightly -vV | sed -n 's/^host: //p')
bin=target/$triple/release

mkdir -p target/fuzz-logs
summary=()
failed=0
for t in "${targets[@]}"; do
    work=target/fuzz-corpus/$t
    log=target/fuzz-logs/$t.log
    mkdir -p "$work" "corpus/$t"
    echo "=== fuzzing $t for ${secs}s"
    status=ok
    mkdir -p "artifacts/$t"
    # The binaries cargo-fuzz built, run directly: no rebuild between targets.
    if ! "$bin/$t" -artifact_prefix="artifacts/$t/" -max_total_time="$secs" \
        -timeout=30 -print_final_stats=1 "$work" "corpus/$t" >"$log" 2>&1; then
        status=CRASH
        failed=1
        tail -n 60 "$log"
    fi
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    last=$(grep -E '(INITED|NEW|REDUCE|pulse|DONE|RELOAD).*cov: ' "$log" | tail -n 1 || true)
    cov=$(sed -n 's/.*cov: \([0-9]*\).*/\1/p' <<<"$last")
    ft=$(sed -n 's/.*ft: \([0-9]*\).*/\1/p' <<<"$last")
    corp=$(sed -n 's/.*corp: \([0-9]*\)\/.*/\1/p' <<<"$last")
    summary+=("$(printf 'fuzz %-8s %-5s execs=%s cov=%s ft=%s corpus=%s' \
        "$t" "$status" "${execs:-?}" "${cov:-?}" "${ft:-?}" "${corp:-?}")")
done

echo "=== fuzz summary (${secs}s per target)"
printf '%s\n' "${summary[@]}"
if ((failed)); then
    echo "crashing inputs are under fuzz/artifacts/TARGET/ (reproduce: cd fuzz && cargo +nightly fuzz run TARGET ARTIFACT)"
fi
exit "$failed"
