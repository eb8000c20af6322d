// The nemesis: a seeded random schedule of process faults against a 3-member chain, its
// execution, a status monitor that samples every member while it runs, and the final heal.
//
// The schedule is a pure function of (seed, duration): the same seed gives the same fault kinds,
// targets and delays (a longer duration only appends to it). Targets are named by role
// ("the primary", "the tail") or by member position; a role is resolved to a member when the
// fault fires. Never more than two members are down (killed or paused) at once: every fault
// restores what it broke before the next one starts.

import type { Chain } from '../helpers/chain.ts'
import type { ServerProc } from '../helpers/spawn.ts'
import type { History, StatusSample } from './history.ts'
import fs from 'node:fs'
import path from 'node:path'
import { Prng } from './prng.ts'

export type TargetSpec =
  | { by: 'role', role: 'primary' | 'tail', fallback: number }
  | { by: 'member', k: number }

export type Fault =
  // SIGKILL one member, restart it after downMs.
  | { kind: 'kill', target: TargetSpec, downMs: number }
  // SIGSTOP one member for longer than the failure timeout, then SIGCONT.
  | { kind: 'pause', target: TargetSpec, pauseMs: number }
  // SIGKILL one member, gapMs later a second one (the first is now the stale one), restart both
  // after downMs, the stale one first or last, restartGapMs apart.
  | { kind: 'kill2', first: TargetSpec, secondOffset: 1 | 2, gapMs: number, downMs: number, staleFirst: boolean, restartGapMs: number }
  // Power loss: SIGKILL one member, then cut its log back to what its last fsync made durable
  // plus a random part of the rest (the page cache lost, a frame torn), restart after downMs.
  // The members run with CHAINCHAT_TRACK_DURABLE=1, so <data>/DURABLE says what was durable.
  | { kind: 'powerloss', target: TargetSpec, downMs: number, keep: number }
  // SIGKILL one member and restart it with a crash point armed (CHAINCHAT_CRASH_AT=point:n):
  // catching up, it kills itself the n-th time it reaches the point. If it has not within
  // armedMs, the nemesis kills it. Then it is restarted unarmed.
  | { kind: 'crashpoint', target: TargetSpec, point: CrashPoint, n: number, armedMs: number, downMs: number }

export type FaultKind = Fault['kind']

// The crash points a restarted member passes while it catches up and replicates (the primary's
// before-reply point is exercised by test/crash-points.test.ts instead: a restarted member
// never comes back as the primary). mid-snapshot fires when it installs a snapshot sent to it.
export const memberCrashPoints = ['after-append-before-fsync', 'after-fsync-before-forward', 'mid-snapshot'] as const
export type CrashPoint = typeof memberCrashPoints[number]

// Cut the log of a killed member back as a power loss would: keep what DURABLE says was fsync'd,
// and `keep` (0 to 1) of the bytes written after it. Zeros the log preallocated past its records
// are not written bytes: they go with the cut. Returns what was done, for the history.
export function losePageCache (dataDir: string, keep: number): string {
  let note: { file: string, bytes: number }
  try {
    note = JSON.parse(fs.readFileSync(path.join(dataDir, 'DURABLE'), 'utf8')) as { file: string, bytes: number }
  } catch {
    return 'no DURABLE note: nothing fsync\'d yet, log left as it is'
  }
  const file = path.join(dataDir, note.file)
  let size: number
  try {
    const buf = fs.readFileSync(file)
    size = buf.length
    while (size > 0 && buf[size - 1] === 0) size--
  } catch {
    return `${note.file} is gone (replaced since): log left as it is`
  }
  // Segments after the noted one hold nothing fsync'd (a segment is noted at its first fsync).
  const later = fs.readdirSync(dataDir).filter(f => /^log-\d{20}\.wal$/.test(f) && f > note.file)
  for (const f of later) fs.truncateSync(path.join(dataDir, f), 0)
  if (size <= note.bytes) return `${note.file}: ${size} bytes, all durable${later.length > 0 ? `; emptied ${later.join(', ')}` : ''}`
  const cut = note.bytes + Math.floor((size - note.bytes) * keep)
  fs.truncateSync(file, cut)
  return `${note.file}: cut from ${size} to ${cut} bytes (durable ${note.bytes})${later.length > 0 ? `; emptied ${later.join(', ')}` : ''}`
}

