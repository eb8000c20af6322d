// Reading the log's segment files and checking their frame checksums on a second thread while
// recovery decodes and applies the records on the main one (SegmentLog.recover). The checksums
// were a sixth of what replaying a million records cost on one thread (0.35 of 2 s), and the
// machine has a second core. Reading a segment into fresh memory was another sixth (0.44 of
// 2.6 s) in a slow stretch of this machine, where the first touch of a page cost about 12 us and
// a 131 MiB segment is 33,000 pages; and the helper read each file again into memory of its own.
//
// The helper thread reads each segment file into a SharedArrayBuffer the main thread allocated
// for it, a mebibyte at a time, and says after each read how many bytes are in. The main thread
// decodes out of that same memory (no copy), never past what the helper has said is in: it waits
// at the frontier (readTo) when it gets there, which it seldom does, as reading is many times
// faster than applying records. As it reads, the helper walks the frames by their length fields,
// as recovery does, checking each frame's CRC, and at the end of the file reports how far that
// walk got: the offset of the first frame that is not whole, in range and matching its CRC, or
// the end of the file. Recovery decodes without the checksums meanwhile, and before it acts on
// what it read (goes on to the next segment, truncates a torn tail, refuses a corrupt log) it
// waits for that report (confirm). If every frame it took lies before the offset reported, they
// all matched their CRCs, and what it did is what it would have done checking them itself. If
// not, or the helper could not read a file whole, it throws ChecksumRecheck, and the caller
// starts over with the checksums checked inline, from a fresh state: a record that failed its
// CRC may already have been applied.
//
// A snapshot is read through the helper too, without the walk (max null): its chunks' checksums
// are checked on the main thread as it decodes them, which is quick next to replaying a log (see
// Store.loadSnapshot).
//
// The helper's code is plain JavaScript, so that the thread starts without a TypeScript loader.

import { Worker } from 'node:worker_threads'
import fs from 'node:fs'

// Per segment, three Int32 slots of the shared results array: the walk's report, the file's
// length as the helper found it, and the bytes read so far. -1: not yet; -2: the file could not
// be read (whole, at the length recovery expects).
const slots = 3
const reachedAt = (slot: number): number => slots * slot
const lengthAt = (slot: number): number => slots * slot + 1
const readAt = (slot: number): number => slots * slot + 2

// The thread's code: for each job { file, slot, max, memory, from }, read the file into memory
// (a SharedArrayBuffer of the file's length) from `from` on, storing the bytes read after each
// read; walk the frames read so far; at the end store the offset the walk reached and the file's
// length, then wake the waiters.
const helperSource = `
const { parentPort, workerData } = require('node:worker_threads')
const fs = require('node:fs')
const zlib = require('node:zlib')
const results = new Int32Array(workerData.results)
const chunk = workerData.chunk
// Walk whole frames from off within buf[0, end): the offset of the first frame that is not
// whole in it, in range and matching its CRC; and whether that frame is bad (so the walk is over)
// rather than just not all read yet.
function walk (buf, off, end, max) {
  while (off + 8 <= end) {
    const len = buf.readUInt32LE(off)
    if (len === 0 || len > max) return { off, over: true }
    if (off + 8 + len > end) break
    if (zlib.crc32(buf.subarray(off + 8, off + 8 + len)) !== buf.readUInt32LE(off + 4)) return { off, over: true }
    off += 8 + len
  }
  return { off, over: false }
}
function publish (at, value) {
  Atomics.store(results, at, value)
  Atomics.notify(results, at)
}
parentPort.on('message', ({ file, slot, max, memory, from }) => {
  const base = ${slots} * slot
  let reached = -2
  let length = -2
  let fd = -1
  try {
    const buf = Buffer.from(memory)
    fd = fs.openSync(file, 'r')
    if (fs.fstatSync(fd).size !== buf.length) throw new Error('not the length recovery expects')
    let got = from // the bytes before were read by the main thread
    let walked = max === null ? { off: 0, over: true } : walk(buf, 0, got, max)
    while (got < buf.length) {
      const n = fs.readSync(fd, buf, got, Math.min(chunk, buf.length - got), got)
      if (n === 0) throw new Error('the file ended early')
      got += n
      publish(base + 2, got)
      if (max !== null && !walked.over) walked = walk(buf, walked.off, got, max)
    }
    length = got
    reached = max === null ? got : walked.off
  } catch {
  } finally {
    if (fd >= 0) try { fs.closeSync(fd) } catch {}
  }
  Atomics.store(results, base + 1, length)
  publish(base, reached)
  Atomics.notify(results, base + 2) // a reader waiting for bytes that will not come
})
`

