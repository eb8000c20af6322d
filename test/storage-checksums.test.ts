// Recovery with the log's checksums checked on a helper thread (storage/checksums.ts) must end
// exactly as recovery checking them inline does, whatever the damage: the same state, the same
// truncation, the same refusal naming the same file and offset.
import t, { type Test } from 'tap'
import fs from 'node:fs'
import path from 'node:path'
import { Store } from '../lib/storage/store.ts'
import { SegmentLog, CorruptLogError, segmentName } from '../lib/storage/log.ts'
import { ParallelChecksums, ChecksumRecheck } from '../lib/storage/checksums.ts'
import { realFiles } from '../lib/storage/files.ts'
import { limits } from '../lib/limits.ts'
import { encodeRecordFrame } from '../lib/storage/framing.ts'
import type { LogRecord } from '../lib/records.ts'
import { tempDir, records, batch, frameSpans, thrown, stateView } from './helpers/storage.ts'

const n = 301 // records 1..301 of the helpers' history, in segments of about 2 KiB; the last a send

// A data directory holding the log; its segment files, in order.
function writeLog (t: Test): { dir: string, segments: string[] } {
  const dir = tempDir(t, 'crc')
  const store = new Store({ dir, segmentBytes: 2048, snapshotEveryRecords: Number.MAX_SAFE_INTEGER, snapshotEveryBytes: Number.MAX_SAFE_INTEGER })
  store.recover()
  for (let i = 1; i <= n; i += 3) store.append(batch(records(i, Math.min(n, i + 2))))
  store.close()
  const segments = fs.readdirSync(dir).filter(f => f.endsWith('.wal')).sort().map(f => path.join(dir, f))
  return { dir, segments }
}

interface Outcome { error?: string, view?: Record<string, unknown>, truncatedBytes?: number, files: Record<string, number>, warnings: string[] }

// Recover a copy of dir, checking the checksums on the helper thread or inline; what came of it,
// with the copy's path taken out of messages. readBytes: the helper's read size.
function recoverCopy (t: Test, dir: string, parallel: boolean, readBytes?: number): Outcome {
  const copy = tempDir(t, parallel ? 'crc-parallel' : 'crc-inline')
  fs.cpSync(dir, copy, { recursive: true })
  const warnings: string[] = []
  const store = new Store({ dir: copy, parallelChecksumBytes: parallel ? 0 : Number.MAX_SAFE_INTEGER, helperReadBytes: readBytes, warn: (msg, fields) => { warnings.push(`${msg} ${JSON.stringify(fields ?? {})}`.replaceAll(copy, 'DIR')) } })
  const out: Outcome = { files: {}, warnings }
  try {
    const r = store.recover()
    out.view = stateView(r.state)
    out.truncatedBytes = r.truncatedBytes
  } catch (e) {
    out.error = String(e).replaceAll(copy, 'DIR')
  } finally {
    store.close()
  }
  for (const f of fs.readdirSync(copy).sort()) out.files[f] = fs.statSync(path.join(copy, f)).size
  return out
}

const rechecked = (o: Outcome): boolean => o.warnings.some(w => w.startsWith('recovering again with the checksums checked inline'))

// Parallel and inline recovery of dir end the same; whether the parallel one had to recheck.
// The parallel one runs twice: with the helper's reads of 1 MiB, which take in a whole test
// segment at once, and of 13 bytes, so that decoding catches up with the helper again and again,
// mid-header and mid-payload, and waits for it there.
function sameBothWays (t: Test, dir: string, what: string): { parallel: Outcome, inline: Outcome } {
  const inline = recoverCopy(t, dir, false)
  const parallel = recoverCopy(t, dir, true)
  const trickle = recoverCopy(t, dir, true, 13)
  const apart = (o: Outcome): Outcome => ({ ...o, warnings: o.warnings.filter(w => !w.startsWith('recovering again')) })
  t.same(apart(parallel), inline, `${what}: the same outcome`)
  t.same(apart(trickle), inline, `${what}: the same outcome, read 13 bytes at a time`)
  t.equal(rechecked(trickle), rechecked(parallel), `${what}: rechecked the same, read 13 bytes at a time`)
  return { parallel, inline }
}

t.test('a clean log of several segments: the same state, nothing rechecked', async t => {
  const { dir, segments } = writeLog(t)
  t.ok(segments.length >= 5, `${segments.length} segments`)
  const { parallel } = sameBothWays(t, dir, 'clean')
  t.equal(parallel.error, undefined)
  t.equal((parallel.view as { index: number }).index, n)
  t.notOk(rechecked(parallel))
})

