// Snapshots of the state machine.
//
//   snapshot-<index, 20 digits>.snap   frames (see framing.ts): a head chunk, the state's chunks,
//                                      and an end chunk; the state as of that log index
//
// A snapshot is written to a temporary file, fsync'd, renamed into place and the directory
// fsync'd, so a crash at any point leaves either the old snapshot or the complete new one.
// Chunking keeps every frame small however large the state grows.

import path from 'node:path'
import { encodeChunkFrame, decodeFrame, frameHeaderBytes } from './framing.ts'
import { type FileOps, writeAll, fsyncDir } from './files.ts'
import { awaitFrame, type HelperRead } from './checksums.ts'
import { crashPoint } from '../fault-hooks.ts'
import { limits } from '../limits.ts'
import { encodeInPieces, type SnapshotChunk } from '../state.ts'

const snapshotPattern = /^snapshot-(\d{20})\.snap$/
const snapshotName = (index: number): string => `snapshot-${String(index).padStart(20, '0')}.snap`
const flushBytes = 1024 * 1024

export class CorruptSnapshotError extends Error {
  constructor (readonly file: string, readonly offset: number, why: string) {
    super(`corrupt snapshot ${file} at offset ${offset}: ${why}; refusing to start`)
    this.name = 'CorruptSnapshotError'
  }
}

export interface LoadedSnapshot {
  index: number
  file: string
  chunks: Array<Record<string, unknown>>
}

// The frames of the snapshot for `index` (a head, the state's chunks, an end), in slices of
// about sliceBytes, or of what was made in about sliceMs. The head and the first chunk make a
// slice of their own: the mid-snapshot crash point falls right after it. Chunks are made and
// encoded as the slices are taken.
function* frameSlices (index: number, chunks: Iterable<object>, sliceBytes: number, sliceMs = Infinity): Generator<Buffer> {
  let pending: Buffer[] = []
  let bytes = 0
  let n = 0
  let started = performance.now()
  const take = (): Buffer => {
    const slice = Buffer.concat(pending, bytes)
    pending = []
    bytes = 0
    started = performance.now()
    return slice
  }
  const add = (chunk: object): boolean => {
    for (const frame of chunkFrames(chunk)) {
      pending.push(frame)
      bytes += frame.length
    }
    return ++n === 2 || bytes >= sliceBytes || performance.now() - started >= sliceMs
  }
  if (add({ kind: 'head', index })) yield take()
  for (const chunk of chunks) if (add(chunk)) yield take()
  add({ kind: 'end', index })
  yield take()
}

// A chunk's frames: one, unless it comes to more than recordBytesMax and can be cut in two, then
// each half's, so that frames stay small. Only a chunk that cannot be cut (one exactly-once entry
// with a large stored reply) makes a bigger frame, up to snapshotFrameBytesMax.
function chunkFrames (chunk: object): Buffer[] {
  return encodeInPieces(chunk as SnapshotChunk, c => encodeChunkFrame(c), f => f.length - frameHeaderBytes, limits.recordBytesMax)
}

// Write one slice; after the first, a crash point.
function writeSlice (files: FileOps, fd: number, slice: Buffer, first: boolean): void {
  writeAll(files, fd, slice)
  if (first) crashPoint('mid-snapshot')
}

// Give up on a temporary file: close it if open, and remove it.
function discard (files: FileOps, fd: number, tmp: string): void {
  if (fd >= 0) try { files.closeSync(fd) } catch { /* closing is best effort here */ }
  try { files.unlinkSync(tmp) } catch { /* best effort: a stale temp file is ignored and removed at the next start */ }
}

// Move a written, fsync'd and closed temporary file into place, durably.
function putInPlace (files: FileOps, dir: string, tmp: string, final: string): void {
  files.renameSync(tmp, final)
  fsyncDir(files, dir)
}

// Durably write the snapshot for `index`. Returns its path and size once it is safely in place.
export function writeSnapshot (files: FileOps, dir: string, index: number, chunks: Iterable<object>): { file: string, bytes: number } {
  const final = path.join(dir, snapshotName(index))
  const tmp = final + '.tmp'
  const fd = files.openSync(tmp, 'w')
  let bytes = 0
  try {
    let first = true
    for (const slice of frameSlices(index, chunks, flushBytes)) {
      writeSlice(files, fd, slice, first)
      bytes += slice.length
      first = false
    }
    files.fsyncSync(fd)
  } catch (e) {
    discard(files, fd, tmp)
    throw e
  }
  files.closeSync(fd)
  putInPlace(files, dir, tmp, final)
  return { file: final, bytes }
}

