// The append-only log, kept as segment files in the data directory.
//
//   log-<first index, 20 digits>.wal   a run of frames (see framing.ts), one record each,
//                                      with indexes increasing by exactly one
//
// A new segment starts when a snapshot is taken, so that whole segments the snapshot covers can
// be deleted and disk use stays bounded, and when the open segment has reached segmentBytes
// (64 MiB in the server), so that no segment outgrows what recovery reads into memory at once:
// with snapshots rare or failing, one segment would otherwise grow past the 2 GiB a single read
// can return, and the log could not be read back. Appends are made durable with fdatasync before
// append() returns, or before appendAsync() calls back; the caller batches records so many
// writes share one fsync (group commit).
//
// Preallocation (optional, on in the server): the open segment is extended with zeros ahead of
// the records, a megabyte at a time, and records are written over the zeros. An fdatasync then
// has only data to flush; appending to the end of a file makes every fdatasync also commit the
// file's new size and blocks to the file system's journal, which on ext4 costs about half as
// much again. A run of zeros where the next frame would start is therefore the end of the
// records, not damage: a frame never starts with a zero length. The open segment is trimmed
// back to its records when the log rolls to a new one.
//
// Recovery reads every segment in order. A frame that is cut short or damaged at the very end of
// the last segment is a torn write from a crash: it is truncated with a warning. A damaged frame
// with a valid frame anywhere after it is corruption, and recovery refuses, naming file and offset.

import path from 'node:path'
import { decodeFrame, validFrameAfter, type FrameResult } from './framing.ts'
import { type FileOps, realFiles, writeAll, fsyncDir } from './files.ts'
import { errors, ChatError } from '../errors.ts'
import { limits } from '../limits.ts'
import type { LogRecord, PackedSendRecord } from '../records.ts'
import { type ParallelChecksums, ChecksumRecheck, awaitFrame, startChecksums, type HelperRead } from './checksums.ts'
import { crashPoint, noteDurable } from '../fault-hooks.ts'

const segmentPattern = /^log-(\d{20})\.wal$/
export const segmentName = (firstIndex: number): string => `log-${String(firstIndex).padStart(20, '0')}.wal`

export class CorruptLogError extends Error {
  constructor (readonly file: string, readonly offset: number, why: string) {
    super(`corrupt log ${file} at offset ${offset}: ${why}; refusing to start (move the file aside to recover what precedes it)`)
    this.name = 'CorruptLogError'
  }
}

interface Segment {
  firstIndex: number
  file: string
}

export interface RecoverOptions {
  // Hand send records over with their text left in the segment's buffer (PackedSendRecord).
  packSends?: boolean
  // Check the frames' checksums on a helper thread (checksums.ts) when the segments hold at
  // least this many bytes in all; inline by default.
  parallelChecksumBytes?: number
  // How much the helper thread reads at a time (default 1 MiB; tests make it small, so that
  // recovery catches up with it often).
  helperReadBytes?: number
}

export interface RecoveryResult {
  lastIndex: number // last valid record in the log, or afterIndex if the log holds nothing newer
  truncatedBytes: number
}

export type Warn = (msg: string, fields?: Record<string, unknown>) => void

function isRecord (v: Record<string, unknown>): v is Record<string, unknown> & LogRecord {
  return Number.isSafeInteger(v.i) && (v.i as number) > 0 && typeof v.op === 'string' && Number.isSafeInteger(v.e) && typeof v.ts === 'number'
}

// What makes a decoded frame unusable as a log record, or null.
function frameFault (f: FrameResult): string | null {
  return f.kind === 'bad' ? f.why : f.kind === 'short' ? 'frame cut short' : isRecord(f.value) ? null : 'not a log record'
}

const zeros = Buffer.alloc(64 * 1024)

