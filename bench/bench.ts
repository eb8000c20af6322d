// chainchat benchmark: `npm run bench [-- flags]`.
//
//   1. Throughput and latency of acknowledged (fsync'd) sends: N closed-loop clients against a
//      real server process, for each N in --clients; then the same against a local chain of
//      three server processes (clients use the library's failover client, given all three).
//      With each level, the CPU of every process, and what the server's status says of its
//      log's appends: records per append (the group commit's batches) and the time from an
//      append's write to its fdatasync's end, the disk's share of a send's latency.
//   2. Failover time: one client sending back to back to a three-server chain; the primary is
//      SIGKILLed (then, separately, SIGSTOPped), and the time from the signal to the first send
//      acknowledged by the new primary is measured as the client sees it.
//   3. Restart time: a data directory holding a --records-record log, started (a) by replaying
//      the whole log, (b) from a snapshot of the same state, and (d) from that snapshot plus
//      the longest log the default snapshot policy leaves behind it; plus (c) the start-up
//      floor of a server on an empty directory, for reference.
//
// Flags:
//   --duration <s>     measured seconds per level (default 5), after --warmup <s> (default 1)
//   --clients <list>   comma-separated client counts (default 1,16,64)
//   --workers <n>      load-generating worker threads (default 0: the bench's main thread)
//   --push             send to another logged-in bench client instead of to an offline user
//   --records <n>      log records for the restart test (default 1,000,000)
//   --runs <n>         restarts per case, and failovers per fault; the median is reported (default 3)
//   --liveness-ms <n>  the failover client's livenessTimeoutMs (default: the library's, 3000)
//   --skip-load        skip the throughput tables (single server and chain)
//   --skip-chain       skip the chain throughput table
//   --skip-failover    skip the failover measurement
//   --skip-restart     skip the restart part
//   --reference        also drive bench/reference-server.ts, a bare-bones group-commit server,
//                      with the same clients at each level, for scale
//   --profile <dir>    run every server under `node --cpu-prof`, profiles written to <dir>
//
// Everything the bench starts is bounded: every wait has a deadline, the whole run has a
// watchdog, and servers, worker threads and temp directories are cleaned up on success, on error,
// on SIGINT/SIGTERM and in a process 'exit' handler.

import { spawn, type ChildProcess } from 'node:child_process'
import { parseArgs } from 'node:util'
import { Worker } from 'node:worker_threads'
import { randomBytes, scryptSync } from 'node:crypto'
import fs from 'node:fs'
import net from 'node:net'
import os from 'node:os'
import path from 'node:path'
import { fileURLToPath } from 'node:url'
import { ChatClient } from '../lib/client.ts'
import { encodeRecordFrame } from '../lib/storage/framing.ts'
import { segmentName, type AppendStats } from '../lib/storage/log.ts'
import { limits } from '../lib/limits.ts'
import type { RegisterRecord, SendRecord } from '../lib/records.ts'
import { connectAll, runLoad, type LoadSpec, type LoadResult, type Pair } from './load.ts'

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..')
const serverJs = path.join(root, 'bin/server.js')
const referenceServer = ['--import', 'tsx', path.join(root, 'bench/reference-server.ts')]
const password = 'bench-password'

// ---- cleanup: servers, workers and temp dirs die with the bench, however it ends -------------

const liveProcs = new Set<ChildProcess>()
const liveWorkers = new Set<Worker>()
const tempDirs = new Set<string>()

function cleanupSync (): void {
  for (const p of liveProcs) try { p.kill('SIGKILL') } catch { /* gone */ }
  liveProcs.clear()
  for (const w of liveWorkers) void w.terminate()
  liveWorkers.clear()
  for (const d of tempDirs) try { fs.rmSync(d, { recursive: true, force: true }) } catch { /* best effort */ }
  tempDirs.clear()
}
process.on('exit', cleanupSync)
for (const sig of ['SIGINT', 'SIGTERM'] as const) {
  process.on(sig, () => {
    process.stderr.write(`\nbench: ${sig}, cleaning up\n`)
    process.exit(130)
  })
}

function mkTemp (tag: string): string {
  const d = fs.mkdtempSync(path.join(os.tmpdir(), `chainchat-bench-${tag}-`))
  tempDirs.add(d)
  return d
}

function rmTemp (d: string): void {
  fs.rmSync(d, { recursive: true, force: true })
  tempDirs.delete(d)
}

// ---- flags ----------------------------------------------------------------------------------

function usageExit (msg: string): never {
  process.stderr.write(`bench: ${msg}\nusage: npm run bench -- [--duration <s>] [--warmup <s>] [--clients 1,16,64] [--workers <n>] [--push] [--records <n>] [--runs <n>] [--liveness-ms <n>] [--skip-load] [--skip-chain] [--skip-failover] [--skip-restart] [--reference] [--profile <dir>]\n`)
  process.exit(2)
}

function num (name: string, v: string | undefined, fallback: number, min: number, max: number): number {
  if (v === undefined) return fallback
  const n = Number(v.replace(/_/g, ''))
  if (!Number.isFinite(n) || n < min || n > max) usageExit(`--${name} must be a number between ${min} and ${max}, not ${JSON.stringify(v)}`)
  return n
}

function parseFlags (): {
  duration: number, warmup: number, clients: number[], workers: number, push: boolean,
  records: number, runs: number, livenessMs: number | null,
  skipRestart: boolean, skipLoad: boolean, skipChain: boolean, skipFailover: boolean, reference: boolean, profile: string | null
} {
  let values
  try {
    values = parseArgs({
      args: process.argv.slice(2),
      strict: true,
      allowPositionals: false,
      options: {
        duration: { type: 'string' },
        warmup: { type: 'string' },
        clients: { type: 'string' },
        workers: { type: 'string' },
        push: { type: 'boolean' },
        records: { type: 'string' },
        runs: { type: 'string' },
        'liveness-ms': { type: 'string' },
        'skip-restart': { type: 'boolean' },
        'skip-load': { type: 'boolean' },
        'skip-chain': { type: 'boolean' },
        'skip-failover': { type: 'boolean' },
        reference: { type: 'boolean' },
        profile: { type: 'string' },
        help: { type: 'boolean', short: 'h' }
      }
    }).values
  } catch (e) {
    usageExit((e as Error).message)
  }
  if (values.help) usageExit('help')
  const clients = (values.clients ?? '1,16,64').split(',').map(s => s.trim()).filter(s => s !== '').map(s => num('clients', s, 0, 1, 1000))
  if (clients.length === 0 || clients.some(n => !Number.isInteger(n))) usageExit('--clients must list whole numbers, e.g. 1,16,64')
  const records = num('records', values.records, 1_000_000, 10, 20_000_000)
  const runs = num('runs', values.runs, 3, 1, 20)
  const workers = num('workers', values.workers, 0, 0, 16)
  const livenessMs = values['liveness-ms'] === undefined ? null : num('liveness-ms', values['liveness-ms'], 0, 50, 60_000)
  if (!Number.isInteger(records) || !Number.isInteger(runs) || !Number.isInteger(workers) || (livenessMs !== null && !Number.isInteger(livenessMs))) usageExit('--records, --runs, --workers and --liveness-ms take whole numbers')
  return {
    duration: num('duration', values.duration, 5, 0.1, 600),
    warmup: num('warmup', values.warmup, 1, 0, 60),
    clients,
    workers,
    push: values.push === true,
    records,
    runs,
    livenessMs,
    skipRestart: values['skip-restart'] === true,
    skipLoad: values['skip-load'] === true,
    skipChain: values['skip-chain'] === true,
    skipFailover: values['skip-failover'] === true,
    reference: values.reference === true,
    profile: values.profile === undefined ? null : path.resolve(values.profile)
  }
}

