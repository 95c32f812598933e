#!/usr/bin/env bash
# Builds the real bosh CLI from the Go module proxy, for the test that checks the BOSH director
# emulator (tests/boshdirector) against it. Pinned by .ci/bosh/go.mod + go.sum; cached outside
# the repo like .ci/build-kube.sh:
#
#   /var/cache/pgrecovery-bosh/go/{mod,build}   Go's module and build caches
#   /var/cache/pgrecovery-bosh/<key>/bin/bosh   the binary
#   /var/cache/pgrecovery-bosh/<key>/build.log  the last build's output
#
# <key> = bosh-cli version + a hash of go.mod/go.sum/this script: a bump builds anew, an
# unchanged pin costs one stat. Why a go.mod of ours rather than `go install …@version`:
# bosh-cli releases have carried `replace` directives (go install refuses those), and ours
# pins every dependency through go.sum with -mod=readonly either way.
#
# Prints one line (version, binary, cached or built in N s); on failure one line on stderr
# (what failed, the log path) and exit 1. PGRECOVERY_BOSH_CACHE overrides the cache root;
# tests/boshdirector/cli.py computes the same <key> to find the binary.
set -euo pipefail
cd "$(dirname "$0")/bosh"

CACHE_ROOT="${PGRECOVERY_BOSH_CACHE:-/var/cache/pgrecovery-bosh}"
GO="$(command -v go || echo /usr/local/go/bin/go)"
if ! [ -x "$GO" ]; then
  echo "build-bosh: no Go toolchain (looked for go on PATH and /usr/local/go/bin/go)" >&2
  exit 1
fi

version="$(awk '$1 == "github.com/cloudfoundry/bosh-cli/v7" && $2 ~ /^v/ {print $2; exit}' go.mod)"
if [ -z "$version" ]; then
  echo "build-bosh: no github.com/cloudfoundry/bosh-cli/v7 version in .ci/bosh/go.mod" >&2
  exit 1
fi
pin_hash="$(cat go.mod go.sum ../build-bosh.sh | sha256sum | cut -c1-12)"
key="bosh-cli-${version}-${pin_hash}"
out="$CACHE_ROOT/$key"
log="$out/build.log"

done_line() { echo "build-bosh: bosh-cli $version in $out/bin ($1)"; }
if [ -x "$out/bin/bosh" ]; then
  done_line cached
  exit 0
fi

mkdir -p "$out" "$CACHE_ROOT/go/mod" "$CACHE_ROOT/go/build"
exec 9>"$CACHE_ROOT/.lock"
flock 9
if [ -x "$out/bin/bosh" ]; then
  done_line "built by another run"
  exit 0
fi

export GOMODCACHE="$CACHE_ROOT/go/mod" GOCACHE="$CACHE_ROOT/go/build"
export GOTOOLCHAIN=local GOFLAGS="-mod=readonly -buildvcs=false"
staging="$out/bin.tmp.$$"
rm -rf "$out"/bin.tmp.*
mkdir -p "$staging"
start=$SECONDS
if ! {
  echo "build-bosh: $("$GO" version); bosh-cli $version"
  # The CLI prints its version from this variable (`bosh -v`), as its own release build sets it.
  "$GO" build -trimpath -o "$staging/bosh" \
    -ldflags="-s -w -X github.com/cloudfoundry/bosh-cli/v7/cmd.VersionLabel=${version#v}" \
    github.com/cloudfoundry/bosh-cli/v7 &&
  "$staging/bosh" -v
} >"$log" 2>&1; then
  rm -rf "$staging"
  echo "build-bosh: building bosh-cli $version failed (log: $log)" >&2
  exit 1
fi
rm -rf "$out/bin"
mv "$staging" "$out/bin"
echo "build-bosh: built in $((SECONDS - start)) s" >>"$log"
done_line "built in $((SECONDS - start)) s, log $log"
