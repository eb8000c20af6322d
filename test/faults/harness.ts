// One fault run: start a 3-member chain, run the workload and the nemesis's schedule for the
// duration, heal, wait for convergence and a quiet period, read the final state and check the
// history against it. Used by run.ts (the long runs) and test/faults.test.ts (the short ones).

import fs from 'node:fs'
import os from 'node:os'
import path from 'node:path'
import { Chain } from '../helpers/chain.ts'
import type { Teardown } from '../helpers/spawn.ts'
import { History, excerpt } from './history.ts'
import { Monitor, Nemesis, makeSchedule, describeFault, type Step } from './nemesis.ts'
import { Workload } from './workload.ts'
import { check, collectFinal, type Anomaly, type FinalState } from './checker.ts'

export interface RunOptions {
  seed: number
  durationMs: number
  clients: number
  switchUser?: 'login' | 'reconnect' // see WorkloadOptions
  snapshotEvery?: number // --snapshot-every-records for the servers, with no growth bound (default: the server's own policy)
  quotaMb?: number // --quota-mb for the servers (default: the server's own)
  helperReads?: number // every recovery reads on the helper thread, this many bytes at a time (CHAINCHAT_HELPER_READS)
  t: Teardown
  log?: (line: string) => void
  historyFile?: string // write the whole history (JSON) here; by default only on anomalies, to a temp file
}

export interface RunResult {
  seed: number
  durationMs: number
  clients: number
  switchUser: 'login' | 'reconnect'
  snapshotEvery: number | null
  quotaMb: number | null
  elapsedMs: number
  schedule: Step[]
  faults: Record<string, number>
  ops: Record<string, { ok: number, fail: number, unknown: number }>
  anomalies: Anomaly[] // the first few of each kind
  anomalyCounts: Record<string, number> // every anomaly, by kind
  notes: string[]
  excerpts: string[][] // per anomaly
  historyFile: string | null
  history: History
}

const sleep = (ms: number): Promise<void> => new Promise(resolve => setTimeout(resolve, ms))

// Statuses until all members agree on index and digest, and the index holds still for stableMs.
async function quiet (chain: Chain, timeoutMs: number, stableMs = 1000): Promise<boolean> {
  const end = Date.now() + timeoutMs
  let since = 0
  let last = ''
  for (let n = 0; n < 100_000 && Date.now() < end; n++) {
    const all = await chain.statuses()
    const key = all.map(s => s ? `${String(s.role)}/${String(s.index)}/${String(s.digest)}` : 'none').join(' ')
    const agree = all.every(s => s !== null && s.index === all[0]!.index && s.digest === all[0]!.digest)
    if (agree && key === last) {
      if (Date.now() - since >= stableMs) return true
    } else {
      since = Date.now()
      last = key
    }
    await sleep(200)
  }
  return false
}

