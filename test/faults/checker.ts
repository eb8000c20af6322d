// The checker: reads the healed cluster's final state through the real protocol (who owns each
// name, every mailbox through paged history, every member's status), then holds the history of
// the run against it. Every rule broken is an anomaly, with the subject (texts, ids, names) whose
// operations make the excerpt printed with it.

import { ChatClient, RequestError, type Message } from '../../lib/client.ts'
import type { Chain } from '../helpers/chain.ts'
import type { History, Op, SeenMessage, StatusSample, Subject } from './history.ts'

export interface Anomaly { kind: string, message: string, subject: Subject }

export interface FinalState {
  users: string[] // every account name, as registered
  owners: Map<string, string[]> // lower-case name -> the candidate passwords that log in
  mailboxes: Map<string, Message[]> // lower-case name -> every message, oldest first
  statuses: Array<Record<string, unknown> | null>
}

const sleep = (ms: number): Promise<void> => new Promise(resolve => setTimeout(resolve, ms))

// Logins through one connection, replaced after two failed attempts (a connection that fails
// three logins gets slowed down, protocol.md "Sessions").
class Prober {
  private client: ChatClient | null = null
  private failures = 0
  constructor (private readonly servers: string[]) {}

  private async get (): Promise<ChatClient> {
    if (this.client && this.failures < 2) return this.client
    this.client?.close()
    this.client = await ChatClient.connect({ servers: this.servers, failoverTimeoutMs: 20_000, requestTimeoutMs: 20_000 })
    this.failures = 0
    return this.client
  }

  // true: logged in; false: AUTH_FAILED. Transient trouble is retried a few times.
  async login (name: string, password: string): Promise<boolean> {
    let last: unknown = null
    for (let attempt = 0; attempt < 4; attempt++) {
      try {
        const c = await this.get()
        await c.login(name, password)
        this.failures = 0
        return true
      } catch (e) {
        if (e instanceof RequestError && e.code === 'AUTH_FAILED') {
          this.failures++
          return false
        }
        last = e
        this.client?.close()
        this.client = null
        await sleep(300)
      }
    }
    throw new Error(`login ${name}: ${String((last as Error)?.message ?? last)}`)
  }

  // Every message of the logged-in user, oldest first, through history pages of 1000.
  async mailbox (): Promise<Message[]> {
    const c = await this.get()
    const all: Message[] = []
    let before: number | undefined
    for (let page = 0; page < 10_000; page++) {
      const r = await c.history(before === undefined ? { limit: 1000 } : { limit: 1000, before })
      all.push(...r.messages)
      if (r.messages.length < 1000) break
      before = r.messages[r.messages.length - 1].id
    }
    return all.reverse()
  }

  async users (): Promise<string[]> {
    const c = await this.get()
    const out: string[] = []
    for (let offset = 0; offset < 1_000_000;) {
      const r = await c.users('*', { offset, limit: 1000 })
      out.push(...r.users)
      offset += r.users.length
      if (r.users.length === 0 || offset >= r.total) break
    }
    return out
  }

  close (): void {
    this.client?.close()
  }
}

// The passwords any client ever used for a name, by lower-case name; those of acknowledged
// registers last (the likely owner: probing it last leaves the connection logged in as it).
function candidates (h: History): Map<string, string[]> {
  const out = new Map<string, Map<string, boolean>>()
  for (const op of h.ops) {
    if ((op.kind !== 'register' && op.kind !== 'login') || !op.name || !op.password) continue
    const key = op.name.toLowerCase()
    if (!out.has(key)) out.set(key, new Map())
    const m = out.get(key)!
    m.set(op.password, m.get(op.password) === true || (op.kind === 'register' && op.status === 'ok'))
  }
  return new Map([...out].map(([k, m]) => [k, [...m].sort((a, b) => Number(a[1]) - Number(b[1])).map(([pw]) => pw)]))
}

