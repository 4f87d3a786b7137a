#!/usr/bin/env bash
# Unpack the Kubernetes test binaries (SRC/*.xz, checked against SRC/SHA256SUMS) into DEST.
# A binary already in DEST with the right checksum is left alone.
# Usage: tests/envtest-assets.sh SRC DEST
set -euo pipefail
src=${1:?usage: $0 SRC DEST}
dest=${2:?usage: $0 SRC DEST}
if [ ! -d "$src" ] || [ ! -f "$src/SHA256SUMS" ]; then
    echo "envtest: $src with SHA256SUMS and the *.xz binaries is missing; it holds kube-apiserver, etcd," \
         "kube-controller-manager... (or point KUBEBUILDER_ASSETS at a folder from 'setup-envtest use 1.36 -p path')" >&2
    exit 1
fi
src=$(cd "$src" && pwd)
mkdir -p "$dest"
cd "$dest"
while read -r sum name; do
    [ -n "$name" ] || continue
    if [ -f "$name" ] && [ -x "$name" ] && echo "$sum  $name" | sha256sum --quiet -c - >/dev/null 2>&1; then
        continue
    fi
    if [ ! -f "$src/$name.xz" ]; then
        echo "envtest: $src/$name.xz is missing (listed in $src/SHA256SUMS)" >&2
        exit 1
    fi
    echo "envtest: unpacking $name"
    xz -dc "$src/$name.xz" > "$name.tmp"
    chmod +x "$name.tmp"
    mv -f "$name.tmp" "$name"
done < "$src/SHA256SUMS"
sha256sum -c "$src/SHA256SUMS"
