// A server's data directory: the lock, the log, snapshots, and the policy that ties them
// together (recover on open, snapshot every N records or M bytes, then drop the covered log).

import { ChatState } from '../state.ts'
import type { LogRecord, PackedSendRecord } from '../records.ts'
import { unpackSend } from './framing.ts'
import { ChecksumRecheck, startChecksums, type ParallelChecksums, type HelperRead } from './checksums.ts'
import { SegmentLog, type Warn } from './log.ts'
import { writeSnapshot, writeSnapshotInSlices, openNewestSnapshot, removeOldSnapshots, oldSnapshots } from './snapshot.ts'
import { type FileOps, realFiles, makeDirs } from './files.ts'
import { checkFormat } from './format.ts'
import { limits } from '../limits.ts'
import type { ChatError } from '../errors.ts'

export interface StoreOptions {
  dir: string
  files?: FileOps
  warn?: Warn
  info?: Warn
  snapshotEveryRecords?: number
  snapshotEveryBytes?: number
  // ... but only once the log written since the last snapshot comes to this many percent of that
  // snapshot's size (see maybeSnapshot); default limits.snapshotGrowthPercent, 0 for no such bound
  snapshotGrowthPercent?: number
  // Write the snapshots maybeSnapshot takes a slice at a time, between other work (the server
  // does); otherwise it writes them at once (simpler to test).
  backgroundSnapshots?: boolean
  // Extend the open log segment with zeros this far ahead of its records (see log.ts); 0, the
  // default, writes plain appends.
  preallocateBytes?: number
  // Start a new log segment once the open one holds this many bytes (see log.ts); default
  // limits.logSegmentBytes.
  segmentBytes?: number
  // During recovery, read the log's segments and check their checksums on a helper thread once
  // they hold this many bytes, and read a snapshot of this many bytes there too (see
  // checksums.ts); default limits.parallelChecksumBytes.
  parallelChecksumBytes?: number
  // The helper thread's read size (see log.ts, RecoverOptions); tests make it small.
  helperReadBytes?: number
  // How long a due background snapshot spends decoding a state's deferred mailboxes before it
  // waits for a later write (see maybeSnapshot); default 2 ms, and at least one chunk.
  warmSliceMs?: number
}

export interface Recovered {
  state: ChatState
  snapshotIndex: number
  replayed: number
  truncatedBytes: number
  unapplied: LogRecord[] // records in the log after applyLimit, in order
  // How the snapshot's and the log's checksums were checked: inline, on a second thread (see
  // checksums.ts), or inline again after the second thread found damage in what had been used,
  // or could not read a file.
  checksums: 'inline' | 'parallel' | 'rechecked'
}

export class Store {
  readonly dir: string
  readonly files: FileOps
  readonly log: SegmentLog
  private readonly warn: Warn
  private readonly info: Warn
  private readonly everyRecords: number
  private readonly everyBytes: number
  private readonly growth: number // snapshotGrowthPercent / 100
  private snapshotBytes = 0 // the size of the last snapshot
  private snapshotIndex = 0
  private bytesSinceSnapshot = 0
  private retryAfterIndex = 0 // after a failed snapshot, wait a full interval before the next try
  private readonly background: boolean
  private writing: { cancelled: boolean } | null = null // a snapshot being written in slices
  private readonly warmSliceMs: number
  private readonly parallelChecksumBytes: number
  private readonly helperReadBytes: number | undefined

  constructor (opts: StoreOptions) {
    this.dir = opts.dir
    this.files = opts.files ?? realFiles
    this.warn = opts.warn ?? (() => {})
    this.info = opts.info ?? (() => {})
    this.everyRecords = opts.snapshotEveryRecords ?? limits.snapshotEveryRecords
    this.everyBytes = opts.snapshotEveryBytes ?? limits.snapshotEveryBytes
    this.growth = (opts.snapshotGrowthPercent ?? limits.snapshotGrowthPercent) / 100
    this.background = opts.backgroundSnapshots ?? false
    this.warmSliceMs = opts.warmSliceMs ?? 2
    this.parallelChecksumBytes = opts.parallelChecksumBytes ?? limits.parallelChecksumBytes
    this.helperReadBytes = opts.helperReadBytes
    makeDirs(this.dir)
    this.log = new SegmentLog(this.dir, this.files, this.warn, opts.preallocateBytes ?? 0, opts.segmentBytes)
  }

