#!/usr/bin/env bash
# Checks the Homebrew formula that dist/build.sh wrote (target/dist/singleflight.rb)
# against the archives beside it: every url names an archive of this version, whose
# sha256 (computed here) is the formula's and the one in SHA256SUMS. `ruby -c` checks the
# template and the generated formula (Ruby is installed with apt where it is missing).
#
#   dist/check-formula.sh            # archives not built here are reported, not failed
#   REQUIRE_ALL=1 dist/check-formula.sh   # (the release) every url's archive must exist
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
dist="${CARGO_TARGET_DIR:-$root/target}/dist"
formula="$dist/singleflight.rb"
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)
fail() { echo "check-formula: FAILED: $*" >&2; exit 1; }

[[ -f $formula ]] || fail "no $formula: run dist/build.sh brew"
[[ -f $dist/SHA256SUMS ]] || fail "no $dist/SHA256SUMS"
grep -q "version \"$version\"" "$formula" || fail "the formula's version is not $version"
! grep -q '@[A-Z0-9_a-z-]*@' "$formula" || fail "placeholders left: $(grep -o '@[^@ ]*@' "$formula" | head -n 3)"

# Pairs of (url, sha256) in the order they appear: each url line is followed by its sha256.
pairs=$(awk '$1 == "url" { gsub(/"/, "", $2); url = $2 }
             $1 == "sha256" && url != "" { gsub(/"/, "", $2); print url, $2; url = "" }' "$formula")
[[ $(wc -l <<< "$pairs") == 4 ]] || fail "expected 4 url/sha256 pairs, found: $pairs"
checked=0
while read -r url sum; do
    file=${url##*/}
    [[ $file =~ ^singleflight-$version-(x86_64|aarch64)-(apple-darwin|unknown-linux-musl)\.tar\.gz$ ]] ||
        fail "url $url does not name a release archive of $version"
    if [[ ! -f $dist/$file ]]; then
        [[ ${REQUIRE_ALL:-} != 1 ]] || fail "$file is in the formula but was not built"
        [[ $sum == NOT-BUILT ]] || fail "$file was not built, yet the formula has a sha256 for it"
        echo "check-formula: $file not built here (the formula says NOT-BUILT)"
        continue
    fi
    actual=$(sha256sum "$dist/$file" | cut -d' ' -f1)
    [[ $sum == "$actual" ]] || fail "$file: formula sha256 $sum, archive $actual"
    grep -qx "$actual  $file" "$dist/SHA256SUMS" || fail "$file: SHA256SUMS does not list $actual"
    # The formula installs these paths from the archive.
    listing=$(tar -tzf "$dist/$file")
    for member in singleflight man/singleflight.1 completions/singleflight.bash \
        completions/_singleflight completions/singleflight.fish; do
        grep -q "/$member\$" <<< "$listing" || fail "$file lacks $member"
    done
    checked=$((checked + 1))
done <<< "$pairs"
[[ $checked -gt 0 ]] || fail "no archive of the formula was built"

if ! command -v ruby > /dev/null && command -v apt-get > /dev/null; then
    (apt-get install -y -qq ruby > /dev/null 2>&1 ||
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ruby > /dev/null; }) || true
fi
if command -v ruby > /dev/null; then
    ruby -c packaging/homebrew/singleflight.rb > /dev/null || fail "ruby -c: the template"
    ruby -c "$formula" > /dev/null || fail "ruby -c: $formula"
    echo "check-formula: ruby -c: ok"
else
    [[ ${CI:-} != true ]] || fail "ruby is not installed, cannot ruby -c"
    echo "check-formula: ruby not installed: ruby -c skipped"
fi
echo "check-formula: $checked archive(s): url, sha256 and SHA256SUMS agree"
