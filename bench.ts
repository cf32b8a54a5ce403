// bench.ts: what agent.ts costs, each figure next to a floor measured in the same run.
//   npm run bench [-- --quick] [--check] [--only=1,4]      (Node)
//   deno task bench [--quick] [--check] [--only=1,4]       (Deno)
// A figure is a median over interleaved rounds (min and max shown). A floor is what the bare
// mechanism costs for the same work on this runtime (a bare spawn(), a plain script); a row
// marked "reference" compares with something that is not a floor. The agent runs as the command
// line ships it: task logs on, every child marked with the run's id. Targets are ratios to the
// floor where one exists; --check exits 1 when a target is missed by more than its noise margin.
import { spawn, type SpawnOptionsWithStdioTuple, spawnSync } from "node:child_process";
import * as fs from "node:fs";
import * as http from "node:http";
import type { AddressInfo } from "node:net";
import * as os from "node:os";
import * as path from "node:path";
import process from "node:process";
import { pathToFileURL } from "node:url";
import {
  agentLoop,
  BackgroundManager,
  loadTranscript,
  LOG_CAP_BYTES,
  LogFolder,
  type ManagerOptions,
  type MessageParam,
  type ModelRequest,
  newStats,
  runTool,
  SafePattern,
  ScriptedModel,
  scriptedReply,
  type ToolContext,
  Transcript,
} from "./agent.ts";

const HELP = `bench.ts: what agent.ts costs, against floors measured in the same run.
Options:
  --quick     fewer rounds and smaller sizes (about a minute; CI runs this)
  --check     exit 1 when a target is missed by more than its noise margin
  --only=N,M  only these figures
  --help      this text
Figures:
  1 parallel sleeps   2 start latency   3 notification latency   4 throughput: per task, per byte
  5 memory and the log   6 loop overhead   7 start-up   8 streaming memory (slope)
  9 watching: log, ready scan, ready latency, tail and filter   10 long sessions: caching,
  context   11 kill latency   12 sessions: saving a turn, resuming
  13 per task and per GB, and the read rate, through the command line (fresh processes)`;
const quick = process.argv.includes("--quick");
const check = process.argv.includes("--check");
const isDeno = typeof (globalThis as { Deno?: unknown }).Deno !== "undefined";
const runtime = isDeno ? "deno" : "node (tsx)";
const repoDir = path.dirname(new URL(import.meta.url).pathname);
const workdir = fs.mkdtempSync(path.join(os.tmpdir(), "s08-bench-"));
// The agents it starts save their transcripts here, not in the user's own state folder.
process.env.XDG_STATE_HOME = path.join(workdir, "state");

/** Wall clock in ms with sub-millisecond resolution, comparable with bash's $EPOCHREALTIME. */
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
  floor?: { label: string; value: Stats };
  target: string;
  met: boolean;
  /** Missed by more than the noise margin: --check fails on it. */
  missedClearly?: boolean;
}
const rows: Row[] = [];

/**
 * A figure against its floor; `limit` is the largest ratio (value / floor) that meets it. For
 * a rate (higher is better) the ratio is floor / value: the floor may be `limit` times faster.
 */
function compare(
  figure: string,
  unit: string,
  ours: number[],
  label: string,
  floor: number[],
  limit: number,
  more: { absolute?: { below: number; at: "median" | "p99" }; rate?: boolean } = {},
) {
  const { absolute, rate } = more;
  const value = stats(ours);
  const reference = stats(floor);
  const ratio = rate ? reference.median / value.median : value.median / reference.median;
  // An infinite limit: the floor is shown for scale and the target is absolute.
  const targets = limit === Infinity
    ? []
    : rate
    ? [`>= ${(1 / limit).toFixed(2)}x floor rate (${(1 / ratio).toFixed(2)}x)`]
    : [`median <= ${limit}x floor (${ratio.toFixed(2)}x)`];
  if (absolute) targets.push(`${absolute.at} < ${absolute.below} ${unit}`);
  const absoluteMet = (factor: number) => !absolute || value[absolute.at] < absolute.below * factor;
  rows.push({
    figure,
    unit,
    value,
    floor: { label, value: reference },
    target: targets.join(", "),
    met: ratio <= limit && absoluteMet(1),
    missedClearly: ratio > limit * NOISE_MARGIN || !absoluteMet(NOISE_MARGIN),
  });
}

/** How far past a target a figure may land before --check calls it a miss: noise here. */
const NOISE_MARGIN = 1.25;

/** A manager as the command line ships it: task logs on (the run marks its children anyway). */
function shippedManager(options: ManagerOptions = {}): BackgroundManager {
  const logs = new LogFolder(fs.mkdtempSync(path.join(workdir, "logs-")));
  return new BackgroundManager(workdir, { logs, ...options });
}

/** Runs two measurements in alternating order, so drift on a shared machine hits both alike. */
async function interleaved<T = number>(
  rounds: number,
  ours: () => Promise<T>,
  floor: () => Promise<T>,
): Promise<[T[], T[]]> {
  const a: T[] = [];
  const b: T[] = [];
  for (let r = 0; r < rounds; r++) {
    if (r % 2 === 0) {
      a.push(await ours());
      b.push(await floor());
    } else {
      b.push(await floor());
      a.push(await ours());
    }
  }
  return [a, b];
}

/**
 * The floor: a bare child_process.spawn with the options agent.ts needs for correctness (its own
 * session, stdin from /dev/null, piped output), read and dropped, resolved when closed.
 */
const FLOOR_OPTIONS: SpawnOptionsWithStdioTuple<"ignore", "pipe", "pipe"> = {
  detached: true,
  stdio: ["ignore", "pipe", "pipe"],
};
function bareSpawn(command: string, onData: (chunk: Buffer) => void = () => {}): Promise<number> {
  const child = spawn("bash", ["-c", command], FLOOR_OPTIONS);
  child.stdout.on("data", onData);
  child.stderr.on("data", onData);
  return new Promise((resolve) => child.on("close", () => resolve(wallMs())));
}

/** Runs `commands` with at most `limit` at once, through a function that resolves at the end. */
async function withLimit(
  commands: string[],
  limit: number,
  run: (command: string) => Promise<unknown>,
) {
  let next = 0;
  const worker = async () => {
    while (next < commands.length) await run(commands[next++]);
  };
  await Promise.all(Array.from({ length: Math.min(limit, commands.length) }, worker));
}

/** Through the manager, with the shipped cap: as many at once as it allows, the rest queued. */
async function throughManager(bg: BackgroundManager, commands: string[], limit = 16) {
  let seen = 0;
  await withLimit(commands, limit, async (command) => {
    const id = bg.run(command);
    await bg.tasks.get(id)!.ended;
    seen += bg.drain().length;
  });
  return seen;
}

