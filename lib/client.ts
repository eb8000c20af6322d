// The client library: one promise per request, `message` events for pushes. Used by the CLI,
// the tests and the benchmark.
//
// Given several servers (a chain), it finds the primary by asking each for its status and
// following NOT_PRIMARY. When the connection drops or the server answers UNAVAILABLE or
// NOT_PRIMARY, it finds the primary again, logs back in, and re-sends every request still
// waiting for a reply. Writing requests carry a rid chosen here and keep it across re-sends,
// so a write whose outcome was unknown is applied exactly once.
//
// Events: 'message' (Message), 'account_deleted', 'reconnecting' (reason), 'reconnected'
// (address), 'close' (after close(), or when no server could be reached in time).

import net from 'node:net'
import { EventEmitter } from 'node:events'
import { randomBytes } from 'node:crypto'
import split2 from 'split2'
import type { Message } from './state.ts'

export type { Message }

export class RequestError extends Error {
  constructor (readonly code: string, message: string, readonly reply: Record<string, unknown>) {
    super(message)
    this.name = 'RequestError'
  }
}

// The connection closed before the reply and the client could not (or was told not to)
// reconnect: the request may or may not have been applied. Repeating it with the same rid is safe.
export class ConnectionLostError extends Error {
  readonly code = 'CONNECTION_LOST'
  constructor (message = 'connection lost before the reply') {
    super(message)
    this.name = 'ConnectionLostError'
  }
}

export interface ClientOptions {
  host?: string
  port?: number
  servers?: string[] // host:port of every server to try, in order
  connectTimeoutMs?: number // per attempt
  requestTimeoutMs?: number // a request not answered in this time fails (default 30 s)
  failoverTimeoutMs?: number // how long to keep looking for a primary (default 20 s)
  reconnect?: boolean // default: true when several servers are given
  // With failover: a server that has sent nothing for this long while a request waits is
  // presumed dead or paused, and the client moves on (default 2 s).
  livenessTimeoutMs?: number
}

export interface LoginResult { user: string, unread: number }
export interface UsersResult { users: string[], total: number }
export interface SendResult { message: Message, delivered: boolean, replayed?: boolean }
export interface ReadResult { messages: Message[], remaining: number }
export interface DeleteResult { deleted: number, missing: number[] }

const mutatingOps = new Set(['register', 'send', 'read', 'delete_messages', 'delete_account'])
const retryCodes = new Set(['NOT_PRIMARY', 'UNAVAILABLE', 'SHUTTING_DOWN'])

interface Pending {
  id: number
  line: string
  op: string
  internal: boolean // a re-login made by reconnect(): never re-sent, replaced by the next one
  resolve: (v: Record<string, unknown>) => void
  reject: (e: Error) => void
  deadline: number // Date.now() after which it fails
}

const sleep = (ms: number): Promise<void> => new Promise(resolve => setTimeout(resolve, ms))

function splitAddr (addr: string): { host: string, port: number } {
  const k = addr.lastIndexOf(':')
  return { host: addr.slice(0, k).replace(/^\[|\]$/g, ''), port: Number(addr.slice(k + 1)) }
}

function open (addr: string, timeoutMs: number): Promise<net.Socket> {
  const { host, port } = splitAddr(addr)
  return new Promise((resolve, reject) => {
    const socket = net.connect(port, host)
    const timer = setTimeout(() => {
      socket.destroy()
      reject(new Error(`connecting to ${addr} timed out`))
    }, timeoutMs)
    socket.once('error', (e) => {
      clearTimeout(timer)
      reject(e)
    })
    socket.once('connect', () => {
      clearTimeout(timer)
      socket.removeAllListeners('error')
      socket.on('error', () => { /* reported through 'close' */ })
      resolve(socket)
    })
  })
}

