#!/usr/bin/env bash
# The app's APK, built with Debian's tools: javac (the core, then the app against API 23's
# android.jar and ExecuTorch's classes.jar), aapt2 (resources and manifest), zip (ExecuTorch's
# JNI libraries, stored), zipalign and apksigner. Debian has no dexer (d8/r8), so without D8 the
# APK carries no runnable code: it is a shell (manifest, resources, native libraries) that
# cannot run. Where the Android SDK is installed, D8 adds the code (android_demo/README.md).
#
#   android_demo/app/build.sh                       the shell: OUT/app-unsigned.apk, OUT/app-signed.apk
#   D8=$ANDROID_HOME/build-tools/<version>/d8 EXTRA_JARS=... EXTRA_JNI=... android_demo/app/build.sh
#
# Settings (environment):
#   OUT          where everything goes (android_demo/app/build)
#   ANDROID_JAR  the platform compiled and linked against (Debian's android-sdk-platform-23)
#   EXECUTORCH   react-native-executorch 0.9.3's unpacked files (fetch_executorch.sh puts them in
#                android_demo/.cache/react-native-executorch-0.9.3)
#   JARS         the core's libraries (Debian's msgpack-core, okhttp, okio)
#   D8           d8 from the SDK's build-tools; with it the APK gets classes.dex
#   D8_LIB       the android.jar d8 desugars against (ANDROID_JAR; give one of API 26 or later, the
#                minSdkVersion, so that d8 sees java.nio.file and java.util.function)
#   EXTRA_JARS   more jars to dex, ':'-separated (ExecuTorch's fbjni and SoLoader's nativeloader)
#   EXTRA_JNI    a folder of ABI/lib*.so to add (fbjni's jni/ folder: libexecutorch.so needs libfbjni.so)
#   KEYSTORE     the signing key store (default: a debug key made in OUT); KEYSTORE_PASS, KEY_ALIAS
set -euo pipefail
APP=$(cd "$(dirname "$0")" && pwd)
DEMO=$(dirname "$APP")
OUT=${OUT:-$APP/build}
ANDROID_JAR=${ANDROID_JAR:-/usr/lib/android-sdk/platforms/android-23/android.jar}
EXECUTORCH=${EXECUTORCH:-$DEMO/.cache/react-native-executorch-0.9.3}
JARS=${JARS:-/usr/share/java/msgpack-core.jar:/usr/share/java/okhttp.jar:/usr/share/java/okio.jar}
D8=${D8:-}
D8_LIB=${D8_LIB:-$ANDROID_JAR}
EXTRA_JARS=${EXTRA_JARS:-}
EXTRA_JNI=${EXTRA_JNI:-}
KEYSTORE=${KEYSTORE:-$OUT/debug.keystore}
KEYSTORE_PASS=${KEYSTORE_PASS:-android}
KEY_ALIAS=${KEY_ALIAS:-androiddebugkey}
MIN_SDK=26  # as AndroidManifest.xml says
ABIS=(arm64-v8a x86_64)  # what ExecuTorch ships

fail() { echo "error: $*" >&2; exit 1; }
for tool in javac jar keytool aapt2 zip zipalign apksigner; do
    command -v "$tool" >/dev/null || fail "$tool is not installed (.ci/run installs what the build needs)"
done
[ -f "$ANDROID_JAR" ] || fail "no $ANDROID_JAR (apt-get install android-sdk-platform-23, from Debian unstable)"
ET_JAR=$EXECUTORCH/android/libs/classes.jar
[ -f "$ET_JAR" ] || fail "no $ET_JAR (run android_demo/app/fetch_executorch.sh)"
IFS=: read -r -a jars <<< "$JARS"
for j in "${jars[@]}"; do
    [ -f "$j" ] || fail "no $j (apt-get install libmsgpack-java libokhttp-java libokio-java)"
done