// True if buf holds nothing but zeros from `from` on. readTo(end): wait until buf holds its bytes
// up to at least end (the helper thread may still be reading the file into it), and say how far
// it does. Only the bytes read so far are looked at, and a non-zero one ends the look, so a frame
// whose length starts with a zero byte does not wait for the rest of the file.
function allZero (buf: Buffer, from: number, readTo: (end: number) => number): boolean {
  for (let at = from; at < buf.length;) {
    const n = Math.min(zeros.length, readTo(at + 1) - at)
    if (buf.compare(zeros, 0, n, at, at + n) !== 0) return false
    at += n
  }
  return true
}

// A file read whole: every byte is in.
function whole (buf: Buffer): HelperRead {
  return { buf, readTo: () => buf.length }
}

// What status reports of a log's appends (protocol.md, "Status", `log`): the appends made
// durable since the server started, the records and bytes they held, and the time from each
// append's write to the end of its fdatasync, as the event loop saw it, over the latest
// syncWindow appends (null before the first). The time the records waited for the disk: under
// load it includes the thread pool's hand-back and the event loop's turn, which the records
// wait for too.
export interface AppendStats {
  appends: number
  records: number
  bytes: number
  syncMs: { p50: number, p99: number, max: number } | null
}

const syncWindow = 1024

export class SegmentLog {
  private segments: Segment[] = []
  private fd = -1
  private size = 0 // bytes in the open (last) segment, all of them durable
  private failure: ChatError | null = null
  private syncing = false // an appendAsync's fdatasync is running
  private generation = 0 // bumped whenever the open file descriptor is let go
  lastIndex = 0
  private appends = 0 // since the start; see AppendStats
  private recordsAppended = 0
  private bytesAppended = 0
  private readonly syncTimes = new Float64Array(syncWindow) // ms, a ring: the latest at appends - 1

  private allocated = 0 // bytes in the open segment's file: size plus zeros ahead of it
  private preallocating: boolean
  private rollAt: number // roll before an append once the open segment holds this many bytes

  // preallocateBytes: how far ahead of the records to extend the open segment with zeros (0: no
  // preallocation, the file ends where the records end). segmentBytes: the size at which the
  // open segment is closed and the next append starts a new one.
  constructor (private readonly dir: string, private readonly files: FileOps, private readonly warn: Warn, private readonly preallocateBytes = 0, private readonly segmentBytes: number = limits.logSegmentBytes) {
    this.preallocating = preallocateBytes > 0
    this.rollAt = segmentBytes
  }

  // Whether the last recover checked the checksums on the helper thread.
  checksumsInParallel = false

  // Read the log, hand every record with index > afterIndex to onRecord in order, truncate a torn
  // tail, and open the last segment for appending. Throws CorruptLogError on corruption. See
  // RecoverOptions; with parallelChecksumBytes it may also throw ChecksumRecheck, after which the
  // caller recovers again, from scratch, without.
  recover (afterIndex: number, onRecord: (r: LogRecord) => void, opts?: RecoverOptions & { packSends?: false }): RecoveryResult
  recover (afterIndex: number, onRecord: (r: LogRecord | PackedSendRecord) => void, opts: RecoverOptions): RecoveryResult
  recover (afterIndex: number, onRecord: ((r: LogRecord) => void) | ((r: LogRecord | PackedSendRecord) => void), opts: RecoverOptions = {}): RecoveryResult {
    const packSends = opts.packSends ?? false
    this.segments = this.files.readdirSync(this.dir)
      .map(f => segmentPattern.exec(f))
      .filter((m): m is RegExpExecArray => m !== null)
      .map(m => ({ firstIndex: Number(m[1]), file: path.join(this.dir, m[0]) }))
      .sort((a, b) => a.firstIndex - b.firstIndex)
    const files = this.segments.map(seg => seg.file)
    // The helper thread reads the files itself, so only with the real file system.
    const parallel = this.files === realFiles && opts.parallelChecksumBytes !== undefined
      ? startChecksums(files, limits.recordBytesMax, { atLeast: opts.parallelChecksumBytes, readBytes: opts.helperReadBytes })
      : null
    this.checksumsInParallel = parallel !== null
    try {
      return this.recoverSegments(afterIndex, onRecord as (r: LogRecord | PackedSendRecord) => void, packSends, parallel)
    } finally {
      parallel?.close()
    }
  }