export interface Step {
  waitMs: number // quiet time before the fault
  settle: boolean // wait for a converged chain of 3 before the fault (else it may overlap a rejoin)
  fault: Fault
}

export const faultWeights: Record<FaultKind, number> = { kill: 4, pause: 3, kill2: 3, powerloss: 2, crashpoint: 2 }

// A rough length of a fault, to know when the schedule covers the duration.
function faultMs (f: Fault): number {
  switch (f.kind) {
    case 'kill': return f.downMs + 1500
    case 'pause': return f.pauseMs + 1000
    case 'kill2': return f.gapMs + f.downMs + f.restartGapMs + 2500
    case 'powerloss': return f.downMs + 1500
    case 'crashpoint': return f.downMs + f.armedMs + 2000
  }
}

function target (p: Prng): TargetSpec {
  const fallback = p.int(0, 2)
  const by = p.weighted({ primary: 4, tail: 2, member: 3 })
  return by === 'member' ? { by: 'member', k: fallback } : { by: 'role', role: by, fallback }
}

export function makeSchedule (seed: number, durationMs: number, weights: Record<FaultKind, number> = faultWeights): Step[] {
  const p = Prng.derive(seed, 'nemesis')
  const steps: Step[] = []
  let t = 0
  while (t < durationMs && steps.length < 10_000) {
    const waitMs = steps.length === 0 ? p.int(1000, 2500) : p.int(300, 3000)
    const settle = p.chance(0.7)
    const kind = p.weighted(weights)
    let fault: Fault
    switch (kind) {
      case 'kill':
        fault = { kind, target: target(p), downMs: p.int(100, 3000) }
        break
      case 'pause':
        fault = { kind, target: target(p), pauseMs: p.int(800, 3000) }
        break
      case 'kill2':
        fault = { kind, first: target(p), secondOffset: p.pick([1, 2] as const), gapMs: p.int(0, 1500), downMs: p.int(200, 3000), staleFirst: p.chance(0.5), restartGapMs: p.int(0, 1500) }
        break
      case 'powerloss':
        fault = { kind, target: target(p), downMs: p.int(100, 3000), keep: p.pick([0, 0, 0.3, 0.7]) }
        break
      case 'crashpoint':
        fault = { kind, target: target(p), point: p.pick(memberCrashPoints), n: p.int(1, 30), armedMs: p.int(1000, 4000), downMs: p.int(100, 1500) }
        break
    }
    steps.push({ waitMs, settle, fault })
    t += waitMs + faultMs(fault)
  }
  return steps
}

function describeTarget (s: TargetSpec): string {
  return s.by === 'member' ? `m${s.k}` : `${s.role}(else m${s.fallback})`
}

export function describeFault (f: Fault): string {
  switch (f.kind) {
    case 'kill': return `kill ${describeTarget(f.target)} for ${f.downMs} ms`
    case 'pause': return `pause ${describeTarget(f.target)} for ${f.pauseMs} ms`
    case 'kill2': return `kill ${describeTarget(f.first)} then +${f.secondOffset} after ${f.gapMs} ms, down ${f.downMs} ms, restart ${f.staleFirst ? 'stale first' : 'stale last'} ${f.restartGapMs} ms apart`
    case 'powerloss': return `powerloss ${describeTarget(f.target)} for ${f.downMs} ms, keeping ${f.keep * 100}% of the unsynced tail`
    case 'crashpoint': return `crashpoint ${f.point}:${f.n} at ${describeTarget(f.target)}, armed for up to ${f.armedMs} ms`
  }
}

const sleep = (ms: number): Promise<void> => new Promise(resolve => setTimeout(resolve, Math.max(0, ms)))

// Samples every member's status while the run goes on, one loop per member so that a paused
// member does not hold up the others. Samples go to the history; the checker reads them.
export class Monitor {
  private stopping = false
  private loops: Array<Promise<void>> = []

  constructor (private readonly chain: Chain, private readonly h: History, private readonly everyMs = 250) {}

  start (): void {
    this.loops = this.chain.members.map((_, k) => this.loop(k))
  }

  private async loop (k: number): Promise<void> {
    for (let n = 0; !this.stopping && n < 1_000_000; n++) {
      await this.sample(k)
      await sleep(this.everyMs)
    }
  }

