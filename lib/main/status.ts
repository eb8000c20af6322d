// `chainchat-status host:port[,host:port...]`: the chain at a glance for an operator. It asks
// every member given, and every member any of them names in its chain or as its learner, for
// `status` (the client protocol, so no secret is needed), prints one row per member and says
// what is wrong. Exit code 0 only for a healthy chain: every member answers, exactly one
// primary, one epoch, one chain and the same quotas everywhere, equal digests at equal indexes,
// and no member at its quota.

import net from 'node:net'
import { parseArgs } from 'node:util'
import { UsageError, flagsOrExit } from '../config.ts'
import type { AppendStats } from '../storage/log.ts'

const timeoutMs = 1000 // per member: connect, ask, read the reply
const maxMembers = 64 // stop discovering after this many (a chain is a handful)
const clearScreen = '\u001b[H\u001b[2J'
const addrRe = /^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):(\d{1,5})$/ // as the server parses --peers

export const usage = `usage: chainchat-status <host:port>[,<host:port>...] [--watch] [--interval-ms <n>] [--json]

Shows every member of a chain: the ones given and any member they name. Exits 0 when every
member answers, exactly one is the primary, all agree on the epoch, the chain and the quotas
(--quota-mb, --mailbox-quota-mb), every member at the primary's index has the primary's
digest, and none holds as much as its quota allows; otherwise prints what is wrong and exits 1.

  --watch            refresh every interval until Ctrl-C
  --interval-ms <n>  the refresh interval for --watch (default 1000)
  --json             print the statuses as JSON (with --watch: one line per refresh)
  -h, --help         show this help

Digest marks: = same as the primary's, ~ differs but at another index (lagging),
! differs at the same index (the states diverged). CLIENTS counts this tool's own connection.
QUOTA: how much of its quota (--quota-mb) the member's state holds.
FULLEST MAILBOX: the mailbox that holds the most on the member, and how much of the mailbox
quota (--mailbox-quota-mb) that is; at 100% sends to it are refused (MAILBOX_FULL).
SYNC P99: of the member's latest 1,024 log appends, the 99th percentile of the time from the
write to the end of its fdatasync (status log.syncMs): a member with a slow disk stands out.
`

export interface StatusFlags { addrs: string[], watch: boolean, intervalMs: number, json: boolean, help: boolean }

export function parseFlags (argv: string[]): StatusFlags {
  let parsed
  try {
    parsed = parseArgs({
      args: argv,
      strict: true,
      allowPositionals: true,
      options: {
        watch: { type: 'boolean' },
        'interval-ms': { type: 'string' },
        json: { type: 'boolean' },
        help: { type: 'boolean', short: 'h' }
      }
    })
  } catch (e) {
    throw new UsageError((e as Error).message)
  }
  const { values, positionals } = parsed
  const help = values.help ?? false
  const addrs = [...new Set(positionals.flatMap(p => p.split(',')).filter(a => a !== ''))]
  if (!help && addrs.length === 0) throw new UsageError('no member address given')
  for (const a of addrs) {
    const m = addrRe.exec(a)
    if (!m || Number(m[2]) < 1 || Number(m[2]) > 65535) throw new UsageError(`${JSON.stringify(a)} is not host:port`)
  }
  const text = values['interval-ms'] ?? '1000'
  const intervalMs = /^\d{1,9}$/.test(text) ? Number(text) : NaN
  if (!(intervalMs >= 1)) throw new UsageError(`--interval-ms must be a whole number of milliseconds, at least 1, not ${JSON.stringify(text)}`)
  return { addrs, watch: values.watch ?? false, intervalMs, json: values.json ?? false, help }
}

// ---- asking the members ---------------------------------------------------------------------