// ---- a server process (the spawn logic of test/helpers/spawn.ts, trimmed) --------------------

interface Server {
  proc: ChildProcess
  port: number
  readyMs: number // from just before spawn() to the readiness line
  stderr: () => string
  exited: Promise<{ code: number | null, signal: NodeJS.Signals | null }>
  stop: (timeoutMs?: number) => Promise<void>
}

// Extra node flags for every server process (--profile sets them).
let serverNodeArgs: string[] = []

// script: the server to run (bin/server.js; or, for --reference, the reference server under tsx).
async function startServer (dir: string, args: string[] = [], readyTimeoutMs = 30_000, port = 0, script = [serverJs]): Promise<Server> {
  const argv = [...serverNodeArgs, ...script, '--port', String(port), '--host', '127.0.0.1', '--data', dir, ...args]
  const t0 = process.hrtime.bigint()
  const proc = spawn(process.execPath, argv, { cwd: root, stdio: ['ignore', 'pipe', 'pipe'] })
  liveProcs.add(proc)
  let err = ''
  proc.stderr!.setEncoding('utf8').on('data', (d: string) => { err = (err + d).slice(-200_000) })
  const exited = new Promise<{ code: number | null, signal: NodeJS.Signals | null }>(resolve => {
    proc.on('exit', (code, signal) => { liveProcs.delete(proc); resolve({ code, signal }) })
  })
  const stop = async (timeoutMs = 20_000): Promise<void> => {
    if (proc.exitCode !== null || proc.signalCode !== null) return
    proc.kill('SIGTERM')
    const timer = setTimeout(() => proc.kill('SIGKILL'), timeoutMs)
    const { code, signal } = await exited
    clearTimeout(timer)
    if (code !== 0) process.stderr.write(`bench: server exited with ${code ?? signal} after SIGTERM; stderr tail: ${err.slice(-1000)}\n`)
  }
  try {
    const { port, readyMs } = await new Promise<{ port: number, readyMs: number }>((resolve, reject) => {
      let out = ''
      const timer = setTimeout(() => reject(new Error(`server not ready in ${readyTimeoutMs} ms; stderr: ${err.slice(-2000)}`)), readyTimeoutMs)
      proc.stdout!.setEncoding('utf8').on('data', (d: string) => {
        out += d
        const nl = out.indexOf('\n')
        if (nl < 0) return
        const readyMs = Number(process.hrtime.bigint() - t0) / 1e6
        clearTimeout(timer)
        try {
          const j = JSON.parse(out.slice(0, nl))
          if (j.event === 'listening' && typeof j.port === 'number') resolve({ port: j.port, readyMs })
          else reject(new Error(`unexpected first stdout line: ${out.slice(0, nl)}`))
        } catch {
          reject(new Error(`unexpected first stdout line: ${out.slice(0, nl)}`))
        }
      })
      void exited.then(({ code, signal }) => {
        clearTimeout(timer)
        reject(new Error(`server exited before it was ready (${code ?? signal}); stderr: ${err.slice(-2000)}`))
      })
    })
    return { proc, port, readyMs, stderr: () => err, exited, stop }
  } catch (e) {
    proc.kill('SIGKILL')
    throw e
  }
}

// The server's operator log is JSON lines on stderr; find the last line with this msg.
function serverLogLine (stderr: string, msg: string): Record<string, unknown> | null {
  const lines = stderr.split('\n')
  for (let k = lines.length - 1; k >= 0; k--) {
    if (!lines[k].includes(`"msg":"${msg}"`)) continue
    try { return JSON.parse(lines[k]) } catch { /* partial line */ }
  }
  return null
}

