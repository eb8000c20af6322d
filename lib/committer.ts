// The write path of the server that leads (a single server, or the primary of a chain). It
// stamps each mutation with its index, epoch and time, hands it to the replicator, and once the
// replicator reports it persisted downstream, makes it durable locally, applies it and settles
// the caller's promise (protocol.md, "Durability").
//
// Group commit and pipelining: everything submitted during one turn of the event loop is
// forwarded as one batch on the next; batches are forwarded without waiting for earlier ones to
// be acknowledged; and when acknowledgements arrive, every record they cover is written with one
// write and one fdatasync. The fdatasync of a batch runs off the event loop, one at a time:
// while it runs, requests keep being read, stamped and forwarded, and the records acknowledged
// meanwhile make up the next write. A lone record is synced on the loop (see flush).

import { encodeRecordFrame } from './storage/framing.ts'
import type { Store } from './storage/store.ts'
import type { ChatState, Applied } from './state.ts'
import type { LogRecord, RecordBody } from './records.ts'
import { errors, ChatError } from './errors.ts'
import { crashPoint } from './fault-hooks.ts'

export interface Batch {
  records: LogRecord[]
  lastIndex: number
}

// Sends batches down the chain and calls committer.acked(index) once every live successor has
// persisted the records up to index. A single server acknowledges at once.
export interface Replicator {
  forward: (batch: Batch) => void
}

export type AppliedHook = (record: LogRecord, applied: Applied) => void

interface Entry {
  record: LogRecord
  frame: Buffer | null // null: already durable here (a new primary's inherited records)
  resolve: (a: Applied) => void
  reject: (e: Error) => void
  rk: string | undefined // its exactly-once key, while it runs
}

const noop = (): void => {}

export class Committer {
  private queue: Entry[] = [] // stamped, not yet forwarded
  private awaiting: Entry[] = [] // forwarded, waiting for the chain's acknowledgement
  private ready: Entry[] = [] // acknowledged by the chain, waiting for the local write in flight
  private flushing: Entry[] | null = null // written here, fdatasync in flight
  private flushScheduled = false
  private recentBatch = 1 // records per local write: a moving average, each write weighing a quarter
  private syncedThisTurn = false // a lone record was written at once in this turn of the loop
  private assigned: number // highest index stamped so far
  private lastTs: number
  private readonly inflightRids = new Map<string, Promise<Applied>>()
  private idleWaiters: Array<() => void> = []
  private failure: ChatError | null = null
  // A single server's replicator acknowledges at once. While an fdatasync runs, a record joins
  // the next write at once; otherwise it waits for the end of this turn of the event loop, so
  // the requests read in one turn share a write.
  private readonly local: Replicator = { forward: (b) => this.acked(b.lastIndex) }
  replicator: Replicator = this.local
  quotaBytes = Infinity // see submit
  mailboxQuotaBytes = Infinity // the same, for one mailbox

  // inherited: records this server holds durably beyond its applied state (a new primary's
  // uncommitted tail). They are committed down the chain before anything new.
  constructor (
    private readonly store: Store,
    private readonly state: ChatState,
    private readonly epoch: number,
    private readonly onApplied: AppliedHook,
    private readonly onStorageFailure: (e: ChatError) => void = noop,
    inherited: LogRecord[] = []
  ) {
    this.assigned = state.index + inherited.length
    this.lastTs = state.lastTs
    for (const r of inherited) if (r.ts > this.lastTs) this.lastTs = r.ts
    for (const record of inherited) this.awaiting.push({ record, frame: null, resolve: noop, reject: noop, rk: undefined })
  }

  // Index of the last record handed out; the chain's source of truth for resends.
  get lastAssigned (): number { return this.assigned }

  // True once the inherited records are committed and applied.
  get caughtUp (): boolean { return this.awaiting.length === 0 || this.awaiting[0].frame !== null }

