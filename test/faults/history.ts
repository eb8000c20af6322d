// The history of a fault run: every client request with its invocation and completion times and
// outcome, every message pushed to a client, every fault the nemesis injected, and the status
// samples taken from the members. Times are milliseconds since the run started (monotonic clock).
//
// Outcomes, as in Jepsen: `ok` (acknowledged), `fail` (a definite RequestError code came back:
// nothing was applied), `unknown` (the connection died, the request timed out or the client was
// closed: it may or may not have been applied).

import { performance } from 'node:perf_hooks'
import { RequestError } from '../../lib/client.ts'

export type Outcome = 'pending' | 'ok' | 'fail' | 'unknown'
export type OpKind = 'register' | 'login' | 'send' | 'read' | 'delete'

export interface SeenMessage { id: number, from: string, to: string, text: string }

export interface Op {
  n: number // position in the history
  client: number // workload client (worker) number
  kind: OpKind
  start: number
  end: number // -1 while pending
  status: Outcome
  code?: string // the error code of a definite failure
  error?: string // the error message of a failure or an unknown outcome
  server?: string // the server the client was talking to when the outcome came back
  session?: string // the user the connection was logged in as, lower case (send, read, delete)
  // register and login
  name?: string
  password?: string
  // send
  to?: string
  text?: string
  rid?: string
  retryOf?: number // a send retried with the same rid after an unknown outcome
  msgId?: number // the id the acknowledgement gave
  replayed?: boolean
  // read
  limit?: number
  messages?: SeenMessage[]
  // delete
  ids?: number[]
  deleted?: number
  missing?: number[]
}

export interface Push { t: number, client: number, session: string | null, message: SeenMessage }

export interface NemesisEvent { t: number, kind: string, detail: string }

// Something a workload client reported: reconnecting (why), reconnected (to whom), closed.
export interface ClientEvent { t: number, client: number, kind: string, detail: string }

export interface StatusSample {
  member: number
  pid: number
  start: number
  end: number
  role: string
  epoch: number
  index: number
  lastIndex: number
  commit: number
  digest: string
  chain: string[]
}

export class History {
  readonly t0 = performance.now()
  readonly ops: Op[] = []
  readonly pushes: Push[] = []
  readonly events: NemesisEvent[] = []
  readonly clientEvents: ClientEvent[] = []
  readonly samples: StatusSample[] = []
  readonly notes: string[] = []

  now (): number {
    return Math.round((performance.now() - this.t0) * 10) / 10
  }

  invoke (client: number, kind: OpKind, fields: Partial<Op>): Op {
    const op: Op = { ...fields, n: this.ops.length, client, kind, start: this.now(), end: -1, status: 'pending' }
    this.ops.push(op)
    return op
  }

  ok (op: Op, fields: Partial<Op> = {}, server?: string): void {
    Object.assign(op, fields)
    op.end = this.now()
    op.status = 'ok'
    if (server) op.server = server
  }

  // A RequestError is a definite failure; anything else (connection lost, timeout, client closed)
  // leaves the outcome unknown.
  failed (op: Op, e: unknown, server?: string): void {
    op.end = this.now()
    if (server) op.server = server
    if (e instanceof RequestError) {
      op.status = 'fail'
      op.code = e.code
    } else {
      op.status = 'unknown'
    }
    op.error = e instanceof Error ? e.message : String(e)
  }

  event (kind: string, detail: string): void {
    this.events.push({ t: this.now(), kind, detail })
  }

  clientEvent (client: number, kind: string, detail: string): void {
    if (this.clientEvents.length < 200_000) this.clientEvents.push({ t: this.now(), client, kind, detail })
  }

  note (text: string): void {
    if (this.notes.length < 1000) this.notes.push(`${fmtTime(this.now())} ${text}`)
  }

  counts (): Record<Outcome, number> {
    const c: Record<Outcome, number> = { pending: 0, ok: 0, fail: 0, unknown: 0 }
    for (const op of this.ops) c[op.status]++
    return c
  }

  toJSON (): Record<string, unknown> {
    return { ops: this.ops, pushes: this.pushes, events: this.events, clientEvents: this.clientEvents, samples: this.samples, notes: this.notes }
  }
}

export function fmtTime (ms: number): string {
  return `${(ms / 1000).toFixed(3).padStart(8)}s`
}