export async function collectFinal (chain: Chain, h: History, parallel = 4): Promise<FinalState> {
  const probers = Array.from({ length: parallel }, () => new Prober(chain.servers))
  try {
    const users = await probers[0].users()
    const cand = candidates(h)
    const keys = [...new Set([...cand.keys(), ...users.map(u => u.toLowerCase())])].sort()
    const owners = new Map<string, string[]>()
    const mailboxes = new Map<string, Message[]>()
    let next = 0
    await Promise.all(probers.map(async prober => {
      for (let n = 0; n < 1_000_000 && next < keys.length; n++) {
        const key = keys[next++]
        const works: string[] = []
        let lastOk = false
        for (const pw of cand.get(key) ?? []) {
          lastOk = await prober.login(key, pw)
          if (lastOk) works.push(pw)
        }
        owners.set(key, works)
        if (works.length > 0) {
          // Unless the last probe logged in (on the connection mailbox() uses), log in again.
          if (!lastOk) await prober.login(key, works[0])
          mailboxes.set(key, await prober.mailbox())
        }
      }
    }))
    const statuses = await chain.statuses()
    return { users, owners, mailboxes, statuses }
  } finally {
    for (const p of probers) p.close()
  }
}

// Per subject and kind, one anomaly: the first one found says enough. Past capPerKind of a
// kind, only the count goes on.
class Anomalies {
  readonly list: Anomaly[] = []
  readonly counts: Record<string, number> = {}
  private readonly keys = new Set<string>()
  constructor (private readonly capPerKind = 10) {}

  add (kind: string, key: string, message: string, subject: Subject): void {
    if (this.keys.has(`${kind}\u0000${key}`)) return
    this.keys.add(`${kind}\u0000${key}`)
    const n = this.counts[kind] = (this.counts[kind] ?? 0) + 1
    if (n <= this.capPerKind) this.list.push({ kind, message, subject })
  }
}

interface LogicalSend { text: string, attempts: Op[], status: 'ok' | 'fail' | 'unknown', ackIds: Set<number>, to: string, from: string }

function logicalSends (h: History): Map<string, LogicalSend> {
  const out = new Map<string, LogicalSend>()
  for (const op of h.ops) {
    if (op.kind !== 'send') continue
    let s = out.get(op.text!)
    if (!s) out.set(op.text!, s = { text: op.text!, attempts: [], status: 'fail', ackIds: new Set(), to: op.to!.toLowerCase(), from: op.session ?? '' })
    s.attempts.push(op)
    if (op.status === 'ok') {
      s.status = 'ok'
      if (op.msgId !== undefined) s.ackIds.add(op.msgId)
    } else if ((op.status === 'unknown' || op.status === 'pending') && s.status !== 'ok') s.status = 'unknown'
  }
  return out
}

// Real-time order: for every pair of items where a completed before b was invoked, a's value
// must not exceed b's (strictly less when `strict`). Calls bad(a, b) for each b, with the a that
// holds the largest value among those completed before b started.
function sweep<T extends { start: number, end: number }> (items: T[], value: (x: T) => number, strict: boolean, bad: (a: T, b: T) => void): void {
  const byEnd = [...items].sort((x, y) => x.end - y.end)
  const byStart = [...items].sort((x, y) => x.start - y.start)
  let k = 0
  let best: T | null = null
  for (const b of byStart) {
    while (k < byEnd.length && byEnd[k].end < b.start) {
      if (best === null || value(byEnd[k]) > value(best)) best = byEnd[k]
      k++
    }
    if (best !== null && (strict ? value(best) >= value(b) : value(best) > value(b))) bad(best, b)
  }
}

export interface CheckInput {
  h: History
  final: FinalState | null
  converged: boolean
  unexpectedExits: Array<{ member: number, pid: number, how: string, stderr: string }>
  restartFailures: number
}

// anomalies: the first few of each kind, with their subjects; counts: how many of each kind.
export interface CheckResult { anomalies: Anomaly[], counts: Record<string, number>, notes: string[] }