async function waitFor (what: string, timeoutMs: number, fn: () => boolean): Promise<void> {
  const end = Date.now() + timeoutMs
  while (!fn()) {
    if (Date.now() > end) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`)
    await new Promise(resolve => setTimeout(resolve, 20))
  }
}

// CPU seconds (user + system) a process has used so far, from /proc; null where unavailable.
function procCpuSeconds (pid: number | undefined): number | null {
  if (pid === undefined) return null
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8')
    const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ')
    return (Number(f[11]) + Number(f[12])) / 100 // utime, stime in USER_HZ (100 on Linux)
  } catch {
    return null
  }
}

// Busy CPU seconds of the whole machine so far (all cores), from /proc/stat; null where
// unavailable. Minus the server's and the bench's own CPU, it shows how much else was running.
function machineBusySeconds (): number | null {
  try {
    const f = fs.readFileSync('/proc/stat', 'utf8').split('\n')[0].trim().split(/\s+/).slice(1).map(Number)
    // user nice system idle iowait irq softirq steal
    return (f[0] + f[1] + f[2] + f[5] + f[6] + (f[7] ?? 0)) / 100
  } catch {
    return null
  }
}

// ---- statistics ---------------------------------------------------------------------------

function percentile (sorted: Float64Array, p: number): number {
  if (sorted.length === 0) return NaN
  const rank = Math.ceil((p / 100) * sorted.length) // nearest-rank
  return sorted[Math.min(sorted.length, Math.max(1, rank)) - 1]
}

function median (xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b)
  const m = s.length >> 1
  return s.length % 2 === 1 ? s[m] : (s[m - 1] + s[m]) / 2
}

function table (head: string[], rows: string[][], rightAlign: boolean[]): string {
  const w = head.map((h, k) => Math.max(h.length, ...rows.map(r => r[k].length)))
  const fmt = (r: string[]): string => '| ' + r.map((c, k) => rightAlign[k] ? c.padStart(w[k]) : c.padEnd(w[k])).join(' | ') + ' |'
  return [fmt(head), '|' + w.map((n, k) => rightAlign[k] ? '-'.repeat(n + 1) + ':' : ':' + '-'.repeat(n + 1)).join('|') + '|', ...rows.map(fmt)].join('\n')
}

const f1 = (x: number): string => Number.isFinite(x) ? x.toFixed(1) : '-'
const f3 = (x: number): string => Number.isFinite(x) ? x.toFixed(3) : '-'
const int = (x: number): string => Math.round(x).toLocaleString('en-US')

// ---- part 1: throughput and latency -----------------------------------------------------------

interface LevelResult {
  clients: number
  opsPerSec: number
  p50: number // ms
  p99: number // ms
  max: number // ms
  errors: number
  firstError: string | null
  // CPU during warm-up + window, as fractions of one core: the server process, the bench process
  // (all threads), and every other process on the machine
  serverCpu: number | null
  memberCpu: Array<number | null> // per server process (one entry for a single server)
  benchCpu: number
  otherCpu: number | null
  setupMs: number
  note: string | null // chain: a reconfiguration during the level, from the members' status and logs
  log: LevelLog | null // the server's (chain: the primary's) appends during the level; null for the reference
}

// What the server's status says of its log's appends (protocol.md, "Status", `log`), taken
// before and after a level: the records per append in between, and the times of the latest
// 1,024 appends at the end (at 64 clients, the last second or two of the level).
interface LevelLog { recordsPerAppend: number, syncMs: AppendStats['syncMs'] }

async function appendStats (addr: string): Promise<AppendStats | null> {
  const st = await statusOf(addr)
  return (st?.log as AppendStats | undefined) ?? null
}

// Register users over the wire, a few connections at a time (each register costs the server a
// scrypt on its thread pool).
async function registerUsers (target: { port: number } | { servers: string[] }, names: string[]): Promise<void> {
  let next = 0
  const worker = async (): Promise<void> => {
    const c = await ChatClient.connect({ ...target, requestTimeoutMs: 30_000 })
    try {
      while (next < names.length) await c.register(names[next++], password)
    } finally {
      c.close()
    }
  }
  await Promise.all(Array.from({ length: Math.min(8, names.length) }, worker))
}

// CPU use while the load runs (warm-up and measured window, not the logins before them).
// `server` is the sum over the server processes measured (one, or the members of a chain),
// `members` the same per process.
interface CpuWindow { server: number | null, members: Array<number | null>, bench: number, other: number | null } // fractions of one core

class CpuMeter {
  private t0 = 0n
  private server0: Array<number | null> = []
  private bench0: NodeJS.CpuUsage = process.cpuUsage()
  private busy0: number | null = null
  constructor (private readonly serverPids: Array<number | undefined>) {}
  start (): void {
    this.server0 = this.serverPids.map(procCpuSeconds)
    this.bench0 = process.cpuUsage()
    this.busy0 = machineBusySeconds()
    this.t0 = process.hrtime.bigint()
  }

  stop (): CpuWindow {
    const wall = Number(process.hrtime.bigint() - this.t0) / 1e9
    const server1 = this.serverPids.map(procCpuSeconds)
    const b = process.cpuUsage(this.bench0)
    const busy1 = machineBusySeconds()
    const members = server1.map((s1, k) => s1 === null || this.server0[k] === null ? null : s1 - this.server0[k]!)
    const server = members.some(m => m === null) ? null : members.reduce((a: number, m) => a + m!, 0)
    const bench = (b.user + b.system) / 1e6
    const other = server === null || this.busy0 === null || busy1 === null ? null : Math.max(0, busy1 - this.busy0 - server - bench)
    return {
      server: server === null ? null : server / wall,
      members: members.map(m => m === null ? null : m / wall),
      bench: bench / wall,
      other: other === null ? null : other / wall
    }
  }
}

// Split the clients over worker threads (or run them here), start them on the same clock, wait
// for every share's latencies.
async function runShares (spec: Omit<LoadSpec, 'pairs'>, pairs: Pair[], workers: number, meter: CpuMeter): Promise<{ results: LoadResult[], cpu: CpuWindow }> {
  const deadlineMs = 60_000 + spec.warmupMs + spec.durationMs + spec.requestTimeoutMs
  if (workers === 0) {
    const li = await connectAll({ ...spec, pairs })
    try {
      meter.start()
      const result = await runLoad(li, process.hrtime.bigint(), spec.warmupMs, spec.durationMs)
      return { results: [result], cpu: meter.stop() }
    } finally {
      li.close()
    }
  }
  const shares: Pair[][] = Array.from({ length: Math.min(workers, pairs.length) }, () => [])
  pairs.forEach((p, k) => shares[k % shares.length].push(p))
  const loadUrl = new URL('./load.ts', import.meta.url).href
  const tsxApi = import.meta.resolve('tsx/esm/api')
  // Worker threads do not inherit the --import tsx loader on Node 20: register it first, as
  // bin/server.js does, then load the TypeScript module.
  const bootstrap = `import(${JSON.stringify(tsxApi)}).then(m => { m.register(); return import(${JSON.stringify(loadUrl)}) })`
  const ws = shares.map(share => {
    const w = new Worker(bootstrap, { eval: true, workerData: { ...spec, pairs: share } satisfies LoadSpec })
    liveWorkers.add(w)
    w.once('exit', () => liveWorkers.delete(w))
    return w
  })
  const ready = ws.map(w => new Promise<void>((resolve, reject) => {
    w.once('message', (m: { type: string, message?: string }) => m.type === 'ready' ? resolve() : reject(new Error(`load worker: ${m.message}`)))
    w.once('error', reject)
  }))
  let timer: NodeJS.Timeout | undefined
  const deadline = new Promise<never>((_resolve, reject) => { timer = setTimeout(() => reject(new Error(`load did not finish in ${deadlineMs} ms`)), deadlineMs) })
  try {
    await Promise.race([Promise.all(ready), deadline])
    const done = ws.map(w => new Promise<LoadResult>((resolve, reject) => {
      w.once('message', (m: { type: string, result?: LoadResult, message?: string }) => m.type === 'done' ? resolve(m.result!) : reject(new Error(`load worker: ${m.message}`)))
      w.once('error', reject)
    }))
    meter.start()
    const t0 = process.hrtime.bigint() + 20_000_000n // 20 ms from now, so every worker starts together
    for (const w of ws) w.postMessage({ type: 'go', t0: String(t0) })
    const results = await Promise.race([Promise.all(done), deadline])
    return { results, cpu: meter.stop() }
  } finally {
    clearTimeout(timer)
    await Promise.all(ws.map(w => w.terminate()))
  }
}

// One level: a fresh single server (or a fresh three-server chain) and data directory, n clients.
async function runLevel (n: number, opts: ReturnType<typeof parseFlags>, kind: 'single' | 'reference' | 'chain'): Promise<LevelResult> {
  const setupStart = Date.now()
  let dir: string | null = null
  let server: Server | null = null
  let chain: LocalChain | null = null
  let epoch0 = 0
  try {
    let target: { port: number } | { servers: string[] }
    let pids: Array<number | undefined>
    let leader: string | null = null // where the log's appends are asked for
    if (kind !== 'chain') {
      dir = mkTemp(`load${n}`)
      server = await startServer(dir, [], 30_000, 0, kind === 'single' ? [serverJs] : referenceServer)
      target = { port: server.port }
      pids = [server.proc.pid]
      if (kind === 'single') leader = `127.0.0.1:${server.port}`
    } else {
      chain = await startChain(`chain${n}`)
      const { order, epoch } = await waitChainReady(chain, 30_000)
      epoch0 = epoch
      target = { servers: chain.servers }
      pids = order.map(k => chain!.members[k].server?.proc.pid) // primary, middle, tail
      leader = chain.members[order[0]].addr
    }
    const senders = Array.from({ length: n }, (_, k) => `s${k}`)
    // Default: each sender has its own recipient who is registered but never logs in, so every
    // acknowledged send is exactly one log record. --push: a ring over the logged-in senders
    // (with one client, that is itself), so each send also pushes to a live session and the
    // server logs a mark_read record for it.
    const recipients = opts.push ? [] : Array.from({ length: n }, (_, k) => `r${k}`)
    await registerUsers(target, [...senders, ...recipients])
    const pairs = senders.map((user, k) => ({ user, to: opts.push ? senders[(k + 1) % n] : recipients[k] }))
    const spec = {
      kind: 'chainchat-load' as const,
      port: 'port' in target ? target.port : 0,
      ...('servers' in target ? { servers: target.servers } : {}),
      password,
      warmupMs: opts.warmup * 1000,
      durationMs: opts.duration * 1000,
      requestTimeoutMs: 10_000
    }
    const setupMs = Date.now() - setupStart
    // Logins (a scrypt each) happen inside runShares, before the clock and the CPU meter start.
    const log0 = leader === null ? null : await appendStats(leader)
    const { results, cpu } = await runShares(spec, pairs, opts.workers, new CpuMeter(pids))
    const log1 = leader === null ? null : await appendStats(leader)
    const log: LevelLog | null = log0 === null || log1 === null
      ? null
      : { recordsPerAppend: (log1.records - log0.records) / Math.max(1, log1.appends - log0.appends), syncMs: log1.syncMs }
    // A chain that reconfigured during the level (a member presumed failed, say, on a starved
    // machine) measured something else: say so next to the table.
    let note: string | null = null
    if (chain !== null) {
      const epochs = (await Promise.all(chain.members.map(m => statusOf(m.addr)))).map(x => x?.epoch ?? 'no answer')
      if (epochs.some(e => e !== epoch0)) note = `the chain reconfigured during the level: epoch ${epoch0} -> ${epochs.join('/')}; ${chainEvents(chain, 3)}`
    }
    const total = results.reduce((s, r) => s + r.latUs.length, 0)
    const all = new Float64Array(total)
    let at = 0
    for (const r of results) { all.set(r.latUs, at); at += r.latUs.length }
    all.sort()
    return {
      clients: n,
      opsPerSec: total / opts.duration,
      p50: percentile(all, 50) / 1000,
      p99: percentile(all, 99) / 1000,
      max: total > 0 ? all[total - 1] / 1000 : NaN,
      errors: results.reduce((s, r) => s + r.errors, 0),
      firstError: results.find(r => r.firstError !== null)?.firstError ?? null,
      serverCpu: cpu.server,
      memberCpu: cpu.members,
      benchCpu: cpu.bench,
      otherCpu: cpu.other,
      setupMs,
      note,
      log
    }
  } catch (e) {
    if (chain !== null) process.stderr.write(`bench: chain level with ${n} clients failed; the members' events: ${chainEvents(chain, 8)}\n`)
    throw e
  } finally {
    if (server !== null) await server.stop()
    if (dir !== null) rmTemp(dir)
    if (chain !== null) await stopChain(chain)
  }
}