// 1. Parallel sleeps -----------------------------------------------------------------------
async function parallelSleeps(): Promise<void> {
  const bg = shippedManager();
  for (const count of quick ? [8] : [8, 32]) {
    const sleeps = Array(count).fill("sleep 1");
    const [ours, floor] = await interleaved(
      quick ? 2 : 5,
      async () => {
        const t0 = wallMs();
        await throughManager(bg, sleeps);
        return (wallMs() - t0) / 1000;
      },
      async () => {
        const t0 = wallMs();
        await withLimit(sleeps, 16, (command) => bareSpawn(command));
        return (wallMs() - t0) / 1000;
      },
    );
    compare(
      `1. ${count} x sleep 1, shipped cap of 16 at once`,
      "s",
      ours,
      "bare spawn(), 16 at once",
      floor,
      1.1,
    );
  }
}

// 2. Start latency ---------------------------------------------------------------------------
async function startLatency(): Promise<void> {
  const bg = shippedManager({ maxRunning: 64 });
  const returns: number[] = [],
    running: number[] = [],
    bareReturns: number[] = [],
    bareRunning: number[] = [];
  for (let i = 0; i < (quick ? 10 : 40); i++) {
    const marker = path.join(workdir, `started-${i}`);
    const command = `echo $EPOCHREALTIME > ${marker}`;
    let t0 = wallMs();
    const id = bg.run(command);
    returns.push(wallMs() - t0);
    await bg.tasks.get(id)!.ended;
    bg.drain();
    running.push(Number(fs.readFileSync(marker, "utf8")) * 1000 - t0);
    t0 = wallMs();
    const done = bareSpawn(`${command}-bare`);
    bareReturns.push(wallMs() - t0);
    await done;
    bareRunning.push(Number(fs.readFileSync(`${marker}-bare`, "utf8")) * 1000 - t0);
  }
  compare(
    "2a. background_run returns (process started)",
    "ms",
    returns,
    "bare spawn() returns",
    bareReturns,
    1.3,
  );
  compare(
    "2b. call -> child running (its own marker)",
    "ms",
    running,
    "bare spawn() -> running",
    bareRunning,
    1.2,
  );
}

// 3. Notification latency ----------------------------------------------------------------------
async function notificationLatency(): Promise<void> {
  const bg = shippedManager({ maxRunning: 64 });
  const queued: number[] = [], closed: number[] = [];
  for (let i = 0; i < (quick ? 10 : 50); i++) {
    const marker = path.join(workdir, `ended-${i}`);
    const command = `sleep 0.02; echo $EPOCHREALTIME > ${marker}`; // the marker is its last act
    bg.run(command);
    await bg.nextNotification();
    const available = wallMs();
    bg.drain();
    queued.push(available - Number(fs.readFileSync(marker, "utf8")) * 1000);
    const closedAt = await bareSpawn(`${command}-bare`);
    closed.push(closedAt - Number(fs.readFileSync(`${marker}-bare`, "utf8")) * 1000);
  }
  compare(
    "3a. child exit -> notification queued",
    "ms",
    queued,
    "bare spawn() 'close' event",
    closed,
    2,
    { absolute: { below: 20, at: "p99" } },
  );
  const woke: number[] = [];
  for (let i = 0; i < (quick ? 5 : 20); i++) {
    const marker = path.join(workdir, `woke-${i}`);
    let wokeAt = 0;
    const model = new ScriptedModel([
      scriptedReply({
        tool: "background_run",
        input: { command: `sleep 0.02; echo $EPOCHREALTIME > ${marker}` },
      }),
      scriptedReply("Waiting."), // the model ends its turn; the one-shot loop goes idle
      () => {
        wokeAt = wallMs();
        return scriptedReply("Seen.");
      },
    ], { recordRequests: false });
    await agentLoop([], "go", { model, background: bg, workdir, waitForBackground: true });
    woke.push(wokeAt - Number(fs.readFileSync(marker, "utf8")) * 1000);
  }
  compare(
    "3b. child exit -> idle one-shot loop calls the model",
    "ms",
    woke,
    "bare spawn() 'close' event",
    closed,
    2.5,
    { absolute: { below: 20, at: "p99" } },
  );
}

// 4. Throughput: per task and per byte ----------------------------------------------------------
/** CPU seconds this process has used since `before` (its children not counted). */
function cpuSince(before: NodeJS.CpuUsage): number {
  const used = process.cpuUsage(before);
  return (used.user + used.system) / 1e6;
}

async function throughput(): Promise<void> {
  const total = quick ? 100 : 500;
  const commands = Array(total).fill("true");
  let exactlyOnce = true;
  const cpu: number[] = [], floorCpu: number[] = [];
  const [ours, floor] = await interleaved(
    quick ? 3 : 10,
    async () => {
      const bg = shippedManager({ keepOutputOf: 16 });
      const [t0, before] = [wallMs(), process.cpuUsage()];
      const seen = await throughManager(bg, commands);
      cpu.push(cpuSince(before) * 1000 / total);
      exactlyOnce &&= seen === total && bg.drain().length === 0;
      return total / ((wallMs() - t0) / 1000);
    },
    async () => {
      const [t0, before] = [wallMs(), process.cpuUsage()];
      await withLimit(commands, 16, (command) => bareSpawn(command));
      floorCpu.push(cpuSince(before) * 1000 / total);
      return total / ((wallMs() - t0) / 1000);
    },
  );
  const once = exactlyOnce ? "each notified once" : "NOT EACH NOTIFIED EXACTLY ONCE";
  compare(
    `4a. ${total} x true, 16 at once, ${once}`,
    "tasks/s",
    ours,
    "bare spawn(), 16 at once",
    floor,
    1 / 0.6,
    { rate: true },
  );
  if (!exactlyOnce) Object.assign(rows.at(-1)!, { met: false, missedClearly: true });
  compare(`4a. CPU per task, the same runs`, "ms", cpu, "bare spawn()", floorCpu, 2);
  await perByte();
}

/** 16 tasks printing `yes` for a few seconds: how fast the agent reads, and its CPU per GB. */
async function perByte(): Promise<void> {
  const seconds = quick ? 2 : 5;
  const cpu: number[] = [], floorCpu: number[] = [];
  const [ours, floor] = await interleaved(
    quick ? 2 : 4,
    async () => {
      const bg = shippedManager({ keepOutputOf: 16 });
      const [t0, before] = [wallMs(), process.cpuUsage()];
      const ids = Array.from({ length: 16 }, () => bg.run("yes", { quietAfterSec: 0 }));
      await new Promise((resolve) => setTimeout(resolve, seconds * 1000));
      const used = cpuSince(before);
      const elapsed = (wallMs() - t0) / 1000;
      const tasks = ids.map((id) => bg.tasks.get(id)!);
      const bytes = tasks.reduce((sum, task) => sum + task.process.output!.totalBytes, 0);
      for (const id of ids) bg.kill(id);
      await Promise.all(tasks.map((task) => task.ended));
      cpu.push(used / (bytes / 1e9));
      return bytes / 1e6 / elapsed;
    },
    async () => {
      let bytes = 0;
      const [t0, before] = [wallMs(), process.cpuUsage()];
      const children = Array.from({ length: 16 }, () => {
        const child = spawn("yes", [], FLOOR_OPTIONS);
        child.stdout.on("data", (chunk: Buffer) => (bytes += chunk.length));
        return child;
      });
      await new Promise((resolve) => setTimeout(resolve, seconds * 1000));
      const [used, read, elapsed] = [cpuSince(before), bytes, (wallMs() - t0) / 1000];
      const closed = children.map((child) => new Promise((resolve) => child.on("close", resolve)));
      for (const child of children) process.kill(-child.pid!, "SIGKILL"); // by the ids started here
      await Promise.all(closed);
      floorCpu.push(used / (read / 1e9));
      return read / 1e6 / elapsed;
    },
  );
  compare(
    `4b. 16 x yes for ${seconds} s, logs on: read rate`,
    "MB/s",
    ours,
    "bare spawn(), read and dropped",
    floor,
    2,
    { rate: true },
  );
  compare("4b. CPU per GB read, the same runs", "s", cpu, "bare spawn()", floorCpu, 1.5);
}

