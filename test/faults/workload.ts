// The workload of a fault run: N clients (ChatClient with the whole server list, so they fail
// over) doing a mixed stream of register, login, send, read and delete_messages, chosen by a
// seeded PRNG per client, every request recorded in the history.
//
// Accounts: every client registers a few private names, and some names are contested: 2 to 4
// clients race to register each of them (in different letter case, each with its own password),
// some at the start and some at scheduled times during the run. A client logs in only as a name
// it owns (its register was acknowledged, or a login with its password worked).
// Messages: every send has a unique text and an explicit rid; a send whose outcome was unknown
// may be retried with the same rid and text. Reads record what they returned; deletes pick
// messages the client saw (by read or push), sometimes with an id of someone else's message.

import { ChatClient, type Message } from '../../lib/client.ts'
import type { History, Op, SeenMessage } from './history.ts'
import { Prng } from './prng.ts'

export interface WorkloadOptions {
  seed: number
  clients: number
  servers: string[]
  durationMs: number
  h: History
  // How a client changes user: `login` on the same connection (the protocol allows it), or
  // `reconnect`: close the client and log in on a new one, so one ChatClient only ever serves
  // one user.
  switchUser?: 'login' | 'reconnect'
}

interface Contest { name: string, racers: number[], atMs: number }

// The contested names and when they are raced for: a pure function of the seed.
export function planContests (seed: number, clients: number, durationMs: number): Contest[] {
  const p = Prng.derive(seed, 'contests')
  const out: Contest[] = []
  const initial = Math.max(3, Math.floor(clients / 2))
  const later = Math.max(2, Math.min(40, Math.floor(durationMs / 4000)))
  const ids = Array.from({ length: clients }, (_, k) => k)
  for (let j = 0; j < initial + later; j++) {
    const racers = p.sample(ids, p.int(2, Math.min(4, clients)))
    out.push({ name: `race${j}`, racers, atMs: j < initial ? 0 : p.int(1000, Math.max(1000, durationMs - 2000)) })
  }
  return out
}

function caseVariant (p: Prng, name: string): string {
  switch (p.int(0, 3)) {
    case 0: return name
    case 1: return name[0].toUpperCase() + name.slice(1)
    case 2: return name.toUpperCase()
    default: return [...name].map(ch => p.chance(0.5) ? ch.toUpperCase() : ch).join('')
  }
}

const sleep = (ms: number): Promise<void> => new Promise(resolve => setTimeout(resolve, ms))

const seen = (m: Message): SeenMessage => ({ id: m.id, from: m.from, to: m.to, text: m.text })

interface Account { name: string, password: string }

class Worker {
  private client: ChatClient | null = null
  private dead = true
  private session: string | null = null // lower-case name this connection is logged in as
  private readonly owned = new Map<string, Account>()
  private readonly tentative = new Map<string, Account>() // register outcome unknown
  private readonly toRegister: Array<Account & { atMs: number }> = []
  private readonly observed = new Map<string, Map<number, SeenMessage>>() // per user: seen, not yet deleted
  private readonly sentIds: number[] = [] // ids of our acknowledged sends (to delete as someone else)
  private readonly unknownSends: Op[] = []
  private readonly retries = new Map<string, number>() // per text
  private privateNames = 0
  private seq = 0

  // Impatient clients give up on a request (or on finding a primary) sooner, which leaves more
  // outcomes unknown and so exercises retries with the same rid.
  private readonly requestTimeoutMs: number
  private readonly failoverTimeoutMs: number

  constructor (private readonly k: number, private readonly w: Workload, private readonly p: Prng) {
    this.requestTimeoutMs = p.pick([1500, 4000, 12_000])
    this.failoverTimeoutMs = p.pick([3000, 15_000])
  }

  plan (contests: Contest[]): void {
    for (const c of contests) {
      if (c.racers.includes(this.k)) this.toRegister.push({ name: caseVariant(this.p, c.name), password: `pw-${c.name}-c${this.k}`, atMs: c.atMs })
    }
    this.addPrivateName(0)
    this.toRegister.sort((a, b) => a.atMs - b.atMs)
  }

  private addPrivateName (atMs: number): void {
    const name = `w${this.k}p${this.privateNames++}`
    const at = this.toRegister.findIndex(r => r.atMs > atMs)
    this.toRegister.splice(at < 0 ? this.toRegister.length : at, 0, { name, password: `pw-${name}`, atMs })
  }

  private get h (): History { return this.w.h }

