// Checking the log's frame checksums on a second thread while recovery decodes and applies the
// records on the main one (SegmentLog.recover). The checksums were a sixth of what replaying a
// million records cost on one thread (0.35 of 2 s), and the machine has a second core.
//
// The helper thread reads each segment file itself and walks its frames as recovery does, by
// their length fields, checking each frame's CRC, and reports how far that walk got: the offset
// of the first frame that is not whole, in range and matching its CRC, or the end of the file.
// Recovery decodes without the checksums meanwhile, and before it acts on what it read (goes on
// to the next segment, truncates a torn tail, refuses a corrupt log) it waits for that report.
// If every frame it took lies before the offset reported, they all matched their CRCs, and what
// it did is what it would have done checking them itself. If not, it throws ChecksumRecheck, and
// the caller starts over with the checksums checked inline, from a fresh state: a record that
// failed its CRC may already have been applied.
//
// The helper's code is plain JavaScript, so that the thread starts without a TypeScript loader.

import { Worker } from 'node:worker_threads'

// The thread's code: for each job { file, slot, max }, read the file, walk its frames, and store
// the offset reached and the file's length in the shared Int32Array at 2*slot and 2*slot+1 (-2
// if the file could not be read), then wake the waiter.
const helperSource = `
const { parentPort, workerData } = require('node:worker_threads')
const fs = require('node:fs')
const zlib = require('node:zlib')
const results = new Int32Array(workerData.results)
function walk (buf, max) {
  let off = 0
  while (off + 8 <= buf.length) {
    const len = buf.readUInt32LE(off)
    if (len === 0 || len > max || off + 8 + len > buf.length) break
    if (zlib.crc32(buf.subarray(off + 8, off + 8 + len)) !== buf.readUInt32LE(off + 4)) break
    off += 8 + len
  }
  return off
}
parentPort.on('message', ({ file, slot, max }) => {
  let reached = -2
  let length = -2
  try {
    const buf = fs.readFileSync(file)
    length = buf.length
    reached = walk(buf, max)
  } catch {}
  Atomics.store(results, 2 * slot + 1, length)
  Atomics.store(results, 2 * slot, reached)
  Atomics.notify(results, 2 * slot)
})
`

// Thrown by SegmentLog.recover when a frame it used did not match its CRC, or the helper could
// not say: recover again with the checksums checked inline (see the top of this file).
export class ChecksumRecheck extends Error {
  constructor (why: string) {
    super(`log checksums must be checked again inline: ${why}`)
    this.name = 'ChecksumRecheck'
  }
}

export class ParallelChecksums {
  private readonly worker: Worker
  private readonly results: Int32Array

  // files: the segments, in order; each is walked as soon as the thread is free. max: the largest
  // frame payload allowed.
  // waitMs: how long confirm waits for a segment's report before it gives up on the helper (it
  // reads a gigabyte a second or so here; a helper that died never reports).
  constructor (private readonly files: readonly string[], max: number, private readonly waitMs = 30_000) {
    this.results = new Int32Array(new SharedArrayBuffer(8 * Math.max(1, files.length))).fill(-1)
    // execArgv []: none of this process's loaders (tsx), which the helper does not need.
    this.worker = new Worker(helperSource, { eval: true, execArgv: [], workerData: { results: this.results.buffer } })
    this.worker.unref()
    this.worker.on('error', () => {}) // a failure shows as a segment never reported: see confirm
    files.forEach((file, slot) => this.worker.postMessage({ file, slot, max }))
  }

  // Recovery stopped reading segment `slot` (of `length` bytes) at `stop`, having used every
  // frame before it (and, with `used`, the frame at `stop` too). Wait for the helper's walk of
  // the segment and throw ChecksumRecheck unless it got at least that far: then every frame used
  // matched its CRC.
  confirm (slot: number, length: number, stop: number, used = false): void {
    const at = 2 * slot
    if (Atomics.load(this.results, at) === -1) Atomics.wait(this.results, at, -1, this.waitMs)
    const reached = Atomics.load(this.results, at)
    if (reached === -1) throw new ChecksumRecheck(`no report on segment ${this.files[slot]} within ${this.waitMs} ms`)
    if (reached === -2 || Atomics.load(this.results, at + 1) !== length) throw new ChecksumRecheck(`the helper could not read ${this.files[slot]} as recovery did`)
    if (reached < stop || (used && reached === stop)) throw new ChecksumRecheck(`a frame in ${this.files[slot]} at offset ${reached} does not match its checksum`)
  }

  close (): void {
    void this.worker.terminate()
  }
}