t.test('a payload byte damaged in the middle: the helper catches what decoding missed, and recovery refuses as inline', async t => {
  const { dir, segments } = writeLog(t)
  const file = segments[2]
  const clean = fs.readFileSync(file)
  const spans = frameSpans(clean)
  const sends = spans.filter(s => clean[s.start + 8] === 0x01) // binary send records
  const json = spans.filter(s => clean[s.start + 8] === 0x7b)
  t.ok(sends.length >= 2 && json.length >= 1)
  for (const [what, span, missed] of [['a send\'s text', sends[0], true], ['a send\'s text', sends[1], true], ['a JSON record\'s closing brace', json[0], false]] as const) {
    const damaged = Buffer.from(clean)
    damaged[span.end - 1] ^= 0x01 // a send: decodes fine and fails its CRC; JSON: does not parse
    fs.writeFileSync(file, damaged)
    const { parallel } = sameBothWays(t, dir, `${what} at ${span.start}`)
    t.match(parallel.error, new RegExp(`corrupt log DIR/${path.basename(file)} at offset ${span.start}: checksum mismatch`))
    t.equal(rechecked(parallel), missed, missed ? 'decoding missed it: recovered again inline' : 'decoding stopped there itself: no recheck')
    // The log alone says so with ChecksumRecheck.
    const log = new SegmentLog(dir, realFiles, () => {})
    t.type(thrown(() => log.recover(0, () => {}, { parallelChecksumBytes: 0 })), missed ? ChecksumRecheck : CorruptLogError)
    log.close()
  }
  fs.writeFileSync(file, clean)
})

t.test('a damaged index: the error decoding met is the damage the checksum shows', async t => {
  const { dir, segments } = writeLog(t)
  const file = segments[1]
  const span = frameSpans(fs.readFileSync(file))[1]
  const damaged = fs.readFileSync(file)
  damaged[span.start + 8 + 1] ^= 0x01 // a send's index (binary) or the JSON's first key: bad either way
  fs.writeFileSync(file, damaged)
  const { parallel } = sameBothWays(t, dir, 'damaged index')
  t.match(parallel.error, /checksum mismatch/)
})

t.test('a damaged length field: refused at once, as inline, without a recheck', async t => {
  const { dir, segments } = writeLog(t)
  const file = segments[1]
  const span = frameSpans(fs.readFileSync(file))[2]
  const damaged = fs.readFileSync(file)
  damaged[span.start + 3] ^= 0x40 // far beyond recordBytesMax
  fs.writeFileSync(file, damaged)
  const { parallel } = sameBothWays(t, dir, 'damaged length')
  t.match(parallel.error, /out of range/)
  t.notOk(rechecked(parallel), 'the helper stopped at the same frame')
})

t.test('the last record torn at every third byte, or damaged: truncated as inline', async t => {
  const { dir, segments } = writeLog(t)
  const file = segments[segments.length - 1]
  const clean = fs.readFileSync(file)
  const spans = frameSpans(clean)
  const last = spans[spans.length - 1]
  for (let cut = last.start; cut < last.end; cut += 3) {
    fs.writeFileSync(file, clean.subarray(0, cut))
    const { parallel } = sameBothWays(t, dir, `cut at ${cut}`)
    t.equal(parallel.truncatedBytes, cut - last.start)
  }
  t.equal(clean[last.start + 8], 0x01, 'the last record is a send')
  const damaged = Buffer.from(clean)
  damaged[last.end - 1] ^= 0x01 // the last byte of its text
  fs.writeFileSync(file, damaged)
  const { parallel } = sameBothWays(t, dir, 'last byte damaged')
  t.equal(parallel.truncatedBytes, last.end - last.start, 'the whole last record')
  t.ok(rechecked(parallel), 'decoding took the damaged record; the helper did not vouch for it')
})