// One status request on a fresh socket, to learn a server's role.
async function probe (addr: string, timeoutMs: number): Promise<{ socket: net.Socket, status: Record<string, unknown> }> {
  const socket = await open(addr, timeoutMs)
  try {
    const status = await new Promise<Record<string, unknown>>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`${addr} did not answer`)), timeoutMs)
      let buf = ''
      const onData = (d: Buffer): void => {
        buf += d.toString('utf8')
        const nl = buf.indexOf('\n')
        if (nl < 0) return
        clearTimeout(timer)
        socket.off('data', onData)
        socket.pause()
        if (nl + 1 < buf.length) socket.unshift(Buffer.from(buf.slice(nl + 1)))
        try { resolve(JSON.parse(buf.slice(0, nl))) } catch (e) { reject(e) }
      }
      socket.on('data', onData)
      socket.once('close', () => reject(new Error(`${addr} closed`)))
      // Without waiting for the digest, which a server that just replayed a big log computes
      // only once it has decoded what it left packed (a second or more).
      socket.write('{"op":"status","id":"probe","digest":false}\n')
    })
    return { socket, status }
  } catch (e) {
    socket.destroy()
    throw e
  }
}

export class ChatClient extends EventEmitter {
  private socket: net.Socket | null = null
  private readonly pending = new Map<number, Pending>()
  private nextId = 1
  private ridSeq = 0
  private readonly ridPrefix = randomBytes(9).toString('base64url')
  private closedByUser = false
  private reconnecting: Promise<void> | null = null
  private credentials: { user: string, password: string } | null = null
  private readonly servers: string[]
  private preferred: string | null = null // the primary a NOT_PRIMARY named
  private lastHeard = 0
  private reconnectAgain = false
  private livenessTimer: NodeJS.Timeout | null = null
  // One timer for every request's deadline, armed for the oldest pending request's (see expire).
  private deadlineTimer: NodeJS.Timeout | null = null
  address = ''

  private constructor (private readonly opts: ClientOptions) {
    super()
    this.servers = opts.servers ?? [`${opts.host ?? '127.0.0.1'}:${opts.port}`]
  }

  static async connect (opts: ClientOptions): Promise<ChatClient> {
    const c = new ChatClient(opts)
    await c.findPrimary()
    return c
  }

  get closed (): boolean { return this.closedByUser || this.socket === null }
  private get failover (): boolean { return this.opts.reconnect ?? this.servers.length > 1 }

  // Ask every server at once and take the first that serves clients, so a paused or dead
  // server costs nothing while another answers. A primary named in a NOT_PRIMARY reply (or by a
  // backup's status) is asked too, even if it was not in the list.
  private async findPrimary (): Promise<void> {
    const deadline = Date.now() + (this.opts.failoverTimeoutMs ?? (this.failover ? 20_000 : 0))
    const attemptMs = this.opts.connectTimeoutMs ?? 2000
    let lastError: unknown = null
    for (let round = 0; ; round++) {
      if (this.closedByUser) throw new ConnectionLostError('client closed')
      const candidates = [...new Set([...(this.preferred ? [this.preferred] : []), ...this.servers])]
      const found = await new Promise<{ socket: net.Socket, addr: string } | null>(resolve => {
        let open = candidates.length
        let done = false
        for (const addr of candidates) {
          probe(addr, attemptMs).then(({ socket, status }) => {
            if (done || this.closedByUser) {
              socket.destroy()
              return
            }
            if (status.ok === true && (status.role === 'primary' || status.role === 'single' || status.role === undefined)) {
              done = true
              resolve({ socket, addr })
              return
            }
            socket.destroy()
            if (typeof status.primary === 'string' && status.primary !== addr) this.preferred = status.primary
            lastError = new Error(`${addr} is ${String(status.role)}`)
          }, e => { lastError = e }).finally(() => {
            if (--open === 0 && !done) resolve(null)
          })
        }
      })
      if (found) {
        this.attach(found.socket, found.addr)
        return
      }
      if (Date.now() >= deadline) throw lastError instanceof Error ? lastError : new Error('no server reachable')
      await sleep(Math.min(50 * 2 ** round, 500))
    }
  }

  private attach (socket: net.Socket, addr: string): void {
    this.socket = socket
    this.address = addr
    this.lastHeard = Date.now()
    socket.setNoDelay(true)
    socket.on('data', () => { this.lastHeard = Date.now() })
    socket.pipe(split2()).on('data', (line: string) => this.onLine(line))
    if (this.failover && !this.livenessTimer) {
      const limit = this.opts.livenessTimeoutMs ?? 2000
      this.livenessTimer = setInterval(() => {
        if (this.socket && !this.reconnecting && this.pending.size > 0 && Date.now() - this.lastHeard > limit) {
          this.reconnect(`no answer from ${this.address} for ${limit} ms`)
        } else if (this.socket && this.pending.size > 0 && Date.now() - this.lastHeard > limit / 2) {
          // Ask for something cheap, so a slow reply is told apart from a dead server.
          this.socket.write('{"op":"ping","id":"liveness"}\n')
        }
      }, Math.max(50, limit / 4))
      this.livenessTimer.unref()
    }
    socket.on('error', () => { /* 'close' follows */ })
    socket.on('close', () => {
      if (this.socket !== socket) return
      this.socket = null
      if (this.reconnecting) this.reconnectAgain = true
      this.dropInternal()
      this.lost('connection closed')
    })
  }

