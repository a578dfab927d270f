#!/usr/bin/env bash
# Builds the browser package into web/pkg: cubbyhole-browser for
# wasm32-unknown-unknown (profile `wasm`: LTO, size-optimized), then wasm-bindgen's JavaScript glue and
# TypeScript declarations (--target web: an ES module the page imports).
# Needs `rustup target add wasm32-unknown-unknown` and the wasm-bindgen CLI
# of the version in Cargo.lock (the CLI refuses another):
#   cargo install wasm-bindgen-cli --version "$(scripts/build-web.sh --wasm-bindgen-version)"
set -euo pipefail
cd "$(dirname "$0")/.."
version=$(awk '/^name = "wasm-bindgen"$/ { getline; gsub(/"/, "", $3); print $3; exit }' Cargo.lock)
if [ "${1:-}" = "--wasm-bindgen-version" ]; then
  echo "$version"
  exit 0
fi
if ! command -v wasm-bindgen >/dev/null || [ "$(wasm-bindgen --version | awk '{print $2}')" != "$version" ]; then
  echo "wasm-bindgen $version is needed: cargo install wasm-bindgen-cli --version $version" >&2
  exit 1
fi
target_dir=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
cargo build --profile wasm --target wasm32-unknown-unknown -p cubbyhole-browser
rm -rf web/pkg
# No name or producers section: 0.8 MB instead of 1.1 (gzip 305 KB
# instead of 368); a panic's stack trace then shows function indices.
wasm-bindgen --target web --remove-name-section --remove-producers-section --out-dir web/pkg \
  "$target_dir/wasm32-unknown-unknown/wasm/cubbyhole_browser.wasm"
ls -l web/pkg
