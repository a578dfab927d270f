#!/usr/bin/env bash
# Runs the benchmarks and prints the report (examples/bench_report.rs): each
# protocol step's median beside the sum of its floor operations and the
# ratio, skip linearity, and the backlog rates. See BENCHMARKS.md.
#
#   scripts/bench-report.sh              # protocol suite + backlog benches (~8 min)
#   scripts/bench-report.sh --protocol   # protocol suite only (~4 min)
#   scripts/bench-report.sh --backlog    # backlog benches only (~3 min)
#   scripts/bench-report.sh --passes 3   # the protocol suite 3 times: medians of medians
#   scripts/bench-report.sh --report     # no run: the report from the last results
#                                        # (all passes of the last multi-pass run)
#
# Extra arguments after `--` go to criterion for the protocol suite, e.g.
#   scripts/bench-report.sh --protocol -- --measurement-time 5
# The protocol suite runs with `--warm-up-time 1 --measurement-time 3` unless
# given others; the backlog benches set their own (10 samples each).
set -euo pipefail
cd "$(dirname "$0")/.."

protocol=1
backlog=1
passes=1
criterion_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --protocol) backlog=0 ;;
    --backlog) protocol=0 ;;
    --report) protocol=0; backlog=0 ;;
    --passes)
      passes="${2:-}"; shift
      case "$passes" in ''|*[!0-9]*|0) echo "--passes expects a positive number" >&2; exit 2 ;; esac ;;
    --) shift; criterion_args=("$@"); break ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
if [ ${#criterion_args[@]} -eq 0 ]; then
  criterion_args=(--warm-up-time 1 --measurement-time 3)
fi

criterion="${CARGO_TARGET_DIR:-target}/criterion"
saved="${CARGO_TARGET_DIR:-target}/bench-passes"
since=$(date +%s)
if [ "$protocol" = 1 ]; then
  rm -rf "$saved"
  for pass in $(seq "$passes"); do
    [ "$passes" -gt 1 ] && echo "=== protocol suite, pass $pass of $passes"
    cargo bench --bench protocol -- "${criterion_args[@]}"
    if [ "$passes" -gt 1 ]; then
      mkdir -p "$saved/pass-$pass"
      cp -r "$criterion/floor" "$criterion/protocol" "$saved/pass-$pass/"
    fi
  done
fi
if [ "$backlog" = 1 ]; then
  cargo bench --features sqlite --bench backlog --bench backlog_sqlite
  cargo bench -p cubbyhole-relay --bench backlog_http
fi

# After a run of several passes (even with --report later), the report
# combines the saved passes; the backlog figures come from criterion's
# directory.
report_args=()
if [ -d "$saved" ]; then
  for pass_dir in "$saved"/pass-*; do report_args+=(--dir "$pass_dir"); done
  for group in backlog backlog_http; do
    [ -d "$criterion/$group" ] && report_args+=(--dir "$criterion/$group")
  done
fi
if [ "$protocol" = 1 ] || [ "$backlog" = 1 ]; then
  report_args+=(--since "$since")
fi

echo
echo "## Benchmark report ($(nproc) CPUs, load average $(cut -d' ' -f1-3 /proc/loadavg))"
echo
cargo run --quiet --example bench_report -- "${report_args[@]}"
