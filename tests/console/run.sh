#!/usr/bin/env bash
# Browser tests of the web console: headless Chromium (Debian's
# /usr/bin/chromium) driven by Playwright, against a real hub, agent and
# the stand-in API server (tests/console_e2e.rs starts them).
#
#   tests/console/run.sh                       run; screenshots in target/console-screenshots/
#   tests/console/run.sh --update-screenshots  also copy them to tests/console/screenshots/ (README)
#
# Needs: apt-get install -y chromium nodejs npm; the npm packages come from
# package-lock.json (npm ci; no browser download: Playwright drives the
# system Chromium).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
update=0
for arg in "$@"; do
  case "$arg" in
    --update-screenshots) update=1 ;;
    *) echo "usage: $0 [--update-screenshots]" >&2; exit 2 ;;
  esac
done

for tool in node npm cargo; do
  command -v "$tool" >/dev/null || { echo "$0: $tool is not installed" >&2; exit 1; }
done
chromium="${UPLINK_CHROMIUM:-/usr/bin/chromium}"
[ -x "$chromium" ] || { echo "$0: $chromium is missing: apt-get install -y chromium" >&2; exit 1; }

if [ ! -d "$here/node_modules/playwright-core" ] || [ "$here/package-lock.json" -nt "$here/node_modules" ]; then
  (cd "$here" && npm ci --no-audit --no-fund)
fi

cd "$repo"
# The test builds uplink and uplink-hub itself (cargo builds a package's
# binaries for its integration tests).
UPLINK_REQUIRE_BROWSER=1 cargo test --test console_e2e -- --nocapture

if [ "$update" = 1 ]; then
  target="${CARGO_TARGET_DIR:-$repo/target}"
  mkdir -p "$here/screenshots"
  rm -f "$here"/screenshots/*.png
  for f in "$target"/console-screenshots/[0-9]*.png; do
    cp "$f" "$here/screenshots/"
  done
  echo "screenshots copied to tests/console/screenshots/"
fi
