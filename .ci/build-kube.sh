#!/usr/bin/env bash
# Builds kube-apiserver and etcd from the Go module proxy for the tests' real Kubernetes API
# (tests/realkube), pinned by .ci/kube/go.mod + go.sum, and caches them outside the repo:
#
#   /var/cache/pgrecovery-kube/go/{mod,build}       Go's module and build caches (shared by versions)
#   /var/cache/pgrecovery-kube/<key>/bin/           kube-apiserver, etcd
#   /var/cache/pgrecovery-kube/<key>/build.log      the last build's output
#
# <key> = k8s.io/kubernetes version + etcd version + a hash of go.mod/go.sum/this script, so a bump
# builds anew and an unchanged pin costs one stat (seconds). Why a go.mod of ours:
# k8s.io/kubernetes points its k8s.io/* staging modules at local folders, and `go install
# pkg@version` refuses modules with replace directives; ours requires it and replaces each
# staging module by the published k8s.io/<name> v0.x.y of the same release. etcd is the
# version that same kube-apiserver release requires (go.etcd.io/etcd/server/v3), built in the
# same module so the two share one dependency graph.
#
# Prints one line (versions, bin directory, cached or built in N s); on failure one line on
# stderr (what failed, the log path) and exit 1. PGRECOVERY_KUBE_CACHE overrides the cache root;
# tests/realkube/server.py computes the same <key> to find the binaries.
set -euo pipefail
cd "$(dirname "$0")/kube"

CACHE_ROOT="${PGRECOVERY_KUBE_CACHE:-/var/cache/pgrecovery-kube}"
GO="$(command -v go || echo /usr/local/go/bin/go)"
if ! [ -x "$GO" ]; then
  echo "build-kube: no Go toolchain (looked for go on PATH and /usr/local/go/bin/go)" >&2
  exit 1
fi

kube_version="$(awk '$1 == "k8s.io/kubernetes" && $2 ~ /^v/ {print $2; exit}' go.mod)"
etcd_version="$(awk '$1 == "go.etcd.io/etcd/server/v3" && $2 ~ /^v/ {print $2; exit}' go.mod)"
# this script is part of the key: a change of how it builds (ldflags, …) builds anew
pin_hash="$(cat go.mod go.sum ../build-kube.sh | sha256sum | cut -c1-12)"
key="kube-${kube_version}-etcd-${etcd_version}-${pin_hash}"
out="$CACHE_ROOT/$key"
log="$out/build.log"

done_line() { echo "build-kube: kube-apiserver $kube_version + etcd $etcd_version in $out/bin ($1)"; }
if [ -x "$out/bin/kube-apiserver" ] && [ -x "$out/bin/etcd" ]; then
  done_line cached
  exit 0
fi

mkdir -p "$out" "$CACHE_ROOT/go/mod" "$CACHE_ROOT/go/build"
# Two checkouts (or two engineers) building at once would race on the same output: one lock.
exec 9>"$CACHE_ROOT/.lock"
flock 9
if [ -x "$out/bin/kube-apiserver" ] && [ -x "$out/bin/etcd" ]; then
  done_line "built by another run"
  exit 0
fi

export GOMODCACHE="$CACHE_ROOT/go/mod" GOCACHE="$CACHE_ROOT/go/build"
# local: never fetch another toolchain; readonly: go.mod/go.sum in the repo are the pin and a
# build must not change them; -trimpath and no VCS stamp for a reproducible binary.
export GOTOOLCHAIN=local GOFLAGS="-mod=readonly -buildvcs=false"
staging="$out/bin.tmp.$$"
rm -rf "$out"/bin.tmp.*  # left by a killed build (we hold the lock: none is running)
mkdir -p "$staging"
start=$SECONDS
if ! {
  echo "build-kube: $("$GO" version); kube-apiserver $kube_version, etcd $etcd_version"
  # The version kube-apiserver reports (/version, kubectl version) is stamped by the linker as in
  # Kubernetes' own build; without it the server calls itself v0.0.0-master.
  minor="${kube_version#v1.}"; minor="${minor%%.*}"
  v=k8s.io/component-base/version
  # (set -e does not apply inside an `if` condition: each step is chained with &&)
  "$GO" build -trimpath -o "$staging/" -ldflags="-s -w -X $v.gitVersion=$kube_version \
    -X $v.gitMajor=1 -X $v.gitMinor=$minor -X $v.gitTreeState=clean" \
    k8s.io/kubernetes/cmd/kube-apiserver go.etcd.io/etcd/server/v3 &&
  mv "$staging/server" "$staging/etcd" &&  # go names the binary of …/server/v3 "server"
  "$staging/kube-apiserver" --version &&
  "$staging/etcd" --version
} >"$log" 2>&1; then
  rm -rf "$staging"
  echo "build-kube: building kube-apiserver $kube_version / etcd $etcd_version failed (log: $log)" >&2
  exit 1
fi
rm -rf "$out/bin"
mv "$staging" "$out/bin"
echo "build-kube: built in $((SECONDS - start)) s" >>"$log"
done_line "built in $((SECONDS - start)) s, log $log"