// ---- a local three-server chain ---------------------------------------------------------------

// The chain runs with the server's default --heartbeat-ms and --failure-timeout-ms (no flags
// passed): the figures are then the ones an operator gets without tuning. The values are read
// from lib/limits.ts, which is where the server takes its defaults from.
interface ChainMember { addr: string, port: number, dir: string, server: Server | null }
interface LocalChain { base: string, members: ChainMember[], servers: string[] }

// n ports that were free a moment ago on 127.0.0.1, ascending (the lowest port is the initial
// primary). Another process could take one before the server binds it: startChain retries.
async function freePorts (n: number): Promise<number[]> {
  const servers: net.Server[] = []
  try {
    while (servers.length < n) {
      const s = net.createServer()
      servers.push(s)
      await new Promise<void>((resolve, reject) => { s.once('error', reject); s.listen(0, '127.0.0.1', resolve) })
    }
    return servers.map(s => (s.address() as net.AddressInfo).port).sort((a, b) => a - b)
  } finally {
    for (const s of servers) await new Promise(resolve => s.close(resolve))
  }
}

async function startChain (tag: string): Promise<LocalChain> {
  let lastError: unknown = null
  for (let attempt = 0; attempt < 3; attempt++) {
    const base = mkTemp(tag)
    const ports = await freePorts(3)
    const members: ChainMember[] = ports.map((port, k) => ({ addr: `127.0.0.1:${port}`, port, dir: path.join(base, `m${k}`), server: null }))
    const chain: LocalChain = { base, members, servers: members.map(m => m.addr) }
    const peers = chain.servers.join(',')
    const started = await Promise.allSettled(members.map(m => startServer(m.dir, ['--peers', peers], 30_000, m.port)))
    started.forEach((r, k) => { if (r.status === 'fulfilled') members[k].server = r.value })
    const failed = started.find((r): r is PromiseRejectedResult => r.status === 'rejected')
    if (failed === undefined) return chain
    lastError = failed.reason
    process.stderr.write(`bench: starting a chain failed (attempt ${attempt + 1} of 3): ${String((lastError as Error)?.message ?? lastError).slice(0, 500)}\n`)
    await stopChain(chain)
  }
  throw new Error(`could not start a three-server chain: ${String((lastError as Error)?.message ?? lastError)}`)
}

// Stop every member (a paused one is continued first, or SIGTERM would wait for the timeout) and
// remove the data directories.
async function stopChain (chain: LocalChain): Promise<void> {
  try {
    await Promise.all(chain.members.map(async m => {
      const s = m.server
      if (s === null) return
      try { s.proc.kill('SIGCONT') } catch { /* gone */ }
      await s.stop(10_000)
    }))
  } finally {
    rmTemp(chain.base)
  }
}

// One status request on a fresh connection; null if the server does not answer in time.
function statusOf (addr: string, timeoutMs = 2000): Promise<Record<string, unknown> | null> {
  const k = addr.lastIndexOf(':')
  return new Promise(resolve => {
    const socket = net.connect(Number(addr.slice(k + 1)), addr.slice(0, k))
    let buf = ''
    const done = (v: Record<string, unknown> | null): void => {
      clearTimeout(timer)
      socket.destroy()
      resolve(v)
    }
    const timer = setTimeout(() => done(null), timeoutMs)
    socket.setEncoding('utf8')
    socket.on('connect', () => socket.write('{"op":"status","id":1}\n'))
    socket.on('data', (d: string) => {
      buf += d
      const nl = buf.indexOf('\n')
      if (nl < 0) return
      try { done(JSON.parse(buf.slice(0, nl))) } catch { done(null) }
    })
    socket.on('error', () => done(null))
    socket.on('close', () => done(null))
  })
}

// Wait until all three members answer, exactly one is primary, its chain holds all three (no
// learner), every member is primary or backup, and all report the same epoch. Returns the
// members' positions in chain order (primary first) and the epoch.
async function waitChainReady (chain: LocalChain, timeoutMs: number): Promise<{ order: number[], epoch: number }> {
  const end = Date.now() + timeoutMs
  for (;;) {
    const st = await Promise.all(chain.members.map(m => m.server === null ? Promise.resolve(null) : statusOf(m.addr)))
    const all = st.filter((x): x is Record<string, unknown> => x !== null)
    const primaries = all.filter(x => x.role === 'primary')
    if (all.length === chain.members.length && primaries.length === 1) {
      const p = primaries[0]
      const order = Array.isArray(p.chain) ? (p.chain as string[]).map(a => chain.servers.indexOf(a)) : []
      if (order.length === chain.members.length && !order.includes(-1) && (p.learner ?? null) === null &&
          all.every(x => x.epoch === p.epoch && (x.role === 'primary' || x.role === 'backup'))) {
        return { order, epoch: Number(p.epoch) }
      }
    }
    if (Date.now() > end) {
      throw new Error(`timed out after ${timeoutMs} ms waiting for a chain of three with a primary at one epoch; statuses: ${JSON.stringify(st.map(x => x === null ? null : { node: x.node, role: x.role, epoch: x.epoch, chain: x.chain, learner: x.learner }))}`)
    }
    await sleep(100)
  }
}

const sleep = (ms: number): Promise<void> => new Promise(resolve => setTimeout(resolve, ms))