  // Load the newest snapshot and replay the log after it, applying records up to applyLimit
  // (a chain member applies only what it knows was committed) and returning the rest. Throws
  // CorruptLogError or CorruptSnapshotError when the data cannot be trusted, DataFormatError when
  // a newer version wrote it.
  recover (applyLimit = Number.MAX_SAFE_INTEGER): Recovered {
    checkFormat(this.files, this.dir)
    try {
      return this.recoverOnce(applyLimit, this.parallelChecksumBytes)
    } catch (e) {
      if (!(e instanceof ChecksumRecheck)) throw e
      // A record or chunk that failed its checksum may have been used: start over, checking inline.
      this.warn('recovering again with the checksums checked inline', { why: e.message })
      return { ...this.recoverOnce(applyLimit, undefined), checksums: 'rechecked' }
    }
  }

  private recoverOnce (applyLimit: number, parallelChecksumBytes: number | undefined): Recovered {
    const { state, parallel } = this.loadSnapshot(parallelChecksumBytes)
    let replayed = 0
    const unapplied: LogRecord[] = []
    // Sends come with their text still in the log's buffer, and most stay packed in the state
    // until first used (ChatState.replay).
    const { truncatedBytes } = this.log.recover(state.index, (r: LogRecord | PackedSendRecord) => {
      if (r.i <= applyLimit && unapplied.length === 0) {
        state.replay(r)
        replayed++
      } else unapplied.push('packed' in r ? unpackSend(r) : r)
    }, { packSends: true, parallelChecksumBytes, helperReadBytes: this.helperReadBytes })
    state.endReplay()
    this.bytesSinceSnapshot = this.log.currentSegmentBytes
    removeOldSnapshots(this.files, this.dir, this.snapshotIndex)
    return { state, snapshotIndex: this.snapshotIndex, replayed, truncatedBytes, unapplied, checksums: parallel || this.log.checksumsInParallel ? 'parallel' : 'inline' }
  }

  // The state of the newest snapshot, or an empty one; whether a helper thread read it. A snapshot
  // of parallelChecksumBytes or more is read on a helper thread (checksums.ts) while this one
  // checks and decodes its chunks right behind the reads: the read was 0.38 s of a 0.85 s start
  // from a snapshot of a million records, in a slow stretch of this machine. (The checksums stay
  // on this thread: building the state from a snapshot is quick, and the helper, with the
  // checksums too, would be the slower of the two.) Throws ChecksumRecheck if the helper cannot
  // read the file: Store.recover then starts over reading it here.
  private loadSnapshot (parallelChecksumBytes: number | undefined): { state: ChatState, parallel: boolean } {
    const started: { helper: ParallelChecksums | null } = { helper: null }
    const read = (file: string): HelperRead | null => {
      if (this.files !== realFiles || parallelChecksumBytes === undefined) return null
      started.helper = startChecksums([file], null, { atLeast: parallelChecksumBytes, readBytes: this.helperReadBytes })
      return started.helper?.take(0) ?? null
    }
    try {
      const snap = openNewestSnapshot(this.files, this.dir, true, read)
      const state = snap ? ChatState.fromSnapshotChunks(snap.chunks) : new ChatState()
      this.snapshotIndex = state.index
      this.snapshotBytes = snap?.bytes ?? 0
      return { state, parallel: started.helper !== null }
    } finally {
      started.helper?.close()
    }
  }