t.test('a frame whose length starts with a zero byte, and a preallocated tail of zeros, read in a trickle: as inline', async t => {
  // Recovery takes a zero byte where a frame starts for the start of preallocated space and looks
  // for a non-zero byte after it. Decoding right behind the helper, it must not take the bytes not
  // yet read (zeros, in fresh memory) for that space.
  const dir = tempDir(t, 'crc')
  const store = new Store({ dir, preallocateBytes: 64 * 1024, snapshotEveryRecords: Number.MAX_SAFE_INTEGER, snapshotEveryBytes: Number.MAX_SAFE_INTEGER })
  store.recover()
  const head = records(1, 4)
  const send = (i: number, text: string): LogRecord => ({ op: 'send', from: 'alice', to: 'bob', text, rk: `alice\u0000z${i}`, i, e: 0, ts: 1_700_000_000_000 + i })
  let text = 'x'
  while (encodeRecordFrame(send(5, text)).length - 8 < 512) text += 'x'
  store.append(batch([...head, send(5, text), send(6, 'after it'), ...records(7, 9)]))
  store.close()
  const file = path.join(dir, segmentName(1))
  const buf = fs.readFileSync(file)
  const span = frameSpans(buf)[4]
  t.equal(buf.readUInt32LE(span.start), 512, 'the fifth frame is 512 bytes long')
  t.equal(buf[span.start], 0, 'so its first byte is a zero')
  t.ok(buf.length >= frameSpans(buf).at(-1)!.end + 60 * 1024, 'zeros after the records')
  const { parallel } = sameBothWays(t, dir, 'zero-led length, preallocated tail')
  t.equal((parallel.view as { index: number }).index, 9, 'every record')
  t.equal(parallel.truncatedBytes, 0)
  // Not all zeros after all: a stray byte at the very end, beyond 60 KiB of them.
  const stray = Buffer.from(buf)
  stray[stray.length - 1] = 0x5a
  fs.writeFileSync(file, stray)
  const after = sameBothWays(t, dir, 'a stray byte at the end of the zeros').parallel
  t.equal((after.view as { index: number }).index, 9, 'every record')
  t.equal(after.truncatedBytes, stray.length - frameSpans(stray).at(-1)!.end, 'the zeros and the stray byte cut off as a torn tail')
})

t.test('sends read in a trickle: decoding waits for each frame in whole', async t => {
  // Five segments of 200 binary sends each, read 13 bytes at a time. Decoding, much faster than
  // such a helper, catches up with it again and again, inside frames. A send is decoded on this
  // thread without its checksum: one taken from a frame only partly read would have zeros in its
  // names or exactly-once key, which make up most of these frames (names of 32 characters, keys
  // of 64, texts of 1).
  const dir = tempDir(t, 'crc')
  const store = new Store({ dir, segmentBytes: 128, snapshotEveryRecords: Number.MAX_SAFE_INTEGER, snapshotEveryBytes: Number.MAX_SAFE_INTEGER })
  store.recover()
  const names = ['a'.repeat(31) + '1', 'b'.repeat(31) + '2']
  const head = (i: number): { i: number, e: number, ts: number } => ({ i, e: 0, ts: 1_700_000_000_000 + i })
  store.append(batch(names.map((user, k) => ({ ...head(k + 1), op: 'register', user, salt: 'salt', hash: 'hash' }))))
  for (let i = 3; i <= 1002; i += 200) {
    const sends: LogRecord[] = []
    for (let j = i; j < i + 200; j++) sends.push({ ...head(j), op: 'send', from: names[j % 2], to: names[1 - j % 2], text: String(j % 10), rk: `${names[j % 2]}\u0000${String(j).padStart(31, 'k')}` })
    store.append(batch(sends))
  }
  store.close()
  t.equal(fs.readdirSync(dir).filter(f => f.endsWith('.wal')).length, 6, 'the registrations, and five segments of sends')
  const { parallel } = sameBothWays(t, dir, 'sends')
  t.equal((parallel.view as { index: number }).index, 1002, 'every record')
})

// A data directory holding a snapshot of records 1..200 of the helpers' history, and the log of
// 201..301 after it; the snapshot's path.
function writeSnapshotted (t: Test): { dir: string, snapshot: string } {
  const dir = tempDir(t, 'crc-snap')
  const store = new Store({ dir, segmentBytes: 2048, snapshotEveryRecords: Number.MAX_SAFE_INTEGER, snapshotEveryBytes: Number.MAX_SAFE_INTEGER })
  const { state } = store.recover()
  for (let i = 1; i <= 200; i++) {
    const r = records(i, i)
    store.append(batch(r))
    state.apply(r[0])
  }
  store.snapshot(state)
  for (let i = 201; i <= n; i += 3) store.append(batch(records(i, Math.min(n, i + 2))))
  store.close()
  const snapshot = fs.readdirSync(dir).filter(f => f.endsWith('.snap')).map(f => path.join(dir, f))
  t.equal(snapshot.length, 1, 'one snapshot')
  return { dir, snapshot: snapshot[0] }
}