// The same, written a slice at a time across turns of the event loop, with the fsync off the
// loop, so a large state does not stall the server: a slice ends after 1 MiB or after 1 ms of
// making and encoding chunks, whichever comes first (slices of 4 MiB alone made pauses of 30 to
// 100 ms here; of 4 MiB or 2 ms, one turn of the loop in ten took over 2.7 ms while a snapshot of
// 300,000 messages was written, against 1.7 ms now). `chunks` must come from a copy that does
// not change meanwhile. `cancelled` is asked before each slice; a cancelled or failed write
// removes its temporary file. `done` gets the final path and the bytes written, or the error.
export function writeSnapshotInSlices (files: FileOps, dir: string, index: number, chunks: Iterable<object>, cancelled: () => boolean, done: (err: Error | null, file: string, bytes: number) => void, sliceBytes = 1024 * 1024, sliceMs = 1): void {
  const final = path.join(dir, snapshotName(index))
  const tmp = final + '.tmp'
  const slices = frameSlices(index, chunks, sliceBytes, sliceMs)
  let fd = -1
  let bytes = 0
  let first = true
  const fail = (e: unknown): void => {
    discard(files, fd, tmp)
    done(e instanceof Error ? e : new Error(String(e)), final, bytes)
  }
  const step = (): void => {
    if (cancelled()) {
      fail(new Error('snapshot cancelled'))
      return
    }
    try {
      if (fd < 0) fd = files.openSync(tmp, 'w')
      const next = slices.next()
      if (!next.done) {
        writeSlice(files, fd, next.value, first)
        bytes += next.value.length
        first = false
        setImmediate(step)
        return
      }
    } catch (e) {
      fail(e)
      return
    }
    files.fsync(fd, (err) => {
      if (err) {
        fail(err)
        return
      }
      try {
        files.closeSync(fd)
        fd = -1
        if (cancelled()) throw new Error('snapshot cancelled')
        putInPlace(files, dir, tmp, final)
      } catch (e) {
        fail(e)
        return
      }
      done(null, final, bytes)
    })
  }
  step()
}

function listSnapshots (files: FileOps, dir: string): Array<{ index: number, file: string }> {
  return files.readdirSync(dir)
    .map(f => snapshotPattern.exec(f))
    .filter((m): m is RegExpExecArray => m !== null)
    .map(m => ({ index: Number(m[1]), file: path.join(dir, m[0]) }))
    .sort((a, b) => a.index - b.index)
}

// Load the newest snapshot, or null if there is none. Throws CorruptSnapshotError if the newest
// one is damaged: an older snapshot cannot stand in for it, since the log it needs is compacted.
export function loadNewestSnapshot (files: FileOps, dir: string): LoadedSnapshot | null {
  const snap = openNewestSnapshot(files, dir)
  return snap && { index: snap.index, file: snap.file, chunks: [...snap.chunks] }
}

// The newest snapshot with its chunks as a stream, decoded one at a time as the caller asks for
// them, so a large state is rebuilt without first holding every parsed chunk in memory. The
// stream throws CorruptSnapshotError where the damage is, at the latest after the last chunk
// (a missing end): the caller must consume it whole before trusting what it built.
// With packMessages, binary messages chunks come checked but packed (see framing.ts), for
// ChatState.fromSnapshotChunks to decode each mailbox when it is first used.
// helper(file): the snapshot's memory as a helper thread reads it into it (checksums.ts), or null
// to read it here first. With the helper, each chunk is checked and decoded as soon as it is in.
export function openNewestSnapshot (files: FileOps, dir: string, packMessages = false, helper: (file: string) => HelperRead | null = () => null): { index: number, file: string, bytes: number, chunks: Generator<Record<string, unknown>> } | null {
  const all = listSnapshots(files, dir)
  if (all.length === 0) return null
  const { index, file } = all[all.length - 1]
  const helped = helper(file)
  const buf = helped?.buf ?? files.readFileSync(file)
  return { index, file, bytes: buf.length, chunks: readChunks(buf, file, index, packMessages, helped?.readTo ?? null) }
}

function * readChunks (buf: Buffer, file: string, index: number, packMessages: boolean, readTo: ((end: number) => number) | null): Generator<Record<string, unknown>> {
  let off = 0
  let ended = false
  while (off < buf.length) {
    if (readTo !== null) awaitFrame(buf, off, limits.snapshotFrameBytesMax, readTo)
    const f = decodeFrame(buf, off, limits.snapshotFrameBytesMax, packMessages)
    if (f.kind !== 'ok') throw new CorruptSnapshotError(file, off, f.kind === 'bad' ? f.why : 'frame cut short')
    const c = f.value
    const isHead = c.kind === 'head'
    if ((off === 0) !== isHead || (isHead && c.index !== index)) throw new CorruptSnapshotError(file, off, off === 0 ? 'missing head' : 'head out of place')
    off = f.next
    if (c.kind === 'end') {
      ended = true
      break
    }
    if (!isHead) yield c
  }
  if (!ended || off !== buf.length) throw new CorruptSnapshotError(file, off, ended ? 'data after the end' : 'missing end')
}

// Remove snapshots older than `index` and temporary files left by a crash.
export function removeOldSnapshots (files: FileOps, dir: string, index: number): void {
  const old = oldSnapshots(files, dir, index)
  for (const f of old) {
    try {
      files.unlinkSync(f)
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw e // gone already: a background snapshot's deletion (store.ts)
    }
  }
  if (old.length > 0) fsyncDir(files, dir)
}

// The files removeOldSnapshots removes: snapshots older than `index`, and temporary files.
export function oldSnapshots (files: FileOps, dir: string, index: number): string[] {
  const old = listSnapshots(files, dir).filter(s => s.index < index).map(s => s.file)
  for (const f of files.readdirSync(dir)) if (f.startsWith('snapshot-') && f.endsWith('.snap.tmp')) old.push(path.join(dir, f))
  return old
}