// Every parsed operator-log line with this msg.
function serverLogLines (stderr: string, msg: string): Array<Record<string, unknown>> {
  const out: Array<Record<string, unknown>> = []
  for (const line of stderr.split('\n')) {
    if (!line.includes(`"msg":"${msg}"`)) continue
    try { out.push(JSON.parse(line)) } catch { /* partial line */ }
  }
  return out
}

// The members' replication events after start-up (role changes beyond the first, lost peers,
// reconfigurations, step-downs), the last `max` of them, for diagnostics.
function chainEvents (chain: LocalChain, max: number): string {
  const events: Array<{ t: string, text: string }> = []
  for (const m of chain.members) {
    for (const msg of ['role change', 'peer lost', 'reconfigured', 'stepping down']) {
      for (const l of serverLogLines(m.server?.stderr() ?? '', msg)) {
        if (msg === 'role change' && l.from === 'waiting') continue // the cold start
        events.push({ t: String(l.t), text: `${String(l.t).slice(11)} ${m.addr} ${msg}${l.to === undefined ? '' : ` -> ${String(l.to)}`}${l.why === undefined ? '' : ` (${String(l.why)})`}` })
      }
    }
  }
  events.sort((a, b) => a.t < b.t ? -1 : a.t > b.t ? 1 : 0)
  return events.length === 0 ? 'none logged' : events.slice(-max).map(e => e.text).join('; ')
}

// ---- failover time -------------------------------------------------------------------------

interface FailoverRun {
  fault: 'SIGKILL' | 'SIGSTOP'
  ms: number // signal -> first send acknowledged at the new primary, on the client's clock
  lossMs: number | null // signal -> the client's 'reconnecting' event (it noticed)
  reconnectedMs: number | null // signal -> the client's 'reconnected' event
  lossReason: string | null
  detectMs: number | null // signal -> first 'peer lost' line of a survivor (server log, ms resolution)
  takeoverMs: number | null // signal -> the new primary's 'role change' to primary (server log)
  oldPrimary: string
  newPrimary: string
  newRole: string // the new primary's role right after, from its status
  epochs: [number, number]
  acksBefore: number
  loginMs: number // the client's first login, for reference: the library logs in again (a scrypt) before 'reconnected'
  errors: number // sends that failed (the library retries; any failure here is one the caller saw)
  firstError: string | null
  rejoinMs: number | null // SIGSTOP: SIGCONT -> the chain of three converged again; null: not within 30 s
}

async function failoverRun (fault: 'SIGKILL' | 'SIGSTOP', livenessMs: number | null): Promise<FailoverRun> {
  const chain = await startChain('failover')
  let client: ChatClient | null = null
  let stopLoop = true
  let loop: Promise<void> = Promise.resolve()
  try {
    const { order, epoch: epoch0 } = await waitChainReady(chain, 30_000)
    const old = chain.members[order[0]]
    await registerUsers({ servers: chain.servers }, ['fo-a', 'fo-b'])
    // The library's defaults, except livenessTimeoutMs when --liveness-ms is given.
    client = await ChatClient.connect({ servers: chain.servers, ...(livenessMs === null ? {} : { livenessTimeoutMs: livenessMs }) })
    const tLogin = process.hrtime.bigint()
    await client.login('fo-a', password)
    const loginMs = Number(process.hrtime.bigint() - tLogin) / 1e6
    if (client.address !== old.addr) throw new Error(`the client connected to ${client.address}, not to the primary ${old.addr}`)
    const c = client

    let tSignal: bigint | null = null
    let firstNew: { t: bigint, addr: string } | null = null
    let lossAt: bigint | null = null
    let lossReason: string | null = null
    let reconnectedAt: bigint | null = null
    let acks = 0
    let errors = 0
    let firstError: string | null = null
    let gone = false
    c.once('close', () => { gone = true })
    c.on('reconnecting', (reason: string) => {
      if (tSignal !== null && lossAt === null) { lossAt = process.hrtime.bigint(); lossReason = reason }
    })
    c.on('reconnected', () => { if (tSignal !== null && reconnectedAt === null) reconnectedAt = process.hrtime.bigint() })

    // One client, sending back to back: the next send starts when the previous one is answered.
    stopLoop = false
    loop = (async () => {
      let seq = 0
      while (!stopLoop && !gone) {
        try {
          await c.send('fo-b', `failover probe ${++seq}`)
          const t = process.hrtime.bigint()
          acks++
          if (tSignal !== null && firstNew === null && t > tSignal && c.address !== old.addr) firstNew = { t, addr: c.address }
        } catch (e) {
          if (stopLoop) break
          errors++
          firstError ??= (e as Error).message
          await sleep(5) // never a hot loop
        }
      }
    })()

    // Steady state first: a second of acknowledged sends at the primary.
    await sleep(1000)
    await waitFor('sends acknowledged before the fault', 10_000, () => acks >= 20)
    const acksBefore = acks
    if (errors > 0) throw new Error(`sends failed before the fault: ${firstError}`)

    const wall0 = Date.now()
    tSignal = process.hrtime.bigint()
    old.server!.proc.kill(fault)
    await waitFor(`the first send acknowledged by a new primary after ${fault}`, 60_000, () => firstNew !== null || gone)
    if (firstNew === null) throw new Error(`the client gave up after ${fault}: ${firstError}`)
    const hit = firstNew as { t: bigint, addr: string }
    stopLoop = true
    const ms = Number(hit.t - tSignal) / 1e6
    const since = (t: bigint | null): number | null => t === null ? null : Number(t - tSignal!) / 1e6

    const st = await statusOf(hit.addr)
    const survivors = chain.members.filter(m => m !== old)
    const logMs = (m: ChainMember, msg: string, pick: (l: Record<string, unknown>) => boolean): number | null => {
      const ts = serverLogLines(m.server?.stderr() ?? '', msg).filter(pick).map(l => Date.parse(String(l.t)) - wall0).filter(x => x >= 0)
      return ts.length === 0 ? null : Math.min(...ts)
    }
    const detects = survivors.map(m => logMs(m, 'peer lost', () => true)).filter((x): x is number => x !== null)
    const newMember = chain.members.find(m => m.addr === hit.addr)
    const takeoverMs = newMember === undefined ? null : logMs(newMember, 'role change', l => l.to === 'primary')

    const run: FailoverRun = {
      fault,
      ms,
      lossMs: since(lossAt),
      reconnectedMs: since(reconnectedAt),
      lossReason,
      detectMs: detects.length === 0 ? null : Math.min(...detects),
      takeoverMs,
      oldPrimary: old.addr,
      newPrimary: hit.addr,
      newRole: String(st?.role ?? 'no answer'),
      epochs: [epoch0, Number(st?.epoch ?? NaN)],
      acksBefore,
      loginMs,
      errors,
      firstError,
      rejoinMs: null
    }
    client.close()
    client = null
    await Promise.race([loop, sleep(5000)])

    if (fault === 'SIGKILL') {
      await old.server!.exited
    } else {
      // Let the paused primary run again; it should find the chain moved on, step down and rejoin.
      const tCont = process.hrtime.bigint()
      old.server!.proc.kill('SIGCONT')
      try {
        await waitChainReady(chain, 30_000)
        run.rejoinMs = Number(process.hrtime.bigint() - tCont) / 1e6
      } catch (e) {
        process.stderr.write(`bench: after SIGCONT: ${(e as Error).message}\n`)
      }
    }
    return run
  } finally {
    stopLoop = true
    client?.close()
    await Promise.race([loop, sleep(5000)])
    await stopChain(chain)
  }
}