// A member's `status` reply, without `ok` and `id` (see protocol.md and lib/node.ts).
export interface Status {
  node: string
  role: string
  epoch: number
  chain: string[]
  learner?: string | null
  primary?: string | null
  index: number
  lastIndex?: number
  commit?: number
  digest: string | null // null: still decoding what it left packed at start (asked without waiting)
  clients: number
  sessions: number
  uptimeMs: number
  storage: string
  stored?: number // bytes, as the quota counts them (protocol.md, "Quota")
  quota?: number
  mailboxQuota?: number
  fullestMailbox?: { user: string, bytes: number } | null
  log?: AppendStats
  [field: string]: unknown
}

// One member as seen from here: its status, or why there is none.
export interface Probe {
  member: string // host:port, as the member names itself when it answered
  status: Status | null
  error: string | null
}

export function probe (addr: string, timeout = timeoutMs): Promise<Probe> {
  const m = addrRe.exec(addr)!
  return new Promise(resolve => {
    const socket = net.connect(Number(m[2]), m[1].replace(/^\[|\]$/g, ''))
    let buf = ''
    let done = false
    const finish = (status: Status | null, error: string | null): void => {
      if (done) return
      done = true
      clearTimeout(timer)
      socket.destroy()
      resolve({ member: typeof status?.node === 'string' ? status.node : addr, status, error })
    }
    const timer = setTimeout(() => finish(null, `no answer in ${timeout} ms`), timeout)
    socket.setEncoding('utf8')
    // Without waiting for the digest: a member that just replayed a big log knows it only once it
    // has decoded what it left packed, and that may take longer than the timeout.
    socket.on('connect', () => socket.write('{"op":"status","id":1,"digest":false}\n'))
    socket.on('data', (d: string) => {
      buf += d
      const nl = buf.indexOf('\n')
      if (nl < 0) {
        if (buf.length > 1 << 20) finish(null, 'reply too long')
        return
      }
      let reply
      try {
        reply = JSON.parse(buf.slice(0, nl))
      } catch {
        return finish(null, 'reply is not JSON')
      }
      if (reply?.ok !== true || typeof reply.role !== 'string') return finish(null, `bad reply: ${buf.slice(0, Math.min(nl, 200))}`)
      const { ok: _ok, id: _id, ...status } = reply
      finish(status as Status, null)
    })
    socket.on('error', (e: NodeJS.ErrnoException) => finish(null, e.code === 'ECONNREFUSED' ? 'connection refused' : e.message))
    socket.on('close', () => finish(null, 'connection closed'))
  })
}

// Ask the given members in parallel, then, round by round, the members they name that were
// not asked yet.
export async function collect (addrs: string[], timeout = timeoutMs): Promise<Probe[]> {
  const probes: Probe[] = []
  const asked = new Set<string>()
  let todo = addrs
  while (todo.length > 0) {
    for (const a of todo) asked.add(a)
    for (const p of await Promise.all(todo.map(a => probe(a, timeout)))) {
      asked.add(p.member)
      if (!probes.some(q => q.member === p.member)) probes.push(p)
    }
    const named = probes.flatMap(p => [...(Array.isArray(p.status?.chain) ? p.status.chain : []), p.status?.learner])
    todo = [...new Set(named)].filter((a): a is string => typeof a === 'string' && addrRe.test(a) && !asked.has(a)).slice(0, maxMembers - asked.size)
  }
  return probes
}

// ---- judging ----------------------------------------------------------------------------------

export interface Report {
  members: Probe[] // in chain order, then the learner, then the others
  primary: Status | null // the one primary, when there is exactly one
  view: Status | null // whose chain the summary shows: the primary, else the highest epoch
  problems: string[]
}

const isPrimary = (s: Status | null): boolean => s?.role === 'primary' || s?.role === 'single'