export async function runFaults (opts: RunOptions): Promise<RunResult> {
  const log = opts.log ?? (() => {})
  const started = Date.now()
  const h = new History()
  const schedule = makeSchedule(opts.seed, opts.durationMs)
  log(`seed ${opts.seed}: ${schedule.length} faults scheduled over ${opts.durationMs / 1000} s, ${opts.clients} clients`)

  // DURABLE notes let the nemesis cut a killed member's log back as a power loss would.
  const args = [...(opts.snapshotEvery ? ['--snapshot-every-records', String(opts.snapshotEvery), '--snapshot-growth-percent', '0'] : []), ...(opts.quotaMb ? ['--quota-mb', String(opts.quotaMb)] : [])]
  const chain = await Chain.create(opts.t, { args, env: { CHAINCHAT_TRACK_DURABLE: '1', ...(opts.helperReads ? { CHAINCHAT_HELPER_READS: String(opts.helperReads) } : {}) } })
  await chain.startAll()
  await chain.waitConverged(3, 30_000)
  h.event('ready', `chain ${chain.servers.join(', ')} converged`)
  const monitor = new Monitor(chain, h)
  const nemesis = new Nemesis(chain, h, monitor)
  for (let k = 0; k < 3; k++) nemesis.watch(k)
  monitor.start()

  const workload = new Workload({ seed: opts.seed, clients: opts.clients, servers: chain.servers, durationMs: opts.durationMs, h, switchUser: opts.switchUser ?? 'login' })
  workload.start()
  const deadline = Date.now() + opts.durationMs
  let harnessError: string | null = null
  try {
    await nemesis.run(schedule, deadline, () => false)
  } catch (e) {
    // A fault that could not be carried out: say so, and still heal and check what happened.
    harnessError = String((e as Error)?.stack ?? e)
    h.event('nemesis-error', harnessError.split('\n')[0])
  }
  while (Date.now() < deadline) await sleep(Math.min(200, deadline - Date.now()))

  // Heal while the clients still run, so requests waiting for a primary can finish; then stop
  // them and let the chain settle.
  log(`seed ${opts.seed}: healing`)
  await nemesis.heal()
  await nemesis.converged(30_000)
  await workload.stop()
  h.event('stopped', 'workload stopped')
  const converged = await nemesis.converged(60_000) && await quiet(chain, 20_000)
  await monitor.stop()
  nemesis.retire()
  log(`seed ${opts.seed}: ${converged ? 'converged' : 'NOT converged'} at ${(h.now() / 1000).toFixed(1)} s; reading the final state`)

  let final: FinalState | null = null
  let collectError: string | null = null
  // Even without convergence, a serving primary's state can be checked for lost writes.
  try {
    final = await collectFinal(chain, h)
  } catch (e) {
    collectError = String((e as Error).message)
  }
  log(`seed ${opts.seed}: final state read at ${(h.now() / 1000).toFixed(1)} s`)
  // Without convergence, what the members said about it is the best clue.
  const serverLogs: Record<string, string> = {}
  if (!converged) for (const [k, m] of chain.members.entries()) if (m.proc) serverLogs[`m${k} ${m.addr} pid ${m.proc.pid}`] = m.proc.stderr().slice(-30_000)
  // Stop the members together (SIGTERM, so a coverage run gets their coverage; SIGKILL if one
  // hangs) rather than one by one in the teardown.
  await Promise.all(chain.members.map(async m => {
    const proc = m.proc
    if (!proc) return
    const timer = setTimeout(() => proc.kill('SIGKILL'), 10_000)
    await proc.stop()
    clearTimeout(timer)
    m.proc = null
  }))
  const result = check({ h, final, converged, unexpectedExits: nemesis.unexpectedExits, restartFailures: nemesis.stats.restartFailures })
  if (collectError) {
    result.anomalies.unshift({ kind: 'no-final-state', message: `could not read the final state: ${collectError}`, subject: {} })
    result.counts['no-final-state'] = 1
  }
  if (harnessError) {
    result.anomalies.unshift({ kind: 'nemesis-error', message: `the nemesis failed: ${harnessError}`, subject: {} })
    result.counts['nemesis-error'] = 1
  }

  const ops: RunResult['ops'] = {}
  for (const op of h.ops) {
    const row = ops[op.kind] ??= { ok: 0, fail: 0, unknown: 0 }
    if (op.status === 'ok') row.ok++
    else if (op.status === 'fail') row.fail++
    else row.unknown++
  }
  const notes = [...h.notes, ...result.notes]
  const armed = nemesis.stats.injected.crashpoint ?? 0
  if (armed > 0) notes.push(`crash points: ${nemesis.stats.crashPointsHit} of ${armed} armed members died at their point (the rest were killed when their time ran out)`)
  if (nemesis.stats.unsettled > 0) notes.push(`${nemesis.stats.unsettled} faults began before the chain had converged (15 s wait)`)
  let historyFile: string | null = opts.historyFile ?? null
  if (historyFile === null && (result.anomalies.length > 0 || !converged)) historyFile = path.join(os.tmpdir(), `chainchat-faults-seed${opts.seed}-${Date.now()}.json`)
  if (historyFile) {
    fs.writeFileSync(historyFile, JSON.stringify({ seed: opts.seed, durationMs: opts.durationMs, clients: opts.clients, schedule: schedule.map(s => ({ ...s, text: describeFault(s.fault) })), anomalyCounts: result.counts, anomalies: result.anomalies, serverLogs, history: h.toJSON() }, null, 1))
  }
  return {
    seed: opts.seed,
    durationMs: opts.durationMs,
    clients: opts.clients,
    switchUser: opts.switchUser ?? 'login',
    snapshotEvery: opts.snapshotEvery ?? null,
    quotaMb: opts.quotaMb ?? null,
    elapsedMs: Date.now() - started,
    schedule,
    faults: { ...nemesis.stats.injected },
    ops,
    anomalies: result.anomalies,
    anomalyCounts: result.counts,
    notes,
    excerpts: result.anomalies.map(a => excerpt(h, a.subject)),
    historyFile,
    history: h
  }
}