rm -rf "$OUT/core" "$OUT/classes" "$OUT/gen" "$OUT/dex" "$OUT"/*.apk "$OUT"/*.idsig "$OUT"/*.zip
mkdir -p "$OUT/core" "$OUT/classes" "$OUT/gen"

# The core as the JVM tests build it (Java 17); d8 reads Java 17 class files.
find "$DEMO/core/src/main/java" -name '*.java' | sort > "$OUT/core-sources.txt"
javac --release 17 -Xlint:all -Werror -d "$OUT/core" -cp "$JARS" @"$OUT/core-sources.txt"
jar --create --file "$OUT/core-classes.jar" -C "$OUT/core" .

# Resources and manifest; aapt2 link writes R.java, which the app's sources need.
aapt2 compile --dir "$APP/src/main/res" -o "$OUT/resources.zip"
aapt2 link -I "$ANDROID_JAR" --manifest "$APP/src/main/AndroidManifest.xml" --java "$OUT/gen" \
    -o "$OUT/linked.apk" "$OUT/resources.zip"

# The app against API 23's android.jar as the boot class path: only the platform's own classes
# are seen. -bootclasspath needs -source/-target 8 (javac refuses it with 9 and later).
{ find "$APP/src/main/java" -name '*.java'; find "$OUT/gen" -name '*.java'; } | sort > "$OUT/app-sources.txt"
javac -source 8 -target 8 -bootclasspath "$ANDROID_JAR" -Xlint:all -Werror -d "$OUT/classes" \
    -cp "$OUT/core-classes.jar:$ET_JAR:$JARS" @"$OUT/app-sources.txt"
jar --create --file "$OUT/app-classes.jar" -C "$OUT/classes" .

# Native libraries stored uncompressed (zip -0) so that zipalign can align them to 16 KiB and the
# system maps them from the APK (extractNativeLibs="false"): 16 KiB serves phones with 16 KiB
# memory pages (Android 15 and later) as well as 4 KiB ones; ExecuTorch's ELF segments are
# 16 KiB-aligned too. (Debian's zipalign 10 has no -P 16; its -p means 4 KiB.)
cp "$OUT/linked.apk" "$OUT/unaligned.apk"
mkdir -p "$OUT/native"
for abi in "${ABIS[@]}"; do
    so=$EXECUTORCH/third-party/android/libs/executorch/$abi/libexecutorch.so
    [ -f "$so" ] || fail "no $so (run android_demo/app/fetch_executorch.sh)"
    mkdir -p "$OUT/native/lib/$abi" && cp "$so" "$OUT/native/lib/$abi/"
    if [ -n "$EXTRA_JNI" ] && [ -d "$EXTRA_JNI/$abi" ]; then
        cp "$EXTRA_JNI/$abi"/*.so "$OUT/native/lib/$abi/"
    fi
done
(cd "$OUT/native" && zip -q -0 -r -D "$OUT/unaligned.apk" lib)
rm -rf "$OUT/native"

if [ -n "$D8" ]; then
    dex_inputs=("$OUT/app-classes.jar" "$OUT/core-classes.jar" "$ET_JAR" "${jars[@]}")
    if [ -n "$EXTRA_JARS" ]; then
        IFS=: read -r -a extra <<< "$EXTRA_JARS"
        dex_inputs+=("${extra[@]}")
    fi
    mkdir -p "$OUT/dex"
    "$D8" --release --min-api "$MIN_SDK" --lib "$D8_LIB" --output "$OUT/dex" "${dex_inputs[@]}"
    (cd "$OUT/dex" && zip -q "$OUT/unaligned.apk" classes*.dex)
fi

zipalign -f 16384 "$OUT/unaligned.apk" "$OUT/app-unsigned.apk"
rm "$OUT/unaligned.apk" "$OUT/linked.apk"
if [ ! -f "$KEYSTORE" ]; then
    keytool -genkeypair -keystore "$KEYSTORE" -storepass "$KEYSTORE_PASS" -alias "$KEY_ALIAS" \
        -keypass "$KEYSTORE_PASS" -keyalg RSA -keysize 2048 -validity 10000 \
        -dname "CN=fwdfed debug, O=fwdfed" 2>/dev/null
fi
apksigner sign --ks "$KEYSTORE" --ks-pass "pass:$KEYSTORE_PASS" --ks-key-alias "$KEY_ALIAS" \
    --key-pass "pass:$KEYSTORE_PASS" --min-sdk-version "$MIN_SDK" --v4-signing-enabled false \
    --out "$OUT/app-signed.apk" "$OUT/app-unsigned.apk"
apksigner verify --min-sdk-version "$MIN_SDK" "$OUT/app-signed.apk"
if [ -n "$D8" ]; then
    echo "built $OUT/app-signed.apk (with classes.dex)"
else
    echo "built $OUT/app-unsigned.apk and $OUT/app-signed.apk: shells without classes.dex (no D8 given)"
fi
