// bench.ts: what background tasks buy, measured against a blocking baseline and a bare-spawn floor.
//   npm run bench [-- --quick]      (Node, through tsx)
//   deno task bench [--quick]       (Deno)
// Every figure is a median over repeated runs (min and max shown) next to a reference measured in
// the same run: these machines are shared and noisy, so ratios hold where absolute times drift.
import { spawn, type SpawnOptionsWithStdioTuple, spawnSync } from "node:child_process";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import process from "node:process";
import {
  agentLoop,
  BackgroundManager,
  type Notification,
  ScriptedModel,
  scriptedReply,
  ShellProcess,
} from "./agent.ts";

const quick = process.argv.includes("--quick");
const isDeno = typeof (globalThis as { Deno?: unknown }).Deno !== "undefined";
const runtime = isDeno ? "deno" : "node (tsx)";
const repoDir = path.dirname(new URL(import.meta.url).pathname);
const workdir = fs.mkdtempSync(path.join(os.tmpdir(), "s08-bench-"));

/** Wall clock in milliseconds with sub-millisecond resolution, comparable with bash's $EPOCHREALTIME. */
const wallMs = () => performance.timeOrigin + performance.now();

interface Stats {
  median: number;
  min: number;
  max: number;
  p99: number;
  n: number;
}
function stats(values: number[]): Stats {
  const sorted = [...values].sort((a, b) => a - b);
  const at = (q: number) => sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))];
  return { median: at(0.5), min: sorted[0], max: sorted.at(-1)!, p99: at(0.99), n: sorted.length };
}

interface Row {
  figure: string;
  unit: string;
  value: Stats;
  reference?: { label: string; value: Stats };
  ratio?: number;
  target: string;
  met?: boolean;
}
const rows: Row[] = [];

/**
 * The floor: a bare child_process.spawn with the options agent.ts needs for correctness (its own
 * process group, stdin from /dev/null, piped output), read and dropped, resolved when closed.
 */
const FLOOR_OPTIONS: SpawnOptionsWithStdioTuple<"ignore", "pipe", "pipe"> = {
  detached: true,
  stdio: ["ignore", "pipe", "pipe"],
};
function bareSpawn(command: string): Promise<void> {
  const child = spawn("bash", ["-c", command], FLOOR_OPTIONS);
  child.stdout.on("data", () => {});
  child.stderr.on("data", () => {});
  return new Promise((resolve) => child.on("close", () => resolve()));
}

async function runAllBackground(
  bg: BackgroundManager,
  commands: string[],
): Promise<Notification[]> {
  const notes: Notification[] = [];
  for (const command of commands) bg.run(command);
  while (notes.length < commands.length) {
    await bg.nextNotification();
    notes.push(...bg.drain());
  }
  return notes;
}

// 1. Parallel efficiency ------------------------------------------------------
async function parallelEfficiency(): Promise<void> {
  const repeats = quick ? 2 : 5;
  const sequentialCount = quick ? 2 : 8;
  const bg = new BackgroundManager(workdir, { maxRunning: 64, keepOutputOf: 64 });
  const sequential: number[] = [];
  const started = wallMs();
  for (let i = 0; i < sequentialCount; i++) {
    const one = wallMs();
    await new ShellProcess("sleep 1", { cwd: workdir, timeoutSec: 60 }).done; // what a blocking loop does: one after another
    sequential.push(wallMs() - one);
  }
  const perTask = (wallMs() - started) / sequentialCount;
  for (const count of quick ? [8] : [8, 32]) {
    const ratios: number[] = [];
    for (let r = 0; r < repeats; r++) {
      const t0 = wallMs();
      await runAllBackground(bg, Array(count).fill("sleep 1"));
      ratios.push((wallMs() - t0) / 1000);
    }
    const value = stats(ratios);
    const blocking = stats(sequential.map((ms) => (ms * count) / 1000));
    rows.push({
      figure: `1. ${count} x sleep 1 at once: wall / 1 s`,
      unit: "x",
      value,
      reference: {
        label: `blocking loop, ${count} one after another (${
          (perTask * count / 1000).toFixed(1)
        } s)`,
        value: blocking,
      },
      ratio: blocking.median / value.median,
      target: count === 8 ? "<= 1.10" : "<= 1.25",
      met: value.median <= (count === 8 ? 1.10 : 1.25),
    });
  }
}

