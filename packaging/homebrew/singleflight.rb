# Homebrew formula for singleflight, installing the release archives (static binaries).
#
# This file is the template: `dist/build.sh brew` (and `dist/build.sh` with no argument)
# writes target/dist/singleflight.rb with the version, homepage, release url and each archive's
# sha256 filled in from the archives it built; dist/check-formula.sh checks that they match.
# Publish that generated file in a tap (e.g. singleflight-cli/homebrew-tap).
class Singleflight < Formula
  desc "Run an expensive command at most once at a time per name; others get the cached result"
  homepage "@HOMEPAGE@"
  version "@VERSION@"
  license "MIT"

  on_macos do
    on_arm do
      url "@RELEASE_URL@/singleflight-@VERSION@-aarch64-apple-darwin.tar.gz"
      sha256 "@SHA256_aarch64-apple-darwin@"
    end
    on_intel do
      url "@RELEASE_URL@/singleflight-@VERSION@-x86_64-apple-darwin.tar.gz"
      sha256 "@SHA256_x86_64-apple-darwin@"
    end
  end

  on_linux do
    on_arm do
      url "@RELEASE_URL@/singleflight-@VERSION@-aarch64-unknown-linux-musl.tar.gz"
      sha256 "@SHA256_aarch64-unknown-linux-musl@"
    end
    on_intel do
      url "@RELEASE_URL@/singleflight-@VERSION@-x86_64-unknown-linux-musl.tar.gz"
      sha256 "@SHA256_x86_64-unknown-linux-musl@"
    end
  end

  def install
    bin.install "singleflight"
    man1.install "man/singleflight.1"
    bash_completion.install "completions/singleflight.bash" => "singleflight"
    zsh_completion.install "completions/_singleflight"
    fish_completion.install "completions/singleflight.fish"
  end

  test do
    assert_match version.to_s, shell_output("#{bin}/singleflight --version")
    ENV["SINGLEFLIGHT_CACHE_DIR"] = (testpath/"cache").to_s
    cmd = "#{bin}/singleflight t --ttl 1h -- sh -c 'echo run >> #{testpath}/runs; echo once'"
    assert_equal "once\n", shell_output(cmd)
    # A fresh hit serves the cached bytes without running the command again.
    assert_equal "once\n", shell_output(cmd)
    assert_equal "run\n", (testpath/"runs").read
    assert_match "fresh", shell_output("#{bin}/singleflight status t")
  end
end