  private recoverSegments (afterIndex: number, onRecord: (r: LogRecord | PackedSendRecord) => void, packSends: boolean, parallel: ParallelChecksums | null): RecoveryResult {
    let prev: number | null = null
    let truncatedBytes = 0
    let end = 0 // where the records of the last segment end
    for (let k = 0; k < this.segments.length; k++) {
      const seg = this.segments[k]
      const last = k === this.segments.length - 1
      if (prev !== null && seg.firstIndex !== prev + 1) throw new CorruptLogError(seg.file, 0, `segment starts at ${seg.firstIndex} but the previous one ends at ${prev}`)
      // With the helper, it reads the file into buf while this loop decodes behind it, never
      // past what readTo says is in.
      const { buf, readTo } = parallel === null ? whole(this.files.readFileSync(seg.file)) : parallel.take(k)
      let off = 0
      let used = false // whether the frame at off has been handed on (an error came from it)
      try {
        while (off < buf.length) {
          if (parallel !== null) awaitFrame(buf, off, limits.recordBytesMax, readTo)
          if (buf[off] === 0 && allZero(buf, off, readTo)) break // preallocated space
          let f = decodeFrame(buf, off, limits.recordBytesMax, false, packSends, parallel === null)
          let why = frameFault(f)
          if (why !== null && parallel !== null) {
            // Before acting on a bad frame, know that the frames before it were good; and say
            // what is wrong with it as the inline check would.
            parallel.confirm(k, buf.length, off)
            f = decodeFrame(buf, off, limits.recordBytesMax, false, packSends)
            why = frameFault(f)
          }
          if (why !== null || f.kind !== 'ok') {
            // Even a frame cut short is corruption if valid frames follow: its length field may be
            // what was damaged.
            if (last && !validFrameAfter(buf, off)) {
              this.warn('truncating a torn write at the end of the log', { file: seg.file, offset: off, bytes: buf.length - off, why })
              truncatedBytes = buf.length - off
              this.truncateFile(seg.file, off)
              break
            }
            throw new CorruptLogError(seg.file, off, why ?? 'bad frame')
          }
          used = true
          const r = f.value as unknown as LogRecord | PackedSendRecord
          const expected: number = prev === null ? seg.firstIndex : prev + 1
          if (r.i !== expected) throw new CorruptLogError(seg.file, off, `record index ${r.i} where ${expected} was expected`)
          if (prev === null && r.i > afterIndex + 1) throw new CorruptLogError(seg.file, off, `log resumes at ${r.i} but the snapshot ends at ${afterIndex}`)
          if (r.i > afterIndex) onRecord(r)
          used = false
          prev = r.i
          off = f.next
        }
        parallel?.confirm(k, buf.length, off)
      } catch (e) {
        // An error from a frame whose checksum the helper has not vouched for may be its damage.
        if (parallel !== null && !(e instanceof ChecksumRecheck)) parallel.confirm(k, buf.length, off, used)
        throw e
      }
      end = Math.min(off, buf.length)
      if (prev === null) {
        if (seg.firstIndex > afterIndex + 1) throw new CorruptLogError(seg.file, 0, `log resumes at ${seg.firstIndex} but the snapshot ends at ${afterIndex}`)
        prev = seg.firstIndex - 1
      }
    }
    this.lastIndex = Math.max(afterIndex, prev ?? 0)
    if (prev !== null && prev < afterIndex && this.segments.length > 0) {
      // Everything in the log is covered by the snapshot (a crash between writing a snapshot and
      // resetting the log): drop those segments and start a fresh one after the snapshot.
      for (const seg of this.segments) this.files.unlinkSync(seg.file)
      this.segments = [this.createSegment(afterIndex + 1)]
      end = 0
    }
    if (this.segments.length === 0) this.segments.push(this.createSegment(afterIndex + 1))
    this.openLast(end)
    return { lastIndex: this.lastIndex, truncatedBytes }
  }