export function assess (probes: Probe[]): Report {
  const problems: string[] = []
  const up = probes.filter(p => p.status !== null)
  const statuses = up.map(p => p.status!)
  for (const p of probes) if (!p.status) problems.push(`${p.member} unreachable (${p.error ?? 'no answer'})`)

  const primaries = up.filter(p => isPrimary(p.status))
  if (primaries.length === 0) problems.push(up.length > 0 ? 'no primary' : 'no member answered')
  if (primaries.length > 1) problems.push(`${primaries.length} primaries: ${primaries.map(p => p.member).join(', ')}`)
  const primary = primaries.length === 1 ? primaries[0].status : null
  const view = primary ?? [...statuses].sort((a, b) => b.epoch - a.epoch)[0] ?? null

  const disagree = (what: string, key: (s: Status) => string): void => {
    const groups = new Map<string, string[]>()
    for (const p of up) groups.set(key(p.status!), [...(groups.get(key(p.status!)) ?? []), p.member])
    if (groups.size > 1) problems.push(`members disagree on the ${what}: ${[...groups].map(([k, ms]) => `${k} (${ms.join(', ')})`).join('; ')}`)
  }
  disagree('epoch', s => String(s.epoch))
  disagree('chain', s => chainText(s.chain))
  disagree('quota', s => typeof s.quota === 'number' ? `${mib(s.quota)} MiB` : 'none told')
  disagree('mailbox quota', s => typeof s.mailboxQuota === 'number' ? `${mib(s.mailboxQuota)} MiB` : 'none told')
  for (const p of up) {
    const s = p.status!
    const share = quotaShare(s)
    if (share !== null && share >= 1) problems.push(`${p.member} holds as much as its quota allows (${mib(s.quota!)} MiB)${isPrimary(s) ? ': sends and registrations are refused' : ''}`)
  }

  if (primary) {
    for (const p of up) {
      if (p.status !== primary && p.status!.index === primary.index && p.status!.digest !== null && primary.digest !== null && p.status!.digest !== primary.digest) problems.push(`${p.member} has a different digest than the primary at index ${primary.index}`)
    }
  }

  const order = view ? [...(Array.isArray(view.chain) ? view.chain : []), view.learner] : []
  const rank = (p: Probe): number => { const k = order.indexOf(p.member); return k < 0 ? order.length : k }
  const members = probes.map((p, k) => ({ p, k })).sort((a, b) => rank(a.p) - rank(b.p) || a.k - b.k).map(x => x.p)
  return { members, primary, view, problems }
}

// ---- output -------------------------------------------------------------------------------------

const mib = (bytes: number): string => String(Math.round(bytes / 1048576 * 10) / 10)

// How full the member is, as a share of its quota (1: full); null if it does not tell.
function quotaShare (s: Status): number | null {
  if (typeof s.stored !== 'number' || typeof s.quota !== 'number' || s.quota <= 0) return null
  return s.stored / s.quota
}

function quotaCell (s: Status): string {
  const share = quotaShare(s)
  return share === null ? '-' : `${Math.floor(share * 100)}%`
}

// The fullest mailbox and its share of the mailbox quota, as "43% ann"; "-" if not told.
function mailboxCell (s: Status): string {
  const f = s.fullestMailbox
  if (typeof s.mailboxQuota !== 'number' || s.mailboxQuota <= 0) return '-'
  if (f === null) return '0%'
  if (typeof f !== 'object' || typeof f.bytes !== 'number' || typeof f.user !== 'string') return '-'
  return `${Math.floor(f.bytes / s.mailboxQuota * 100)}% ${f.user}`
}

function syncCell (s: Status): string {
  const ms = s.log?.syncMs?.p99
  return typeof ms === 'number' ? `${ms < 10 ? ms.toFixed(2) : Math.round(ms)} ms` : '-'
}

function chainText (chain: unknown): string {
  return Array.isArray(chain) && chain.length > 0 ? chain.join(' -> ') : '(empty)'
}

// 45s, 3m12s, 2h05m, 3d04h
export function formatUptime (ms: number): string {
  const s = Math.floor(ms / 1000)
  const two = (n: number): string => String(n).padStart(2, '0')
  if (s < 60) return `${s}s`
  if (s < 3600) return `${Math.floor(s / 60)}m${two(s % 60)}s`
  if (s < 86400) return `${Math.floor(s / 3600)}h${two(Math.floor(s / 60) % 60)}m`
  return `${Math.floor(s / 86400)}d${two(Math.floor(s / 3600) % 24)}h`
}

