// Where this platform's native singleflight is: the launcher and the install script share it.
"use strict";
const path = require("path");

const PLATFORMS = {
  "linux x64": "linux-x64",
  "linux arm64": "linux-arm64",
  "darwin x64": "darwin-x64",
  "darwin arm64": "darwin-arm64",
  "win32 x64": "win32-x64",
};

// The package of this platform, or null where none is built.
function packageName() {
  const platform = PLATFORMS[`${process.platform} ${process.arch}`];
  return platform ? `@singleflight-cli/${platform}` : null;
}

// The native executable's path, or throws with one line saying what is missing.
function nativeBinary() {
  const name = packageName();
  if (!name) {
    throw new Error(`no native singleflight is built for ${process.platform}-${process.arch}`);
  }
  const exe = process.platform === "win32" ? "singleflight.exe" : "singleflight";
  let manifest;
  try {
    // Resolved from this package: npm puts the optional dependency either inside it or
    // beside it (a global install of both tarballs at once).
    manifest = require.resolve(`${name}/package.json`, { paths: [__dirname] });
  } catch (_) {
    throw new Error(
      `${name} is not installed (npm skipped the optional dependency?): reinstall ` +
        `@singleflight-cli/singleflight without --omit=optional, or install ${name} too`,
    );
  }
  return path.join(path.dirname(manifest), "bin", exe);
}

module.exports = { nativeBinary, packageName };