  private async ensureClient (): Promise<boolean> {
    for (let attempt = 0; this.dead && !this.w.stopping && attempt < 1000; attempt++) {
      try {
        const c = await ChatClient.connect({ servers: this.w.opts.servers, livenessTimeoutMs: 1500, requestTimeoutMs: this.requestTimeoutMs, failoverTimeoutMs: this.failoverTimeoutMs })
        if (this.w.stopping) {
          c.close()
          return false
        }
        this.client = c
        this.dead = false
        this.session = null
        this.w.clients.add(c)
        c.on('message', (m: Message) => {
          this.h.pushes.push({ t: this.h.now(), client: this.k, session: this.session, message: seen(m) })
          this.observe(seen(m))
        })
        c.on('reconnecting', (why: string) => this.h.clientEvent(this.k, 'reconnecting', String(why)))
        c.on('reconnected', (addr: string) => this.h.clientEvent(this.k, 'reconnected', `to ${addr}`))
        c.on('close', () => {
          if (!this.w.stopping) this.h.clientEvent(this.k, 'closed', 'gave up finding a primary')
          if (this.client === c) this.dead = true
          this.w.clients.delete(c)
        })
        c.on('relogin_failed', (e: unknown) => {
          if (this.w.stopping) return
          this.h.clientEvent(this.k, 'relogin-failed', String((e as Error)?.message ?? e))
          this.h.note(`c${this.k}: login after failover failed: ${String((e as Error)?.message ?? e)}`)
        })
      } catch (e) {
        this.h.note(`c${this.k}: no primary found: ${String((e as Error).message)}`)
        await sleep(200)
      }
    }
    return !this.dead && !this.w.stopping
  }

  private observe (m: SeenMessage): void {
    const key = m.to.toLowerCase()
    let map = this.observed.get(key)
    if (!map) this.observed.set(key, map = new Map())
    map.set(m.id, m)
  }

  async run (): Promise<void> {
    for (let n = 0; n < 1_000_000 && !this.w.stopping; n++) {
      if (!(await this.ensureClient())) return
      await this.step()
      await sleep(this.p.int(0, 10))
    }
  }

  private async step (): Promise<void> {
    const now = this.h.now()
    const due = this.toRegister.length > 0 && this.toRegister[0].atMs <= now
    if (due) return await this.register(this.toRegister.shift()!)
    if (this.owned.size === 0) {
      if (this.tentative.size > 0 && this.p.chance(0.5)) return await this.login(this.p.pick([...this.tentative.values()]))
      if (this.privateNames < 50) this.addPrivateName(0)
      return
    }
    if (this.session === null) return await this.login(this.p.pick([...this.owned.values()]))
    if (this.unknownSends.length > 0 && this.p.chance(0.5)) return await this.retrySend(this.unknownSends.shift()!)
    const choice = this.p.weighted({ send: 55, read: 15, delete: 10, login: 10, register: 1.5, tentative: this.tentative.size > 0 ? 3 : 0 })
    switch (choice) {
      case 'send': return await this.send()
      case 'read': return await this.read()
      case 'delete': return await this.delete()
      case 'login': return await this.login(this.p.pick([...this.owned.values()]))
      case 'register':
        if (this.privateNames < 12) this.addPrivateName(0)
        return
      case 'tentative': return await this.login(this.p.pick([...this.tentative.values()]))
    }
  }

  private async register (a: Account): Promise<void> {
    const c = this.client!
    const op = this.h.invoke(this.k, 'register', { name: a.name, password: a.password, session: this.session ?? undefined, rid: `r${this.w.opts.seed}-${this.k}-${this.seq++}` })
    try {
      await c.register(a.name, a.password, op.rid)
      this.h.ok(op, {}, c.address)
      this.owned.set(a.name.toLowerCase(), a)
      this.w.known.set(a.name.toLowerCase(), a.name)
    } catch (e) {
      this.h.failed(op, e, c.address)
      if (op.status === 'unknown') this.tentative.set(a.name.toLowerCase(), a)
    }
  }

  private async login (a: Account): Promise<void> {
    if (this.w.opts.switchUser === 'reconnect' && this.session !== null && this.session !== a.name.toLowerCase()) {
      this.client?.close()
      this.dead = true
      if (!(await this.ensureClient())) return
    }
    const c = this.client!
    const op = this.h.invoke(this.k, 'login', { name: this.p.chance(0.3) ? caseVariant(this.p, a.name) : a.name, password: a.password })
    try {
      await c.login(op.name!, a.password)
      this.h.ok(op, {}, c.address)
      const key = a.name.toLowerCase()
      this.session = key
      if (this.tentative.delete(key)) {
        this.owned.set(key, a)
        this.w.known.set(key, a.name)
      }
    } catch (e) {
      this.h.failed(op, e, c.address)
      if (op.status === 'unknown') this.session = null
      else if (op.code === 'AUTH_FAILED') this.tentative.delete(a.name.toLowerCase())
    }
  }