export function check (input: CheckInput): CheckResult {
  const { h, final } = input
  const a = new Anomalies()
  const notes: string[] = []

  if (!input.converged) a.add('no-convergence', 'heal', 'after the heal the three members did not converge (one chain, same epoch, index and digest)', {})
  for (const x of input.unexpectedExits) a.add('crash', `${x.member}:${x.pid}`, `member m${x.member} (pid ${x.pid}) exited on its own (${x.how}); stderr tail:\n${x.stderr.split('\n').slice(-15).join('\n')}`, {})
  if (input.restartFailures > 0) a.add('restart-failed', 'restart', `${input.restartFailures} restarts failed three times in a row`, {})
  for (const op of h.ops) {
    if (op.status === 'fail' && op.code === 'INTERNAL') a.add('internal-error', `#${op.n}`, `the server answered INTERNAL: ${op.error}`, { texts: op.text ? [op.text] : [], names: op.name ? [op.name] : [] })
    if (op.status === 'pending') notes.push(`op #${op.n} still pending at the end`)
  }

  checkStatuses(h.samples, a, notes)

  if (final) {
    const digests = final.statuses.map(s => (s?.digest as string | undefined) ?? 'unreachable')
    if (input.converged && new Set(digests).size !== 1) a.add('digest', 'final', `members report different digests after the heal: ${digests.join(', ')}`, {})
    checkAccounts(h, final, a, notes)
    checkMessages(h, final, a)
  }
  checkSendOrder(h, a)
  return { anomalies: a.list, counts: a.counts, notes }
}

function checkStatuses (samples: StatusSample[], a: Anomalies, notes: string[]): void {
  const members = [...new Set(samples.map(s => s.member))]
  for (const m of members) {
    const mine = samples.filter(s => s.member === m)
    // Epochs are persisted before they are acted on: never lower, even across restarts.
    sweep(mine, s => s.epoch, false, (x, y) => a.add('epoch-backwards', `${m}:${y.start}`, `member m${m}: epoch ${x.epoch} (pid ${x.pid}, sampled ${x.end} ms) then ${y.epoch} (pid ${y.pid}, sampled ${y.start} ms)`, {}))
    for (const pid of new Set(mine.map(s => s.pid))) {
      // Within one process the applied index only grows.
      sweep(mine.filter(s => s.pid === pid), s => s.index, false, (x, y) => a.add('index-backwards', `${m}:${pid}:${y.start}`, `member m${m} pid ${pid}: applied index ${x.index} (at ${x.end} ms) then ${y.index} (at ${y.start} ms), with no restart in between`, {}))
    }
    // Across a restart the applied index may restart lower: the committed index is persisted
    // lazily (meta.json "commit" is a lower bound) and the rest is applied when the chain says so.
    // Reported as a note; the durability of what was applied is checked on primaries below.
    const pids = [...new Set(mine.map(s => s.pid))]
    for (let k = 1; k < pids.length; k++) {
      const before = Math.max(...mine.filter(s => s.pid === pids[k - 1]).map(s => s.index))
      const first = mine.find(s => s.pid === pids[k])!
      if (first.index < before) notes.push(`m${m} restarted (pid ${pids[k]}) at applied index ${first.index}, below the ${before} it had applied before (lastIndex ${first.lastIndex})`)
    }
  }
  // Replicas that applied the same prefix of the log hold the same state: equal applied
  // indexes must come with equal digests, on every member, at any time. A primary that assigned
  // a new record to an index already committed elsewhere shows up here.
  const byIndex = new Map<number, StatusSample>()
  for (const x of samples) {
    const first = byIndex.get(x.index)
    if (!first) byIndex.set(x.index, x)
    else if (first.digest !== x.digest) a.add('divergence', `${x.index}`, `at applied index ${x.index}, m${first.member} (pid ${first.pid}, epoch ${first.epoch}, at ${first.start} ms) has digest ${first.digest} but m${x.member} (pid ${x.pid}, epoch ${x.epoch}, at ${x.start} ms) has ${x.digest}`, {})
  }
  // A primary of the newest epoch lacking records some member had applied before: that is a
  // primary of a conflicting configuration with the same epoch (it is fenced: its successor
  // refuses it, so it commits nothing, which the divergence check above would catch). A note.
  const byEnd = [...samples].sort((x, y) => x.end - y.end)
  let k = 0
  let maxIndex: StatusSample | null = null
  let maxEpoch = 0
  for (const x of [...samples].sort((p, q) => p.start - q.start)) {
    while (k < byEnd.length && byEnd[k].end < x.start) {
      if (maxIndex === null || byEnd[k].index > maxIndex.index) maxIndex = byEnd[k]
      maxEpoch = Math.max(maxEpoch, byEnd[k].epoch)
      k++
    }
    if (maxIndex && x.role === 'primary' && x.epoch >= maxEpoch && Math.max(x.index, x.lastIndex) < maxIndex.index) {
      notes.push(`m${x.member} (pid ${x.pid}) was primary at epoch ${x.epoch} (chain ${x.chain.join(', ')}) with index ${x.index}, lastIndex ${x.lastIndex} at ${x.start} ms, though m${maxIndex.member} had applied ${maxIndex.index} by ${maxIndex.end} ms (epoch ${maxIndex.epoch}, chain ${maxIndex.chain.join(', ')})`)
    }
  }
}

