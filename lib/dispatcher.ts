// Routes a parsed request (protocol.md, "Operations"). Queries, login and logout are answered
// from the committed state; mutations become log records and go through the committer (and,
// in a chain, down the chain) before they are applied and answered. Also keeps the table of
// logged-in sessions that live pushes go to.

import { scrypt, randomBytes, timingSafeEqual } from 'node:crypto'
import { ChatError, errors } from './errors.ts'
import { commands, isOp, type Op, type Params } from './commands.ts'
import { limits } from './limits.ts'
import type { Request } from './protocol.ts'
import type { ChatState, Applied, Reply, Message, Mailbox } from './state.ts'
import type { RecordBody, LogRecord } from './records.ts'

// A client connection as the dispatcher sees it.
export interface Session {
  readonly id: number
  user: string | null // account key (lower case) once logged in
  // Queue an event line; `taken` is called with no error once the bytes were handed to the
  // kernel, or with an error if the connection closed first.
  pushEvent: (line: string, taken: (err?: Error | null) => void) => void
  // Failed logins on this connection, to slow down password guessing.
  failedLogins: number
}

// What a dispatcher needs from the server it runs in: the state, a way to commit records, and
// the node's identity. In a chain these change with the node's role.
export interface Host {
  state: () => ChatState
  submit: (body: RecordBody) => Promise<Applied>
  // null when this server may serve clients; otherwise the error every client request gets.
  refuse: () => ChatError | null
  status: () => Record<string, unknown>
}

const scryptOpts = { N: limits.scryptN, r: limits.scryptR, p: limits.scryptP, maxmem: 64 * 1024 * 1024 }

// Password hashes run in libuv's thread pool (4 threads), and so does the log's fdatasync under
// load. Unbounded, a burst of logins (every client of a failed primary logging in again, or
// someone guessing passwords from many connections) filled the pool, and every write waited
// behind the hashes: 100 concurrent failed logins held up all writes for 2.1 s. So at most
// limits.scryptConcurrency hashes run at once, and the rest wait their turn here, in order.
let hashSlots: number = limits.scryptConcurrency
const hashQueue: Array<() => void> = []

async function hashPassword (password: string, salt: Buffer): Promise<Buffer> {
  if (hashSlots > 0) hashSlots--
  else await new Promise<void>(resolve => hashQueue.push(resolve))
  try {
    return await new Promise<Buffer>((resolve, reject) => {
      scrypt(password, salt, limits.scryptKeyBytes, scryptOpts, (err, key) => err ? reject(err) : resolve(key))
    })
  } finally {
    const next = hashQueue.shift()
    if (next !== undefined) next() // the slot passes straight to the next in line
    else hashSlots++
  }
}

// Used when the account does not exist, so an unknown name costs the same time as a wrong password.
const dummySalt = randomBytes(limits.saltBytes)

const ok = (fields: Record<string, unknown> = {}): Reply => ({ ok: true, ...fields })

// Run `slice` (a few milliseconds of decoding, true while more is left) once per turn of the
// event loop until it is done, between other work; resolves then. A slice that throws ends it:
// that never happens for data that passed its checks at load, and if it does, the request meets
// the error itself when it uses what was being decoded, and answers with it.
function inSlices (slice: () => boolean): Promise<void> {
  return new Promise<void>(resolve => {
    const step = (): void => {
      let more = false
      try {
        more = slice()
      } catch { /* see above */ }
      if (more) setImmediate(step)
      else resolve()
    }
    setImmediate(step)
  })
}

export class Dispatcher {
  private readonly sessionsByUser = new Map<string, Set<Session>>()

  constructor (private readonly host: Host, private readonly log: (level: string, msg: string, fields?: Record<string, unknown>) => void = () => {}) {}

  // Whether a request may start while earlier ones on its connection are still running. One
  // that must first wait for its mailbox to be decoded (see decoded) goes alone, so that later
  // requests on the connection do not overtake it.
  isPipelined (op: string, session?: Session): boolean {
    if (!isOp(op) || !commands[op].pipelined) return false
    if ((op === 'read' || op === 'delete_messages') && session !== undefined && this.deferredMailbox(session.user) !== null) return false
    return true
  }

  // A start from a snapshot leaves each mailbox packed until it is first used (state.ts,
  // Mailbox.defer); decoding one at once holds up every client (0.35 s for 300,000 messages).
  // So a request that will use one waits while it is decoded a few milliseconds at a time
  // between other work: null if there is nothing to wait for. Everything waiting for the same
  // mailbox resumes in the order it began waiting: a push's read mark before a read the
  // recipient sent after seeing the push. A request awaits only what this returns, never null:
  // even `await null` would let requests that came after it on its connection be submitted
  // first.
  private readonly decoding = new Map<Mailbox, Promise<void>>()