  private lost (reason: string): void {
    if (this.closedByUser) return
    if (!this.failover) {
      this.failPending()
      this.emit('close')
      return
    }
    this.reconnect(reason)
  }

  // Find the primary again, log back in, and re-send everything still pending, in order. The
  // reconnect counts as in progress until all of that is written: if the connection drops again
  // meanwhile, the whole sequence starts over, so an old re-login can never land after a newer
  // login of the user's own.
  private reconnect (reason: string): void {
    if (this.reconnecting) {
      this.reconnectAgain = true
      return
    }
    this.emit('reconnecting', reason)
    this.socket?.destroy()
    this.socket = null
    this.reconnecting = (async () => {
      for (;;) {
        this.reconnectAgain = false
        this.dropInternal()
        try {
          await this.findPrimary()
        } catch (e) {
          this.reconnecting = null
          this.failPending(`no primary reachable: ${(e as Error).message}`)
          this.closedByUser = true
          if (this.livenessTimer) clearInterval(this.livenessTimer)
          this.emit('close')
          return
        }
        if (this.credentials) {
          try {
            await this.dispatch('login', { ...this.credentials }, true)
          } catch (e) {
            if (this.reconnectAgain || !this.socket) continue
            this.emit('relogin_failed', e)
          }
        }
        if (this.reconnectAgain || !this.socket) continue
        for (const p of [...this.pending.values()].sort((a, b) => a.id - b.id)) if (!p.internal) this.socket.write(p.line)
        break
      }
      this.reconnecting = null
      this.emit('reconnected', this.address)
    })()
  }

  // Abandon re-logins of an earlier reconnect attempt.
  private dropInternal (): void {
    for (const p of [...this.pending.values()]) {
      if (!p.internal) continue
      this.pending.delete(p.id)
      p.reject(new ConnectionLostError('superseded'))
    }
  }

  private onLine (line: string): void {
    if (line.trim() === '') return
    let msg: Record<string, unknown>
    try {
      msg = JSON.parse(line)
    } catch {
      return
    }
    if (typeof msg.event === 'string' && msg.ok === undefined) {
      if (msg.event === 'message') this.emit('message', msg.message as Message)
      else this.emit(msg.event, msg)
      return
    }
    const p = typeof msg.id === 'number' ? this.pending.get(msg.id) : undefined
    if (!p) return
    const err = (msg.error ?? {}) as { code?: string, message?: string, primary?: string }
    if (msg.ok !== true && this.failover && err.code !== undefined && retryCodes.has(err.code)) {
      // Nothing was applied: ask the primary instead, once it is found. A re-login fails at once,
      // so the reconnect that sent it starts over.
      if (err.code === 'NOT_PRIMARY' && typeof err.primary === 'string') this.preferred = err.primary
      if (p.internal) {
        this.pending.delete(p.id)
        p.reject(new RequestError(err.code, err.message ?? 'retry', msg))
        this.reconnectAgain = true
      }
      setTimeout(() => this.reconnect(err.code!), err.code === 'NOT_PRIMARY' ? 0 : 100)
      return
    }
    this.pending.delete(p.id)
    if (msg.ok === true) p.resolve(msg)
    else p.reject(new RequestError(err.code ?? 'UNKNOWN', err.message ?? 'request failed', msg))
  }

  // Send any request. Mutating ops get a fresh rid unless the caller supplies one.
  request (op: string, fields: Record<string, unknown> = {}): Promise<Record<string, unknown>> {
    return this.dispatch(op, fields, false)
  }