// 5. Memory and the 1 GB log (in a fresh process, so earlier figures do not count) ---------------
const print = (megabytes: number) => `head -c ${megabytes * 1_000_000} /dev/zero | tr '\\0' 'a'`;

/** Runs inside a child process: prints what it measured as JSON. */
async function probe(kind: string, arg: string): Promise<void> {
  const idle = process.memoryUsage().rss;
  let peak = idle;
  const sampler = setInterval(() => (peak = Math.max(peak, process.memoryUsage().rss)), 5);
  const result: Record<string, unknown> = {};
  if (kind === "memory" || kind === "memory-bare") {
    const [count, megabytes] = arg.split("x").map(Number);
    const commands = Array(count).fill(print(megabytes));
    const t0 = wallMs();
    if (kind === "memory-bare") await Promise.all(commands.map((c) => bareSpawn(c)));
    else {
      const logs = new LogFolder(path.join(workdir, `logs-${process.pid}`));
      await throughManager(new BackgroundManager(workdir, { logs }), commands);
      result.logBytes = Math.max(
        ...fs.readdirSync(logs.dir).map((f) => fs.statSync(path.join(logs.dir, f)).size),
      );
    }
    result.seconds = (wallMs() - t0) / 1000;
  } else if (kind === "stream" || kind === "stream-bare") {
    const [seconds, ...marks] = arg.split(",").map(Number);
    const logs = new LogFolder(path.join(workdir, `stream-${process.pid}`));
    const bg = new BackgroundManager(workdir, { logs });
    const children: ReturnType<typeof spawn>[] = [];
    for (let i = 0; i < 16; i++) {
      if (kind === "stream") bg.run("yes", { timeoutSec: seconds + 30, quietAfterSec: 0 });
      else {
        const child = spawn("yes", [], { stdio: ["ignore", "pipe", "ignore"] });
        child.stdout!.on("data", () => {});
        children.push(child);
      }
    }
    const t0 = wallMs();
    const at: number[] = [];
    for (const mark of marks) {
      await new Promise((resolve) => setTimeout(resolve, t0 + mark * 1000 - wallMs()));
      at.push((process.memoryUsage().rss - idle) / 1e6);
    }
    result.at = at;
    for (const id of bg.tasks.keys()) bg.kill(id);
    for (const child of children) child.kill("SIGKILL"); // by the ids this probe started
    await Promise.all([...bg.tasks.values()].map((t) => t.ended));
  }
  clearInterval(sampler);
  result.peak = (Math.max(peak, process.memoryUsage().rss) - idle) / 1e6;
  result.idle = idle / 1e6;
  console.log(JSON.stringify(result));
  fs.rmSync(workdir, { recursive: true, force: true }); // each probe process has its own
}

function selfCommand(extra: string[]): string[] {
  return isDeno
    ? [process.execPath, "run", "-A", path.join(repoDir, "bench.ts"), ...extra]
    : [process.execPath, "--import", "tsx", path.join(repoDir, "bench.ts"), ...extra];
}

function runProbe(kind: string, arg: string): Record<string, number & number[]> {
  const [command, ...args] = selfCommand(["--probe", kind, arg]);
  const result = spawnSync(command, args, { cwd: repoDir, encoding: "utf8" });
  if (result.status !== 0) throw new Error(`${kind} probe failed: ${result.stderr}`);
  return JSON.parse(result.stdout.trim().split("\n").at(-1)!);
}

function memory(): void {
  for (const mode of quick ? ["1x200"] : ["1x1000", "8x100"]) {
    const ours: number[] = [], bare: number[] = [], logs: number[] = [];
    let idle = 0;
    for (let r = 0; r < (quick ? 1 : 3); r++) {
      const probed = runProbe("memory", mode);
      idle = probed.idle;
      ours.push(probed.peak);
      logs.push(probed.logBytes);
      bare.push(runProbe("memory-bare", mode).peak);
    }
    const [count, megabytes] = mode.split("x");
    rows.push({
      figure: `5. peak RSS above idle (${
        idle.toFixed(0)
      } MB), ${count} x ${megabytes} MB output, logs on`,
      unit: "MB",
      value: stats(ours),
      floor: { label: "reference: bare spawn(), output dropped", value: stats(bare) },
      target: `< 150 MB; log <= cap (${Math.max(...logs)} B)`,
      met: stats(ours).median < 150 && Math.max(...logs) <= LOG_CAP_BYTES + 200,
      missedClearly: stats(ours).median > 150 * NOISE_MARGIN ||
        Math.max(...logs) > LOG_CAP_BYTES + 200,
    });
  }
}

// 6. Loop overhead -----------------------------------------------------------------------------
/**
 * Each turn the model starts a real (cheap) task, and the next request carries its notification.
 * Harness time is what a turn costs outside the model's own answer: the tool call (a real
 * spawn), the drain, the history, and serialising the request as the SDK does. The floor is the
 * least any harness pays for the same turn: a bare spawn() and serialising the same request.
 */
async function loopOverhead(): Promise<void> {
  const turns = quick ? 200 : 1000;
  const bg = shippedManager({ keepOutputOf: 16 });
  const harness: number[] = [], floor: number[] = [];
  let returnedAt = 0;
  const model = new ScriptedModel(async (request) => {
    const calledAt = wallMs();
    const s0 = wallMs();
    JSON.stringify({ model: "m", ...request }); // what the SDK does with every request
    const serialised = wallMs() - s0;
    if (returnedAt > 0) {
      harness.push(calledAt - returnedAt + serialised);
      const b0 = wallMs();
      const bare = bareSpawn("true"); // the floor's spawn, timed like background_run's
      floor.push(wallMs() - b0 + serialised);
      await bare;
    }
    // The model "thinks" until the task it started has ended, so each turn carries one result.
    while (bg.runningCount() > 0) await bg.nextNotification();
    const done = request.messages.length >= 2 * turns;
    returnedAt = wallMs();
    return done
      ? scriptedReply("Done.")
      : scriptedReply({ tool: "background_run", input: { command: "true" } });
  }, { recordRequests: false });
  await agentLoop([], "go", { model, background: bg, workdir });
  const window = 20;
  for (
    const [label, from, to] of [["1", 0, window], [String(turns), -window, undefined]] as const
  ) {
    compare(
      `6. one turn at turn ${label}: tool call, real task, its result, serialised request`,
      "ms",
      harness.slice(from, to),
      "bare spawn() + serialising the request",
      floor.slice(from, to),
      1.5,
    );
  }
}