// 2. Start latency -------------------------------------------------------------
async function startLatency(): Promise<void> {
  const samples = quick ? 10 : 40;
  const bg = new BackgroundManager(workdir, { maxRunning: 64, keepOutputOf: 64 });
  const runReturns: number[] = [];
  const untilRunning: number[] = [];
  const bareReturns: number[] = [];
  const bareUntilRunning: number[] = [];
  const plainReturns: number[] = [];
  for (let i = 0; i < samples; i++) {
    // Alternate the two so drift on a shared machine hits both alike.
    const marker = path.join(workdir, `started-${i}`);
    const command = `echo $EPOCHREALTIME > ${marker}`;
    let t0 = wallMs();
    const id = bg.run(command);
    runReturns.push(wallMs() - t0);
    await bg.get(id)!.ended;
    bg.drain();
    untilRunning.push(Number(fs.readFileSync(marker, "utf8")) * 1000 - t0);

    t0 = wallMs();
    const child = spawn("bash", ["-c", `${command}-bare`], FLOOR_OPTIONS);
    bareReturns.push(wallMs() - t0);
    await new Promise((resolve) => child.on("close", resolve));
    bareUntilRunning.push(Number(fs.readFileSync(`${marker}-bare`, "utf8")) * 1000 - t0);

    t0 = wallMs(); // for information: spawn() without a process group of its own
    const plain = spawn("bash", ["-c", "true"]);
    plainReturns.push(wallMs() - t0);
    await new Promise((resolve) => plain.on("close", resolve));
  }
  const returned = stats(runReturns);
  const bareReturned = stats(bareReturns);
  rows.push({
    figure: "2a. background_run returns (process started)",
    unit: "ms",
    value: returned,
    reference: { label: "bare spawn() returns", value: bareReturned },
    ratio: returned.median / bareReturned.median,
    target: "<= 1.2x floor",
    met: returned.median <= 1.2 * bareReturned.median,
  });
  rows.push({
    figure: "2c. (info) spawn() without detached: returns",
    unit: "ms",
    value: stats(plainReturns),
    target: "(reported)",
  });
  const running = stats(untilRunning);
  const bareRunning = stats(bareUntilRunning);
  rows.push({
    figure: "2b. call -> child running (marker)",
    unit: "ms",
    value: running,
    reference: { label: "bare spawn() -> child running", value: bareRunning },
    ratio: running.median / bareRunning.median,
    target: "<= 1.2x floor",
    met: running.median <= 1.2 * bareRunning.median,
  });
}

// 3. Notification latency --------------------------------------------------------
async function notificationLatency(): Promise<void> {
  const samples = quick ? 10 : 50;
  const bg = new BackgroundManager(workdir, { maxRunning: 64, keepOutputOf: 64 });
  const toQueue: number[] = [];
  for (let i = 0; i < samples; i++) {
    const marker = path.join(workdir, `ended-${i}`);
    bg.run(`sleep 0.05; echo $EPOCHREALTIME > ${marker}`); // the marker is the child's last act
    await bg.nextNotification();
    const available = wallMs();
    bg.drain();
    toQueue.push(available - Number(fs.readFileSync(marker, "utf8")) * 1000);
  }
  const queued = stats(toQueue);
  rows.push({
    figure: "3a. child exit -> notification queued",
    unit: "ms",
    value: queued,
    target: "p99 < 20 ms",
    met: queued.p99 < 20,
  });

  const toWake: number[] = [];
  for (let i = 0; i < (quick ? 5 : 20); i++) {
    const marker = path.join(workdir, `woke-${i}`);
    let wokeAt = 0;
    const model = new ScriptedModel([
      scriptedReply({
        tool: "background_run",
        input: { command: `sleep 0.05; echo $EPOCHREALTIME > ${marker}` },
      }),
      scriptedReply("Waiting."), // the model ends its turn; the one-shot loop goes idle
      () => {
        wokeAt = wallMs();
        return scriptedReply("Seen.");
      },
    ], { recordRequests: false });
    await agentLoop([], "go", { model, background: bg, workdir, waitForBackground: true });
    toWake.push(wokeAt - Number(fs.readFileSync(marker, "utf8")) * 1000);
  }
  const woke = stats(toWake);
  rows.push({
    figure: "3b. child exit -> idle one-shot loop calls the model",
    unit: "ms",
    value: woke,
    target: "p99 < 20 ms",
    met: woke.p99 < 20,
  });
}