  private dispatch (op: string, fields: Record<string, unknown>, internal: boolean): Promise<Record<string, unknown>> {
    if (this.closedByUser) return Promise.reject(new ConnectionLostError('client closed'))
    if (!this.socket && !this.reconnecting && !this.failover) return Promise.reject(new ConnectionLostError('not connected'))
    const id = this.nextId++
    const body: Record<string, unknown> = { op, id, ...fields }
    if (mutatingOps.has(op) && body.rid === undefined) body.rid = `${this.ridPrefix}-${++this.ridSeq}`
    let line: string
    try {
      line = JSON.stringify(body) + '\n'
    } catch (e) { // a BigInt or a cycle in the fields: the caller's promise says so
      return Promise.reject(e)
    }
    const deadline = Date.now() + this.timeoutMs
    return new Promise((resolve, reject) => {
      this.pending.set(id, { id, line, op, internal, resolve, reject, deadline })
      if (this.deadlineTimer === null) this.armDeadline(deadline)
      // While reconnecting, requests wait to be re-sent in order; the re-login goes first.
      if (this.socket && (internal || !this.reconnecting)) this.socket.write(line)
    })
  }

  // Fail every pending request with ConnectionLostError(message): their replies will not come.
  private failPending (message?: string): void {
    for (const p of this.pending.values()) p.reject(new ConnectionLostError(message))
    this.pending.clear()
  }

  private get timeoutMs (): number { return this.opts.requestTimeoutMs ?? 30_000 }

  // Requests are pending in the order they were made, all with the same timeout, so the first
  // pending request has the earliest deadline. The timer is not moved when replies come in: when
  // it fires, it fails what is overdue and is armed again for whatever is first by then. That
  // saves a timer set and cleared per request. It is unref'd: a request pends only while a
  // socket is open or a reconnect is under way, and either keeps the process alive.
  private armDeadline (deadline: number): void {
    this.deadlineTimer = setTimeout(this.expire, Math.max(0, deadline - Date.now()))
    this.deadlineTimer.unref()
  }

  private readonly expire = (): void => {
    this.deadlineTimer = null
    const now = Date.now()
    for (const p of this.pending.values()) {
      if (p.deadline > now) {
        this.armDeadline(p.deadline)
        return
      }
      this.pending.delete(p.id)
      p.reject(new Error(`${p.op}: no reply within ${this.timeoutMs} ms`))
    }
  }

  async register (user: string, password: string, rid?: string): Promise<void> {
    await this.request('register', rid === undefined ? { user, password } : { user, password, rid })
  }

  async login (user: string, password: string): Promise<LoginResult> {
    const r = await this.request('login', { user, password }) as unknown as LoginResult
    this.credentials = { user, password }
    return r
  }

  async logout (): Promise<void> {
    this.credentials = null
    await this.request('logout')
  }

  // These hand back the request's own promise: an async wrapper would add a promise and turns
  // of the microtask queue to every call, which the benchmark's clients spend on every send.
  users (pattern = '*', page: { offset?: number, limit?: number } = {}): Promise<UsersResult> {
    return this.request('users', { pattern, ...page }) as Promise<unknown> as Promise<UsersResult>
  }

  send (to: string, text: string, rid?: string): Promise<SendResult> {
    return this.request('send', rid === undefined ? { to, text } : { to, text, rid }) as Promise<unknown> as Promise<SendResult>
  }

  read (limit?: number): Promise<ReadResult> { return this.request('read', limit === undefined ? {} : { limit }) as Promise<unknown> as Promise<ReadResult> }
  history (opts: { limit?: number, before?: number } = {}): Promise<{ messages: Message[] }> {
    return this.request('history', opts) as Promise<unknown> as Promise<{ messages: Message[] }>
  }

  deleteMessages (ids: number[]): Promise<DeleteResult> { return this.request('delete_messages', { ids }) as Promise<unknown> as Promise<DeleteResult> }
  async deleteAccount (password: string): Promise<void> {
    await this.request('delete_account', { password })
    this.credentials = null
  }

  async ping (): Promise<void> { await this.request('ping') }
  status (): Promise<Record<string, unknown>> { return this.request('status') }

  close (): void {
    this.closedByUser = true
    if (this.livenessTimer) clearInterval(this.livenessTimer)
    if (this.deadlineTimer) clearTimeout(this.deadlineTimer)
    this.deadlineTimer = null
    const s = this.socket
    this.socket = null
    this.failPending('client closed')
    s?.destroy()
    this.emit('close')
  }
}