// ---- part 2: restart time -----------------------------------------------------------------

// A deterministic pseudo-random sequence, so every run builds the same log.
function lcg (seed: number): () => number {
  let x = seed >>> 0
  return () => {
    x = (Math.imul(x, 1664525) + 1013904223) >>> 0
    return x / 2 ** 32
  }
}

const words = ['hello', 'are', 'you', 'coming', 'tonight', 'lunch', 'meeting', 'moved', 'to', 'three', 'thanks', 'see', 'the', 'doc', 'ok', 'sounds', 'good', 'deploy', 'is', 'done', 'call', 'me', 'later', 'when', 'free', 'ship', 'it', 'friday', 'review', 'please']

// Write a log of `records` records straight into `dir` with the project's framing, record
// encoding (encodeRecordFrame, as the committer writes them) and segment naming: `users`
// register records (all sharing one real scrypt hash of `password`), then sends between them,
// each with the exactly-once key a real client's rid produces. One segment, as a server running with snapshots disabled
// would leave it. Returns the log's size in bytes.
function buildLog (dir: string, records: number, users: number, from = 1): number {
  const salt = randomBytes(limits.saltBytes)
  const hash = scryptSync(password, salt, limits.scryptKeyBytes, { N: limits.scryptN, r: limits.scryptR, p: limits.scryptP, maxmem: 64 * 1024 * 1024 })
  const saltB64 = salt.toString('base64')
  const hashB64 = hash.toString('base64')
  const rand = lcg(42)
  const names = Array.from({ length: users }, (_, k) => `user${String(k).padStart(4, '0')}`)
  const prefixes = names.map(() => randomBytes(9).toString('base64url'))
  const ridSeq = new Array<number>(users).fill(0)
  const ts0 = Date.now() - 24 * 3600 * 1000
  const fd = fs.openSync(path.join(dir, segmentName(from)), 'w')
  let bytes = 0
  try {
    let pending: Buffer[] = []
    let pendingBytes = 0
    const push = (frame: Buffer): void => {
      pending.push(frame)
      pendingBytes += frame.length
      if (pendingBytes >= 4 << 20) flush()
    }
    const flush = (): void => {
      const buf = Buffer.concat(pending, pendingBytes)
      let done = 0
      while (done < buf.length) done += fs.writeSync(fd, buf, done, buf.length - done)
      bytes += buf.length
      pending = []
      pendingBytes = 0
    }
    for (let i = from; i < from + records; i++) {
      const ts = ts0 + Math.floor(i / 30) // ~30k records a second
      if (i <= users) {
        const k = i - 1
        const r: RegisterRecord = { op: 'register', user: names[k], salt: saltB64, hash: hashB64, rk: `\u0000${prefixes[k]}-${++ridSeq[k]}`, i, e: 0, ts }
        push(encodeRecordFrame(r))
        continue
      }
      const from = Math.floor(rand() * users)
      const to = (from + 1 + Math.floor(rand() * (users - 1))) % users
      const nWords = 3 + Math.floor(rand() * 12)
      let text = rand() < 0.5 ? `hey ${names[to]},` : 'hi!'
      for (let w = 0; w < nWords; w++) text += ' ' + words[Math.floor(rand() * words.length)]
      const r: SendRecord = { op: 'send', from: names[from], to: names[to], text, rk: `${names[from]}\u0000${prefixes[from]}-${++ridSeq[from]}`, i, e: 0, ts }
      push(encodeRecordFrame(r))
    }
    flush()
    fs.fsyncSync(fd)
  } finally {
    fs.closeSync(fd)
  }
  return bytes
}

interface RestartCase { label: string, runs: number[], recoveredMs: number[], decodedMs: number[], replayed: number | null }

async function timeRestarts (label: string, dir: string, args: string[], runs: number): Promise<RestartCase> {
  const out: RestartCase = { label, runs: [], recoveredMs: [], decodedMs: [], replayed: null }
  for (let k = 0; k < runs; k++) {
    const s = await startServer(dir, args, 600_000)
    try {
      out.runs.push(s.readyMs)
      // The 'recovered' log line precedes the readiness line; its ms is the server's own
      // measurement of loading the snapshot and replaying the log.
      await waitFor('the recovered log line', 5000, () => serverLogLine(s.stderr(), 'recovered') !== null)
      const rec = serverLogLine(s.stderr(), 'recovered')!
      out.recoveredMs.push(Number(rec.ms))
      out.replayed = Number(rec.replayed)
      // The server decodes the mailboxes it left packed (from a snapshot, or the messages of the
      // sends it replayed) in the background, once it is ready, and logs when it is done
      // (lib/node.ts).
      if (Number(rec.packedMailboxes) > 0) {
        await waitFor('the mailboxes decoded log line', 60_000, () => serverLogLine(s.stderr(), 'mailboxes decoded') !== null)
        out.decodedMs.push(Number(serverLogLine(s.stderr(), 'mailboxes decoded')!.ms))
      }
    } finally {
      await s.stop(60_000)
    }
  }
  return out
}

async function restartPart (records: number, runs: number): Promise<{ cases: RestartCase[], notes: string[] }> {
  const notes: string[] = []
  const dir = mkTemp('restart')
  try {
    const users = Math.max(2, Math.min(1000, Math.floor(records / 10)))
    const t0 = Date.now()
    const logBytes = buildLog(dir, records, users)
    notes.push(`log: ${int(records)} records (${users} register + ${int(records - users)} send) in one segment, ${f1(logBytes / 2 ** 20)} MiB, written directly in ${f1((Date.now() - t0) / 1000)} s`)

    // (a) Replay of the whole log: snapshots effectively off, so none is taken (none would be
    // anyway without a write, but the flags make sure of it).
    const noSnap = ['--snapshot-every-records', String(Number.MAX_SAFE_INTEGER), '--snapshot-every-bytes', String(Number.MAX_SAFE_INTEGER)]
    const a = await timeRestarts(`(a) replay ${int(records)}-record log`, dir, noSnap, runs)

    // (b) The same state from a snapshot. Stopping a server does not write one: snapshots are
    // taken after a write once --snapshot-every-records records have accumulated. So: start the
    // server once on the log with --snapshot-every-records 1 (the default, 100,000, would do the
    // same for any log at least that long), log in and send one message; that write triggers a
    // snapshot of index records+1 and compacts the replayed segment away. The snapshot is
    // written before the send's reply goes out.
    const t1 = Date.now()
    const maker = await startServer(dir, ['--snapshot-every-records', '1'], 600_000)
    try {
      const c = await ChatClient.connect({ port: maker.port, requestTimeoutMs: 120_000 })
      try {
        await c.login('user0000', password)
        await c.send('user0001', 'one more message, to make the server take a snapshot')
      } finally {
        c.close()
      }
      await waitFor('the snapshot', 10_000, () => serverLogLine(maker.stderr(), 'snapshot written') !== null)
    } finally {
      await maker.stop(60_000)
    }
    const files = fs.readdirSync(dir)
    const snap = files.find(f => /^snapshot-\d{20}\.snap$/.test(f))
    if (snap === undefined) throw new Error(`no snapshot was written; files: ${files.join(', ')}`)
    const snapMs = Number(serverLogLine(maker.stderr(), 'snapshot written')?.ms)
    notes.push(`snapshot: ${snap}, ${f1(fs.statSync(path.join(dir, snap)).size / 2 ** 20)} MiB, made by the server itself (--snapshot-every-records 1, one login + one send after the replay; writing it took the server ${snapMs} ms; whole step ${f1((Date.now() - t1) / 1000)} s); log files left: ${files.filter(f => f.endsWith('.wal')).join(', ')}`)
    const b = await timeRestarts(`(b) snapshot of the same state (+1 record)`, dir, [], runs)

    // (d) The most a restart replays under the default policy: the snapshot plus the longest log
    // after it that does not make the next one due, written into the empty segment the snapshot
    // left, from the next index on. That is one record short of --snapshot-every-records (default
    // 100,000), or of --snapshot-growth-percent of the snapshot's size (default 50%) in log bytes,
    // whichever is longer; the bytes per record as in the log of (a).
    const snapBytes = fs.statSync(path.join(dir, snap)).size
    const byGrowth = Math.ceil(limits.snapshotGrowthPercent / 100 * snapBytes / (logBytes / records)) - 1
    const tail = Math.min(Math.max(limits.snapshotEveryRecords - 1, byGrowth), records)
    const snapIndex = Number(/^snapshot-(\d{20})\.snap$/.exec(snap)![1])
    buildLog(dir, tail, users, snapIndex + 1)
    const d = await timeRestarts(`(d) snapshot + ${int(tail)}-record log (the default policy's worst case)`, dir, [], runs)

    // For reference: what a start costs with nothing to recover (node + tsx + compiling lib/).
    const empty = mkTemp('empty')
    const c = await timeRestarts('(c) empty data dir (start-up floor)', empty, [], runs)
    rmTemp(empty)
    return { cases: [a, b, d, c], notes }
  } finally {
    rmTemp(dir)
  }
}

