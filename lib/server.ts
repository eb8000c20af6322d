// Client connections over node:net (protocol.md, "Transport"). Each connection is split into
// lines by split2 with a size bound, parsed, and handed to the dispatcher. Replies go out in the
// order requests came in. Backpressure: reading pauses while too many requests of a connection
// are unanswered or while the socket cannot take more output, and a client that lets its
// output pile up past a bound is disconnected. What piles up waits in the heap, so there is a
// bound on all connections together too: past it, the clients that have not taken their output
// for the longest are disconnected (without it, 30 clients asking for big histories and never
// reading aborted a server with a 112 MiB heap limit). The same goes for unfinished lines, which
// split2 holds until their newline comes: each is bounded by the line limit, and all together by
// another bound, past which the clients with the longest ones are disconnected.

import net from 'node:net'
import type { Duplex } from 'node:stream'
import split2 from 'split2'
import { errors } from './errors.ts'
import { parseRequest, RequestParseError, encodeReply, encodeError, type Request, type RequestId } from './protocol.ts'
import type { Dispatcher, Session } from './dispatcher.ts'

export interface ConnectionOptions {
  lineBytesMax: number
  inflightMax: number
  outboundBytesMax: number
  outboundBytesTotalMax?: number // over every connection (default: no such bound)
  partialBytesTotalMax?: number // unfinished lines, over every connection (default: no such bound)
}

// Bytes all the connections of one server hold in this process, with what to do once they pass
// their bound. For output: what was written and is still waiting (not yet taken by the kernel),
// each connection's writableLength as it last saw it. A part is brought up to date by the
// connection's next write, 'drain' or close; until then it may still count what one write left
// waiting and the kernel took since (no event says so). For input: the unfinished lines.
interface Held {
  bytes: number
  max: number // the bound (Infinity: none)
  over: () => void // called when bytes passes it
}

// Move a connection's part of `held` from `was` to `now`; returns `now`, its new part.
function move (held: Held, was: number, now: number): number {
  held.bytes += now - was
  return now
}

let nextSessionId = 1

// A request read from a connection, from the moment it is read until its reply is written.
interface Pending {
  id: RequestId | undefined
  req: Request | null // null: it failed to parse, and `reply` holds its error line already
  reply: string | null // the encoded reply, once there is one
}

class Connection implements Session {
  readonly id = nextSessionId++
  user: string | null = null
  failedLogins = 0
  private readonly lines: ReturnType<typeof split2>
  // Requests in the order they were read, from the oldest whose reply is not yet written. Replies
  // are written in this order. Requests start in this order too: a pipelined one once no
  // non-pipelined one is ahead of it, a non-pipelined one once everything before it is answered.
  private readonly pending: Pending[] = []
  private head = 0 // index in `pending` of the oldest request not yet answered
  private started = 0 // index in `pending` of the first request not yet started
  private exclusive = false // a non-pipelined request is running
  private drainWaiters: Array<() => void> = []
  private endLine: string | null = null // written, and the connection ended, once all is answered
  private blockedOnDrain = false
  blockedSince = 0 // when the socket last stopped taking output (0: it takes it)
  private queued = 0 // this connection's part of held.outbound.bytes
  partial = 0 // bytes read after the last newline: its part of held.partial.bytes
  private closed = false // no more requests are read
  private gone = false // the connection itself is closed