t.test('a snapshot read on the helper thread: the same state as inline, clean or damaged in any frame', async t => {
  const { dir, snapshot } = writeSnapshotted(t)
  const clean = fs.readFileSync(snapshot)
  const spans = frameSpans(clean)
  t.ok(spans.length >= 5, `${spans.length} frames: head, state, accounts, messages, rids, end`)
  t.equal(spans.at(-1)!.end, clean.length)
  const { parallel } = sameBothWays(t, dir, 'clean snapshot')
  t.equal((parallel.view as { index: number }).index, n, 'the snapshot and the log after it')
  t.notOk(rechecked(parallel))
  for (const [k, span] of spans.entries()) {
    for (const [what, at, mask] of [['a payload byte', Math.floor((span.start + 8 + span.end) / 2), 0x02], ['the last byte', span.end - 1, 0x01], ['the length', span.start + 1, 0x01]] as const) {
      const damaged = Buffer.from(clean)
      damaged[at] ^= mask
      fs.writeFileSync(snapshot, damaged)
      const { parallel } = sameBothWays(t, dir, `frame ${k}, ${what}`)
      t.match(parallel.error, /^CorruptSnapshotError: corrupt snapshot DIR\/snapshot-\d+\.snap at offset \d+/, `frame ${k}, ${what}: refused`)
    }
  }
  for (const cut of [0, 5, spans[1].start, spans[2].start + 9, spans.at(-1)!.start, clean.length - 1]) {
    fs.writeFileSync(snapshot, clean.subarray(0, cut))
    const { parallel } = sameBothWays(t, dir, `cut at ${cut}`)
    t.match(parallel.error, /^CorruptSnapshotError/, `cut at ${cut}: refused`)
  }
  fs.writeFileSync(snapshot, Buffer.concat([clean, clean.subarray(spans[1].start, spans[1].end)]))
  t.match(sameBothWays(t, dir, 'a frame after the end').parallel.error, /data after the end/)
  fs.writeFileSync(snapshot, clean)
})

t.test('the helper: a file it cannot read, or that is not what recovery read, means checking again', async t => {
  const dir = tempDir(t, 'crc')
  const file = path.join(dir, segmentName(1))
  fs.writeFileSync(file, batch(records(1, 5)).frames)
  const size = fs.statSync(file).size
  const check = new ParallelChecksums([file, path.join(dir, 'missing.wal')], limits.recordBytesMax)
  t.teardown(() => check.close())
  t.doesNotThrow(() => check.confirm(0, size, size), 'every frame good')
  t.type(thrown(() => check.confirm(0, size, size, true)), ChecksumRecheck, 'a frame used where the helper found none')
  t.match(thrown(() => check.confirm(0, size + 1, size)), { message: /could not read .* as recovery did/ }, 'another length')
  t.match(thrown(() => check.confirm(1, 0, 0)), { message: /could not read/ }, 'a missing file')
  // The memory the helper reads the file into: handed over once, and whole once readTo says so.
  const memory = check.take(0)
  t.equal(memory.readTo(size), size, 'read to the end')
  t.same(memory.buf, fs.readFileSync(file), 'the file, as read')
  t.type(thrown(() => check.take(0)), ChecksumRecheck, 'handed over once')
  t.match(thrown(() => check.take(1)), { message: /could not read .*missing\.wal/ }, 'no memory for a missing file')
  const slow = new ParallelChecksums([file], limits.recordBytesMax, 0)
  t.teardown(() => slow.close())
  const e = thrown(() => slow.confirm(0, size, size))
  t.ok(e === undefined || (e instanceof ChecksumRecheck && /no report/.test(e.message)), 'no report in time: check again (or it was quick)')
  // Read a byte at a time (the first four by this thread): the rest does not come at once.
  const slowRead = new ParallelChecksums([file], limits.recordBytesMax, 0, 1)
  t.teardown(() => slowRead.close())
  const r = thrown(() => slowRead.take(0).readTo(size))
  t.ok(r === undefined || (r instanceof ChecksumRecheck && /no word/.test(r.message)), 'no bytes in time: check again (or it was quick)')
})

t.test('a log too small for the helper is checked inline', async t => {
  const { dir } = writeLog(t)
  const warnings: string[] = []
  const store = new Store({ dir, warn: msg => { warnings.push(msg) } })
  t.teardown(() => store.close())
  t.equal(store.recover().replayed, n)
  t.ok(fs.readdirSync(dir).filter(f => f.endsWith('.wal')).reduce((s, f) => s + fs.statSync(path.join(dir, f)).size, 0) < limits.parallelChecksumBytes)
})