// Read up to `bytes` bytes of the start of file into memory; how many were read (0 if it could
// not be read: the helper then reads it all, or says it cannot).
function readHead (file: string, memory: SharedArrayBuffer, bytes: number): number {
  const buf = Buffer.from(memory)
  let fd = -1
  let got = 0
  try {
    fd = fs.openSync(file, 'r')
    while (got < Math.min(bytes, buf.length)) {
      const n = fs.readSync(fd, buf, got, Math.min(bytes, buf.length) - got, got)
      if (n === 0) break
      got += n
    }
  } catch {
    got = 0
  } finally {
    if (fd >= 0) fs.closeSync(fd)
  }
  return got
}

// A file the helper reads: its memory, and how to wait for its bytes (ParallelChecksums.take).
export interface HelperRead {
  buf: Buffer
  readTo: (end: number) => number
}

// Wait until the frame at buf[off] is read in whole: its header, then as much as its length says
// (at most max). Reading on past a frame not yet whole would take the zeros of memory the helper
// has not filled yet for its bytes.
export function awaitFrame (buf: Buffer, off: number, max: number, readTo: (end: number) => number): void {
  readTo(off + 8)
  if (off + 8 <= buf.length) readTo(off + 8 + Math.min(buf.readUInt32LE(off), max))
}

// Thrown by SegmentLog.recover when a frame it used did not match its CRC, or the helper could
// not say: recover again with the checksums checked inline (see the top of this file).
export class ChecksumRecheck extends Error {
  constructor (why: string) {
    super(`checksums must be checked again inline: ${why}`)
    this.name = 'ChecksumRecheck'
  }
}

export class ParallelChecksums {
  private readonly worker: Worker
  private readonly results: Int32Array
  private readonly memory: Array<SharedArrayBuffer | null>

  // files: the segments, in order; each is read and walked as soon as the thread is free, into
  // memory of the length the file has now. max: the largest frame payload allowed; null to read
  // the files only, their checksums checked by the caller (a snapshot: see Store).
  // Read only, the helper's report on a file is its length once it has read it whole.
  // waitMs: how long readTo and confirm wait for word of a segment before they give up on the
  // helper (it reads a gigabyte a second or so here; a helper that died never reports).
  // readBytes: how much the helper reads at a time, saying so after each read.
  //
  // sizes: the files' lengths (null: it cannot be known), as fileSize gives them.
  //
  // The helper thread takes about 50 ms to start here, so this thread reads the first four reads'
  // worth of the first segment itself meanwhile, for recovery to begin on at once, and the helper
  // goes on from there (walking the frames from the start).
  constructor (private readonly files: readonly string[], max: number | null, private readonly waitMs = 30_000, readBytes = 1024 * 1024, sizes: ReadonlyArray<number | null> = files.map(fileSize)) {
    this.results = new Int32Array(new SharedArrayBuffer(4 * slots * Math.max(1, files.length))).fill(-1)
    // No memory for a file whose length is not known: the helper, unable to read it either, says so.
    this.memory = sizes.map(size => size === null ? null : new SharedArrayBuffer(size))
    // execArgv []: none of this process's loaders (tsx), which the helper does not need.
    this.worker = new Worker(helperSource, { eval: true, execArgv: [], workerData: { results: this.results.buffer, chunk: readBytes } })
    this.worker.unref()
    this.worker.on('error', () => {}) // a failure shows as a segment never reported: see readTo
    const head = this.memory.length > 0 && this.memory[0] !== null ? readHead(files[0], this.memory[0], 4 * readBytes) : 0
    if (head > 0) this.results[readAt(0)] = head
    files.forEach((file, slot) => this.worker.postMessage({ file, slot, max, memory: this.memory[slot] ?? new SharedArrayBuffer(0), from: slot === 0 ? head : 0 }))
  }

