#!/usr/bin/env bash
# Release archives and npm packages, from a clean clone:
#
#   dist/build.sh                 # every target below, then the npm packages and the formula
#   dist/build.sh TARGET...       # those targets only (e.g. x86_64-unknown-linux-musl)
#   dist/build.sh npm             # the npm packages, from the archives in target/dist
#   dist/build.sh brew            # the Homebrew formula, from the archives in target/dist
#
# Targets: x86_64-unknown-linux-musl, aarch64-unknown-linux-musl (static), x86_64-apple-darwin,
# aarch64-apple-darwin (linked by cargo-zigbuild, no macOS SDK), x86_64-pc-windows-gnu (mingw-w64).
#
# Output in target/dist/: singleflight-VERSION-TARGET.tar.gz (.zip for Windows), each holding
# singleflight-VERSION-TARGET/{singleflight[.exe],completions/,man/,LICENSE,README.md};
# SHA256SUMS of every archive; npm/*.tgz; singleflight.rb (the formula, with the sha256 of
# the archives, from packaging/homebrew/singleflight.rb).
#
# It installs what it lacks: rustup targets, mingw-w64 (apt), zig (pip's ziglang) and
# cargo-zigbuild (cargo install). Archives are made byte-reproducible from the same commit
# and toolchain: paths are remapped, entries sorted, times set to the commit's, owners 0.
#
# RELEASE_URL: where the archives are downloadable, for the formula's urls; HOMEPAGE: the
# formula's homepage. The release workflow sets both; the defaults are placeholders
# (example.invalid) that no formula can be published with.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
all_targets=(x86_64-unknown-linux-musl aarch64-unknown-linux-musl x86_64-apple-darwin
    aarch64-apple-darwin x86_64-pc-windows-gnu)
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)
target_dir=${CARGO_TARGET_DIR:-$root/target}
dist="$target_dir/dist"
release_url=${RELEASE_URL:-https://example.invalid/singleflight/releases/download/v$version}
homepage=${HOMEPAGE:-https://example.invalid/singleflight}
# The commit's time: archive entries, npm packages and zip entries carry it, not now.
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || echo 315532800)}

say() { printf 'dist: %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }

apt_install() {
    command -v apt-get > /dev/null || die "cannot install $* (no apt-get): install it by hand"
    local sudo=()
    [[ $(id -u) == 0 ]] || sudo=(sudo)
    "${sudo[@]}" apt-get install -y -qq "$@" > /dev/null 2>&1 ||
        { "${sudo[@]}" apt-get update -qq && DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq "$@" > /dev/null; }
}

need_target() {
    rustup target list --installed | grep -qx "$1" || rustup target add "$1"
}

need_zigbuild() {
    if ! command -v zig > /dev/null && ! python3 -c 'import ziglang' 2> /dev/null; then
        say "installing zig (pip install ziglang)"
        python3 -m pip install --quiet ziglang 2> /dev/null ||
            python3 -m pip install --quiet --break-system-packages ziglang
    fi
    if ! command -v cargo-zigbuild > /dev/null; then
        say "installing cargo-zigbuild"
        cargo install --locked --quiet cargo-zigbuild
    fi
}

# Builds TARGET's release binary; prints its path.
build_binary() {
    local target=$1 exe=singleflight
    need_target "$target"
    # Paths in the binary (panic locations) name no home or clone directory.
    local remap="--remap-path-prefix=$root=. --remap-path-prefix=${CARGO_HOME:-$HOME/.cargo}=/cargo"
    case $target in
    x86_64-unknown-linux-musl | aarch64-unknown-linux-musl)
        # ring (rustls' crypto) compiles C for the target: zig's clang and musl do it
        # on any host, where the host's gcc has no musl headers.
        # The code of a fresh hit first in the text, together (see dist/hit-path.sh).
        # Linked from a copy named by its checksum: cargo does not know the script, but
        # a changed RUSTFLAGS makes it link again.
        need_zigbuild
        local script
        script="$target_dir/hit-path/$(sha256sum dist/hit-path.ld | cut -c1-16).ld"
        mkdir -p "$(dirname "$script")"
        cp dist/hit-path.ld "$script"
        RUSTFLAGS="$remap -C link-arg=-Wl,-T,$script" \
            cargo zigbuild --release --locked --quiet --target "$target"
        ;;
    *-apple-darwin)
        need_zigbuild
        # zig links a Mach-O without an SDK; it warns once that none was found. Without
        # the PostgreSQL backend: tokio-postgres's whoami links the SystemConfiguration
        # and CoreFoundation frameworks, which only a macOS SDK has (the link fails here).
        RUSTFLAGS="$remap" cargo zigbuild --release --locked --quiet \
            --no-default-features --features etcd --target "$target" 2>&1 |
            grep -v -e xcrun -e 'the SDK is needed' -e '^ *|$' -e '^$' >&2 || true
        [[ ${PIPESTATUS[0]} == 0 ]] || die "$target: cargo zigbuild failed"
        ;;
    x86_64-pc-windows-gnu)
        command -v x86_64-w64-mingw32-gcc > /dev/null || apt_install mingw-w64
        RUSTFLAGS="$remap" cargo build --release --locked --quiet --target "$target"
        exe=singleflight.exe
        ;;
    *) die "unknown target $target (known: ${all_targets[*]}, npm, brew)" ;;
    esac
    local bin="$target_dir/$target/release/$exe"
    [[ -f $bin ]] || die "$target: no $bin after the build"
    printf '%s\n' "$bin"
}