// 4. Throughput ----------------------------------------------------------------
async function throughput(): Promise<void> {
  const total = quick ? 100 : 500;
  const limit = 16;
  const repeats = quick ? 1 : 3;
  const ours: number[] = [];
  const floor: number[] = [];
  let exactlyOnce = true;
  for (let r = 0; r < repeats; r++) {
    const bg = new BackgroundManager(workdir, { maxRunning: limit, keepOutputOf: 64 });
    const seen = new Map<string, number>();
    let started = 0;
    const t0 = wallMs();
    while (seen.size < total) {
      while (started < total && bg.runningCount() < limit) {
        bg.run("true");
        started++;
      }
      await bg.nextNotification();
      for (const note of bg.drain()) seen.set(note.taskId, (seen.get(note.taskId) ?? 0) + 1);
    }
    ours.push(total / ((wallMs() - t0) / 1000));
    exactlyOnce &&= seen.size === total && [...seen.values()].every((n) => n === 1) &&
      bg.drain().length === 0;

    const t1 = wallMs();
    let next = 0;
    const worker = async () => {
      while (next < total) {
        next++;
        await bareSpawn("true");
      }
    };
    await Promise.all(Array.from({ length: limit }, worker));
    floor.push(total / ((wallMs() - t1) / 1000));
  }
  const value = stats(ours);
  const reference = stats(floor);
  rows.push({
    figure: `4. ${total} x true, 16 at once${
      exactlyOnce ? ", each notified once" : ", NOTIFICATIONS WRONG"
    }`,
    unit: "tasks/s",
    value,
    reference: { label: "bare spawn loop, 16 at once", value: reference },
    ratio: reference.median / value.median,
    target: "floor within 1.5x",
    met: exactlyOnce && reference.median / value.median <= 1.5,
  });
}

// 5. Memory (measured in a fresh process, so earlier figures do not count) -----
async function memoryProbe(mode: string): Promise<void> {
  // Runs inside the child process: prints {idle, peak} in MB.
  const idle = process.memoryUsage().rss;
  let peak = idle;
  const sampler = setInterval(() => (peak = Math.max(peak, process.memoryUsage().rss)), 5);
  const [count, megabytes] = mode.split("x").map(Number);
  const print = `head -c ${megabytes * 1_000_000} /dev/zero | tr '\\0' 'a'`;
  if (process.argv.includes("--bare")) {
    await Promise.all(Array.from({ length: count }, () => bareSpawn(print)));
  } else {
    const bg = new BackgroundManager(workdir);
    await runAllBackground(bg, Array(count).fill(print));
  }
  clearInterval(sampler);
  peak = Math.max(peak, process.memoryUsage().rss);
  console.log(JSON.stringify({ idle: idle / 1e6, peak: peak / 1e6 }));
}

function selfCommand(extra: string[]): string[] {
  return isDeno
    ? [process.execPath, "run", "-A", path.join(repoDir, "bench.ts"), ...extra]
    : [process.execPath, "--import", "tsx", path.join(repoDir, "bench.ts"), ...extra];
}

function runProbe(extra: string[]): { idle: number; peak: number } {
  const [command, ...args] = selfCommand(extra);
  const result = spawnSync(command, args, { cwd: repoDir, encoding: "utf8" });
  if (result.status !== 0) throw new Error(`memory probe failed: ${result.stderr}`);
  return JSON.parse(result.stdout.trim().split("\n").at(-1)!);
}

function memory(): void {
  const repeats = quick ? 1 : 3;
  for (const mode of quick ? ["1x100"] : ["1x1000", "8x100"]) {
    const ours: number[] = [];
    const bare: number[] = [];
    let idle = 0;
    for (let r = 0; r < repeats; r++) {
      const probe = runProbe(["--memory-probe", mode]);
      idle = probe.idle;
      ours.push(probe.peak - probe.idle);
      const floor = runProbe(["--memory-probe", mode, "--bare"]);
      bare.push(floor.peak - floor.idle);
    }
    const [count, megabytes] = mode.split("x");
    const value = stats(ours);
    rows.push({
      figure: `5. peak RSS above idle (${
        idle.toFixed(0)
      } MB), ${count} task(s) x ${megabytes} MB output`,
      unit: "MB",
      value,
      reference: { label: "bare spawn, output read and dropped", value: stats(bare) },
      target: "< 150 MB",
      met: value.median < 150,
    });
  }
}

// 6. Loop overhead ---------------------------------------------------------------
/** Hands the loop one ready notification per drain, so each turn carries one without spawning. */
class OneNotificationPerDrain extends BackgroundManager {
  constructor(workdir: string, private remaining: number) {
    super(workdir);
  }
  override drain(): Notification[] {
    if (this.remaining-- <= 0) return [];
    return [{
      taskId: "0badcafe",
      kind: "ended" as const,
      text: "completed (exit 0, 1.5s): 42 passed",
    }];
  }
}