  // Segment `slot`'s memory, which the helper fills, and readTo(end), which waits until the
  // helper has read it up to end (or its end) and says how far it has: the caller reads the
  // memory only below that. Handed over once: this object keeps no hold on it after. Throws
  // ChecksumRecheck (readTo too) if the helper cannot read the file, stopped short of what is
  // asked, or said nothing more within waitMs.
  take (slot: number): HelperRead {
    const memory = this.memory[slot]
    this.memory[slot] = null
    if (memory === null) throw this.unreadable(slot)
    const buf = Buffer.from(memory)
    let read = 0
    const readTo = (end: number): number => {
      if (end > read && read < buf.length) read = this.waitFor(slot, Math.min(end, buf.length))
      return read
    }
    return { buf, readTo }
  }

  private waitFor (slot: number, end: number): number {
    for (;;) {
      const got = Atomics.load(this.results, readAt(slot))
      if (got >= end) return got
      if (Atomics.load(this.results, reachedAt(slot)) !== -1) throw this.unreadable(slot)
      if (Atomics.wait(this.results, readAt(slot), got, this.waitMs) === 'timed-out') throw new ChecksumRecheck(`no word on ${this.files[slot]} within ${this.waitMs} ms`)
    }
  }

  // Recovery stopped reading segment `slot` (of `length` bytes) at `stop`, having used every
  // frame before it (and, with `used`, the frame at `stop` too). Wait for the helper's walk of
  // the segment and throw ChecksumRecheck unless it got at least that far: then every frame used
  // matched its CRC.
  confirm (slot: number, length: number, stop: number, used = false): void {
    const at = reachedAt(slot)
    if (Atomics.load(this.results, at) === -1) Atomics.wait(this.results, at, -1, this.waitMs)
    const reached = Atomics.load(this.results, at)
    if (reached === -1) throw new ChecksumRecheck(`no report on segment ${this.files[slot]} within ${this.waitMs} ms`)
    if (reached === -2 || Atomics.load(this.results, lengthAt(slot)) !== length) throw this.unreadable(slot)
    if (reached < stop || (used && reached === stop)) throw new ChecksumRecheck(`a frame in ${this.files[slot]} at offset ${reached} does not match its checksum`)
  }

  private unreadable (slot: number): ChecksumRecheck {
    return new ChecksumRecheck(`the helper could not read ${this.files[slot]} as recovery did`)
  }

  close (): void {
    void this.worker.terminate()
  }
}

// A file's length, or null if it cannot be known.
function fileSize (file: string): number | null {
  try {
    return fs.statSync(file).size
  } catch {
    return null
  }
}

// A helper for `files` (see the constructor), or null (read and check inline) if they hold fewer
// than atLeast bytes in all, or no thread can be started.
export function startChecksums (files: readonly string[], max: number | null, opts: { atLeast: number, readBytes?: number }): ParallelChecksums | null {
  const sizes = files.map(fileSize)
  if (sizes.reduce<number>((n, size) => n + (size ?? 0), 0) < opts.atLeast) return null
  try {
    return new ParallelChecksums(files, max, undefined, opts.readBytes, sizes)
  } catch {
    return null
  }
}
