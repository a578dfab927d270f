#!/bin/bash
# Compares two relay builds under load, interleaved in one sitting (this
# machine's speed drifts by tens of percent over a day, so only
# interleaved runs are comparable).
#
#   scripts/relay-load-ab.sh OLD_LOADGEN NEW_LOADGEN
#
# Each argument is a `loadgen` binary (cargo build --release -p
# cubbyhole-relay --features postgres --bin loadgen, at each commit). Runs,
# alternating old and new: SQLite closed loop x3, SQLite at 10 000
# deposits/s x2, and, if CUBBYHOLE_LOAD_POSTGRES is set to a loopback
# postgres:// URL, PostgreSQL closed loop x2, running CUBBYHOLE_LOAD_PG_RESET
# (a shell command that empties that database) before each PostgreSQL run.
set -u
old=$1
new=$2
common=(--clients 500 --mailboxes 50 --seconds 10 --deposits 1000000)
run() {
    local name=$1
    shift
    echo "== $name"
    "$@" 2>&1 | grep -E "throughput|deposit lat|fetch lat|acknowledge lat|fetched"
}
for i in 1 2 3; do
    run "old sqlite closed $i" "$old" "${common[@]}"
    run "new sqlite closed $i" "$new" "${common[@]}"
done
for i in 1 2; do
    run "old sqlite rate 10000 $i" "$old" "${common[@]}" --rate 10000
    run "new sqlite rate 10000 $i" "$new" "${common[@]}" --rate 10000
done
if [ -n "${CUBBYHOLE_LOAD_POSTGRES:-}" ]; then
    for i in 1 2; do
        for build in old new; do
            bash -c "${CUBBYHOLE_LOAD_PG_RESET:-true}"
            binary=$old
            [ "$build" = new ] && binary=$new
            run "$build postgres closed $i" "$binary" "${common[@]}" \
                --postgres "$CUBBYHOLE_LOAD_POSTGRES"
        done
    done
fi