# Writes target/dist/singleflight-VERSION-TARGET.{tar.gz,zip}.
archive() {
    local target=$1 bin=$2 name="singleflight-$version-$1"
    local stage="$dist/stage/$name"
    rm -rf "$dist/stage"
    mkdir -p "$stage/completions" "$stage/man"
    cp "$bin" "$stage/"
    cp completions/* "$stage/completions/"
    cp man/singleflight.1 "$stage/man/"
    cp LICENSE README.md "$stage/"
    chmod 755 "$stage/$(basename "$bin")"
    find "$stage" -type f ! -name 'singleflight' ! -name '*.exe' -exec chmod 644 {} +
    find "$stage" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
    if [[ $target == *windows* ]]; then
        rm -f "$dist/$name.zip"
        python3 - "$dist/stage" "$name" "$dist/$name.zip" << 'PY'
import os, sys, time, zipfile
base, name, out = sys.argv[1:]
when = time.gmtime(int(os.environ["SOURCE_DATE_EPOCH"]))[:6]
with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
    for dirpath, dirs, files in os.walk(os.path.join(base, name)):
        dirs.sort()
        for f in sorted(files):
            path = os.path.join(dirpath, f)
            info = zipfile.ZipInfo(os.path.relpath(path, base), when)
            info.external_attr = (os.stat(path).st_mode & 0o777) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            with open(path, "rb") as src:
                z.writestr(info, src.read())
PY
    else
        tar --sort=name --owner=0 --group=0 --numeric-owner --mtime="@$SOURCE_DATE_EPOCH" \
            --format=gnu -C "$dist/stage" -cf - "$name" | gzip -9 -n > "$dist/$name.tar.gz"
    fi
    rm -rf "$dist/stage"
    say "wrote $(ls "$dist/$name".* | head -n 1)"
}

write_sums() {
    # Whatever archives are there (a build of one target may be the first): a glob that
    # matches nothing expands to nothing, never to itself.
    (cd "$dist" && shopt -s nullglob &&
        archives=(singleflight-"$version"-*.tar.gz singleflight-"$version"-*.zip) &&
        printf '%s\n' "${archives[@]}" | LC_ALL=C sort | xargs -r sha256sum > SHA256SUMS)
    say "wrote $dist/SHA256SUMS"
}

# The npm packages: one per platform archive present, and the main package.
pack_npm() {
    command -v npm > /dev/null || apt_install npm
    local out="$dist/npm" work="$dist/npm-stage"
    rm -rf "$out" "$work"
    mkdir -p "$out" "$work"
    local packed=0 target
    for target in "${all_targets[@]}"; do
        local platform
        platform=$(npm_platform "$target")
        local archive="$dist/singleflight-$version-$target.tar.gz" exe=singleflight
        [[ $target == *windows* ]] && { archive="${archive%.tar.gz}.zip"; exe=singleflight.exe; }
        [[ -f $archive ]] || continue
        local pkg="$work/$platform"
        mkdir -p "$pkg/bin"
        if [[ $archive == *.zip ]]; then
            python3 -c 'import sys, zipfile; open(sys.argv[3], "wb").write(zipfile.ZipFile(sys.argv[1]).read(sys.argv[2]))' \
                "$archive" "singleflight-$version-$target/$exe" "$pkg/bin/$exe"
        else
            tar -xzf "$archive" -O "singleflight-$version-$target/$exe" > "$pkg/bin/$exe"
        fi
        chmod 755 "$pkg/bin/$exe"
        cp LICENSE "$pkg/"
        sed -e "s/@VERSION@/$version/g" -e "s/@PLATFORM@/$platform/g" \
            -e "s/@OS@/${platform%-*}/g" -e "s/@CPU@/${platform#*-}/g" -e "s/@TARGET@/$target/g" \
            -e "s/@EXE@/$exe/g" dist/npm/platform.package.json > "$pkg/package.json"
        printf '# @singleflight-cli/%s\n\nThe `singleflight` executable for %s (%s): installed by\n`@singleflight-cli/singleflight`, not meant to be installed by itself.\n' \
            "$platform" "$platform" "$target" > "$pkg/README.md"
        (cd "$out" && npm pack --silent "$pkg" > /dev/null)
        packed=$((packed + 1))
    done
    [[ $packed -gt 0 ]] || die "npm: no archive in $dist to pack: run dist/build.sh TARGET first"
    local main="$work/singleflight"
    mkdir -p "$main/bin"
    cp dist/npm/launcher.js "$main/bin/singleflight"
    cp dist/npm/install.js dist/npm/platform.js "$main/"
    chmod 755 "$main/bin/singleflight"
    cp LICENSE README.md "$main/"
    sed -e "s/@VERSION@/$version/g" dist/npm/package.json > "$main/package.json"
    (cd "$out" && npm pack --silent "$main" > /dev/null)
    rm -rf "$work"
    say "wrote $(cd "$out" && ls | tr '\n' ' ')into $out"
}

npm_platform() {
    case $1 in
    x86_64-unknown-linux-musl) echo linux-x64 ;;
    aarch64-unknown-linux-musl) echo linux-arm64 ;;
    x86_64-apple-darwin) echo darwin-x64 ;;
    aarch64-apple-darwin) echo darwin-arm64 ;;
    x86_64-pc-windows-gnu) echo win32-x64 ;;
    esac
}

# target/dist/singleflight.rb: the formula with every archive's url and sha256 filled in.
write_formula() {
    local formula
    formula=$(sed -e "s/@VERSION@/$version/g" -e "s|@RELEASE_URL@|$release_url|g" \
        -e "s|@HOMEPAGE@|$homepage|g" \
        packaging/homebrew/singleflight.rb)
    local target
    for target in x86_64-unknown-linux-musl aarch64-unknown-linux-musl x86_64-apple-darwin \
        aarch64-apple-darwin; do
        local file="singleflight-$version-$target.tar.gz" sum
        if [[ -f $dist/$file ]]; then
            sum=$(cd "$dist" && sha256sum "$file" | cut -d' ' -f1)
        else
            # Not built here: the formula cannot be released, and says so.
            sum="NOT-BUILT"
        fi
        formula=${formula//@SHA256_$target@/$sum}
    done
    printf '%s\n' "$formula" > "$dist/singleflight.rb"
    say "wrote $dist/singleflight.rb"
}

mkdir -p "$dist"
[[ $# -gt 0 ]] || set -- "${all_targets[@]}" npm brew
built=0
for arg in "$@"; do
    case $arg in
    npm | brew) ;;
    *)
        say "building $arg"
        bin=$(build_binary "$arg")
        archive "$arg" "$bin"
        built=1
        ;;
    esac
done
[[ $built == 0 ]] || write_sums
for arg in "$@"; do
    case $arg in
    npm) pack_npm ;;
    brew) write_formula ;;
    esac
done
