#!/usr/bin/env bash
# ExecuTorch's Android Java API (classes.jar) and JNI library (libexecutorch.so for arm64-v8a and
# x86_64), as the npm package react-native-executorch 0.9.3 ships them inside its tarball. Later
# versions download their binaries when installed, which cannot work where only the package
# registries are reachable. npm checks the tarball against the registry's sha512.
#
#   android_demo/app/fetch_executorch.sh [CACHE]     (CACHE: android_demo/.cache, which git ignores)
#
# Leaves CACHE/react-native-executorch-0.9.3/{android/libs/classes.jar,
# third-party/android/libs/executorch/{arm64-v8a,x86_64}/libexecutorch.so}; does nothing if they are there.
set -euo pipefail
VERSION=0.9.3
CACHE=${1:-$(cd "$(dirname "$0")/.." && pwd)/.cache}
DEST=$CACHE/react-native-executorch-$VERSION
WANTED=(android/libs/classes.jar
        third-party/android/libs/executorch/arm64-v8a/libexecutorch.so
        third-party/android/libs/executorch/x86_64/libexecutorch.so)

have_all() {
    for f in "${WANTED[@]}"; do [ -s "$DEST/$f" ] || return 1; done
}
if have_all; then
    exit 0
fi
command -v npm >/dev/null || { echo "error: npm is not installed (apt-get install npm)" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "react-native-executorch@$VERSION" >/dev/null)
mkdir -p "$work/x"
tar -xzf "$work/react-native-executorch-$VERSION.tgz" -C "$work/x" "${WANTED[@]/#/package/}"
rm -rf "$DEST" && mkdir -p "$CACHE" && mv "$work/x/package" "$DEST"
have_all || { echo "error: react-native-executorch-$VERSION's tarball lacks one of ${WANTED[*]}" >&2; exit 1; }
echo "ExecuTorch's classes.jar and libexecutorch.so are in $DEST"