function checkAccounts (h: History, final: FinalState, a: Anomalies, notes: string[]): void {
  const existing = new Set(final.users.map(u => u.toLowerCase()))
  const regs = new Map<string, Op[]>()
  for (const op of h.ops) {
    if (op.kind !== 'register') continue
    const key = op.name!.toLowerCase()
    if (!regs.has(key)) regs.set(key, [])
    regs.get(key)!.push(op)
  }
  for (const [key, works] of final.owners) {
    const subject = { names: [key] }
    const mine = regs.get(key) ?? []
    if (works.length > 1) a.add('two-owners', key, `name ${key} logs in with ${works.length} different passwords: ${works.join(', ')}`, subject)
    if (existing.has(key) && works.length === 0) a.add('orphan-account', key, mine.length === 0 ? `account ${key} exists but nobody registered it` : `account ${key} exists but no password any client used logs in`, subject)
    if (!existing.has(key) && works.length > 0) a.add('unlisted-account', key, `name ${key} logs in but is missing from the users list`, subject)
    for (const op of mine) {
      if (op.status === 'ok' && !works.includes(op.password!)) a.add('register-lost', key, `register ${op.name} (#${op.n}) was acknowledged but its password does not log in${works.length ? `; ${works[0]} does` : ''}`, subject)
      if (op.status === 'fail' && op.code === 'USER_EXISTS' && works.includes(op.password!)) a.add('failed-register-owns', key, `register ${op.name} (#${op.n}) failed with USER_EXISTS, yet its password owns the name`, subject)
      if (op.status === 'fail' && op.code === 'USER_EXISTS' && !existing.has(key)) a.add('phantom-user-exists', key, `register ${op.name} (#${op.n}) failed with USER_EXISTS, but no account ${key} exists`, subject)
      if (op.status === 'fail' && op.code !== 'USER_EXISTS') notes.push(`register ${op.name} (#${op.n}) failed with ${op.code}`)
    }
    const okRegs = mine.filter(op => op.status === 'ok')
    for (const op of h.ops) {
      if (op.kind !== 'login' || op.name!.toLowerCase() !== key) continue
      if (op.status === 'ok' && !works.includes(op.password!)) a.add('login-wrong-owner', key, `login ${op.name} (#${op.n}) worked with ${op.password}, which does not own the name at the end`, subject)
      if (op.status === 'fail' && op.code === 'AUTH_FAILED') {
        const prior = okRegs.find(r => r.password === op.password && r.end < op.start)
        if (prior) a.add('login-rejected', `${key}:${op.n}`, `login ${op.name} (#${op.n}) got AUTH_FAILED with the password of register #${prior.n}, acknowledged before it (answered by ${op.server ?? '?'})`, subject)
      }
    }
  }
  // A send to a name whose register had been acknowledged must not find no such user.
  const ackedAt = new Map<string, number>()
  for (const [key, ops] of regs) {
    const ends = ops.filter(op => op.status === 'ok').map(op => op.end)
    if (ends.length > 0) ackedAt.set(key, Math.min(...ends))
  }
  for (const op of h.ops) {
    if (op.kind !== 'send' || op.status !== 'fail' || op.code !== 'NO_SUCH_USER') continue
    const at = ackedAt.get(op.to!.toLowerCase())
    if (at !== undefined && at < op.start) a.add('account-vanished', `${op.to!.toLowerCase()}:${op.n}`, `send #${op.n} to ${op.to} got NO_SUCH_USER after the account's register was acknowledged (answered by ${op.server ?? '?'})`, { names: [op.to!], texts: [op.text!] })
  }
}

