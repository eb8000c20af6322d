// A server's data directory: the lock, the log, snapshots, and the policy that ties them
// together (recover on open, snapshot every N records or M bytes, then drop the covered log).

import fs from 'node:fs'
import { ChatState } from '../state.ts'
import type { LogRecord } from '../records.ts'
import { SegmentLog, type Warn } from './log.ts'
import { writeSnapshot, openNewestSnapshot, removeOldSnapshots } from './snapshot.ts'
import { type FileOps, realFiles } from './files.ts'
import { limits } from '../limits.ts'
import type { ChatError } from '../errors.ts'

export interface StoreOptions {
  dir: string
  files?: FileOps
  warn?: Warn
  info?: Warn
  snapshotEveryRecords?: number
  snapshotEveryBytes?: number
}

export interface Recovered {
  state: ChatState
  snapshotIndex: number
  replayed: number
  truncatedBytes: number
  unapplied: LogRecord[] // records in the log after applyLimit, in order
}

export class Store {
  readonly dir: string
  readonly files: FileOps
  readonly log: SegmentLog
  private readonly warn: Warn
  private readonly info: Warn
  private readonly everyRecords: number
  private readonly everyBytes: number
  private snapshotIndex = 0
  private bytesSinceSnapshot = 0
  private retryAfterIndex = 0 // after a failed snapshot, wait a full interval before the next try

  constructor (opts: StoreOptions) {
    this.dir = opts.dir
    this.files = opts.files ?? realFiles
    this.warn = opts.warn ?? (() => {})
    this.info = opts.info ?? (() => {})
    this.everyRecords = opts.snapshotEveryRecords ?? limits.snapshotEveryRecords
    this.everyBytes = opts.snapshotEveryBytes ?? limits.snapshotEveryBytes
    fs.mkdirSync(this.dir, { recursive: true })
    this.log = new SegmentLog(this.dir, this.files, this.warn)
  }

  // Load the newest snapshot and replay the log after it, applying records up to applyLimit
  // (a chain member applies only what it knows was committed) and returning the rest. Throws
  // CorruptLogError or CorruptSnapshotError when the data cannot be trusted.
  recover (applyLimit = Number.MAX_SAFE_INTEGER): Recovered {
    const snap = openNewestSnapshot(this.files, this.dir)
    const state = snap ? ChatState.fromSnapshotChunks(snap.chunks) : new ChatState()
    this.snapshotIndex = state.index
    let replayed = 0
    const unapplied: LogRecord[] = []
    const { truncatedBytes } = this.log.recover(state.index, (r: LogRecord) => {
      if (r.i <= applyLimit && unapplied.length === 0) {
        state.apply(r)
        replayed++
      } else unapplied.push(r)
    })
    this.bytesSinceSnapshot = this.log.currentSegmentBytes
    removeOldSnapshots(this.files, this.dir, this.snapshotIndex)
    return { state, snapshotIndex: this.snapshotIndex, replayed, truncatedBytes, unapplied }
  }

  // Replace everything with a snapshot received from a peer: write it durably, then start an
  // empty log after it. Returns the state it holds.
  installSnapshot (chunks: Array<Record<string, unknown>>): ChatState {
    const state = ChatState.fromSnapshotChunks(chunks)
    writeSnapshot(this.files, this.dir, state.index, state.snapshotChunks())
    this.snapshotIndex = state.index
    this.log.resetTo(state.index)
    this.bytesSinceSnapshot = 0
    removeOldSnapshots(this.files, this.dir, state.index)
    return state
  }

  get snapshotAt (): number { return this.snapshotIndex }

  // Durably append a batch of encoded records (see SegmentLog.append).
  append (batch: { frames: Buffer, lastIndex: number }): void {
    this.log.append(batch.frames, batch.lastIndex)
    this.bytesSinceSnapshot += batch.frames.length
  }

  // The same, with the fdatasync off the event loop (see SegmentLog.appendAsync).
  appendAsync (batch: { frames: Buffer, lastIndex: number }, done: (err: ChatError | null) => void): void {
    this.log.appendAsync(batch.frames, batch.lastIndex, done)
    this.bytesSinceSnapshot += batch.frames.length
  }

  // Take a snapshot if enough has been written since the last one. The state must be at or
  // behind the log's end. Snapshot failures are logged and retried later: the log still holds
  // everything, so no data is at risk.
  maybeSnapshot (state: ChatState): void {
    if (state.index - this.snapshotIndex < this.everyRecords && this.bytesSinceSnapshot < this.everyBytes) return
    if (state.index < this.retryAfterIndex) return
    this.snapshot(state)
  }

  snapshot (state: ChatState): void {
    if (state.index === this.snapshotIndex) return
    const started = Date.now()
    try {
      const file = writeSnapshot(this.files, this.dir, state.index, state.snapshotChunks())
      this.snapshotIndex = state.index
      this.log.roll()
      this.bytesSinceSnapshot = 0
      const segments = this.log.compact(state.index)
      removeOldSnapshots(this.files, this.dir, state.index)
      this.info('snapshot written', { file, index: state.index, ms: Date.now() - started, segmentsRemoved: segments })
    } catch (e) {
      this.retryAfterIndex = state.index + this.everyRecords
      this.warn('snapshot failed; the log still holds everything', { error: String(e) })
    }
  }

  close (): void {
    this.log.close()
  }
}