  // Records not yet durable here, from index `from` on (forwarded, inherited, or acknowledged
  // and being written), in index order, for resending to a new successor.
  pendingFrom (from: number): LogRecord[] {
    const out: LogRecord[] = []
    for (const list of [this.flushing ?? [], this.ready, this.awaiting]) {
      for (const e of list) if (e.record.i >= from) out.push(e.record)
    }
    return out
  }

  // Submit a mutation. Resolves once it is durable here and on every live successor, and
  // applied. Rejects with STORAGE_ERROR or UNAVAILABLE when it was not applied (or, after a
  // step-down, when the outcome is unknown: the client retries with the same rid).
  // A body whose exactly-once key was already applied resolves with the stored reply.
  // The body becomes the record (stamped with its index, epoch and time): the caller hands over
  // a fresh object and keeps no reference to it.
  submit (body: RecordBody): Promise<Applied> {
    if (body.rk !== undefined) {
      const stored = this.state.ridReply(body.rk)
      if (stored) return Promise.resolve({ reply: stored, effects: {}, replayed: true })
      const running = this.inflightRids.get(body.rk)
      if (running) return running
    }
    if (this.failure) return Promise.reject(this.failure)
    // The quotas: what would add an account or a message is refused once the state holds as much
    // as it allows, and a message once its recipient's mailbox does. Checked against what is
    // applied, so they may be passed by what is in flight.
    if ((body.op === 'send' || body.op === 'register') && this.state.storedBytes >= this.quotaBytes) return Promise.reject(errors.storeFull(this.quotaBytes))
    if (body.op === 'send') {
      const to = this.state.account(body.to)
      if (to !== undefined && to.bytes >= this.mailboxQuotaBytes) return Promise.reject(errors.mailboxFull(to.name, this.mailboxQuotaBytes))
    }
    this.lastTs = Math.max(this.lastTs, Date.now())
    // Stamped in place, not copied: a copy by object spread with the stamps after it ran into a
    // slow path of V8 (about 2 us, a tenth of the whole request's CPU time).
    const record = body as LogRecord
    record.i = this.assigned + 1
    record.e = this.epoch
    record.ts = this.lastTs
    let frame: Buffer
    try {
      frame = encodeRecordFrame(record)
    } catch (e) {
      return Promise.reject(errors.internal(e))
    }
    this.assigned++
    const rk = body.rk
    let entry: Entry | undefined
    const p = new Promise<Applied>((resolve, reject) => { entry = { record, frame, resolve, reject, rk } })
    this.queue.push(entry!)
    if (rk !== undefined) this.inflightRids.set(rk, p)
    if (this.replicator !== this.local) this.scheduleForward()
    else if (this.flushing !== null) this.forwardQueued() // joins the next write
    else if (this.recentBatch < 1.5 && !this.syncedThisTurn && !this.flushScheduled) {
      // Light load: the last few writes were lone records, so this one is likely alone too.
      // Write it at once instead of a turn of the event loop later, but only one such write per
      // turn: others read in the same turn are batched as usual. An average, not just the last
      // write: under load a batch of one now and then is no sign of light load, and syncing the
      // write after it on the loop would hold up every other client for an fdatasync (at 64
      // clients, about 5% of the event loop's time, and 3-4% of the throughput).
      this.syncedThisTurn = true
      setImmediate(this.endTurn)
      this.forwardQueued()
    } else this.scheduleForward()
    return p
  }

  private readonly endTurn = (): void => { this.syncedThisTurn = false }

  private scheduleForward (): void {
    if (this.flushScheduled) return
    this.flushScheduled = true
    setImmediate(this.forwardScheduled)
  }

  private readonly forwardScheduled = (): void => this.forwardQueued()

  // Resolves when nothing is queued or awaiting acknowledgement.
  idle (): Promise<void> {
    if (this.isIdle()) return Promise.resolve()
    return new Promise(resolve => this.idleWaiters.push(resolve))
  }