  async sample (k: number): Promise<StatusSample | null> {
    const proc = this.chain.members[k].proc
    if (!proc) return null
    const start = this.h.now()
    const s = await this.chain.status(k)
    const end = this.h.now()
    // A reply from a process restarted meanwhile would be filed under the old pid: drop it.
    if (!s || s.ok !== true || this.chain.members[k].proc !== proc) return null
    const sample: StatusSample = {
      member: k,
      pid: proc.pid,
      start,
      end,
      role: String(s.role),
      epoch: Number(s.epoch),
      index: Number(s.index),
      lastIndex: Number(s.lastIndex ?? s.index),
      commit: Number(s.commit ?? s.index),
      digest: String(s.digest),
      chain: (s.chain as string[]) ?? []
    }
    this.h.samples.push(sample)
    return sample
  }

  async stop (): Promise<void> {
    this.stopping = true
    await Promise.all(this.loops)
  }
}

export interface NemesisStats {
  injected: Record<string, number>
  restartFailures: number
  crashPointsHit: number // armed crash points the member actually reached
  unsettled: number // faults started without the chain having converged in time
}

export interface UnexpectedExit { member: number, pid: number, t: number, how: string, stderr: string }

export class Nemesis {
  readonly stats: NemesisStats = { injected: {}, restartFailures: 0, crashPointsHit: 0, unsettled: 0 }
  readonly unexpectedExits: UnexpectedExit[] = []
  private readonly ours = new WeakSet<ServerProc>() // processes we killed on purpose
  private readonly paused = new Set<number>()
  private readonly watched = new WeakSet<ServerProc>()
  private stopping = false

  constructor (private readonly chain: Chain, private readonly h: History, private readonly monitor: Monitor) {}

  // Report a member process that dies without the nemesis killing it.
  watch (k: number): void {
    const proc = this.chain.members[k].proc
    if (!proc || this.watched.has(proc)) return
    this.watched.add(proc)
    proc.exited.then(({ code, signal }) => {
      if (this.ours.has(proc) || this.stopping) return
      this.unexpectedExits.push({ member: k, pid: proc.pid, t: this.h.now(), how: String(code ?? signal), stderr: proc.stderr().slice(-4000) })
      this.h.event('exit', `m${k} pid ${proc.pid} exited on its own (${code ?? signal})`)
    }, () => {})
  }

  // Called once the run is over and the heal is done: the test's teardown stops the processes.
  retire (): void {
    this.stopping = true
  }

  private async resolve (spec: TargetSpec): Promise<number> {
    if (spec.by === 'member') return spec.k
    const all = await this.chain.statuses()
    let best: { epoch: number, chain: string[], node: string } | null = null
    for (const s of all) {
      if (s?.ok === true && s.role === 'primary' && (best === null || Number(s.epoch) > best.epoch)) best = { epoch: Number(s.epoch), chain: s.chain as string[], node: String(s.node) }
    }
    if (!best) return spec.fallback
    const addr = spec.role === 'primary' ? best.node : best.chain.at(-1)!
    const k = this.chain.member(addr)
    return k >= 0 ? k : spec.fallback
  }

  private async kill (k: number): Promise<void> {
    const proc = this.chain.members[k].proc
    if (!proc) return
    this.ours.add(proc)
    this.paused.delete(k)
    this.h.event('kill', `m${k} pid ${proc.pid} SIGKILL`)
    await this.chain.kill(k, 'SIGKILL')
  }

  private async start (k: number, env: Record<string, string> = {}): Promise<boolean> {
    if (this.chain.members[k].proc) return true
    for (let attempt = 1; attempt <= 3; attempt++) {
      try {
        await this.chain.start(k, [], env)
        this.watch(k)
        this.h.event('start', `m${k} pid ${this.chain.members[k].proc!.pid} started`)
        await this.monitor.sample(k)
        return true
      } catch (e) {
        this.h.event('start-failed', `m${k} attempt ${attempt}: ${String((e as Error).message).slice(0, 300)}`)
        await sleep(500 * attempt)
      }
    }
    this.stats.restartFailures++
    return false
  }

