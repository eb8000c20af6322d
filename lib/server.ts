// Client connections over node:net (protocol.md, "Transport"). Each connection is split into
// lines by split2 with a size bound, parsed, and handed to the dispatcher. Replies go out in the
// order requests came in. Backpressure: reading pauses while too many requests of a connection
// are unanswered or while the socket cannot take more output, and a client that lets its
// output pile up past a bound is disconnected.

import net from 'node:net'
import type { Duplex } from 'node:stream'
import split2 from 'split2'
import { errors } from './errors.ts'
import { parseRequest, RequestParseError, encodeReply, encodeError } from './protocol.ts'
import type { Dispatcher, Session } from './dispatcher.ts'
import type { Reply } from './state.ts'

export interface ConnectionOptions {
  lineBytesMax: number
  inflightMax: number
  outboundBytesMax: number
}

let nextSessionId = 1

class Connection implements Session {
  readonly id = nextSessionId++
  user: string | null = null
  failedLogins = 0
  private readonly lines: ReturnType<typeof split2>
  private tail: Promise<void> = Promise.resolve() // settles when every earlier reply is written
  private barrier: Promise<unknown> = Promise.resolve() // settles when earlier non-pipelined requests finish
  private unanswered = 0
  private blockedOnDrain = false
  private closed = false // no more requests are read
  private gone = false // the connection itself is closed

  constructor (private readonly stream: Duplex, private readonly dispatcher: Dispatcher, private readonly opts: ConnectionOptions, private readonly onClose: (c: Connection) => void) {
    // split2 bounds the unterminated remainder; complete lines are checked in onLine.
    this.lines = split2(/\r?\n/, { maxLength: opts.lineBytesMax })
    stream.pipe(this.lines)
    this.lines.on('data', (line: string) => this.onLine(line))
    this.lines.on('error', () => this.tooLong())
    stream.on('drain', () => {
      this.blockedOnDrain = false
      this.updateFlow()
    })
    stream.on('error', () => { /* 'close' follows */ })
    stream.on('close', () => {
      this.closed = true
      this.gone = true
      this.onClose(this)
    })
  }

  private onLine (line: string): void {
    if (this.closed) return
    if (line.length > this.opts.lineBytesMax || (line.length * 3 > this.opts.lineBytesMax && Buffer.byteLength(line) > this.opts.lineBytesMax)) {
      this.tooLong()
      return
    }
    if (line.trim() === '') return
    let reply: Promise<[string | number | null | undefined, Reply | string]>
    try {
      const req = parseRequest(line)
      // A request still queued when its connection closes is not run: its reply could not be
      // delivered, and it would run without the session it was sent in (a rid filed under the
      // wrong user, a login for a connection that is gone). Its client retries with the same rid.
      const run = (): Promise<[typeof req.id, Reply]> => this.gone
        ? Promise.resolve([req.id, { ok: false, error: errors.shuttingDown().toWire() } as Reply])
        : this.dispatcher.handle(this, req).then(r => [req.id, r])
      if (this.dispatcher.isPipelined(req.op)) {
        reply = this.barrier.then(run)
      } else {
        reply = this.tail.then(run)
        this.barrier = reply
      }
    } catch (e) {
      const err = e instanceof RequestParseError ? e : new RequestParseError(errors.internal(e), undefined)
      reply = Promise.resolve([err.id, encodeError(err.id, err.error)])
    }
    this.unanswered++
    this.updateFlow()
    const prev = this.tail
    this.tail = Promise.all([prev, reply]).then(([, [id, r]]) => {
      this.unanswered--
      this.write(typeof r === 'string' ? r : encodeReply(id, r))
      this.updateFlow()
    })
  }

  private tooLong (): void {
    if (this.closed) return
    this.closed = true
    this.stream.unpipe(this.lines)
    this.lines.destroy()
    this.stream.pause()
    const line = encodeError(undefined, errors.lineTooLong(this.opts.lineBytesMax))
    // Earlier requests still get their replies, then the error, then the connection ends.
    this.tail = this.tail.then(() => { this.stream.end(line) })
  }

  // Write a reply or event. Returns false if the connection is gone or was cut for being slow.
  private write (text: string, cb?: (err?: Error | null) => void): void {
    if (this.stream.destroyed || !this.stream.writable) {
      if (cb) cb(new Error('connection closed'))
      return
    }
    if (!this.stream.write(text, cb)) this.blockedOnDrain = true
    if (this.stream.writableLength > this.opts.outboundBytesMax) {
      // The client is not reading: rather than buffer without bound, let it go.
      this.stream.destroy()
    }
  }

  pushEvent (line: string, taken: (err?: Error | null) => void): void {
    this.write(line, taken)
  }

  private updateFlow (): void {
    if (this.closed) return
    if (this.blockedOnDrain || this.unanswered >= this.opts.inflightMax) this.lines.pause()
    else this.lines.resume()
  }

  // Stop reading new requests (shutdown); replies to earlier ones still go out.
  stopReading (): void {
    this.stream.unpipe(this.lines)
    this.stream.pause()
  }

  // Resolves when every reply to a request read so far has been written.
  drained (): Promise<void> { return this.tail }

  end (): void {
    this.stream.end()
  }

  destroy (): void {
    this.stream.destroy()
  }
}

export class ChatServer {
  private listener: net.Server | null = null
  private readonly connections = new Set<Connection>()

  constructor (private readonly dispatcher: Dispatcher, private readonly opts: ConnectionOptions) {}

  // Take over a listening server: close() will stop it.
  adopt (listener: net.Server): void {
    this.listener = listener
  }

  // Serve one client stream: a socket, or any Duplex (tests use in-memory pairs).
  handle (stream: Duplex): void {
    const c = new Connection(stream, this.dispatcher, this.opts, conn => {
      this.connections.delete(conn)
      this.dispatcher.dropSession(conn)
    })
    this.connections.add(c)
  }

  get clientCount (): number { return this.connections.size }

  // Disconnect every client at once (after losing the primary role: their requests' outcomes
  // are unknown, and they retry elsewhere).
  dropClients (): void {
    for (const c of this.connections) c.destroy()
  }

  // Stop accepting, stop reading, let in-flight requests finish and their replies go out.
  async close (graceMs: number): Promise<void> {
    const listener = this.listener
    const closed = listener ? new Promise<void>(resolve => listener.close(() => resolve())) : Promise.resolve()
    for (const c of this.connections) c.stopReading()
    const drained = Promise.all([...this.connections].map(c => c.drained().then(() => c.end())))
    await Promise.race([drained, new Promise(resolve => setTimeout(resolve, graceMs).unref())])
    for (const c of this.connections) c.destroy()
    await closed
  }
}