async function loopOverhead(): Promise<void> {
  const turns = quick ? 200 : 1000;
  const repeats = quick ? 2 : 5;
  const perTurn: number[] = [];
  for (let r = 0; r < repeats; r++) {
    const script = Array.from(
      { length: turns - 1 },
      (_, i) => scriptedReply({ tool: "check_background", input: {}, id: `toolu_${i}` }),
    );
    script.push(scriptedReply("Done."));
    const model = new ScriptedModel(script, { recordRequests: false });
    const bg = new OneNotificationPerDrain(workdir, turns);
    const t0 = wallMs();
    let calls = 0;
    await agentLoop([], "go", {
      model,
      background: bg,
      workdir,
      events: { onModelCall: () => calls++ },
    });
    perTurn.push((wallMs() - t0) / calls);
  }
  const value = stats(perTurn);
  rows.push({
    figure: `6. harness time per model turn (${turns} turns, tool call + notification each)`,
    unit: "ms",
    value,
    target: "< 1 ms",
    met: value.median < 1,
  });
}

// 7. Start-up --------------------------------------------------------------------
/** The deno binary itself (node_modules/.bin/deno may be a Node launcher script in front of it). */
function denoBinary(): string {
  if (isDeno) return process.execPath;
  const launcher = path.join(repoDir, "node_modules/.bin/deno");
  const asked = spawnSync(launcher, ["eval", "console.log(Deno.execPath())"], { encoding: "utf8" });
  return asked.status === 0 ? asked.stdout.trim() : launcher;
}

function startup(): void {
  const repeats = quick ? 1 : 5;
  const commands: Array<[string, string[]]> = [
    ["tsx", [path.join(repoDir, "node_modules/.bin/tsx"), "agent.ts", "--help"]],
    ["deno", [denoBinary(), "run", "-A", "agent.ts", "--help"]],
  ];
  for (const [name, [command, ...args]] of commands) {
    const times: number[] = [];
    for (let r = 0; r < repeats; r++) {
      const t0 = wallMs();
      const result = spawnSync(command, args, { cwd: repoDir });
      if (result.status !== 0) break; // e.g. no Node on a Deno-only machine
      times.push(wallMs() - t0);
    }
    if (times.length === 0) {
      process.stderr.write(`(start-up under ${name} not measured: it did not run here)\n`);
    } else {rows.push({
        figure: `7. agent.ts --help, whole process, ${name}`,
        unit: "ms",
        value: stats(times),
        target: "(reported)",
      });}
  }
}

function printTable(): void {
  const fmt = (s: Stats, unit: string) => {
    const digits = unit === "x" ? 3 : s.median >= 100 ? 0 : 2;
    return `${s.median.toFixed(digits)} [${s.min.toFixed(digits)}-${s.max.toFixed(digits)}]${
      unit === "ms" && s.n >= 10 ? ` p99 ${s.p99.toFixed(digits)}` : ""
    } ${unit}`;
  };
  const header = ["figure", "median [min-max]", "reference (same run)", "ratio", "target", "met"];
  const body = rows.map((row) => [
    row.figure,
    fmt(row.value, row.unit),
    row.reference ? `${row.reference.label}: ${fmt(row.reference.value, row.unit)}` : "",
    row.ratio !== undefined ? `${row.ratio.toFixed(2)}x` : "",
    row.target,
    row.met === undefined ? "" : row.met ? "yes" : "NO",
  ]);
  console.log(
    `\nbench.ts on ${runtime} ${
      isDeno
        ? (globalThis as unknown as { Deno: { version: { deno: string } } }).Deno.version.deno
        : process.version
    }, ${os.cpus().length} cores, ${new Date().toISOString().slice(0, 10)}${
      quick ? ", --quick" : ""
    }\n`,
  );
  console.log(`| ${header.join(" | ")} |`);
  console.log(`|${header.map(() => "---").join("|")}|`);
  for (const line of body) console.log(`| ${line.join(" | ")} |`);
}

async function main(): Promise<void> {
  const probe = process.argv.indexOf("--memory-probe");
  if (probe !== -1) return memoryProbe(process.argv[probe + 1]);
  const started = wallMs();
  const steps: Array<[string, () => unknown]> = [
    ["parallel efficiency", parallelEfficiency],
    ["start latency", startLatency],
    ["notification latency", notificationLatency],
    ["throughput", throughput],
    ["memory", memory],
    ["loop overhead", loopOverhead],
    ["start-up", startup],
  ];
  for (const [name, step] of steps) {
    process.stderr.write(`measuring ${name}...\n`);
    await step();
  }
  printTable();
  console.log(`\n(${((wallMs() - started) / 1000).toFixed(0)} s in all)`);
}

try {
  await main();
} finally {
  fs.rmSync(workdir, { recursive: true, force: true });
}