  // Append encoded frames holding records lastIndex+1 .. lastIndexAfter, durably: when this
  // returns, the bytes are fsync'd. On a write error the partial write is cut off again and the
  // log stays usable; after a failed fsync the page cache is in an unknown state, so the log
  // refuses every later append (the member must recover from disk or from its peers).
  append (frames: Buffer, lastIndexAfter: number): void {
    const started = performance.now()
    const before = this.write(frames)
    try {
      this.files.fdatasyncSync(this.fd)
    } catch (e) {
      throw this.syncFailed(e, this.fd, before)
    }
    this.durable(frames.length, lastIndexAfter, started)
  }

  // The same, with the fdatasync run off the event loop (in libuv's thread pool), so the server
  // keeps reading and batching requests while the disk works. The write itself is synchronous:
  // a write error throws here, with the log cut back as append() does. `done` is called once,
  // with null when the frames are durable. One at a time: the caller waits for `done` before
  // the next append of either kind. If the log lets go of its file meanwhile (a replica
  // truncating or resetting it, or close()), `done` gets an error and the log is not failed.
  appendAsync (frames: Buffer, lastIndexAfter: number, done: (err: ChatError | null) => void): void {
    if (this.syncing) throw new Error('appendAsync: an append is already in flight')
    const started = performance.now()
    const before = this.write(frames)
    const fd = this.fd
    const generation = this.generation
    this.syncing = true
    this.files.fdatasync(fd, (e) => {
      if (generation !== this.generation) {
        done(errors.unavailable('the log was reset while the write was in flight'))
        return
      }
      this.syncing = false
      if (e) {
        done(this.syncFailed(e, fd, before))
        return
      }
      this.durable(frames.length, lastIndexAfter, started)
      done(null)
    })
  }

  // Write frames at the end of the open segment; returns the size before them. On a write
  // error, cut the partial write back off (the log stays usable) and throw STORAGE_ERROR.
  private write (frames: Buffer): number {
    if (this.failure) throw this.failure
    if (this.syncing) throw new Error('append: an appendAsync is in flight')
    if (this.size >= this.rollAt) this.rollForSize()
    const before = this.size
    if (this.preallocating && before + frames.length > this.allocated) this.preallocate(before + frames.length)
    try {
      writeAll(this.files, this.fd, frames, before)
    } catch (e) {
      try {
        this.files.ftruncateSync(this.fd, before)
        this.allocated = before
      } catch (e2) {
        this.failure = errors.storage(e2)
      }
      throw errors.storage(e)
    }
    crashPoint('after-append-before-fsync')
    return before
  }

  // Extend the open segment with zeros past `needed`, up to a whole multiple of preallocateBytes.
  // The zeros reach the disk with the next fdatasync. If they cannot be written (a full disk),
  // cut them back off and let this segment grow a record at a time, as without preallocation:
  // the records themselves may still fit.
  private preallocate (needed: number): void {
    const from = this.allocated
    const to = Math.ceil((needed + 1) / this.preallocateBytes) * this.preallocateBytes
    try {
      for (let at = from; at < to; at += zeros.length) writeAll(this.files, this.fd, zeros.subarray(0, Math.min(zeros.length, to - at)), at)
      this.allocated = to
    } catch {
      this.preallocating = false
      try {
        this.files.ftruncateSync(this.fd, from)
      } catch { /* the zeros stay: recovery reads them as the end of the records */ }
    }
  }

  // A failed fsync: the batch was refused, so try to take it back out; either way the log
  // accepts nothing more, since after a failed fsync what the page cache holds is unknown.
  private syncFailed (e: unknown, fd: number, before: number): ChatError {
    this.failure = errors.storage(e)
    try {
      this.files.ftruncateSync(fd, before)
      if (fd === this.fd) this.allocated = before
    } catch { /* the member stops acknowledging anyway */ }
    return this.failure
  }

