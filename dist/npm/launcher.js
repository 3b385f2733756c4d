#!/usr/bin/env node
// The `singleflight` command where the native executable could not replace this file
// (Windows, or an install with --ignore-scripts): runs it with this process's stdio,
// forwards SIGINT, SIGTERM and SIGHUP to it, and ends as it ended: with its exit status,
// or killed by the same signal.
//
// Forwarding matters: a status-line host that cancels a call signals this process, and
// singleflight must hear it to stop its command's process tree instead of orphaning it.
"use strict";
const { spawn } = require("child_process");
const { nativeBinary } = require("../platform.js");

let binary;
try {
  binary = nativeBinary();
} catch (err) {
  process.stderr.write(`singleflight: ${err.message}\n`);
  process.exit(125);
}

const child = spawn(binary, process.argv.slice(2), { stdio: "inherit", windowsHide: false });
const forwarded = ["SIGINT", "SIGTERM", "SIGHUP"];
for (const signal of forwarded) {
  process.on(signal, () => {
    // On Windows a console Ctrl+C reaches the child by itself, and child.kill() would
    // TerminateProcess it before it could stop its tree: only wait for it there.
    if (process.platform !== "win32") {
      try {
        child.kill(signal);
      } catch (_) {
        // It has exited already: its exit event follows.
      }
    }
  });
}

child.on("error", (err) => {
  process.stderr.write(`singleflight: cannot run ${binary}: ${err.message}\n`);
  process.exit(err.code === "ENOENT" ? 127 : 126);
});

child.on("exit", (code, signal) => {
  if (signal) {
    // Die of the same signal, so that a shell sees 128+N and a loop stops at one Ctrl-C.
    for (const s of forwarded) process.removeAllListeners(s);
    process.kill(process.pid, signal);
    // A signal the host ignores for us (SIGINT in a background job) does not kill: exit
    // with the shell's number for it instead.
    setTimeout(() => process.exit(128 + (require("os").constants.signals[signal] || 0)), 100);
    return;
  }
  process.exit(code);
});