// 7. Start-up: the first prompt and the first request --------------------------------------------
function denoBinary(): string {
  if (isDeno) return process.execPath;
  const scope = path.join(repoDir, "node_modules", "@deno");
  const found = fs.existsSync(scope)
    ? fs.readdirSync(scope).map((d) => path.join(scope, d, "deno"))
    : [];
  return found.find((f) => fs.existsSync(f)) ?? "deno";
}
const tsx = path.join(repoDir, "node_modules", ".bin", "tsx");
const runner = isDeno ? [denoBinary(), "run", "-A"] : [tsx];
/**
 * tsx's ESM loader as a file URL, as `npm start` imports it (`--import tsx/esm` would resolve
 * from the bench's temp folder).
 */
const tsxLoader =
  pathToFileURL(path.join(repoDir, "node_modules", "tsx", "dist", "esm", "index.mjs")).href;

/** Milliseconds from spawning `command` in a terminal (util-linux script) until `text` shows. */
function timeUntilShown(
  command: string[],
  text: string,
  env: Record<string, string>,
): Promise<number> {
  const quoted = command.map((w) => `'${w}'`).join(" ");
  const t0 = wallMs();
  const child = spawn("script", ["-qfec", quoted, "/dev/null"], {
    cwd: workdir,
    env: { ...process.env as Record<string, string>, ...env, TERM: "xterm" },
    stdio: ["pipe", "pipe", "ignore"],
  });
  let seen = "";
  return new Promise((resolve) => {
    child.stdout.on("data", (chunk) => {
      seen += chunk;
      if (seen.includes(text)) {
        resolve(wallMs() - t0);
        child.kill("SIGKILL"); // the terminal hangs up: what runs in it gets SIGHUP and ends
      }
    });
  });
}

/** A loopback Messages API on a free port, and the environment that points the agent at it. */
async function serveLoopbackApi(handler: http.RequestListener) {
  const server = http.createServer(handler);
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const port = (server.address() as AddressInfo).port;
  return {
    server,
    env: { ANTHROPIC_API_KEY: "k", ANTHROPIC_BASE_URL: `http://127.0.0.1:${port}` },
  };
}

/**
 * A figure's floor scripts, written to a folder in the repo so both runtimes resolve packages
 * as agent.ts does: each one's path, and remove() for the folder.
 */
function writeFloorScripts<Name extends string>(sources: Record<Name, string>) {
  const dir = fs.mkdtempSync(path.join(repoDir, ".bench-"));
  const paths = {} as Record<Name, string>;
  for (const name of Object.keys(sources) as Name[]) {
    paths[name] = path.join(dir, `${name}.mts`);
    fs.writeFileSync(paths[name], sources[name]);
  }
  return { paths, remove: () => fs.rmSync(dir, { recursive: true, force: true }) };
}

async function startup(): Promise<void> {
  if (spawnSync("script", ["--version"]).status !== 0) {
    return void process.stderr.write("(start-up not measured: no util-linux script)\n");
  }
  const hits: number[] = [];
  const { server, env } = await serveLoopbackApi((_req, res) => {
    hits.push(wallMs());
    res.writeHead(400, { "content-type": "application/json" });
    res.end(
      JSON.stringify({ type: "error", error: { type: "invalid_request_error", message: "bench" } }),
    );
  });
  const floors = writeFloorScripts({
    promptOnly:
      'import * as readline from "node:readline";\nimport process from "node:process";\n' +
      "const rl = readline.createInterface({ input: process.stdin, output: process.stdout });\n" +
      'rl.setPrompt("s08 >> ");\nrl.prompt();\n',
    requestOnly:
      'import Anthropic from "@anthropic-ai/sdk";\nconst client = new Anthropic({ maxRetries: 0 });\n' +
      'const request = { model: "m", max_tokens: 1, messages: [{ role: "user" as const, content: "hi" }] };\n' +
      "await client.messages.create(request).catch(() => {});\n",
  });
  const { promptOnly, requestOnly } = floors.paths;
  const rounds = quick ? 3 : 10;
  const [prompt, promptFloor] = await interleaved(
    rounds,
    () => timeUntilShown([...runner, path.join(repoDir, "agent.ts")], ">> ", env),
    () => timeUntilShown([...runner, promptOnly], ">> ", env),
  );
  compare(
    `7a. first REPL prompt with a key, ${runtime}`,
    "ms",
    prompt,
    "a script that only prints a prompt",
    promptFloor,
    1.3,
  );
  const firstRequest = async (script: string[]) => {
    const before = hits.length;
    const t0 = wallMs();
    const child = spawn(script[0], script.slice(1), {
      cwd: workdir,
      env: { ...process.env as Record<string, string>, ...env },
      stdio: "ignore",
    });
    await new Promise((resolve) => child.on("close", resolve)); // the API's 400 ends both
    return hits[before] - t0;
  };
  const [request, requestFloor] = await interleaved(
    rounds,
    () => firstRequest([...runner, path.join(repoDir, "agent.ts"), "-p", "hi"]),
    () => firstRequest([...runner, requestOnly]),
  );
  compare(
    `7b. one-shot: first request reaches the API, ${runtime}`,
    "ms",
    request,
    "a script importing the SDK the ordinary way",
    requestFloor,
    isDeno ? 1.3 : 0.8,
  );
  server.close();
  floors.remove();
}

// 8. Memory while 16 tasks stream output (yes) -----------------------------------------------------
function streaming(): void {
  // Sampled every few seconds; flatAndBelow fits the slope over the second half.
  const step = quick ? 1 : 5;
  const marks = Array.from({ length: quick ? 10 : 12 }, (_, i) => (i + 1) * step);
  const arg = [marks.at(-1), ...marks].join(",");
  const ours: number[] = runProbe("stream", arg).at;
  const bare: number[] = runProbe("stream-bare", arg).at;
  const limit = isDeno ? 180 : 40; // MB above idle: a collection every few MB of pipe reads
  const half = Math.floor(marks.length / 2);
  const memory = flatAndBelow(limit, Math.max(...ours), marks, ours);
  const shown = (values: number[]) => values.filter((_, i) => i % 3 === 2).map((m) => m.toFixed(0));
  rows.push({
    figure:
      `8b. in one process: RSS above idle, 16 tasks streaming yes (logs on), every ${step} s: ${
        shown(ours).join("/")
      } MB, ${memory.slope}`,
    unit: "MB",
    value: stats(ours.slice(half)),
    floor: {
      label: `reference: bare spawn(), output dropped: ${shown(bare).join("/")} MB`,
      value: stats(bare.slice(half)),
    },
    ...memory.verdict,
  });
}

/**
 * Memory under a flood: the peak below `limit` MB, and flat: the slope of `mb` over `seconds`,
 * fitted over the second half (the first still sees the logs filling up to their caps, which
 * says nothing about a leak). Garbage collection makes RSS jump by tens of MB between
 * samples: a slope is "flat" while it is within one standard error of the allowance, and
 * clearly not once two errors past it.
 */
