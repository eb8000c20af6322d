// Command-line flags -> a validated, frozen Config. A bad flag is a UsageError: the executable
// prints the usage and exits 2.

import { parseArgs } from 'node:util'
import path from 'node:path'
import fs from 'node:fs'
import v8 from 'node:v8'
import { limits } from './limits.ts'

export interface Config {
  readonly host: string
  readonly port: number
  readonly data: string | null // null: ./data/<the port actually bound>
  readonly snapshotEveryRecords: number
  readonly snapshotEveryBytes: number
  readonly snapshotGrowthPercent: number
  readonly segmentBytes: number
  readonly lineBytesMax: number
  readonly quotaBytes: number // sends and registrations are refused once the state holds this much
  readonly mailboxQuotaBytes: number // sends to a mailbox are refused once it holds this much
  // replication (protocol.md, "Replication")
  readonly peers: string[] | null // every member of the initial chain, this one included
  readonly me: string // this server as named in --peers (host:port)
  readonly join: string | null
  readonly secret: string | null
  readonly heartbeatMs: number
  readonly failureTimeoutMs: number
  readonly minChain: number
  readonly forceStart: boolean
}

export class UsageError extends Error {
  constructor (message: string) {
    super(message)
    this.name = 'UsageError'
  }
}

// Parse an executable's flags; on the user's mistake print it with the usage and exit 2; with
// --help print the usage and return null (the caller then returns).
export function flagsOrExit<F extends { help: boolean }> (program: string, text: string, parse: () => F): F | null {
  let flags: F
  try {
    flags = parse()
  } catch (e) {
    if (!(e instanceof UsageError)) throw e
    process.stderr.write(`${program}: ${e.message}\n\n${text}`)
    process.exit(2)
  }
  if (flags.help) {
    process.stdout.write(text)
    return null
  }
  return flags
}

export const usage = `usage: chainchat-server --port <n> [options]

  --port <n>                   TCP port to listen on (0 picks a free one)
  --host <addr>                address to listen on (default 127.0.0.1)
  --data <dir>                 data directory (default ./data/<port>)
  --snapshot-every-records <n> take a snapshot after this many log records (default ${limits.snapshotEveryRecords})
  --snapshot-every-bytes <n>   ... or after this many log bytes (default ${limits.snapshotEveryBytes})
  --snapshot-growth-percent <n>
                               ... and once the log since the last snapshot comes to this many
                               percent of that snapshot's size (default ${limits.snapshotGrowthPercent}; 0: no such bound)
  --segment-bytes <n>          start a new log segment once one holds this many bytes (default ${limits.logSegmentBytes})
  --line-bytes-max <n>         longest request line accepted (default ${limits.lineBytesMax})
  --quota-mb <n>               refuse sends and registrations once the state holds this many
                               MiB, as protocol.md counts it (default ${defaultQuotaMb()}: a sixth of
                               this process's heap limit)
  --mailbox-quota-mb <n>       refuse sends to a mailbox once it holds this many MiB, counted the
                               same way (default ${defaultMailboxQuotaMb()}: a sixteenth of the default quota)

replication:
  --peers <h:p,h:p,h:p>        every member of the chain, this server included; the initial
                               chain is ordered by port (then host), the lowest is the primary
  --join <h:p>                 join a running chain through this member (a server not in --peers)
  --secret-file <file>         shared secret for peer links (or set CHAINCHAT_SECRET); without
                               one, peer links are accepted only from loopback addresses
  --heartbeat-ms <n>           heartbeat interval on peer links (default ${limits.heartbeatMs})
  --failure-timeout-ms <n>     a peer silent this long is considered failed (default ${limits.failureTimeoutMs})
  --min-chain <n>              refuse writes while fewer members are in the chain (default 1)
  --force-start                lead even without every member of the latest configuration
                               (may lose writes that only the absent members hold)
  -h, --help                   show this help
`

function integer (name: string, v: string | undefined, min: number, max: number, fallback: number): number {
  if (v === undefined) return fallback
  if (!/^\d+$/.test(v)) throw new UsageError(`--${name} must be a whole number, not ${JSON.stringify(v)}`)
  const n = Number(v)
  if (n < min || n > max) throw new UsageError(`--${name} must be between ${min} and ${max}`)
  return n
}