// ---- main ---------------------------------------------------------------------------------

async function main (): Promise<void> {
  const opts = parseFlags()
  if (opts.profile !== null) {
    fs.mkdirSync(opts.profile, { recursive: true })
    serverNodeArgs = ['--cpu-prof', `--cpu-prof-dir=${opts.profile}`]
  }
  const started = Date.now()
  const levels = opts.skipLoad ? [] : opts.clients
  const chainLevels = opts.skipLoad || opts.skipChain ? [] : opts.clients
  const referenceRuns = opts.reference ? levels.length : 0
  const failoverRuns = opts.skipFailover ? 0 : opts.runs
  // Watchdog: generous, but finite. A chain level adds up to 3 x 30 s of start-up and 30 s of
  // convergence to a single-server level; a failover run is bounded by its waits (chain start,
  // convergence, the fault, SIGCONT and rejoin, stop) at well under 4 minutes.
  const budgetMs = 10 * 60_000 +
    (levels.length + referenceRuns) * (opts.duration + opts.warmup + 120) * 1000 +
    chainLevels.length * (opts.duration + opts.warmup + 240) * 1000 +
    failoverRuns * 2 * 240_000 +
    (opts.skipRestart ? 0 : (opts.runs + 1) * 600_000 + 5 * 60_000) // each start may take up to 600 s
  setTimeout(() => {
    process.stderr.write(`bench: watchdog: still running after ${Math.round(budgetMs / 1000)} s, giving up\n`)
    process.exit(1)
  }, budgetMs).unref()

  const cpus = os.cpus()
  const loadavg = (): string => os.loadavg().map(x => x.toFixed(2)).join(' ')
  console.log('chainchat benchmark')
  console.log(`node ${process.version} | ${cpus.length} CPUs (${cpus[0]?.model ?? 'unknown'}) | ${os.platform()} ${os.release()} | ${new Date().toISOString()} | load average ${loadavg()}`)
  console.log(`data in ${os.tmpdir()} | load: ${opts.workers === 0 ? 'main thread' : `${opts.workers} worker thread(s)`} | recipients: ${opts.push ? 'logged-in clients (push + mark_read)' : 'registered, offline users'}`)
  if (chainLevels.length > 0 || failoverRuns > 0) {
    console.log(`chain: three server processes on 127.0.0.1, fresh ports and data dirs per chain, server defaults --heartbeat-ms ${limits.heartbeatMs} --failure-timeout-ms ${limits.failureTimeoutMs} (not passed; lib/limits.ts)`)
  }
  console.log()

  const bar: string[] = []
  if (levels.length > 0 || chainLevels.length > 0) {
    // One fresh server (or chain) and data directory per level: every level starts from the same
    // empty log and state, so a level never pays for snapshots or compaction triggered by the
    // records an earlier level wrote, and the levels are independent of their order. The price
    // is registering and logging in users again (a scrypt each), which happens before the clock
    // starts.
    //
    // Load generation: by default all clients run in the bench's main thread (--workers 0).
    // Measured on the 2-core target machine at 64 clients: the load generator needs only ~25% of
    // one core at the rates the server sustains, while the server process needs more than one
    // core (main thread + GC and thread-pool helpers); 1 or 2 worker threads gave no measurable
    // gain (differences were within the run-to-run noise) and take CPU the server could use.
    // `--workers 1|2` splits the clients over worker threads, to check again elsewhere; the CPU
    // table shows who was busy (server, bench, everything else on the machine).
    //
    // The chain: three processes on this one machine, so the chain's CPU is shared by three
    // servers plus the bench; on 2 cores, the chain table measures a CPU-bound setup, not three
    // machines. Its clients are the library's failover clients given all three servers: they
    // find the primary themselves and would follow a failover (none is caused here).
    console.log(`throughput: closed loop, ${opts.warmup} s warm-up (discarded) + ${opts.duration} s measured per level, fresh server (or chain) per level`)
    // Interleaved (single 1, chain 1, single 16, chain 16, ...): on a shared machine whose load
    // drifts, the two figures for a client count are then taken close together in time.
    const single: LevelResult[] = []
    const reference: LevelResult[] = []
    const chained: LevelResult[] = []
    const results = { single, reference, chain: chained }
    const levelsOf = { single: levels, reference: opts.reference ? levels : [], chain: chainLevels }
    for (const n of [...new Set([...levels, ...chainLevels])]) {
      for (const kind of ['single', 'reference', 'chain'] as const) {
        if (!levelsOf[kind].includes(n)) continue
        const r = await runLevel(n, opts, kind)
        results[kind].push(r)
        process.stderr.write(`bench: ${kind === 'single' ? 'single server' : kind}, ${n} clients done (setup ${f1(r.setupMs / 1000)} s)\n`)
      }
    }
    const throughput = (rs: LevelResult[]): string => table(['clients', 'ops/s', 'p50 ms', 'p99 ms', 'errors'],
      rs.map(r => [String(r.clients), int(r.opsPerSec), f3(r.p50), f3(r.p99), String(r.errors)]),
      [true, true, true, true, true])
    if (single.length > 0) {
      console.log('single server:')
      console.log(throughput(single))
      console.log()
    }
    if (reference.length > 0) {
      console.log('reference: bench/reference-server.ts, a bare-bones group-commit server (no state, no checks), same clients:')
      console.log(throughput(reference))
      console.log()
    }
    if (chained.length > 0) {
      console.log('three-server chain (primary -> backup -> tail; an ack means fsync\'d on all three):')
      console.log(throughput(chained))
      console.log()
    }
    const pct = (x: number | null): string => x === null ? '-' : `${Math.round(x * 100)}%`
    console.log(`CPU during each level, in % of one core (${cpus.length} cores in all; 'other' is every other process on the machine):`)
    const cpuRows = (label: string, rs: LevelResult[]): string[][] => rs.map(r => [label, String(r.clients), f1(r.max),
      r.memberCpu.length > 1 ? `${pct(r.serverCpu)} (${r.memberCpu.map(pct).join(' + ')})` : pct(r.serverCpu), pct(r.benchCpu), pct(r.otherCpu)])
    console.log(table(['setup', 'clients', 'max ms', 'server CPU (chain: primary + backup + tail)', 'bench CPU', 'other CPU'],
      [...cpuRows('single', single), ...cpuRows('reference', reference), ...cpuRows('chain', chained)],
      [false, true, true, true, true, true]))
    console.log()
    console.log('the log\'s appends during each level (status `log`; chain: the primary\'s), each one write and one fdatasync;')
    console.log('the time is from an append\'s write to its fdatasync\'s end as the server saw it, over its last 1,024 appends:')
    const logRows = (label: string, rs: LevelResult[]): string[][] => rs.map(r => [label, String(r.clients),
      r.log === null ? '-' : f1(r.log.recordsPerAppend),
      r.log?.syncMs == null ? '-' : f3(r.log.syncMs.p50), r.log?.syncMs == null ? '-' : f3(r.log.syncMs.p99)])
    console.log(table(['setup', 'clients', 'records per append', 'sync p50 ms', 'sync p99 ms'],
      [...logRows('single', single), ...logRows('chain', chained)],
      [false, true, true, true, true]))
    for (const r of single) if (r.firstError) console.log(`first error at ${r.clients} clients, single server: ${r.firstError}`)
    for (const r of chained) if (r.firstError) console.log(`first error at ${r.clients} clients, chain: ${r.firstError}`)
    for (const r of chained) if (r.note) console.log(`note at ${r.clients} clients, chain: ${r.note}`)
    console.log()
    const at64 = single.find(r => r.clients === 64)
    const at1 = single.find(r => r.clients === 1)
    if (at64) bar.push(`>= 35,000 ops/s at 64 clients: ${int(at64.opsPerSec)} -> ${at64.opsPerSec >= 35_000 ? 'PASS' : 'MISS'}`)
    if (at1) bar.push(`p50 <= 0.4 ms at 1 client: ${f3(at1.p50)} ms -> ${at1.p50 <= 0.4 ? 'PASS' : 'MISS'}`)
  }

  if (failoverRuns > 0) {
    // A fresh chain per run, so every run starts from the same three-member configuration with
    // the lowest port as primary. The client is the library with all three servers and its
    // defaults (--liveness-ms overrides livenessTimeoutMs): what an application gets. Times are
    // on the client's clock from just before kill(2); the server-log columns come from the
    // members' JSON log timestamps (wall clock, 1 ms resolution) against Date.now() at the
    // signal. SIGKILL closes the primary's sockets at once, so peers and the client see the
    // loss immediately; SIGSTOP leaves them open, so the loss is found by timeouts: the
    // servers' --failure-timeout-ms and the client's livenessTimeoutMs.
    const liveness = opts.livenessMs === null ? 'library default' : `${opts.livenessMs} ms (--liveness-ms)`
    console.log(`failover: one client (library, all three servers, livenessTimeoutMs ${liveness}, other options default) sending back to back; the primary is signalled; fresh chain per run, ${failoverRuns} run(s) per fault`)
    console.log(`server failure timeout: ${limits.failureTimeoutMs} ms (heartbeat ${limits.heartbeatMs} ms), the server defaults`)
    const runs: FailoverRun[] = []
    for (const fault of ['SIGKILL', 'SIGSTOP'] as const) {
      for (let k = 0; k < failoverRuns; k++) {
        const r = await failoverRun(fault, opts.livenessMs)
        runs.push(r)
        process.stderr.write(`bench: ${fault} run ${k + 1}: ${f1(r.ms)} ms\n`)
      }
    }
    const ms = (x: number | null): string => x === null ? '-' : f1(x)
    console.log(table(['fault', 'run', 'to first ack at new primary ms', 'client noticed ms', 'client reconnected (after re-login) ms', 'survivor logged peer lost ms', 'new primary took over ms', 'login ms (before)', 'failed sends', 'new primary (role, epoch)', 'rejoined after SIGCONT ms'],
      runs.map((r, k) => [`${r.fault} primary`, String(k % failoverRuns + 1), f1(r.ms), ms(r.lossMs), ms(r.reconnectedMs), ms(r.detectMs), ms(r.takeoverMs), f1(r.loginMs), String(r.errors),
        `${r.newPrimary} (${r.newRole}, ${r.epochs[0]} -> ${r.epochs[1]})`, r.fault === 'SIGSTOP' ? (r.rejoinMs === null ? 'not in 30 s' : f1(r.rejoinMs)) : 'n/a']),
      [false, true, true, true, true, true, true, true, true, false, true]))
    for (const fault of ['SIGKILL', 'SIGSTOP'] as const) {
      const rs = runs.filter(r => r.fault === fault)
      const reasons = [...new Set(rs.map(r => r.lossReason?.replaceAll(r.oldPrimary, 'the old primary') ?? '-'))].join('; ')
      console.log(`${fault} of the primary: ${rs.map(r => f1(r.ms)).join(', ')} ms -> median ${f1(median(rs.map(r => r.ms)))} ms (server failure timeout ${limits.failureTimeoutMs} ms; client noticed by: ${reasons})`)
      for (const r of rs) if (r.firstError !== null) console.log(`  first failed send (${fault}): ${r.firstError}`)
    }
    console.log()
  }

  if (!opts.skipRestart) {
    console.log(`restart: time from spawning the server to its readiness line, median of ${opts.runs}; the mailboxes left packed (a snapshot's, and the messages of replayed sends) are decoded in the background from then on (last column)`)
    const { cases, notes } = await restartPart(opts.records, opts.runs)
    for (const n of notes) console.log(n)
    console.log(table(['case', 'records replayed', 'runs ms', 'median ms', 'server recovery ms (median)', 'mailboxes decoded, ms after ready (median)'],
      cases.map(c => [c.label, c.replayed === null ? '-' : int(c.replayed), c.runs.map(x => Math.round(x)).join(', '), int(median(c.runs)), int(median(c.recoveredMs)), c.decodedMs.length === 0 ? '-' : int(median(c.decodedMs))]),
      [false, true, true, true, true, true]))
    console.log()
    const [a, b, d] = cases
    bar.push(`restart of a ${int(opts.records)}-record log <= 2 s: ${int(median(a.runs))} ms -> ${median(a.runs) <= 2000 ? 'PASS' : 'MISS'} (replayed in full, snapshots off)`)
    bar.push(`  the same history as the server keeps it: ${int(median(b.runs))} ms from a snapshot, ${int(median(d.runs))} ms with the default policy's longest log after it`)
  }

  if (bar.length > 0) {
    console.log('bar:')
    for (const b of bar) console.log(`  ${b}`)
  }
  console.log(`total bench time: ${f1((Date.now() - started) / 1000)} s | load average at the end ${loadavg()}`)
}

try {
  await main()
} catch (e) {
  process.stderr.write(`bench failed: ${(e as Error)?.stack ?? String(e)}\n`)
  process.exitCode = 1
} finally {
  cleanupSync()
}