export function describeOp (op: Op): string {
  const when = `${fmtTime(op.start)} .. ${op.end < 0 ? '(pending)' : fmtTime(op.end).trim()}`
  const who = `c${op.client}${op.session ? `(${op.session})` : ''}`
  let what = ''
  switch (op.kind) {
    case 'register':
    case 'login':
      what = `${op.kind} ${op.name} pw=${op.password}`
      break
    case 'send':
      what = `send to=${op.to} text=${op.text} rid=${op.rid}${op.retryOf !== undefined ? ` (retry of #${op.retryOf})` : ''}`
      break
    case 'read':
      what = `read limit=${op.limit}`
      break
    case 'delete':
      what = `delete ids=[${(op.ids ?? []).join(',')}]`
      break
  }
  let result: string = op.status
  if (op.status === 'ok') {
    if (op.kind === 'send') result += ` id=${op.msgId}${op.replayed ? ' (replayed)' : ''}`
    if (op.kind === 'read') result += ` -> [${(op.messages ?? []).map(m => `${m.id}:${m.text}`).join(', ')}]`
    if (op.kind === 'delete') result += ` deleted=${op.deleted} missing=[${(op.missing ?? []).join(',')}]`
  } else if (op.status === 'fail') {
    result += ` ${op.code}`
  } else if (op.status === 'unknown') {
    result += ` (${op.error ?? ''})`
  }
  return `#${op.n} ${when} ${who} ${what} => ${result}${op.server ? ` @${op.server}` : ''}`
}

export function describePush (p: Push): string {
  return `${fmtTime(p.t)} c${p.client}(${p.session ?? '-'}) push ${p.message.id}:${p.message.text} from=${p.message.from} to=${p.message.to}`
}

export function describeEvent (e: NemesisEvent): string {
  return `${fmtTime(e.t)} NEMESIS ${e.kind} ${e.detail}`
}

export function describeClientEvent (e: ClientEvent): string {
  return `${fmtTime(e.t)} c${e.client} client ${e.kind} ${e.detail}`
}

// What the excerpt of an anomaly is about: message texts and ids, account names.
export interface Subject { texts?: string[], ids?: number[], names?: string[] }

// The operations, pushes and faults that involve a subject, in time order, with the faults that
// happened around them. At most maxLines lines.
export function excerpt (h: History, subject: Subject, maxLines = 40): string[] {
  const texts = new Set(subject.texts ?? [])
  const ids = new Set(subject.ids ?? [])
  const names = new Set((subject.names ?? []).map(n => n.toLowerCase()))
  const touches = (op: Op): boolean => {
    if (op.text !== undefined && texts.has(op.text)) return true
    if (op.msgId !== undefined && ids.has(op.msgId)) return true
    if (op.name !== undefined && names.has(op.name.toLowerCase())) return true
    if (op.messages?.some(m => texts.has(m.text) || ids.has(m.id))) return true
    if (op.ids?.some(i => ids.has(i))) return true
    return false
  }
  const lines: Array<{ t: number, s: string }> = []
  const clients = new Set<number>()
  let lo = Infinity
  let hi = -Infinity
  for (const op of h.ops) {
    if (!touches(op)) continue
    clients.add(op.client)
    lines.push({ t: op.start, s: describeOp(op) })
    lo = Math.min(lo, op.start)
    hi = Math.max(hi, op.end < 0 ? op.start : op.end)
  }
  for (const p of h.pushes) {
    if (!texts.has(p.message.text) && !ids.has(p.message.id)) continue
    lines.push({ t: p.t, s: describePush(p) })
    lo = Math.min(lo, p.t)
    hi = Math.max(hi, p.t)
  }
  if (lines.length > 0) {
    // Around each operation on the subject: the faults, what its client went through, and who it
    // had logged in as shortly before.
    const acts = h.ops.filter(touches)
    const near = (t: number, client?: number): boolean => acts.some(x => (client === undefined || x.client === client) && t >= x.start - 3000 && t <= (x.end < 0 ? x.start : x.end) + 1000)
    for (const e of h.events) if (near(e.t) || (lo === hi && e.t >= lo - 3000 && e.t <= hi + 1000)) lines.push({ t: e.t, s: describeEvent(e) })
    for (const e of h.clientEvents) if (clients.has(e.client) && near(e.t, e.client)) lines.push({ t: e.t, s: describeClientEvent(e) })
    for (const op of h.ops) {
      if (op.kind !== 'login' || touches(op) || !clients.has(op.client)) continue
      if (acts.some(x => x.client === op.client && op.start <= x.start && (op.end < 0 || op.end >= x.start - 3000))) lines.push({ t: op.start, s: describeOp(op) })
    }
  }
  lines.sort((a, b) => a.t - b.t)
  const out = lines.map(l => l.s)
  if (out.length <= maxLines) return out
  const half = Math.floor(maxLines / 2)
  return [...out.slice(0, half), `... ${out.length - maxLines} more lines ...`, ...out.slice(-half)]
}
