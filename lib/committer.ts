// The write path of a server that leads (a single server, or the primary of a chain): it stamps
// each mutation with its index, epoch and time, makes it durable, applies it to the state and
// only then settles the caller's promise. Concurrent submissions share one write and one
// fdatasync (group commit): everything submitted during one turn of the event loop is flushed
// together on the next.
//
// Before the local write, `replicate` is awaited for the batch: for a single server it returns
// at once; for a chain primary it resolves once every live successor has persisted the batch
// (protocol.md, "Durability and replication").

import assert from 'node:assert/strict'
import { encodeFrame } from './storage/framing.ts'
import type { Store } from './storage/store.ts'
import type { ChatState, Applied } from './state.ts'
import type { LogRecord, RecordBody } from './records.ts'
import { errors, ChatError } from './errors.ts'

export interface Batch {
  records: LogRecord[]
  frames: Buffer // the records' frames, concatenated, exactly as written to disk
  lastIndex: number
}

export type Replicate = (batch: Batch) => Promise<void>
export type AppliedHook = (record: LogRecord, applied: Applied) => void

interface Entry {
  record: LogRecord
  frame: Buffer
  resolve: (a: Applied) => void
  reject: (e: Error) => void
}

export class Committer {
  private queue: Entry[] = []
  private flushScheduled = false
  private assigned: number // highest index stamped so far
  private lastTs: number
  private readonly inflightRids = new Map<string, Promise<Applied>>()
  private flushing: Promise<void> = Promise.resolve()
  private inflight = 0
  private idleWaiters: Array<() => void> = []
  epoch = 0

  constructor (
    private readonly store: Store,
    private readonly state: ChatState,
    private readonly onApplied: AppliedHook,
    private readonly replicate: Replicate = async () => {}
  ) {
    assert.equal(store.log.lastIndex, state.index, 'a leader starts with everything it logged applied')
    this.assigned = state.index
    this.lastTs = state.lastTs
  }

  // Submit a mutation. Resolves once it is durable (here and, in a chain, downstream) and applied;
  // rejects with STORAGE_ERROR (or UNAVAILABLE from replication) when nothing was applied.
  // A body with an exactly-once key that was already applied resolves with the stored reply.
  submit (body: RecordBody): Promise<Applied> {
    if (body.rk !== undefined) {
      const stored = this.state.ridReply(body.rk)
      if (stored) return Promise.resolve({ reply: stored, effects: {}, replayed: true })
      const running = this.inflightRids.get(body.rk)
      if (running) return running
    }
    const failed = this.store.log.failed
    if (failed) return Promise.reject(failed)
    const now = Date.now()
    this.lastTs = Math.max(this.lastTs, now)
    const record = { ...body, i: ++this.assigned, e: this.epoch, ts: this.lastTs } as LogRecord
    let frame: Buffer
    try {
      frame = encodeFrame(record)
    } catch (e) {
      this.assigned--
      return Promise.reject(errors.internal(e))
    }
    this.inflight++
    const p = new Promise<Applied>((resolve, reject) => {
      this.queue.push({ record, frame, resolve, reject })
    })
    if (body.rk !== undefined) {
      const rk = body.rk
      this.inflightRids.set(rk, p)
      const forget = (): void => { this.inflightRids.delete(rk) }
      p.then(forget, forget)
    }
    if (!this.flushScheduled) {
      this.flushScheduled = true
      setImmediate(() => { this.flushing = this.flushing.then(() => this.flush()) })
    }
    return p
  }

  // Resolves when nothing is queued or being written.
  idle (): Promise<void> {
    if (this.inflight === 0) return Promise.resolve()
    return new Promise(resolve => this.idleWaiters.push(resolve))
  }

  private async flush (): Promise<void> {
    this.flushScheduled = false
    const entries = this.queue
    this.queue = []
    if (entries.length === 0) return
    const batch: Batch = {
      records: entries.map(e => e.record),
      frames: entries.length === 1 ? entries[0].frame : Buffer.concat(entries.map(e => e.frame)),
      lastIndex: entries[entries.length - 1].record.i
    }
    try {
      await this.replicate(batch)
      this.store.append(batch)
    } catch (e) {
      // Nothing in this batch was applied, and nothing after it has been written: every record
      // stamped after it is in this.queue and fails too, so the index can be handed out again.
      const err = e instanceof ChatError ? e : errors.storage(e)
      const later = this.queue
      this.queue = []
      this.assigned = this.store.log.lastIndex
      for (const x of [...entries, ...later]) x.reject(err)
      this.settled(entries.length + later.length)
      return
    }
    for (const x of entries) {
      const applied = this.state.apply(x.record)
      this.onApplied(x.record, applied)
      x.resolve(applied)
    }
    this.settled(entries.length)
    this.store.maybeSnapshot(this.state)
  }

  private settled (n: number): void {
    this.inflight -= n
    if (this.inflight === 0) {
      const waiters = this.idleWaiters
      this.idleWaiters = []
      for (const w of waiters) w()
    }
  }
}