  constructor (private readonly stream: Duplex, private readonly dispatcher: Dispatcher, private readonly opts: ConnectionOptions, private readonly held: { outbound: Held, partial: Held }, private readonly onClose: (c: Connection) => void) {
    // split2 bounds the unterminated remainder; complete lines are checked in onLine.
    this.lines = split2(/\r?\n/, { maxLength: opts.lineBytesMax })
    stream.on('data', (chunk: Buffer | string) => this.received(chunk))
    stream.pipe(this.lines)
    this.lines.on('data', (line: string) => this.onLine(line))
    this.lines.on('error', () => this.tooLong())
    stream.on('drain', () => {
      this.blockedOnDrain = false
      this.blockedSince = 0
      this.track()
      this.updateFlow()
    })
    stream.on('error', () => { /* 'close' follows */ })
    stream.on('close', () => {
      this.closed = true
      this.gone = true
      this.letGo()
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
    let p: Pending
    try {
      const req = parseRequest(line)
      p = { id: req.id, req, reply: null }
    } catch (e) {
      const err = e instanceof RequestParseError ? e : new RequestParseError(errors.internal(e), undefined)
      p = { id: err.id, req: null, reply: encodeError(err.id, err.error) }
    }
    this.pending.push(p)
    this.updateFlow()
    this.startReady()
    if (p.reply !== null) this.writeAnswered()
  }

  // Start the requests that may start now, in order.
  private startReady (): void {
    while (this.started < this.pending.length && !this.exclusive) {
      const p = this.pending[this.started]
      if (p.req === null) { // answered already
        this.started++
        continue
      }
      const pipelined = this.dispatcher.isPipelined(p.req.op, this)
      if (!pipelined && this.started > this.head) return // wait for everything before it
      this.started++
      if (!pipelined) this.exclusive = true
      this.run(p, pipelined)
    }
  }

  private run (p: Pending, pipelined: boolean): void {
    const req = p.req!
    p.req = null
    // A request still queued when its connection closes is not run: its reply could not be
    // delivered, and it would run without the session it was sent in (a rid filed under the
    // wrong user, a login for a connection that is gone). Its client retries with the same rid.
    if (this.gone) {
      p.reply = encodeError(req.id, errors.shuttingDown())
      if (!pipelined) this.exclusive = false
      this.writeAnswered()
      return
    }
    this.dispatcher.handle(this, req).then(reply => {
      p.reply = encodeReply(req.id, reply)
      if (!pipelined) this.exclusive = false
      this.writeAnswered()
      this.startReady()
    })
  }

  // Write the replies that are next in order, then see whether more requests may be read.
  private writeAnswered (): void {
    let k = this.head
    while (k < this.pending.length && this.pending[k].reply !== null) this.write(this.pending[k++].reply!)
    if (k === this.head) return
    if (k === this.pending.length) {
      this.pending.length = 0
      this.head = 0
      this.started = 0
      this.allAnswered()
    } else {
      this.head = k
      if (k >= 1024 && k * 2 >= this.pending.length) { // drop the answered prefix now and then
        this.pending.splice(0, k)
        this.started = Math.max(0, this.started - k) // what it passes is answered already
        this.head = 0
      }
    }
    this.updateFlow()
  }

  private allAnswered (): void {
    if (this.endLine !== null) {
      this.stream.end(this.endLine)
      this.endLine = null
    }
    const waiters = this.drainWaiters
    this.drainWaiters = []
    for (const w of waiters) w()
  }

  private tooLong (): void {
    if (this.closed) return
    this.closed = true
    this.stream.unpipe(this.lines)
    this.lines.destroy()
    this.stream.pause()
    this.partial = move(this.held.partial, this.partial, 0) // split2 let it go
    // Earlier requests still get their replies, then the error, then the connection ends.
    this.endLine = encodeError(undefined, errors.lineTooLong(this.opts.lineBytesMax))
    if (this.head === this.pending.length) this.allAnswered()
  }

  // Write a reply or event. Returns false if the connection is gone or was cut for being slow.
  private write (text: string, cb?: (err?: Error | null) => void): void {
    if (this.stream.destroyed || !this.stream.writable) {
      if (cb) cb(new Error('connection closed'))
      return
    }
    // Behind output still waiting, a reply would wait as a string in the heap, with two bytes a
    // character if any is beyond Latin-1, and count as one a character: it waits as its UTF-8
    // bytes instead, outside the heap. (Written at once, a string goes to the kernel, and what
    // the kernel does not take is kept outside the heap as UTF-8 by Node.)
    const chunk = this.stream.writableLength > 0 ? Buffer.from(text, 'utf8') : text
    if (!this.stream.write(chunk, cb) && !this.blockedOnDrain) {
      this.blockedOnDrain = true
      this.blockedSince = performance.now()
    }
    this.track()
    if (this.stream.writableLength > this.opts.outboundBytesMax) {
      // The client is not reading: rather than buffer without bound, let it go.
      this.cut()
    } else if (this.held.outbound.bytes > this.held.outbound.max) this.held.outbound.over()
  }

  private track (): void {
    this.queued = move(this.held.outbound, this.queued, this.stream.writableLength)
  }

  // A chunk read: what follows its last newline is (the start of) an unfinished line.
  private received (chunk: Buffer | string): void {
    let now: number
    if (typeof chunk === 'string') {
      const nl = chunk.lastIndexOf('\n')
      now = (nl < 0 ? this.partial : 0) + Buffer.byteLength(nl < 0 ? chunk : chunk.slice(nl + 1))
    } else {
      const nl = chunk.lastIndexOf(10)
      now = nl < 0 ? this.partial + chunk.length : chunk.length - nl - 1
    }
    if (this.closed) now = 0 // nothing is kept once a line was too long
    this.partial = move(this.held.partial, this.partial, now)
    if (now > 0 && this.held.partial.bytes > this.held.partial.max) this.held.partial.over()
  }

  // Give back this connection's parts of what all connections hold.
  private letGo (): void {
    this.queued = move(this.held.outbound, this.queued, 0)
    this.partial = move(this.held.partial, this.partial, 0)
  }

  // Disconnect, and let go of what it held at once.
  cut (): void {
    this.letGo()
    this.stream.destroy()
  }

  pushEvent (line: string, taken: (err?: Error | null) => void): void {
    this.write(line, taken)
  }

  private updateFlow (): void {
    if (this.closed) return
    if (this.blockedOnDrain || this.pending.length - this.head >= this.opts.inflightMax) this.lines.pause()
    else this.lines.resume()
  }

  // Stop reading new requests (shutdown); replies to earlier ones still go out.
  stopReading (): void {
    this.stream.unpipe(this.lines)
    this.stream.pause()
  }

  // Resolves when every reply to a request read so far has been written.
  drained (): Promise<void> {
    if (this.head === this.pending.length) return Promise.resolve()
    return new Promise(resolve => this.drainWaiters.push(resolve))
  }

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
  private readonly held: { outbound: Held, partial: Held }

  constructor (private readonly dispatcher: Dispatcher, private readonly opts: ConnectionOptions, private readonly warn: (msg: string, fields: Record<string, unknown>) => void = () => {}) {
    this.held = {
      outbound: this.bound(opts.outboundBytesTotalMax, 'output waiting for slow clients passed its bound; the ones waiting longest were disconnected',
        () => [...this.connections].filter(c => c.blockedSince > 0).sort((a, b) => a.blockedSince - b.blockedSince)),
      partial: this.bound(opts.partialBytesTotalMax, 'unfinished lines passed their bound; the clients with the longest were disconnected',
        () => [...this.connections].filter(c => c.partial > 0).sort((a, b) => b.partial - a.partial))
    }
  }

  // A bound on what all connections hold. Once it is passed, the clients `first` lists are
  // disconnected in that order until it is back under three quarters of the bound, with
  // `warning`. At most one look every 100 ms: while clients are cut, `over` is called on every
  // write (or read).
  private bound (max = Infinity, warning: string, first: () => Connection[]): Held {
    let lastLook = -Infinity
    let total = 0
    const held: Held = {
      bytes: 0,
      max,
      over: () => {
        const now = performance.now()
        if (now - lastLook < 100) return
        lastLook = now
        let cut = 0
        for (const c of first()) {
          if (held.bytes <= 0.75 * max) break
          c.cut()
          cut++
        }
        if (cut === 0) return
        total += cut
        this.warn(warning, { disconnected: cut, total, bytes: held.bytes, max })
      }
    }
    return held
  }

  // Take over a listening server: close() will stop it.
  adopt (listener: net.Server): void {
    this.listener = listener
  }

  // Serve one client stream: a socket, or any Duplex (tests use in-memory pairs).
  handle (stream: Duplex): void {
    const c = new Connection(stream, this.dispatcher, this.opts, this.held, conn => {
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
