import { spawn } from "node:child_process";
import { ShellProcess, BackgroundManager } from "./agent.ts";
const bg = new BackgroundManager("/tmp", { maxRunning: 64, keepOutputOf: 64 });
const res: Record<string, number[]> = {};
const variants: Record<string, () => Promise<unknown>> = {
  bare: () => { const c = spawn("bash", ["-c", "true"]); return new Promise((r) => c.on("close", r)); },
  bareDetachedIgnore: () => { const c = spawn("bash", ["-c", "true"], { detached: true, stdio: ["ignore", "pipe", "pipe"] }); return new Promise((r) => c.on("close", r)); },
  shellProcess: () => new ShellProcess("true", "/tmp", 30).done,
  bgRun: () => { const id = bg.run("true"); return bg.waitForTask(id, 30); },
};
for (let i = 0; i < 40; i++) for (const [k, f] of Object.entries(variants)) {
  const t0 = performance.now();
  const p = f();
  (res[k] ??= []).push(performance.now() - t0);
  await p;
}
for (const [k, v] of Object.entries(res)) { v.sort((a, b) => a - b); console.log(k.padEnd(20), v[20].toFixed(2), v[38].toFixed(2)); }