  // Replace everything with a snapshot received from a peer: write it durably, then start an
  // empty log after it. Returns the state it holds.
  installSnapshot (chunks: Array<Record<string, unknown>>): ChatState {
    this.cancelBackground()
    const state = ChatState.fromSnapshotChunks(chunks)
    this.snapshotBytes = writeSnapshot(this.files, this.dir, state.index, state.snapshotChunks()).bytes
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
  //
  // A state started from a snapshot may still hold mailboxes not yet decoded (state.ts,
  // Mailbox.defer), and a background snapshot's copy would decode them all at once (about a
  // second for a million messages). So while any is left, a due snapshot decodes a slice of them
  // instead and waits for a later write.
  maybeSnapshot (state: ChatState): void {
    if (this.writing) return
    if (state.index - this.snapshotIndex < this.everyRecords && this.bytesSinceSnapshot < this.everyBytes) return
    if (this.bytesSinceSnapshot < this.growth * this.snapshotBytes) return
    if (state.index < this.retryAfterIndex) return
    if (this.background && state.warmSome(this.warmSliceMs)) return
    if (this.background) this.snapshotInSlices(state)
    else this.snapshot(state)
  }

  // Take a consistent copy of the state now (snapshotChunks copies arrays, not messages: a few
  // milliseconds for a million messages), start a new log segment, then make, encode and write
  // the chunks a slice at a time while the server goes on. Once the snapshot is in place, the
  // segments it covers are deleted.
  private snapshotInSlices (state: ChatState): void {
    if (state.index === this.snapshotIndex) return
    const index = state.index
    const started = Date.now()
    let chunks: Iterable<object>
    try {
      chunks = state.snapshotChunks()
      this.log.roll()
    } catch (e) {
      this.failed(index, e)
      return
    }
    this.bytesSinceSnapshot = 0
    const run = { cancelled: false }
    this.writing = run
    writeSnapshotInSlices(this.files, this.dir, index, chunks, () => run.cancelled, (err, file, bytes) => {
      if (this.writing === run) this.writing = null
      if (run.cancelled) return
      if (err) {
        this.failed(index, err)
        return
      }
      if (index <= this.snapshotIndex) return
      this.snapshotIndex = index
      this.snapshotBytes = bytes
      this.deleteCovered(run, index, file, started)
    })
  }

  // The background snapshot at `index` (file) is in place: delete the log segments and the older
  // snapshots it covers off the event loop (deleting a file of tens of megabytes took 12 ms here),
  // then say so. No next snapshot starts until they are gone. A file left by a crash meanwhile is
  // covered by the snapshot: recovery skips it, and the next snapshot deletes it.
  private deleteCovered (run: { cancelled: boolean }, index: number, file: string, started: number): void {
    let covered: string[]
    try {
      const snapshots = oldSnapshots(this.files, this.dir, index) // first: it may throw, log.dropCovered does not
      covered = [...this.log.dropCovered(index), ...snapshots]
    } catch (e) {
      this.warn('removing what the snapshot covers failed; the next snapshot retries', { error: String(e) })
      return
    }
    this.writing = run
    let left = covered.length + 1
    let failure: unknown = null
    const one = (err: NodeJS.ErrnoException | null): void => {
      if (err !== null && err.code !== 'ENOENT') failure ??= err
      if (--left > 0) return
      if (this.writing === run) this.writing = null
      if (failure !== null) this.warn('removing what the snapshot covers failed; a later snapshot removes what is left, or the first after a restart', { error: String(failure) })
      else this.info('snapshot written', { file, index, ms: Date.now() - started, segmentsRemoved: covered.filter(f => f.endsWith('.wal')).length })
    }
    for (const f of covered) this.files.unlink(f, one)
    one(null)
  }

  // The same at once, for a snapshot written at once (snapshot). Throws what the deletions throw.
  private deleteCoveredNow (index: number, file: string, started: number): void {
    const segments = this.log.compact(index)
    removeOldSnapshots(this.files, this.dir, index)
    this.info('snapshot written', { file, index, ms: Date.now() - started, segmentsRemoved: segments })
  }

  private failed (index: number, e: unknown): void {
    this.retryAfterIndex = index + this.everyRecords
    this.warn('snapshot failed; the log still holds everything', { error: String(e) })
  }

  private cancelBackground (): void {
    if (this.writing) this.writing.cancelled = true
    this.writing = null
  }

  snapshot (state: ChatState): void {
    if (state.index === this.snapshotIndex) return
    this.cancelBackground()
    const started = Date.now()
    try {
      const { file, bytes } = writeSnapshot(this.files, this.dir, state.index, state.snapshotChunks())
      this.snapshotIndex = state.index
      this.snapshotBytes = bytes
      this.log.roll()
      this.bytesSinceSnapshot = 0
      this.deleteCoveredNow(state.index, file, started)
    } catch (e) {
      this.failed(state.index, e)
    }
  }

  close (): void {
    this.cancelBackground()
    this.log.close()
  }
}