  private forwardQueued (): void {
    this.flushScheduled = false
    if (this.queue.length === 0) return
    const entries = this.queue
    this.queue = []
    this.awaiting.push(...entries)
    this.replicator.forward({ records: entries.map(e => e.record), lastIndex: entries[entries.length - 1].record.i })
  }

  // The chain has persisted every record up to `index`: write them here, apply, answer.
  acked (index: number): void {
    let n = 0
    while (n < this.awaiting.length && this.awaiting[n].record.i <= index) n++
    if (n === 0 || this.failure) return
    const entries = this.awaiting.splice(0, n)
    if (this.ready.length === 0) this.ready = entries
    else for (const x of entries) this.ready.push(x)
    if (this.flushing === null) this.flush()
  }

  // Write everything ready with one write, and settle it once its fdatasync is done. A lone
  // record is synced on the event loop: nothing else is waiting to be written, and handing the
  // fdatasync to the thread pool and back costs more than it saves (about 50 us of a 200 us
  // write here). Requests that arrive meanwhile wait in the socket and make up the next write.
  private flush (): void {
    const entries = this.ready
    this.ready = []
    const frames: Buffer[] = []
    for (const x of entries) if (x.frame !== null) frames.push(x.frame)
    if (frames.length === 0) { // inherited records only: durable here already
      this.settle(entries)
      return
    }
    this.recentBatch = 0.75 * this.recentBatch + 0.25 * frames.length
    const batch = { frames: frames.length === 1 ? frames[0] : Buffer.concat(frames), lastIndex: entries[entries.length - 1].record.i }
    try {
      if (frames.length > 1) {
        this.store.appendAsync(batch, err => this.flushed(entries, err))
        this.flushing = entries
        return
      }
      this.store.append(batch)
    } catch (e) {
      const err = e instanceof ChatError ? e : errors.storage(e)
      if (this.store.log.failed === null) {
        // A failed write (a full disk) that the log cut back off: nothing from here on was
        // applied, so the indexes can be handed out again and later writes may succeed.
        const later = [...entries, ...this.awaiting.splice(0), ...this.queue.splice(0)]
        this.assigned = this.store.log.lastIndex
        for (const x of later) this.reject(x, err)
        this.checkIdle()
      } else this.abandon(err, entries)
      this.onStorageFailure(err)
      return
    }
    this.settle(entries)
  }

  private flushed (entries: Entry[], err: ChatError | null): void {
    if (this.flushing !== entries) return // abandoned meanwhile: these were rejected already
    this.flushing = null
    if (err !== null) {
      this.abandon(err, entries)
      this.onStorageFailure(err)
      return
    }
    this.settle(entries)
    if (this.ready.length > 0 && this.failure === null) this.flush()
  }

  // Apply durable records in order and answer their callers.
  private settle (entries: Entry[]): void {
    crashPoint('before-reply')
    for (const x of entries) {
      const applied = this.state.apply(x.record)
      this.onApplied(x.record, applied)
      if (x.rk !== undefined) this.inflightRids.delete(x.rk)
      x.resolve(applied)
    }
    this.store.maybeSnapshot(this.state)
    this.checkIdle()
  }

  // Fail everything not yet applied: after a storage failure, or when this server stops leading.
  abandon (err: ChatError, alsoThese: Entry[] = []): void {
    this.failure = err
    const all = [...alsoThese, ...(this.flushing ?? []), ...this.ready, ...this.awaiting, ...this.queue]
    this.flushing = null
    this.ready = []
    this.awaiting = []
    this.queue = []
    for (const x of all) this.reject(x, err)
    this.checkIdle()
  }

  private reject (x: Entry, err: Error): void {
    if (x.rk !== undefined) this.inflightRids.delete(x.rk)
    x.reject(err)
  }

  private isIdle (): boolean {
    return this.queue.length === 0 && this.awaiting.length === 0 && this.ready.length === 0 && this.flushing === null
  }

  private checkIdle (): void {
    if (!this.isIdle()) return
    const waiters = this.idleWaiters
    this.idleWaiters = []
    for (const w of waiters) w()
  }
}