  private pickRecipient (): string {
    const r = this.p.next()
    if (r < 0.04) return `ghost${this.p.int(0, 9)}` // never registered: a definite NO_SUCH_USER
    if (r < 0.08) return `race${this.p.int(0, 60)}` // contested, perhaps not (yet) registered
    const known = [...this.w.known.values()]
    if (known.length === 0) return `ghost${this.p.int(0, 9)}`
    const to = this.p.pick(known)
    return this.p.chance(0.2) ? caseVariant(this.p, to) : to
  }

  private async send (): Promise<void> {
    const n = this.seq++
    const to = this.pickRecipient()
    await this.sendOp(to, `t${this.w.opts.seed}.${this.k}.${n}`, `s${this.w.opts.seed}-${this.k}-${n}`)
  }

  private async sendOp (to: string, text: string, rid: string, retryOf?: number): Promise<void> {
    const c = this.client!
    const op = this.h.invoke(this.k, 'send', { session: this.session!, to, text, rid, ...(retryOf !== undefined ? { retryOf } : {}) })
    try {
      const r = await c.send(to, text, rid)
      this.h.ok(op, { msgId: r.message.id, ...(r.replayed ? { replayed: true } : {}) }, c.address)
      if (r.message.to.toLowerCase() !== this.session) this.sentIds.push(r.message.id)
      if (this.sentIds.length > 200) this.sentIds.splice(0, 100)
    } catch (e) {
      this.h.failed(op, e, c.address)
      if (op.status === 'unknown') this.unknownSends.push(op)
    }
  }

  // The same rid and text again, logged in as the same user (the rid is kept per user).
  private async retrySend (orig: Op): Promise<void> {
    const tries = (this.retries.get(orig.text!) ?? 0) + 1
    this.retries.set(orig.text!, tries)
    if (tries > 3) return
    if (this.session !== orig.session) {
      const a = this.owned.get(orig.session!)
      if (!a) return
      await this.login(a)
      if (this.session !== orig.session) {
        this.unknownSends.push(orig)
        return
      }
    }
    await this.sendOp(orig.to!, orig.text!, orig.rid!, orig.retryOf ?? orig.n)
  }

  private async read (): Promise<void> {
    const c = this.client!
    const op = this.h.invoke(this.k, 'read', { session: this.session!, limit: this.p.int(1, 20) })
    try {
      const r = await c.read(op.limit)
      this.h.ok(op, { messages: r.messages.map(seen) }, c.address)
      for (const m of r.messages) this.observe(seen(m))
    } catch (e) {
      this.h.failed(op, e, c.address)
    }
  }

  private async delete (): Promise<void> {
    const mine = this.observed.get(this.session!)
    const ids = this.p.sample([...(mine?.keys() ?? [])], this.p.int(1, 3))
    if (this.p.chance(0.2) && this.sentIds.length > 0) ids.push(this.p.pick(this.sentIds)) // someone else's message
    if (this.p.chance(0.05)) ids.push(1_000_000_000 + this.p.int(0, 1000)) // no such message
    if (ids.length === 0) return await this.read()
    const c = this.client!
    const op = this.h.invoke(this.k, 'delete', { session: this.session!, ids })
    for (const id of ids) mine?.delete(id)
    try {
      const r = await c.deleteMessages(ids)
      this.h.ok(op, { deleted: r.deleted, missing: r.missing }, c.address)
    } catch (e) {
      this.h.failed(op, e, c.address)
    }
  }
}

export class Workload {
  stopping = false
  readonly known = new Map<string, string>() // lower-case name -> name, of acknowledged accounts
  readonly clients = new Set<ChatClient>()
  private loops: Array<Promise<void>> = []
  readonly contests: Contest[]

  constructor (readonly opts: WorkloadOptions) {
    this.contests = planContests(opts.seed, opts.clients, opts.durationMs)
  }

  get h (): History { return this.opts.h }

  start (): void {
    const workers = Array.from({ length: this.opts.clients }, (_, k) => new Worker(k, this, Prng.derive(this.opts.seed, `client${k}`)))
    for (const w of workers) w.plan(this.contests)
    this.loops = workers.map(w => w.run())
  }

  // Close every client: requests still waiting end as unknown outcomes.
  async stop (): Promise<void> {
    this.stopping = true
    for (const c of this.clients) c.close()
    await Promise.all(this.loops)
    for (const c of this.clients) c.close()
  }
}
