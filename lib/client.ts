// The client library: one promise per request, `message` events for pushes. Used by the CLI,
// the tests and the benchmark. Mutating requests carry a rid chosen here, so a request repeated
// after an unknown outcome (a dropped connection) is applied at most once by the server.

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

// The outcome of a request whose connection closed before its reply came: it may or may not
// have been applied. Repeating it with the same rid is safe.
export class ConnectionLostError extends Error {
  readonly code = 'CONNECTION_LOST'
  constructor (message = 'connection lost before the reply') {
    super(message)
    this.name = 'ConnectionLostError'
  }
}

export interface ClientOptions {
  host?: string
  port: number
  connectTimeoutMs?: number
  requestTimeoutMs?: number
}

export interface LoginResult { user: string, unread: number }
export interface UsersResult { users: string[], total: number }
export interface SendResult { message: Message, delivered: boolean }
export interface ReadResult { messages: Message[], remaining: number }
export interface DeleteResult { deleted: number, missing: number[] }

const mutatingOps = new Set(['register', 'send', 'read', 'delete_messages', 'delete_account'])

interface Pending {
  resolve: (v: Record<string, unknown>) => void
  reject: (e: Error) => void
  timer: NodeJS.Timeout
}

export class ChatClient extends EventEmitter {
  private readonly pending = new Map<number, Pending>()
  private nextId = 1
  private ridSeq = 0
  private readonly ridPrefix = randomBytes(9).toString('base64url')
  private closedFlag = false
  readonly address: string

  private constructor (private readonly socket: net.Socket, private readonly requestTimeoutMs: number) {
    super()
    this.address = `${socket.remoteAddress}:${socket.remotePort}`
    socket.setNoDelay(true)
    socket.pipe(split2()).on('data', (line: string) => this.onLine(line))
    socket.on('error', () => { /* 'close' follows and settles everything */ })
    socket.on('close', () => {
      this.closedFlag = true
      for (const p of this.pending.values()) {
        clearTimeout(p.timer)
        p.reject(new ConnectionLostError())
      }
      this.pending.clear()
      this.emit('close')
    })
  }

  static connect (opts: ClientOptions): Promise<ChatClient> {
    const host = opts.host ?? '127.0.0.1'
    return new Promise((resolve, reject) => {
      const socket = net.connect(opts.port, host)
      const timer = setTimeout(() => {
        socket.destroy()
        reject(new Error(`connecting to ${host}:${opts.port} timed out`))
      }, opts.connectTimeoutMs ?? 5000)
      socket.once('error', (e) => {
        clearTimeout(timer)
        reject(e)
      })
      socket.once('connect', () => {
        clearTimeout(timer)
        socket.removeAllListeners('error')
        resolve(new ChatClient(socket, opts.requestTimeoutMs ?? 30_000))
      })
    })
  }

  get closed (): boolean { return this.closedFlag }

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
    this.pending.delete(msg.id as number)
    clearTimeout(p.timer)
    if (msg.ok === true) p.resolve(msg)
    else {
      const err = (msg.error ?? {}) as { code?: string, message?: string }
      p.reject(new RequestError(err.code ?? 'UNKNOWN', err.message ?? 'request failed', msg))
    }
  }

  // Send any request. Mutating ops get a fresh rid unless the caller supplies one.
  request (op: string, fields: Record<string, unknown> = {}): Promise<Record<string, unknown>> {
    if (this.closedFlag) return Promise.reject(new ConnectionLostError('not connected'))
    const id = this.nextId++
    const body: Record<string, unknown> = { op, id, ...fields }
    if (mutatingOps.has(op) && body.rid === undefined) body.rid = `${this.ridPrefix}-${++this.ridSeq}`
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id)
        reject(new Error(`${op}: no reply within ${this.requestTimeoutMs} ms`))
      }, this.requestTimeoutMs)
      this.pending.set(id, { resolve, reject, timer })
      this.socket.write(JSON.stringify(body) + '\n')
    })
  }

  async register (user: string, password: string): Promise<void> { await this.request('register', { user, password }) }
  async login (user: string, password: string): Promise<LoginResult> { return await this.request('login', { user, password }) as unknown as LoginResult }
  async logout (): Promise<void> { await this.request('logout') }
  async users (pattern = '*', page: { offset?: number, limit?: number } = {}): Promise<UsersResult> {
    return await this.request('users', { pattern, ...page }) as unknown as UsersResult
  }

  async send (to: string, text: string, rid?: string): Promise<SendResult> {
    return await this.request('send', rid === undefined ? { to, text } : { to, text, rid }) as unknown as SendResult
  }

  async read (limit?: number): Promise<ReadResult> { return await this.request('read', limit === undefined ? {} : { limit }) as unknown as ReadResult }
  async history (opts: { limit?: number, before?: number } = {}): Promise<{ messages: Message[] }> {
    return await this.request('history', opts) as unknown as { messages: Message[] }
  }

  async deleteMessages (ids: number[]): Promise<DeleteResult> { return await this.request('delete_messages', { ids }) as unknown as DeleteResult }
  async deleteAccount (password: string): Promise<void> { await this.request('delete_account', { password }) }
  async ping (): Promise<void> { await this.request('ping') }
  async status (): Promise<Record<string, unknown>> { return await this.request('status') }

  close (): void { this.socket.destroy() }
}
