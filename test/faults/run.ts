// The long fault runs, outside tap:
//
//   npm run test:faults -- [--seed N] [--duration SECONDS] [--clients N] [--runs K]
//                          [--switch-user login|reconnect] [--snapshot-every N] [--quota-mb N]
//                          [--helper-reads BYTES] [--history FILE] [--verbose]
//
// --seed      the seed of the first run (default: random, printed); the same seed gives the same
//             fault schedule and workload plan
// --duration  seconds of faults and workload per run (default 60)
// --clients   workload clients, 8 to 16 (default 12)
// --runs      run K seeds in a row: seed, seed+1, ... (default 1)
// --switch-user login|reconnect
//             how a client changes user: login again on the same connection (default), or
//             close it and log in on a new one
// --snapshot-every N
//             the servers snapshot (and drop the log) every N records, however big the state
//             (--snapshot-growth-percent 0), so catching up from a snapshot is part of the run
//             (default: the server's own policy, 100,000 records and the growth bound)
// --quota-mb N
//             the servers' quota (default: theirs); a small one keeps the state at its quota,
//             so that sends refused with STORE_FULL are part of the run
// --helper-reads BYTES
//             every recovery of a member reads its log and snapshot on the helper thread
//             (storage/checksums.ts), whatever their size, BYTES at a time, so that decoding
//             catches up with it inside frames (default: the server's own threshold, 16 MiB)
// --history   write the whole history of the (last) run to FILE as JSON
// --verbose   print the fault schedule and the notes (non-anomalies worth knowing)
//
// Prints a summary table (seed, duration, faults by kind, operations ok/fail/unknown, anomalies)
// and every anomaly with an excerpt of the history; exits 1 when any run found an anomaly.

import { parseArgs } from 'node:util'
import { runFaults, formatSummary, formatAnomalies, anomalyTotal, type RunResult } from './harness.ts'
import { describeFault } from './nemesis.ts'

const { values } = parseArgs({
  options: {
    seed: { type: 'string' },
    duration: { type: 'string', default: '60' },
    clients: { type: 'string', default: '12' },
    runs: { type: 'string', default: '1' },
    history: { type: 'string' },
    'switch-user': { type: 'string', default: 'login' },
    'snapshot-every': { type: 'string' },
    'quota-mb': { type: 'string' },
    'helper-reads': { type: 'string' },
    verbose: { type: 'boolean', default: false }
  }
})

function int (name: string, v: string | undefined, lo: number, hi: number): number {
  const n = Number(v)
  if (!Number.isInteger(n) || n < lo || n > hi) {
    console.error(`--${name} must be an integer from ${lo} to ${hi}`)
    process.exit(2)
  }
  return n
}

const seed = values.seed === undefined ? Math.floor(Math.random() * 2 ** 31) : int('seed', values.seed, 0, 2 ** 32 - 1)
const durationS = int('duration', values.duration, 5, 24 * 3600)
const clients = int('clients', values.clients, 1, 64)
const runs = int('runs', values.runs, 1, 1000)
const snapshotEvery = values['snapshot-every'] === undefined ? undefined : int('snapshot-every', values['snapshot-every'], 1, 1e9)
const quotaMb = values['quota-mb'] === undefined ? undefined : int('quota-mb', values['quota-mb'], 1, 1024 * 1024)
const helperReads = values['helper-reads'] === undefined ? undefined : int('helper-reads', values['helper-reads'], 1, 64 * 1024 * 1024)
const switchUser = values['switch-user']
if (switchUser !== 'login' && switchUser !== 'reconnect') {
  console.error('--switch-user must be login or reconnect')
  process.exit(2)
}

// Everything a run starts (server processes, data directories) is undone here, latest first.
const teardowns: Array<() => unknown> = []
const t = { teardown: (fn: () => unknown) => { teardowns.push(fn) } }
async function cleanup (): Promise<void> {
  for (const fn of teardowns.splice(0).reverse()) {
    try { await fn() } catch (e) { console.error(`cleanup: ${String(e)}`) }
  }
}
process.once('SIGINT', () => { cleanup().finally(() => process.exit(130)) })

const results: RunResult[] = []
for (let k = 0; k < runs; k++) {
  const s = (seed + k) >>> 0
  const log = (line: string): void => console.log(`[${new Date().toISOString().slice(11, 19)}] ${line}`)
  const r = await runFaults({ seed: s, durationMs: durationS * 1000, clients, switchUser, snapshotEvery, quotaMb, helperReads, t, log, historyFile: values.history })
  await cleanup()
  results.push(r)
  if (values.verbose) {
    console.log(`schedule of seed ${s} (as far as it ran):`)
    const n = Object.values(r.faults).reduce((a, b) => a + b, 0)
    for (const step of r.schedule.slice(0, n)) console.log(`  after ${step.waitMs} ms${step.settle ? ' (settled)' : ''}: ${describeFault(step.fault)}`)
    for (const e of r.history.events) console.log(`  ${(e.t / 1000).toFixed(3)}s ${e.kind} ${e.detail}`)
    if (r.notes.length > 0) console.log(`notes:\n  ${r.notes.slice(0, 200).join('\n  ')}`)
  }
  if (r.anomalies.length > 0) console.log(formatAnomalies(r))
  log(`seed ${s}: ${anomalyTotal(r)} anomalies in ${(r.elapsedMs / 1000).toFixed(1)} s${r.historyFile ? `; history in ${r.historyFile}` : ''}`)
}
console.log('\n' + formatSummary(results))
process.exit(results.some(r => anomalyTotal(r) > 0) ? 1 : 0)