  private durable (bytes: number, lastIndexAfter: number, started: number): void {
    this.size += bytes
    this.syncTimes[this.appends % syncWindow] = performance.now() - started
    this.appends++
    this.recordsAppended += lastIndexAfter - this.lastIndex
    this.bytesAppended += bytes
    this.lastIndex = lastIndexAfter
    noteDurable(this.dir, this.segments[this.segments.length - 1].file, this.size)
  }

  // Records from `from` to the end of the durable log, in chunks of at most chunkRecords, reading
  // each segment file once. Used to catch a peer up; the caller sends one chunk at a time.
  * readFrom (from: number, chunkRecords = 1000): Generator<LogRecord[]> {
    let k = this.segments.length - 1
    while (k > 0 && this.segments[k].firstIndex > from) k--
    if (this.segments.length === 0 || this.segments[k].firstIndex > from) throw new RangeError(`record ${from} is no longer in the log (compacted)`)
    const end = this.lastIndex
    for (; k < this.segments.length; k++) {
      const seg = this.segments[k]
      const buf = this.files.readFileSync(seg.file)
      let chunk: LogRecord[] = []
      for (let off = 0; off < buf.length;) {
        const f = decodeFrame(buf, off)
        if (f.kind !== 'ok') break // a write in progress at the end of the open segment
        const r = f.value as unknown as LogRecord
        off = f.next
        if (r.i > end) break
        if (r.i < from) continue
        chunk.push(r)
        if (chunk.length >= chunkRecords) {
          yield chunk
          chunk = []
        }
      }
      if (chunk.length > 0) yield chunk
    }
  }

  // The first index still in the log (records before it were compacted into a snapshot).
  get firstIndex (): number { return this.segments.length > 0 ? this.segments[0].firstIndex : this.lastIndex + 1 }

  // Drop every record after `index`, durably. Used when a replica discards records the chain
  // never committed before it is caught up again.
  truncateAfter (index: number): void {
    // With an appendAsync in flight the file holds more than lastIndex: cut that off too.
    if (index >= this.lastIndex && !this.syncing) return
    if (this.failure) throw this.failure
    this.close()
    while (this.segments.length > 1 && this.segments[this.segments.length - 1].firstIndex > index + 1) {
      this.files.unlinkSync(this.segments.pop()!.file)
    }
    const seg = this.segments[this.segments.length - 1]
    const buf = this.files.readFileSync(seg.file)
    let off = 0
    let last = seg.firstIndex - 1
    while (off < buf.length && last < index) {
      const f = decodeFrame(buf, off)
      if (f.kind !== 'ok') break
      off = f.next
      last = (f.value as unknown as LogRecord).i
    }
    this.truncateFile(seg.file, off)
    fsyncDir(this.files, this.dir)
    this.lastIndex = Math.min(last, index)
    this.openLast(off)
  }

  // Throw the whole log away and start empty after `index` (a snapshot from a peer replaces it).
  resetTo (index: number): void {
    this.close()
    for (const seg of this.segments) this.files.unlinkSync(seg.file)
    this.segments = [this.createSegment(index + 1)]
    this.lastIndex = index
    this.openLast(0)
  }

  get failed (): ChatError | null { return this.failure }

  appendStats (): AppendStats {
    const n = Math.min(this.appends, syncWindow)
    let syncMs: AppendStats['syncMs'] = null
    if (n > 0) {
      const t = this.syncTimes.slice(0, n).sort()
      const at = (p: number): number => Math.round(t[Math.min(n - 1, Math.ceil(n * p / 100) - 1)] * 1000) / 1000
      syncMs = { p50: at(50), p99: at(99), max: at(100) }
    }
    return { appends: this.appends, records: this.recordsAppended, bytes: this.bytesAppended, syncMs }
  }

  get currentSegmentBytes (): number { return this.size }

  // The open segment is full: start a new one. If that fails, appends go on into this one (the
  // bound is there for recovery's sake, and a little over it is harmless) and the next try is
  // another sixteenth of a segment later; if the failure left the log unsafe to append to
  // (roll), the append throws.
  private rollForSize (): void {
    try {
      this.roll()
    } catch (e) {
      this.rollAt = this.size + Math.max(1, Math.floor(this.segmentBytes / 16))
      this.warn('could not start a new log segment; appending to the current one', { error: String(e), bytes: this.size })
      if (this.failure) throw this.failure
    }
  }