function flatAndBelow(limit: number, peak: number, seconds: number[], mb: number[]) {
  const half = Math.floor(seconds.length / 2);
  const fit = fitSlope(seconds.slice(half), mb.slice(half));
  const [slope, error] = [fit.slope * 60, fit.standardError * 60]; // MB per minute
  const allowed = Math.max(10, 0.25 * mb.at(-1)!);
  return {
    slope: `slope ${slope.toFixed(0)} ± ${error.toFixed(0)} MB/min`,
    verdict: {
      target: `< ${limit} MB, flat (second-half slope <= max(10, 25% of the last) MB/min)`,
      met: peak < limit && slope - error <= allowed,
      missedClearly: peak > limit * NOISE_MARGIN || slope - 2 * error > allowed,
    },
  };
}

/** RSS of process `pid` in MB, from /proc (NaN once it is gone). */
function rssOf(pid: number): number {
  try {
    const status = fs.readFileSync(`/proc/${pid}/status`, "utf8");
    return Number(status.match(/VmRSS:\s+(\d+)/)![1]) / 1024;
  } catch {
    return NaN;
  }
}

/**
 * RSS of a command, sampled every 250 ms for `seconds` after `started` resolves, then the
 * command is sent SIGTERM: the peak, and the largest sample of each second.
 */
async function sampleRss(
  command: string[],
  env: Record<string, string>,
  seconds: number,
  started: Promise<unknown>,
): Promise<{ peak: number; perSecond: number[] }> {
  const child = spawn(command[0], command.slice(1), {
    cwd: workdir,
    env: { ...process.env as Record<string, string>, ...env },
    stdio: "ignore",
  });
  const closed = new Promise((resolve) => child.on("close", resolve));
  const samples: number[] = [];
  const sampler = setInterval(() => samples.push(rssOf(child.pid!)), 250);
  await Promise.race([started, closed]);
  const t0 = samples.length;
  await new Promise((resolve) => setTimeout(resolve, seconds * 1000));
  clearInterval(sampler);
  child.kill("SIGTERM"); // the agent ends its tasks on the way out; the floor script dies
  await closed;
  const valid = samples.filter((mb) => mb > 0);
  const perSecond = Array.from(
    { length: seconds },
    (_, i) => Math.max(...samples.slice(t0 + i * 4, t0 + i * 4 + 4).filter((mb) => mb > 0)),
  );
  return { peak: Math.max(...valid), perSecond };
}

/** 8a. The command line the user runs: a model starts 16 x `yes` and answers after a minute. */
async function streamingThroughCli(): Promise<void> {
  const seconds = quick ? 12 : 60;
  let firstRequest: () => void = () => {};
  let requests = 0;
  const held: http.ServerResponse[] = []; // every later request waits until the end
  const { server, env } = await serveLoopbackApi((req, res) => {
    req.resume();
    req.on("end", () => {
      if (requests++ > 0) return void held.push(res);
      sendReply(res, Array.from({ length: 16 }, (_, i) => backgroundRun(`${i}`, "yes")));
      firstRequest();
    });
  });
  const floors = writeFloorScripts({
    reader: 'import { spawn } from "node:child_process";\n' +
      'for (let i = 0; i < 16; i++) spawn("yes", [], { stdio: ["ignore", "pipe", "ignore"] })' +
      '.stdout!.on("data", () => {});\nprocess.on("SIGTERM", () => process.exit(0));\n',
  });
  // Node runs as `npm start` does (node --import tsx/esm), so the sampled pid is the agent itself.
  const agentRunner = isDeno ? runner : [process.execPath, "--import", tsxLoader];
  const run = (command: string[], waitForRequest: boolean) => {
    requests = 0;
    const started = new Promise<void>((resolve) => (firstRequest = resolve));
    return sampleRss(command, env, seconds, waitForRequest ? started : Promise.resolve());
  };
  const ours = await run([...agentRunner, path.join(repoDir, "agent.ts"), "-p", "go"], true);
  for (const res of held) res.destroy();
  const bare = await run([...agentRunner, floors.paths.reader], false);
  server.close();
  floors.remove();
  const limit = isDeno ? 200 : 120; // MB: the whole process, start-up included
  const marks = ours.perSecond.map((_, i) => i + 1);
  const memory = flatAndBelow(limit, ours.peak, marks, ours.perSecond);
  const every = (values: number[]) =>
    values.filter((_, i) => i % Math.max(1, Math.floor(seconds / 6)) === 0).map((mb) =>
      mb.toFixed(0)
    );
  rows.push({
    figure: `8a. peak RSS of the command line, 16 tasks streaming yes for ${seconds} s: ${
      every(ours.perSecond).join("/")
    } MB, ${memory.slope}`,
    unit: "MB",
    value: stats1(ours.peak),
    floor: {
      label: `reference: a bare script reading 16 x yes: ${every(bare.perSecond).join("/")} MB`,
      value: stats1(bare.peak),
    },
    ...memory.verdict,
  });
}

/** The least-squares slope of y over x, and its standard error. */
function fitSlope(x: number[], y: number[]): { slope: number; standardError: number } {
  const mean = (v: number[]) => v.reduce((a, b) => a + b, 0) / v.length;
  const mx = mean(x), my = mean(y);
  const num = x.reduce((sum, xi, i) => sum + (xi - mx) * (y[i] - my), 0);
  const den = x.reduce((sum, xi) => sum + (xi - mx) ** 2, 0);
  if (den === 0 || x.length < 3) return { slope: 0, standardError: 0 };
  const slope = num / den;
  const residuals = y.reduce((sum, yi, i) => sum + (yi - my - slope * (x[i] - mx)) ** 2, 0);
  return { slope, standardError: Math.sqrt(residuals / (x.length - 2) / den) };
}