function checkMessages (h: History, final: FinalState, a: Anomalies): void {
  const sends = logicalSends(h)
  // Where each text is at the end.
  const where = new Map<string, Array<{ owner: string, m: Message }>>()
  for (const [owner, msgs] of final.mailboxes) {
    for (const m of msgs) {
      if (!where.has(m.text)) where.set(m.text, [])
      where.get(m.text)!.push({ owner, m })
    }
  }
  // Deletes: `sure` after an acknowledged delete that counted the id as deleted, `maybe` after
  // an unknown one. Keyed by the deleter's mailbox and the id.
  const deleted = new Map<string, 'sure' | 'maybe'>()
  const deleteOps: Op[] = []
  for (const op of h.ops) {
    if (op.kind !== 'delete' || op.status === 'fail') continue
    deleteOps.push(op)
    for (const id of op.ids ?? []) {
      const key = `${op.session}\u0000${id}`
      if (op.status === 'ok' && !(op.missing ?? []).includes(id)) deleted.set(key, 'sure')
      else if (op.status !== 'ok' && deleted.get(key) !== 'sure') deleted.set(key, 'maybe')
    }
  }
  const deletion = (owner: string, ids: Iterable<number>): 'sure' | 'maybe' | null => {
    let out: 'sure' | 'maybe' | null = null
    for (const id of ids) {
      const d = deleted.get(`${owner}\u0000${id}`)
      if (d === 'sure') return 'sure'
      if (d === 'maybe') out = 'maybe'
    }
    return out
  }
  // What clients saw: acknowledged reads and pushes.
  const observed = new Map<string, Array<{ m: SeenMessage, t: number, read?: Op }>>()
  for (const op of h.ops) {
    if (op.kind !== 'read' || op.status !== 'ok') continue
    for (const m of op.messages ?? []) {
      if (!observed.has(m.text)) observed.set(m.text, [])
      observed.get(m.text)!.push({ m, t: op.end, read: op })
    }
  }
  for (const p of h.pushes) {
    if (!observed.has(p.message.text)) observed.set(p.message.text, [])
    observed.get(p.message.text)!.push({ m: p.message, t: p.t })
  }

  for (const s of sends.values()) {
    const subject = { texts: [s.text], ids: [...s.ackIds] }
    const locs = where.get(s.text) ?? []
    const seenIds = new Set([...s.ackIds, ...(observed.get(s.text) ?? []).map(o => o.m.id), ...locs.map(l => l.m.id)])
    const del = deletion(s.to, seenIds)
    if (s.ackIds.size > 1) a.add('acked-twice', s.text, `send ${s.text} was acknowledged with different ids ${[...s.ackIds].join(', ')}`, subject)
    for (const l of locs) {
      if (l.owner !== s.to) a.add('misdelivered', s.text, `message ${s.text} (id ${l.m.id}) is in ${l.owner}'s mailbox, but was sent to ${s.to}`, subject)
      if (l.m.from.toLowerCase() !== s.from) a.add('wrong-sender', s.text, `message ${s.text} (id ${l.m.id}) says it is from ${l.m.from}, but was sent by ${s.from}`, subject)
    }
    if (s.status === 'ok') {
      if (locs.length > 1) a.add('duplicate', s.text, `acknowledged send ${s.text} is present ${locs.length} times (ids ${locs.map(l => l.m.id).join(', ')})`, subject)
      if (locs.length === 0 && del === null) a.add('lost', s.text, `acknowledged send ${s.text} (id ${[...s.ackIds].join(', ')}) to ${s.to} is missing from the mailbox, and was never deleted`, subject)
      if (locs.length === 1 && del === 'sure') a.add('undeleted', s.text, `message ${s.text} (id ${locs[0].m.id}) is still present after an acknowledged delete counted it deleted`, subject)
      if (locs.length === 1 && s.ackIds.size === 1 && !s.ackIds.has(locs[0].m.id)) a.add('id-changed', s.text, `acknowledged send ${s.text} got id ${[...s.ackIds][0]}, but the mailbox has it as id ${locs[0].m.id}`, subject)
    } else if (s.status === 'fail') {
      if (locs.length > 0) a.add('failed-applied', s.text, `send ${s.text} failed (${s.attempts.map(x => x.code).join(', ')}) yet is present ${locs.length} time(s)`, subject)
    } else if (locs.length > 1) {
      a.add('duplicate', s.text, `send ${s.text} with an unknown outcome is present ${locs.length} times (ids ${locs.map(l => l.m.id).join(', ')})`, subject)
    }
  }

  for (const [text, obs] of observed) {
    const s = sends.get(text)
    const subject = { texts: [text], ids: [...new Set(obs.map(o => o.m.id))] }
    if (!s) {
      a.add('phantom-message', text, `a client was given message ${text} (id ${obs[0].m.id}) that nobody sent`, subject)
      continue
    }
    if (s.status === 'fail') a.add('failed-observed', text, `send ${text} failed, yet a client was given it (id ${obs[0].m.id})`, subject)
    for (const o of obs) {
      if (s.ackIds.size > 0 && !s.ackIds.has(o.m.id)) a.add('id-changed', text, `a client was given ${text} as id ${o.m.id}, but the send was acknowledged as id ${[...s.ackIds].join(', ')}`, subject)
      if (o.m.to.toLowerCase() !== s.to) a.add('misdelivered', text, `a client was given ${text} addressed to ${o.m.to}, but it was sent to ${s.to}`, subject)
    }
    const locs = (where.get(text) ?? []).filter(l => l.owner === s.to)
    if (locs.length === 0 && deletion(s.to, subject.ids) === null) a.add('lost', text, `message ${text} (id ${subject.ids.join(', ')}) was given to a client at ${obs[0].t} ms, and is missing at the end though never deleted`, subject)
  }

  // An acknowledged read marks what it returns read: a later acknowledged read must not return
  // it again.
  const readsBy = new Map<string, Op[]>()
  for (const op of h.ops) {
    if (op.kind !== 'read' || op.status !== 'ok') continue
    if (!readsBy.has(op.session!)) readsBy.set(op.session!, [])
    readsBy.get(op.session!)!.push(op)
  }
  for (const reads of readsBy.values()) {
    const firstRead = new Map<number, Op>()
    for (const op of [...reads].sort((x, y) => x.start - y.start)) {
      for (const m of op.messages ?? []) {
        const prior = firstRead.get(m.id)
        if (prior && prior.end < op.start) a.add('read-twice', m.text, `message ${m.text} (id ${m.id}) was returned by read #${prior.n} and again by the later read #${op.n}`, { texts: [m.text], ids: [m.id] })
        if (!prior) firstRead.set(m.id, op)
      }
    }
  }

  // An acknowledged delete that reports as missing a message its own mailbox must hold (sent,
  // acknowledged and seen by this user before the delete started, not deleted by anyone else).
  const ackIdOwner = new Map<number, { to: string, text: string, end: number }>()
  for (const s of sends.values()) {
    for (const op of s.attempts) if (op.status === 'ok' && op.msgId !== undefined) ackIdOwner.set(op.msgId, { to: s.to, text: s.text, end: op.end })
  }
  for (const op of deleteOps) {
    if (op.status !== 'ok') continue
    for (const id of op.missing ?? []) {
      const info = ackIdOwner.get(id)
      if (!info || info.to !== op.session || info.end > op.start) continue
      const others = deleteOps.filter(d => d !== op && d.session === op.session && (d.ids ?? []).includes(id) && d.start < op.end)
      if (others.length === 0) a.add('delete-missing', info.text, `delete #${op.n} reported ${id} (${info.text}) missing from ${op.session}'s mailbox, where it was acknowledged before and never deleted`, { texts: [info.text], ids: [id] })
    }
  }
}

// Acknowledged sends in real-time order get increasing ids (an id is a log index). Retries with
// the same rid are left out: they return the id of an earlier attempt.
function checkSendOrder (h: History, a: Anomalies): void {
  const acks = h.ops.filter(op => op.kind === 'send' && op.status === 'ok' && op.retryOf === undefined && op.msgId !== undefined)
  sweep(acks, op => op.msgId!, true, (x, y) => {
    const pair = x.session === y.session && x.to!.toLowerCase() === y.to!.toLowerCase() ? ` (same sender and recipient ${x.session} -> ${x.to})` : ''
    a.add('order', `${x.text}/${y.text}`, `send ${x.text} was acknowledged as id ${x.msgId} before send ${y.text} was invoked, yet ${y.text} got the smaller id ${y.msgId}${pair}`, { texts: [x.text!, y.text!] })
  })
}
