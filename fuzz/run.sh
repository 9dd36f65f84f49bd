#!/usr/bin/env bash
# Fuzzes each target in turn for SECONDS_PER_TARGET (default 60) from its
# corpus in fuzz/corpus/<target>/, then minimises that corpus (cmin, greedy set cover
# of the features, which keeps it small), and
# prints per target the executions, the corpus size and the crashes.
# One fuzzer at a time, one job. Crash inputs land in fuzz/artifacts/<target>/.
set -uo pipefail
cd "$(dirname "$0")"
SECONDS_PER_TARGET="${1:-60}"
TARGETS=(peer_frame client_request client_response context_token stored_entry
         change_chunk membership_payload layout_state node_config store_file
         feed_cursor)
[ -n "${ONLY:-}" ] && read -r -a TARGETS <<< "$ONLY"
cargo +nightly fuzz build -O || exit 1
mkdir -p logs
summary=()
for t in "${TARGETS[@]}"; do
    mkdir -p "corpus/$t" "artifacts/$t"
    before=$(ls "artifacts/$t" | wc -l)
    echo "== $t: ${SECONDS_PER_TARGET}s"
    cargo +nightly fuzz run -O "$t" "corpus/$t" -- \
        -max_total_time="$SECONDS_PER_TARGET" -timeout=10 -rss_limit_mb=2048 \
        -print_final_stats=1 > "logs/$t.log" 2>&1
    status=$?
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "logs/$t.log" | grep -o '[0-9]*$' | tail -1)
    cargo +nightly fuzz cmin -O "$t" "corpus/$t" -- -set_cover_merge=1 > "logs/$t.cmin.log" 2>&1 \
        || echo "   cmin failed, see fuzz/logs/$t.cmin.log"
    size=$(ls "corpus/$t" | wc -l)
    crashes=$(( $(ls "artifacts/$t" | wc -l) - before ))
    [ "$status" -ne 0 ] && [ "$crashes" -eq 0 ] && crashes="exit $status (see fuzz/logs/$t.log)"
    summary+=("$(printf '%-20s executions %-10s corpus %-5s crashes %s' "$t" "${execs:-?}" "$size" "$crashes")")
done
echo
printf '%s\n' "${summary[@]}"