  private decoded (key: string | null): Promise<void> | null {
    const mailbox = this.deferredMailbox(key)
    if (mailbox === null) return null
    let p = this.decoding.get(mailbox)
    if (p === undefined) {
      p = inSlices(() => {
        const until = performance.now() + 2
        while (mailbox.warmStep() && performance.now() < until);
        return mailbox.isDeferred
      }).then(() => { this.decoding.delete(mailbox) })
      this.decoding.set(mailbox, p)
    }
    return p
  }

  // The same for the state's digest (ChatState.digestPending): the state's packed messages
  // decoded a few milliseconds at a time, or null if the digest is known already.
  private digesting: Promise<void> | null = null

  private digested (): Promise<void> | null {
    if (!this.host.state().digestPending) return null
    this.digesting ??= inSlices(() => this.host.state().warmSome(2)).then(() => { this.digesting = null })
    return this.digesting
  }

  private deferredMailbox (key: string | null): Mailbox | null {
    const mailbox = key === null ? undefined : this.host.state().accounts.get(key)?.mailbox
    return mailbox?.isDeferred === true ? mailbox : null
  }

  // Answer one request. Never rejects: failures become error replies.
  async handle (session: Session, req: Request): Promise<Reply> {
    try {
      if (!isOp(req.op)) throw errors.unknownOp(req.op)
      const spec = commands[req.op]
      const params = spec.parse(req.fields)
      if (req.op !== 'ping' && req.op !== 'status') {
        const refusal = this.host.refuse()
        if (refusal) throw refusal
      }
      if (spec.needsLogin && session.user === null) throw errors.notLoggedIn()
      return await this.run(session, req.op, params)
    } catch (e) {
      if (e instanceof ChatError) return { ok: false, error: e.toWire() } as Reply
      this.log('error', 'request failed unexpectedly', { op: req.op, error: String((e as Error)?.stack ?? e) })
      return { ok: false, error: errors.internal(e).toWire() } as Reply
    }
  }

  private ridKey (session: Session, rid: string | undefined): string | undefined {
    return rid === undefined ? undefined : `${session.user ?? ''}\u0000${rid}`
  }

  private commit (body: RecordBody): Promise<Applied> {
    return this.host.submit(body)
  }

  private async run (session: Session, op: Op, p: Params<Op>): Promise<Reply> {
    const state = this.host.state()
    switch (op) {
      case 'register': {
        const q = p as Params<'register'>
        const rk = this.ridKey(session, q.rid)
        const stored = rk === undefined ? undefined : state.ridReply(rk)
        if (stored) return stored
        if (state.account(q.user)) throw errors.userExists(q.user)
        const salt = randomBytes(limits.saltBytes)
        const hash = await hashPassword(q.password, salt)
        const applied = await this.commit({ op: 'register', user: q.user, salt: salt.toString('base64'), hash: hash.toString('base64'), rk })
        return applied.reply
      }
      case 'login': {
        const q = p as Params<'login'>
        const account = state.account(q.user)
        const salt = account ? Buffer.from(account.salt, 'base64') : dummySalt
        const key = await hashPassword(q.password, salt)
        await this.slowDownGuessing(session)
        // The state may have moved on while hashing; look the account up again.
        const now = this.host.state().account(q.user)
        if (!account || now !== account || !timingSafeEqual(key, Buffer.from(account.hash, 'base64'))) {
          session.failedLogins++
          throw errors.authFailed()
        }
        session.failedLogins = 0
        // Every send to the account is written to each of its sessions: bound them, so that
        // one account cannot turn each message sent to it into thousands of writes.
        const open = this.sessionsByUser.get(account.key)
        if (open !== undefined && open.size >= limits.sessionsPerUserMax && !open.has(session)) throw errors.tooManyRequests(`${account.name} has ${open.size} sessions open, the most one account may have; log one out first`)
        this.setUser(session, account.key)
        return ok({ user: account.name, unread: account.mailbox.unreadCount })
      }
      case 'logout':
        this.setUser(session, null)
        return ok()
      case 'users': {
        const q = p as Params<'users'>
        return ok(state.listUsers(q.pattern, q.offset, q.limit))
      }
      case 'send': {
        const q = p as Params<'send'>
        const rk = this.ridKey(session, q.rid)
        const from = state.accounts.get(session.user!)
        if (!from) throw errors.notLoggedIn()
        if (!(rk !== undefined && state.ridReply(rk)) && !state.account(q.to)) throw errors.noSuchUser(q.to)
        const applied = await this.commit({ op: 'send', from: from.name, to: q.to, text: q.text, rk })
        if (!applied.reply.ok) return applied.reply
        // Not { ...applied.reply, delivered }: a spread followed by more fields takes a slow path
        // of V8, about 0.7 us a send.
        const reply: Reply = Object.assign({}, applied.reply)
        reply.delivered = applied.delivered === true
        if (applied.replayed) reply.replayed = true
        return reply
      }
      case 'read': {
        const q = p as Params<'read'>
        const waiting = this.decoded(session.user)
        if (waiting !== null) await waiting
        const applied = await this.commit({ op: 'read', user: session.user!, limit: q.limit, rk: this.ridKey(session, q.rid) })
        return applied.reply
      }
      case 'history': {
        const q = p as Params<'history'>
        const waiting = this.decoded(session.user)
        if (waiting !== null) await waiting
        const a = this.host.state().accounts.get(session.user!)
        if (!a) throw errors.notLoggedIn()
        return ok({ messages: a.mailbox.newest(q.limit, q.before) })
      }
      case 'delete_messages': {
        const q = p as Params<'delete_messages'>
        const waiting = this.decoded(session.user)
        if (waiting !== null) await waiting
        const applied = await this.commit({ op: 'delete_messages', user: session.user!, ids: q.ids, rk: this.ridKey(session, q.rid) })
        return applied.reply
      }
      case 'delete_account': {
        const q = p as Params<'delete_account'>
        const rk = this.ridKey(session, q.rid)
        const stored = rk === undefined ? undefined : state.ridReply(rk)
        if (stored) return stored
        const account = state.accounts.get(session.user!)
        if (!account) throw errors.notLoggedIn()
        const key = await hashPassword(q.password, Buffer.from(account.salt, 'base64'))
        if (!timingSafeEqual(key, Buffer.from(account.hash, 'base64'))) throw errors.authFailed()
        const waiting = this.decoded(session.user) // deleting the account goes through its mailbox
        if (waiting !== null) await waiting
        const applied = await this.commit({ op: 'delete_account', user: account.name, created: account.created, rk })
        return applied.reply
      }
      case 'ping':
        return ok()
      case 'status': {
        // The digest counts every message: wait while those a start left packed are decoded,
        // unless the request does without it (a client looking for the primary: the status then
        // says `digest: null` until they are).
        const waiting = (p as Params<'status'>).digest ? this.digested() : null
        if (waiting !== null) await waiting
        return ok(this.host.status())
      }
    }
  }