  private pause (k: number): void {
    const proc = this.chain.members[k].proc
    if (!proc) return
    this.paused.add(k)
    this.h.event('pause', `m${k} pid ${proc.pid} SIGSTOP`)
    proc.kill('SIGSTOP')
  }

  private resume (k: number): void {
    const proc = this.chain.members[k].proc
    if (!proc || !this.paused.has(k)) return
    this.paused.delete(k)
    this.h.event('resume', `m${k} pid ${proc.pid} SIGCONT`)
    proc.kill('SIGCONT')
  }

  // Poll until the three members form one converged chain; false after the deadline.
  async converged (timeoutMs: number): Promise<boolean> {
    const end = Date.now() + timeoutMs
    for (let n = 0; n < 100_000; n++) {
      try {
        await this.chain.waitConverged(3, Math.max(1, Math.min(2000, end - Date.now())))
        return true
      } catch {
        if (Date.now() >= end) return false
      }
    }
    return false
  }

  // Resolve a fault's target to a member, and record the fault against it.
  private async aim (f: Fault, spec: TargetSpec): Promise<number> {
    const k = await this.resolve(spec)
    this.h.event('fault', `${describeFault(f)} -> m${k}`)
    return k
  }

  async execute (f: Fault): Promise<void> {
    this.stats.injected[f.kind] = (this.stats.injected[f.kind] ?? 0) + 1
    switch (f.kind) {
      case 'kill':
      case 'powerloss': {
        const k = await this.aim(f, f.target)
        await this.kill(k)
        if (f.kind === 'powerloss') this.h.event('powerloss', `m${k} ${losePageCache(this.chain.members[k].data, f.keep)}`)
        await sleep(f.downMs)
        await this.start(k)
        return
      }
      case 'pause': {
        const k = await this.aim(f, f.target)
        this.pause(k)
        await sleep(f.pauseMs)
        this.resume(k)
        await this.monitor.sample(k)
        return
      }
      case 'kill2': {
        const a = await this.resolve(f.first)
        const b = (a + f.secondOffset) % 3
        this.h.event('fault', `${describeFault(f)} -> m${a} (stale) then m${b}`)
        await this.kill(a)
        await sleep(f.gapMs)
        await this.kill(b)
        await sleep(f.downMs)
        const order = f.staleFirst ? [a, b] : [b, a]
        await this.start(order[0])
        await sleep(f.restartGapMs)
        await this.start(order[1])
        return
      }
      case 'crashpoint': {
        const k = await this.aim(f, f.target)
        await this.kill(k)
        await sleep(f.downMs)
        if (!(await this.start(k, { CHAINCHAT_CRASH_AT: `${f.point}:${f.n}` }))) return
        const proc = this.chain.members[k].proc!
        this.ours.add(proc) // its own death is expected
        const died = await Promise.race([proc.exited.then(() => true), sleep(f.armedMs).then(() => false)])
        if (died) {
          this.chain.members[k].proc = null
          this.stats.crashPointsHit++
          this.h.event('crashed', `m${k} pid ${proc.pid} died at ${f.point}:${f.n}`)
        } else await this.kill(k)
        await this.start(k)
      }
    }
  }

  // Carry out the schedule until the deadline (a fault that has begun is always finished).
  async run (schedule: Step[], deadline: number, stopped: () => boolean): Promise<void> {
    for (const step of schedule) {
      const waitEnd = Math.min(Date.now() + step.waitMs, deadline)
      while (Date.now() < waitEnd && !stopped()) await sleep(Math.min(100, waitEnd - Date.now()))
      if (Date.now() >= deadline || stopped()) return
      if (step.settle && !(await this.converged(Math.min(15_000, Math.max(2000, deadline - Date.now()))))) {
        this.stats.unsettled++
        this.h.note('the chain did not converge before the next fault')
      }
      if (Date.now() >= deadline || stopped()) return
      await this.execute(step.fault)
    }
  }

  // Undo everything: resume paused members, start the dead ones.
  async heal (): Promise<void> {
    this.h.event('heal', 'resume and start every member')
    for (const k of [...this.paused]) this.resume(k)
    for (let k = 0; k < this.chain.members.length; k++) {
      const proc = this.chain.members[k].proc
      if (proc) proc.kill('SIGCONT')
      else await this.start(k)
    }
  }
}
