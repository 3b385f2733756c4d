// postinstall: puts the native executable where npm's `singleflight` link points
// (bin/singleflight of this package), in place of the JavaScript launcher, so that a call
// starts no node at all. A status line calls singleflight several times a second; a node
// start-up per call would cost 30-50 times the cached hit itself.
//
// Where it cannot (Windows, where npm's .cmd shim runs the file with node; or anything
// failing below) the launcher stays, and works: it only costs the node start-up.
// With --ignore-scripts this never runs; `node install.js` in this directory does it later.
"use strict";
const fs = require("fs");
const path = require("path");
const { execFileSync } = require("child_process");
const { nativeBinary } = require("./platform.js");

function main() {
  if (process.platform === "win32") {
    return; // npm's shim for bin/singleflight runs it with node: the launcher must stay.
  }
  const native = nativeBinary();
  // A binary that cannot run here (a wrong libc, a noexec mount) keeps the launcher, which
  // then says why at each call rather than leaving a broken command on PATH.
  const version = execFileSync(native, ["--version"], { encoding: "utf8" }).trim();
  const launcher = path.join(__dirname, "bin", "singleflight");
  const tmp = `${launcher}.native-${process.pid}`;
  // A copy, not a link: the command keeps working if npm prunes the platform package, and
  // it is on the same file system as the launcher, so the rename below is atomic.
  fs.copyFileSync(native, tmp);
  fs.chmodSync(tmp, 0o755);
  fs.renameSync(tmp, launcher);
  console.log(`singleflight: installed the native executable (${version})`);
}

try {
  main();
} catch (err) {
  // Never fail the install: the launcher still runs the native binary.
  console.warn(`singleflight: keeping the JavaScript launcher: ${err.message.split("\n")[0]}`);
}