function digestCell (s: Status, primary: Status | null): string {
  if (s.digest === null) return 'decoding'
  const short = typeof s.digest === 'string' ? s.digest.slice(0, 8) : '-'
  if (!primary || s === primary || primary.digest === null) return short
  if (s.digest === primary.digest) return `${short} =`
  return `${short} ${s.index === primary.index ? '!' : '~'}`
}

// The table, the chain summary and one line per problem; pure, for tests.
export function formatReport (r: Report): string {
  const rows = [['MEMBER', 'ROLE', 'EPOCH', 'INDEX', 'LAG', 'DIGEST', 'CLIENTS', 'UPTIME', 'STORAGE', 'QUOTA', 'FULLEST MAILBOX', 'SYNC P99']]
  for (const p of r.members) {
    const s = p.status
    if (!s) {
      rows.push([p.member, 'unreachable', '-', '-', '-', '-', '-', '-', '-', '-', '-', '-'])
      continue
    }
    const lag = r.primary && s !== r.primary && typeof s.index === 'number' ? String(r.primary.index - s.index) : '-'
    const uptime = typeof s.uptimeMs === 'number' ? formatUptime(s.uptimeMs) : '-'
    rows.push([p.member, s.role, String(s.epoch ?? '-'), String(s.index ?? '-'), lag, digestCell(s, r.primary), String(s.clients ?? '-'), uptime, String(s.storage ?? '-'), quotaCell(s), mailboxCell(s), syncCell(s)])
  }
  const widths = rows[0].map((_, c) => Math.max(...rows.map(row => row[c].length)))
  const lines = rows.map(row => row.map((cell, c) => cell.padEnd(widths[c])).join('  ').trimEnd())
  const v = r.view
  if (v) {
    const seen = r.primary ? '' : `, as seen by ${v.node}`
    const learner = typeof v.learner === 'string' ? `, learner ${v.learner}` : ''
    lines.push(`chain: ${chainText(v.chain)} (epoch ${v.epoch}${learner}${seen})`)
  } else {
    lines.push('chain: unknown (no member answered)')
  }
  for (const problem of r.problems) lines.push(`problem: ${problem}`)
  return lines.join('\n') + '\n'
}

export function toJson (r: Report): { ok: boolean, problems: string[], members: Probe[] } {
  return { ok: r.problems.length === 0, problems: r.problems, members: r.members }
}

// ---- the executable -----------------------------------------------------------------------------

export async function main (argv: string[]): Promise<void> {
  const flags = flagsOrExit('chainchat-status', usage, () => parseFlags(argv))
  if (flags === null) return
  if (!flags.watch) {
    const r = assess(await collect(flags.addrs))
    process.stdout.write(flags.json ? JSON.stringify(toJson(r), null, 2) + '\n' : formatReport(r))
    process.exitCode = r.problems.length === 0 ? 0 : 1
    return
  }
  process.on('SIGINT', () => process.exit(0))
  process.stdout.on('error', () => process.exit(0)) // e.g. piped into `head`
  const tty = process.stdout.isTTY === true
  for (let n = 0; ; n++) {
    const started = Date.now()
    const r = assess(await collect(flags.addrs))
    if (flags.json) {
      process.stdout.write(JSON.stringify({ time: new Date().toISOString(), ...toJson(r) }) + '\n')
    } else {
      const header = `${new Date().toTimeString().slice(0, 8)}  every ${flags.intervalMs} ms, Ctrl-C to stop\n`
      process.stdout.write((tty ? clearScreen : n > 0 ? '\n' : '') + header + formatReport(r))
    }
    await new Promise(resolve => setTimeout(resolve, Math.max(0, flags.intervalMs - (Date.now() - started))))
  }
}