  // Start a new segment for records after lastIndex, so the ones before can be compacted away.
  // Throws if the new segment cannot be made, with the log as it was. A new segment file that
  // was created but cannot be used is removed again, durably: left behind, it would start
  // inside the records later appended to the old one, and recovery would refuse the log. If it
  // cannot be removed, the log fails (it holds everything up to here, which recovers).
  roll (): void {
    const cur = this.segments[this.segments.length - 1]
    if (cur.firstIndex === this.lastIndex + 1) return // already empty
    // Create the new segment before letting go of the old one, so a failure leaves the log as it was.
    const file = path.join(this.dir, segmentName(this.lastIndex + 1))
    let next: Segment
    let fd: number
    try {
      next = this.createSegment(this.lastIndex + 1)
      fd = this.files.openSync(next.file, 'r+')
    } catch (e) {
      this.removeUnused(file)
      throw e
    }
    // Trim the zeros ahead of the old segment's records. Not fsync'd: if they come back after a
    // crash, recovery reads them as the end of the records all the same.
    if (this.allocated > this.size) {
      try { this.files.ftruncateSync(this.fd, this.size) } catch { /* as above */ }
    }
    this.close()
    this.segments.push(next)
    this.adopt(fd, 0, 0)
  }

  // Remove a segment file that roll created but could not put to use, if it exists.
  private removeUnused (file: string): void {
    try {
      this.files.unlinkSync(file)
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'ENOENT') return // never created
      this.failure = errors.storage(e)
      return
    }
    try {
      fsyncDir(this.files, this.dir)
    } catch (e) {
      this.failure = errors.storage(e)
    }
  }

  // Delete segments whose every record is at or below snapshotIndex.
  compact (snapshotIndex: number): number {
    const covered = this.dropCovered(snapshotIndex)
    for (const file of covered) this.files.unlinkSync(file)
    if (covered.length > 0) fsyncDir(this.files, this.dir)
    return covered.length
  }

  // The same, leaving the files to the caller: the log forgets the segments whose every record
  // is at or below snapshotIndex and returns their files, for the caller to delete. Recovery
  // skips such a segment if it is still there (a crash before its deletion).
  dropCovered (snapshotIndex: number): string[] {
    const covered: string[] = []
    while (this.segments.length > 1 && this.segments[1].firstIndex <= snapshotIndex + 1) covered.push(this.segments.shift()!.file)
    return covered
  }

  close (): void {
    if (this.fd >= 0) this.files.closeSync(this.fd)
    this.fd = -1
    this.generation++
    this.syncing = false
  }

  private createSegment (firstIndex: number): Segment {
    const file = path.join(this.dir, segmentName(firstIndex))
    this.files.closeSync(this.files.openSync(file, 'a'))
    fsyncDir(this.files, this.dir)
    return { firstIndex, file }
  }

  // Open the last segment for writing; its records end at `end`, and anything after that is
  // preallocated zeros.
  private openLast (end: number): void {
    const fd = this.files.openSync(this.segments[this.segments.length - 1].file, 'r+')
    this.adopt(fd, end, this.files.fstatSync(fd).size)
  }

  // Make fd, open on the last segment, the one appends go to: its records end at `end`, and the
  // file is `allocated` bytes long.
  private adopt (fd: number, end: number, allocated: number): void {
    this.fd = fd
    this.size = end
    this.allocated = allocated
    this.preallocating = this.preallocateBytes > 0
    this.rollAt = this.segmentBytes
  }

  private truncateFile (file: string, length: number): void {
    const fd = this.files.openSync(file, 'r+')
    try {
      this.files.ftruncateSync(fd, length)
      this.files.fsyncSync(fd)
    } finally {
      this.files.closeSync(fd)
    }
  }
}