function totals (r: RunResult): { ok: number, fail: number, unknown: number } {
  const t = { ok: 0, fail: 0, unknown: 0 }
  for (const row of Object.values(r.ops)) {
    t.ok += row.ok
    t.fail += row.fail
    t.unknown += row.unknown
  }
  return t
}

export function reproduce (r: RunResult): string {
  return `npm run test:faults -- --seed ${r.seed} --duration ${r.durationMs / 1000} --clients ${r.clients}${r.switchUser === 'reconnect' ? ' --switch-user reconnect' : ''}${r.snapshotEvery ? ` --snapshot-every ${r.snapshotEvery}` : ''}${r.quotaMb ? ` --quota-mb ${r.quotaMb}` : ''}`
}

export function anomalyTotal (r: RunResult): number {
  return Object.values(r.anomalyCounts).reduce((a, b) => a + b, 0)
}

// The anomalies of a run (the first few of each kind), each with its excerpt of the history.
export function formatAnomalies (r: RunResult): string {
  const out: string[] = []
  r.anomalies.forEach((a, k) => {
    out.push(`ANOMALY ${k + 1}/${r.anomalies.length} [${a.kind}] seed ${r.seed}: ${a.message}`)
    for (const line of r.excerpts[k]) out.push(`    ${line}`)
  })
  if (r.anomalies.length > 0) {
    out.push(`seed ${r.seed}: ${anomalyTotal(r)} anomalies: ${Object.entries(r.anomalyCounts).map(([k, n]) => `${k} ${n}`).join(', ')}${anomalyTotal(r) > r.anomalies.length ? ' (the first few of each kind are shown above)' : ''}`)
    out.push(`reproduce: ${reproduce(r)}`)
    if (r.historyFile) out.push(`full history: ${r.historyFile}`)
  }
  return out.join('\n')
}

function table (header: string[], rows: string[][]): string {
  const widths = header.map((h, k) => Math.max(h.length, ...rows.map(r => r[k].length)))
  const line = (cells: string[]): string => cells.map((c, k) => c.padEnd(widths[k])).join('  ').trimEnd()
  return [line(header), widths.map(w => '-'.repeat(w)).join('  '), ...rows.map(line)].join('\n')
}

// The summary table: one row per run.
export function formatSummary (runs: RunResult[]): string {
  const kinds = [...new Set(runs.flatMap(r => Object.keys(r.faults)))].sort()
  const header = ['seed', 'duration', 'clients', 'faults', ...kinds, 'ops ok', 'fail', 'unknown', 'anomalies']
  const rows = runs.map(r => {
    const t = totals(r)
    const nFaults = Object.values(r.faults).reduce((a, b) => a + b, 0)
    return [String(r.seed), `${r.durationMs / 1000}s (${(r.elapsedMs / 1000).toFixed(0)}s)`, String(r.clients), String(nFaults), ...kinds.map(k => String(r.faults[k] ?? 0)), String(t.ok), String(t.fail), String(t.unknown), String(anomalyTotal(r))]
  })
  const perOp = runs.map(r => {
    const replayed = r.history.ops.filter(op => op.kind === 'send' && op.status === 'ok' && op.replayed).length
    const retried = r.history.ops.filter(op => op.kind === 'send' && op.retryOf !== undefined).length
    return `seed ${r.seed} by op: ${Object.entries(r.ops).map(([k, v]) => `${k} ${v.ok}/${v.fail}/${v.unknown}`).join(', ')} (ok/fail/unknown); sends retried with the same rid ${retried}, answered as replayed ${replayed}`
  })
  const kinds2 = runs.filter(r => anomalyTotal(r) > 0).map(r => `seed ${r.seed} anomalies by kind: ${Object.entries(r.anomalyCounts).map(([k, n]) => `${k} ${n}`).join(', ')}`)
  return [table(header, rows), ...perOp, ...kinds2].join('\n')
}