export function parseConfig (argv: string[]): Config | 'help' {
  let values
  try {
    values = parseArgs({
      args: argv,
      strict: true,
      allowPositionals: false,
      options: {
        port: { type: 'string' },
        host: { type: 'string' },
        data: { type: 'string' },
        'snapshot-every-records': { type: 'string' },
        'snapshot-every-bytes': { type: 'string' },
        'snapshot-growth-percent': { type: 'string' },
        'segment-bytes': { type: 'string' },
        'line-bytes-max': { type: 'string' },
        'quota-mb': { type: 'string' },
        'mailbox-quota-mb': { type: 'string' },
        peers: { type: 'string' },
        join: { type: 'string' },
        'secret-file': { type: 'string' },
        'heartbeat-ms': { type: 'string' },
        'failure-timeout-ms': { type: 'string' },
        'min-chain': { type: 'string' },
        'force-start': { type: 'boolean' },
        help: { type: 'boolean', short: 'h' }
      }
    }).values
  } catch (e) {
    throw new UsageError((e as Error).message)
  }
  if (values.help) return 'help'
  if (values.port === undefined) throw new UsageError('--port is required')
  const port = integer('port', values.port, 0, 65535, 0)
  const host = values.host ?? '127.0.0.1'
  if (host === '') throw new UsageError('--host must not be empty')
  const me = `${host}:${port}`
  let peers: string[] | null = null
  if (values.peers !== undefined) {
    if (port === 0) throw new UsageError('--peers needs a fixed --port')
    peers = sortChain(values.peers.split(',').map(p => p.trim()).filter(p => p !== '').map(p => address('peers', p)))
    if (new Set(peers).size !== peers.length) throw new UsageError('--peers lists a member twice')
    if (!peers.includes(me)) throw new UsageError(`--peers must include this server (${me})`)
  }
  const join = values.join === undefined ? null : address('join', values.join)
  if (join !== null && port === 0) throw new UsageError('--join needs a fixed --port')
  let secret: string | null = process.env.CHAINCHAT_SECRET ?? null
  if (values['secret-file'] !== undefined) {
    try {
      secret = fs.readFileSync(values['secret-file'], 'utf8').trim()
    } catch (e) {
      throw new UsageError(`--secret-file: ${(e as Error).message}`)
    }
  }
  if (secret === '') throw new UsageError('the peer secret is empty')
  const heartbeatMs = integer('heartbeat-ms', values['heartbeat-ms'], 10, 60_000, limits.heartbeatMs)
  const failureTimeoutMs = integer('failure-timeout-ms', values['failure-timeout-ms'], 50, 600_000, limits.failureTimeoutMs)
  if (failureTimeoutMs < 2 * heartbeatMs) throw new UsageError('--failure-timeout-ms must be at least twice --heartbeat-ms')
  return Object.freeze({
    peers,
    me,
    join,
    secret,
    heartbeatMs,
    failureTimeoutMs,
    minChain: integer('min-chain', values['min-chain'], 1, 64, 1),
    forceStart: values['force-start'] === true,
    host,
    port,
    data: values.data === undefined ? null : path.resolve(values.data),
    snapshotEveryRecords: integer('snapshot-every-records', values['snapshot-every-records'], 1, Number.MAX_SAFE_INTEGER, limits.snapshotEveryRecords),
    snapshotEveryBytes: integer('snapshot-every-bytes', values['snapshot-every-bytes'], 1, Number.MAX_SAFE_INTEGER, limits.snapshotEveryBytes),
    snapshotGrowthPercent: integer('snapshot-growth-percent', values['snapshot-growth-percent'], 0, 1_000_000, limits.snapshotGrowthPercent),
    // At most 1 GiB: recovery reads a segment into memory whole, and a read returns at most 2 GiB.
    segmentBytes: integer('segment-bytes', values['segment-bytes'], 1024, 1024 * 1024 * 1024, limits.logSegmentBytes),
    lineBytesMax: integer('line-bytes-max', values['line-bytes-max'], 1024, 16 * 1024 * 1024, limits.lineBytesMax),
    quotaBytes: integer('quota-mb', values['quota-mb'], 1, 1024 * 1024 * 1024, defaultQuotaMb()) * 1024 * 1024,
    mailboxQuotaBytes: integer('mailbox-quota-mb', values['mailbox-quota-mb'], 1, 1024 * 1024 * 1024, defaultMailboxQuotaMb()) * 1024 * 1024
  })
}

// The state lives in the heap: a server whose state outgrew V8's heap limit would abort, and
// abort again while its restart read the state back. The default quota keeps it to a share of
// that limit (node's --max-old-space-size sets it).
export function defaultQuotaMb (): number {
  return Math.max(1, Math.floor(heapShare(limits.quotaHeapShare) / 1024 / 1024))
}

// One mailbox may hold a share of that (not of --quota-mb: a small quota given for a test or a
// small server does not make every mailbox smaller with it).
export function defaultMailboxQuotaMb (): number {
  return Math.max(1, Math.floor(defaultQuotaMb() * limits.mailboxQuotaShare))
}

// A share of V8's heap limit, in bytes.
export function heapShare (share: number): number {
  return Math.floor(v8.getHeapStatistics().heap_size_limit * share)
}

function address (flag: string, text: string): string {
  const m = /^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):(\d{1,5})$/.exec(text)
  if (!m || Number(m[2]) < 1 || Number(m[2]) > 65535) throw new UsageError(`--${flag}: ${JSON.stringify(text)} is not host:port`)
  return `${m[1]}:${Number(m[2])}`
}

// The initial chain order: by port, then by host (protocol.md, "Replication").
export function sortChain (members: string[]): string[] {
  const port = (a: string): number => Number(a.slice(a.lastIndexOf(':') + 1))
  return [...members].sort((a, b) => port(a) - port(b) || (a < b ? -1 : a > b ? 1 : 0))
}