  // After a few failed logins on one connection, each further attempt waits longer (up to 2 s),
  // so guessing passwords over one connection is slow. The delay is per connection and is not
  // replicated.
  private async slowDownGuessing (session: Session): Promise<void> {
    if (session.failedLogins < 3) return
    const ms = Math.min(2000, 100 * 2 ** (session.failedLogins - 3))
    await new Promise(resolve => setTimeout(resolve, ms))
  }

  setUser (session: Session, key: string | null): void {
    if (session.user !== null) {
      const set = this.sessionsByUser.get(session.user)
      set?.delete(session)
      if (set?.size === 0) this.sessionsByUser.delete(session.user)
    }
    session.user = key
    if (key !== null) {
      let set = this.sessionsByUser.get(key)
      if (!set) this.sessionsByUser.set(key, set = new Set())
      set.add(session)
    }
  }

  // Called for every record applied on the serving node, in log order: carry out its effects.
  onApplied (_record: LogRecord, applied: Applied): void {
    const { push, accountDeleted } = applied.effects
    if (push) applied.delivered = this.deliver(push)
    if (accountDeleted) {
      for (const s of [...this.sessionsByUser.get(accountDeleted) ?? []]) {
        this.setUser(s, null)
        s.pushEvent(JSON.stringify({ event: 'account_deleted' }) + '\n', () => {})
      }
    }
  }

  // Push a message to every live session of its recipient. Once one of them has taken it, the
  // message is marked read through the log, so a push lost with its connection stays unread.
  private deliver (m: Message): boolean {
    const sessions = this.sessionsByUser.get(m.to.toLowerCase())
    if (!sessions || sessions.size === 0) return false
    const line = JSON.stringify({ event: 'message', message: m }) + '\n'
    let marked = false
    for (const s of sessions) {
      s.pushEvent(line, (err) => {
        if (err || marked) return
        marked = true
        this.markRead(m.to.toLowerCase(), m.id)
      })
    }
    return true
  }

  // Submitted at once, so the mark precedes any request the recipient sends after seeing the push
  // (or, while the mailbox is being decoded, as soon as it is, ahead of any such request: see
  // decoded);
  // the committer's group commit batches marks with everything else.
  private markRead (user: string, id: number): void {
    const waiting = this.decoded(user)
    if (waiting !== null) {
      void waiting.then(() => this.markRead(user, id))
      return
    }
    this.commit({ op: 'mark_read', user, ids: [id] }).catch(e => {
      // The message stays unread and a later read returns it: nothing is lost.
      this.log('warn', 'could not record a pushed message as read', { user, id, error: String(e) })
    })
  }

  sessionsOnline (): number {
    let n = 0
    for (const s of this.sessionsByUser.values()) n += s.size
    return n
  }

  dropSession (session: Session): void {
    this.setUser(session, null)
  }
}