// 9. Watching long-running work ---------------------------------------------------------------------
async function watching(): Promise<void> {
  const megabytes = quick ? 200 : 1000;
  const lines = `yes 'building module ... ok' | head -c ${megabytes * 1_000_000}`;
  // 9a. Output to a capped log: wall time against the same command redirected by the shell.
  const logs = new LogFolder(path.join(workdir, "logs-9"));
  let onNotice = (_n: { kind: string }) => {};
  const bg = new BackgroundManager(workdir, { logs, onNotification: (n) => onNotice(n) });
  const [logged, redirected] = await interleaved(
    quick ? 2 : 5,
    async () => {
      const t0 = wallMs();
      await bg.tasks.get(bg.run(lines))!.ended;
      return wallMs() - t0;
    },
    async () => {
      const t0 = wallMs();
      await bareSpawn(`${lines} > ${path.join(workdir, "redirected.log")}`);
      return wallMs() - t0;
    },
  );
  compare(
    `9a. ${megabytes} MB of output, log file on`,
    "ms",
    logged,
    "the shell redirecting it to a file",
    redirected,
    1.3,
  );
  // 9b. A ready pattern that never matches: CPU time against the same run without one.
  new SafePattern("warm-up"); // re2js loads with the first pattern: a one-time cost, not the scan's
  const [withReady, without] = await interleaved(
    quick ? 3 : 5, // a median of three: two rounds of 200 MB swing by 50%
    async () => {
      const c0 = process.cpuUsage();
      const ready = new SafePattern("listening on port \\d+");
      await bg.tasks.get(bg.run(lines, { ready }))!.ended;
      const c = process.cpuUsage(c0);
      return (c.user + c.system) / 1000;
    },
    async () => {
      const c0 = process.cpuUsage();
      await bg.tasks.get(bg.run(lines))!.ended;
      const c = process.cpuUsage(c0);
      return (c.user + c.system) / 1000;
    },
  );
  compare(
    `9b. agent CPU, ${megabytes} MB of non-matching lines with a ready pattern`,
    "ms",
    withReady,
    "the same without a pattern",
    without,
    1.3,
  );
  // 9c. Ready latency: the matching line's own timestamp to the notification being queued.
  const latency: number[] = [], bareLatency: number[] = [];
  for (let i = 0; i < (quick ? 10 : 50); i++) {
    const command = 'sleep 0.02; echo "READY at $EPOCHREALTIME"; sleep 5';
    let queuedAt = 0;
    onNotice = (n) => void (n.kind === "ready" && (queuedAt = wallMs()));
    const id = bg.run(command, { ready: new SafePattern("^READY at") });
    while (queuedAt === 0) await bg.nextNotification().then(() => bg.drain());
    const line = bg.tasks.get(id)!.process.readyLine!;
    latency.push(queuedAt - Number(line.split(" at ")[1]) * 1000);
    bg.kill(id);
    let seenAt = 0, stamp = 0;
    await bareSpawn(command.replace("sleep 5", "true"), (chunk) => {
      if (seenAt === 0) {
        seenAt = wallMs();
        stamp = Number(String(chunk).split(" at ")[1]) * 1000;
      }
    });
    bareLatency.push(seenAt - stamp);
  }
  onNotice = () => {};
  compare(
    "9c. ready line written -> ready notification queued",
    "ms",
    latency,
    "bare spawn() 'data' event",
    bareLatency,
    Infinity,
    { absolute: { below: 20, at: "p99" } },
  );
  // 9d. Checks on a task that has printed a lot: new output, tail and filter views.
  const chatty = bg.run(`${lines}; echo 'one more line'; sleep 30`);
  while ((bg.tasks.get(chatty)!.process.output?.totalBytes ?? 0) < megabytes * 1_000_000) {
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
  const ctx: ToolContext = { workdir, background: bg };
  const check = (input: Record<string, unknown>) =>
    runTool({ type: "tool_use", id: "toolu_bench", name: "check_background", input }, ctx);
  await check({ task_id: chatty }); // the first read takes what is kept
  const tiny = bg.run("echo hi; sleep 30");
  for (
    const [label, view] of [
      ["new output", {}],
      ["tail 20", { tail: 20 }],
      ["filter /ok$/", { filter: "ok$" }],
    ] as const
  ) {
    const reads: number[] = [], small: number[] = [];
    for (let i = 0; i < (quick ? 10 : 50); i++) {
      let t0 = wallMs();
      await check({ task_id: chatty, ...view });
      reads.push(wallMs() - t0);
      t0 = wallMs();
      await check({ task_id: tiny, ...view });
      small.push(wallMs() - t0);
    }
    compare(
      `9d. check_background (${label}) on a task with ${megabytes} MB printed`,
      "ms",
      reads,
      "reference: the same on a task that printed 3 bytes",
      small,
      Infinity,
      { absolute: { below: 10, at: "median" } },
    );
  }
  for (const id of bg.tasks.keys()) bg.kill(id);
  await Promise.all([...bg.tasks.values()].map((t) => t.ended));
}

// 10. Long sessions: caching and the context ---------------------------------------------------
/**
 * What a scripted session of 30 model calls (a few background tasks, a log read again and
 * again) is billed for input, in the API's price ratios: cache reads 0.1x, writes 1.25x. The
 * cache is the API's: a prefix written at a breakpoint is read back by a later request that
 * has the same prefix. And the largest context reached, against a small window.
 */
async function longSession(): Promise<void> {
  const bg = shippedManager();
  const chatty = bg.run("seq 1 100000 | sed 's/^/building module /; s/$/ ... ok/'");
  await bg.tasks.get(chatty)!.ended; // a busy log: every check reads 400 long lines again
  let call = 0;
  const model = new ScriptedModel(() => {
    call++;
    if (call >= 30) return scriptedReply("Done.");
    if (call % 10 === 1) {
      return scriptedReply({ tool: "background_run", input: { command: "sleep 0.1" } });
    }
    return scriptedReply({ tool: "check_background", input: { task_id: chatty, tail: 400 } });
  });
  const stats = newStats();
  await agentLoop([], "watch the build", {
    model,
    background: bg,
    workdir,
    stats,
    contextWindow: 40_000,
  });
  const { cached, uncached } = billedInput(model.requests);
  rows.push({
    figure: "10a. input billed over a 30-call session, with cache breakpoints",
    unit: "tokens",
    value: stats1(cached),
    floor: { label: "reference: the same requests without caching", value: stats1(uncached) },
    target: `<= 0.35x uncached (${(cached / uncached).toFixed(2)}x)`,
    met: cached / uncached <= 0.35,
    missedClearly: cached / uncached > 0.35 * NOISE_MARGIN,
  });
  const largest = Math.max(...model.requests.map((r) => JSON.stringify(r).length / 4));
  rows.push({
    figure: "10b. largest request of that session, a 40,000-token window",
    unit: "tokens",
    value: stats1(largest),
    target: "under the window",
    met: largest < 40_000,
    missedClearly: largest >= 40_000,
  });
  for (const id of bg.tasks.keys()) bg.kill(id);
  await Promise.all([...bg.tasks.values()].map((t) => t.ended));
}

// 11. Kill latency: kill_background answers once the task's processes are gone --------------
async function killLatency(): Promise<void> {
  const rounds = quick ? 6 : 20;
  const bg = shippedManager();
  const context: ToolContext = { workdir, background: bg };
  const ours = async (command: string) => {
    const id = bg.run(command);
    await new Promise((resolve) => setTimeout(resolve, 50)); // it is running
    const t0 = wallMs();
    await runTool(
      { type: "tool_use", id: "k", name: "kill_background", input: { task_id: id } },
      context,
    );
    bg.drain();
    return wallMs() - t0;
  };
  const floor = async () => {
    const child = spawn("bash", ["-c", "sleep 300"], FLOOR_OPTIONS);
    const closed = new Promise((resolve) => child.on("close", resolve));
    await new Promise((resolve) => setTimeout(resolve, 50));
    const t0 = wallMs();
    process.kill(-child.pid!, "SIGTERM");
    await closed;
    return wallMs() - t0;
  };
  const [plain, bare] = await interleaved(rounds, () => ours("sleep 300"), floor);
  compare(
    "11a. kill_background of a task that dies on SIGTERM",
    "ms",
    plain,
    "bare: SIGTERM to the group, until closed",
    bare,
    Infinity,
    {
      absolute: { below: 100, at: "median" },
    },
  );
  const escaping = "sleep 300 & setsid sleep 301 & sleep 302";
  const [escaped, bare2] = await interleaved(rounds, () => ours(escaping), floor);
  compare(
    "11b. the same, with a setsid escapee holding the pipes",
    "ms",
    escaped,
    "bare: SIGTERM to the group, until closed",
    bare2,
    Infinity,
    {
      absolute: { below: 100, at: "median" },
    },
  );
}

// 12. Sessions: saving a turn, and resuming a long conversation ------------------------------
function sessions(): void {
  const messages = quick ? 500 : 2000;
  const dir = fs.mkdtempSync(path.join(workdir, "session-"));
  const file = path.join(dir, "s.jsonl");
  const transcript = new Transcript(file, { id: "bench", workspace: dir });
  const bg = shippedManager();
  const history: MessageParam[] = [];
  const saveCosts: number[] = [];
  const requestCosts: number[] = [];
  for (let i = 0; i < messages; i++) {
    const role = i % 2 === 0 ? "user" : "assistant";
    history.push({
      role,
      content: [{ type: "text", text: `message ${i}: ${"words ".repeat(60)}` }],
    });
    if (i % 50 !== 49) continue; // a turn's end now and then: measure one save against the request
    let t0 = performance.now();
    transcript.save(history, bg);
    saveCosts.push(performance.now() - t0);
    t0 = performance.now();
    JSON.stringify({ model: "m", messages: history }); // what the SDK does to send the request
    requestCosts.push(performance.now() - t0);
  }
  transcript.close();
  compare(
    `12a. saving a turn of a ${messages}-message session`,
    "ms",
    saveCosts,
    "the request's own JSON.stringify",
    requestCosts,
    1.5,
  );
  const loads: number[] = [];
  const parses: number[] = [];
  for (let r = 0; r < (quick ? 3 : 7); r++) {
    let t0 = performance.now();
    loadTranscript(file);
    loads.push(performance.now() - t0);
    t0 = performance.now();
    fs.readFileSync(file, "utf8").split("\n").filter(Boolean).map((l) => JSON.parse(l));
    parses.push(performance.now() - t0);
  }
  compare(
    `12b. resuming that ${messages}-message session`,
    "ms",
    loads,
    "reading and parsing the file",
    parses,
    Infinity,
    {
      absolute: { below: 1000, at: "median" },
    },
  );
}

// A loopback Messages API for the figures that run the real command line (8 and 13).
type ReplyBlock =
  | { type: "text"; text: string }
  | { type: "tool_use"; id: string; name: string; input: Record<string, unknown> };

/** A background_run call the loopback model makes. */
function backgroundRun(id: string, command: string): ReplyBlock {
  return { type: "tool_use", id: `toolu_${id}`, name: "background_run", input: { command } };
}

/** One reply of the streaming Messages API, as the SDK reads it; tool calls stop with tool_use. */
function sendReply(res: http.ServerResponse, blocks: ReplyBlock[]): void {
  const send = (event: string, data: unknown) =>
    res.write(`event: ${event}\ndata: ${JSON.stringify(data)}\n\n`);
  res.writeHead(200, { "content-type": "text/event-stream" });
  const usage = { input_tokens: 1, output_tokens: 1 };
  send("message_start", {
    type: "message_start",
    message: { id: "msg", type: "message", role: "assistant", model: "m", content: [], usage },
  });
  blocks.forEach((block, index) => {
    const start = block.type === "text" ? { type: "text", text: "" } : { ...block, input: {} };
    send("content_block_start", { type: "content_block_start", index, content_block: start });
    const delta = block.type === "text"
      ? { type: "text_delta", text: block.text }
      : { type: "input_json_delta", partial_json: JSON.stringify(block.input) };
    send("content_block_delta", { type: "content_block_delta", index, delta });
    send("content_block_stop", { type: "content_block_stop", index });
  });
  const stop_reason = blocks.some((block) => block.type === "tool_use") ? "tool_use" : "end_turn";
  send("message_delta", { type: "message_delta", delta: { stop_reason }, usage });
  send("message_stop", { type: "message_stop" });
  res.end();
}

// 13. Per task and per byte as the user pays it: the command line, a fresh process per sample --
/** CPU seconds (user + sys) of `command` and all it started (bash's `times`), and wall seconds. */
async function childCpu(
  command: string[],
  env: Record<string, string>,
): Promise<{ cpu: number; wall: number }> {
  const t0 = wallMs();
  const quoted = command.map((w) => `'${w.replace(/'/g, "'\\''")}'`).join(" ");
  const child = spawn("bash", ["-c", `${quoted} >/dev/null 2>&1 </dev/null; times`], {
    cwd: workdir,
    env: { ...process.env as Record<string, string>, ...env },
    stdio: ["ignore", "pipe", "ignore"],
  });
  let out = "";
  child.stdout.on("data", (chunk) => (out += chunk));
  await new Promise((resolve) => child.on("close", resolve));
  const seconds = (text: string) => {
    const [, m, s] = text.match(/(\d+)m([\d.]+)s/)!;
    return Number(m) * 60 + Number(s);
  };
  const children = out.trim().split("\n")[1].split(/\s+/); // user and sys of the children
  return { cpu: seconds(children[0]) + seconds(children[1]), wall: (wallMs() - t0) / 1000 };
}

async function commandLine(): Promise<void> {
  const tasks = quick ? 128 : 480;
  const bytes = quick ? 500_000_000 : 2_000_000_000;
  // A loopback API whose model starts `tasks` background tasks, 16 to a reply, then stops.
  let script: string[] = [];
  let issued = 0;
  const api = await serveLoopbackApi((req, res) => {
    req.resume();
    req.on("end", () => {
      const commands = script.slice(issued, issued + 16); // the next 16, then only "Done."
      issued += commands.length;
      if (commands.length === 0) return sendReply(res, [{ type: "text", text: "Done." }]);
      sendReply(res, commands.map((command, i) => backgroundRun(`${issued}_${i}`, command)));
    });
  });
  const env = { ...api.env, S08_BACKGROUND_AFTER_SEC: "0" };
  const agent = [...runner, path.join(repoDir, "agent.ts"), "-p", "go"];
  const floors = writeFloorScripts({
    spawner: 'import { spawn } from "node:child_process";\nimport process from "node:process";\n' +
      "const commands = JSON.parse(process.argv[2]);\nlet next = 0;\n" +
      "const one = () => new Promise((done) => {\n" +
      '  const c = spawn("bash", ["-c", commands[next++]], { detached: true, stdio: ["ignore", "pipe", "pipe"] });\n' +
      '  c.stdout.on("data", () => {}); c.stderr.on("data", () => {}); c.on("close", done);\n' +
      "});\nconst worker = async () => { while (next < commands.length) await one(); };\n" +
      "await Promise.all(Array.from({ length: 16 }, worker));\n",
  });
  const floor = (commands: string[]) => [...runner, floors.paths.spawner, JSON.stringify(commands)];
  const rounds = quick ? 3 : 5;
  const perUnit = async (commands: string[], units: number) => {
    script = commands;
    const [withWork, withWorkFloor] = await interleaved(
      rounds,
      () => ((issued = 0), childCpu(agent, env)),
      () => childCpu(floor(commands), env),
    );
    script = [];
    const [idle, idleFloor] = await interleaved(
      rounds,
      () => ((issued = 0), childCpu(agent, env)),
      () => childCpu(floor([]), env),
    );
    // Per unit: what the work added to an idle run's CPU; its rate: units per added second.
    const added = (runs: { cpu: number; wall: number }[], idleRuns: typeof runs) => {
      const [idleCpu, idleWall] = [idleRuns.map((r) => r.cpu), idleRuns.map((r) => r.wall)];
      return {
        perUnit: runs.map((r) => (r.cpu - stats(idleCpu).median) / units),
        rate: runs.map((r) => units / (r.wall - stats(idleWall).median)),
      };
    };
    return [added(withWork, idle), added(withWorkFloor, idleFloor)];
  };
  const [{ perUnit: perTask }, { perUnit: perTaskFloor }] = await perUnit(
    Array(tasks).fill("true"),
    tasks,
  );
  compare(
    `13a. CPU per task through the command line (${tasks} x true, a fresh process each)`,
    "ms",
    perTask.map((s) => s * 1000),
    "a bare spawner script, also fresh",
    perTaskFloor.map((s) => s * 1000),
    1.5,
  );
  const reader = `head -c ${bytes / 2} /dev/zero`;
  const [ourRead, floorRead] = await perUnit([reader, reader], bytes / 1e9);
  const [perGb, perGbFloor] = [ourRead.perUnit, floorRead.perUnit];
  compare(
    `13b. CPU per GB read through the command line (2 x ${bytes / 2e6} MB)`,
    "s",
    perGb,
    "a bare spawner script reading and dropping",
    perGbFloor,
    1.5,
  );
  compare(
    "13c. read rate through the command line, the same runs (past an idle run's time)",
    "GB/s",
    ourRead.rate,
    "the bare spawner script",
    floorRead.rate,
    1 / 0.7,
    { rate: true },
  );
  api.server.close();
  floors.remove();
}

function stats1(value: number): Stats {
  return { median: value, min: value, max: value, p99: value, n: 1 };
}

/** Input tokens (4 characters each) billed with the cache, and without, in price units. */
function billedInput(requests: ModelRequest[]): { cached: number; uncached: number } {
  const written = new Set<string>();
  let cached = 0, uncached = 0;
  for (const request of requests) {
    const text = JSON.stringify(request);
    const prefixes = breakpointPrefixes(request);
    const readBack = prefixes.filter((p) => written.has(p)).at(-1)?.length ?? 0;
    const lastMark = prefixes.at(-1)?.length ?? 0;
    cached += (text.length - Math.max(readBack, lastMark)) / 4 + readBack / 4 * 0.1 +
      Math.max(0, lastMark - readBack) / 4 * 1.25;
    uncached += text.length / 4;
    for (const prefix of prefixes) written.add(prefix);
  }
  return { cached: Math.round(cached), uncached: Math.round(uncached) };
}

/** The request's prefixes that end at a cache breakpoint (tools, system, then messages). */
function breakpointPrefixes(request: ModelRequest): string[] {
  const parts: unknown[] = [request.tools];
  const prefixes: string[] = [];
  const blocks: Array<[string, unknown]> = [];
  if (typeof request.system !== "string") {
    for (const s of request.system) blocks.push(["system", s]);
  }
  for (const m of request.messages) {
    if (typeof m.content === "string") blocks.push([m.role, m.content]);
    else for (const block of m.content) blocks.push([m.role, block]);
  }
  for (const block of blocks) {
    // The API's cache key is the content; where the breakpoints sit is not part of it.
    parts.push(JSON.stringify(block).replace(/,?"cache_control":\{"type":"ephemeral"\}/g, ""));
    if (JSON.stringify(block[1]).includes('"cache_control"')) prefixes.push(JSON.stringify(parts));
  }
  return prefixes;
}

function printTable(): void {
  const fmt = (s: Stats, unit: string) => {
    const digits = s.median >= 100 ? 0 : 2;
    const p99 = unit === "ms" && s.n >= 10 ? ` p99 ${s.p99.toFixed(digits)}` : "";
    return `${s.median.toFixed(digits)} [${s.min.toFixed(digits)}-${
      s.max.toFixed(digits)
    }]${p99} ${unit}`;
  };
  const deno = (globalThis as unknown as { Deno?: { version: { deno: string } } }).Deno;
  const version = deno ? deno.version.deno : process.version;
  const cpu = os.cpus()[0]?.model ?? "cpu";
  console.log(
    `\nbench.ts on ${runtime} ${version}, ${os.cpus().length} x ${cpu}, ${
      new Date().toISOString().slice(0, 10)
    }${quick ? ", --quick" : ""}\n`,
  );
  const header = ["figure", "median [min-max]", "floor (same run)", "target", "met"];
  console.log(`| ${header.join(" | ")} |`);
  console.log(`|${header.map(() => "---").join("|")}|`);
  for (const row of rows) {
    const floor = row.floor ? `${row.floor.label}: ${fmt(row.floor.value, row.unit)}` : "";
    console.log(
      `| ${
        [row.figure, fmt(row.value, row.unit), floor, row.target, row.met ? "yes" : "NO"].join(
          " | ",
        )
      } |`,
    );
  }
}

async function main(): Promise<void> {
  if (process.argv.includes("--help")) {
    fs.rmSync(workdir, { recursive: true, force: true });
    return void console.log(HELP);
  }
  const probeAt = process.argv.indexOf("--probe");
  if (probeAt !== -1) return probe(process.argv[probeAt + 1], process.argv[probeAt + 2]);
  const only = process.argv.find((a) => a.startsWith("--only="))?.slice(7).split(",");
  const steps: Array<[string, () => unknown]> = [
    ["1", parallelSleeps],
    ["2", startLatency],
    ["3", notificationLatency],
    ["4", throughput],
    ["5", memory],
    ["6", loopOverhead],
    ["7", startup],
    ["8", async () => (await streamingThroughCli(), streaming())],
    ["9", watching],
    ["10", longSession],
    ["11", killLatency],
    ["12", sessions],
    ["13", commandLine],
  ];
  const started = wallMs();
  for (const [figure, step] of steps) {
    if (only && !only.includes(figure)) continue;
    const t0 = wallMs();
    await step();
    process.stderr.write(`figure ${figure} measured in ${((wallMs() - t0) / 1000).toFixed(1)} s\n`);
  }
  printTable();
  const missed = rows.filter((row) => row.missedClearly).map((row) => row.figure);
  console.log(
    `\n(${((wallMs() - started) / 1000).toFixed(0)} s in all; ${
      missed.length === 0
        ? "no target missed past its noise margin"
        : `missed: ${missed.join("; ")}`
    })`,
  );
  fs.rmSync(workdir, { recursive: true, force: true });
  if (check && missed.length > 0) process.exit(1);
}

await main();
