import t, { type Test } from 'tap'
import fs from 'node:fs'
import path from 'node:path'
import { SegmentLog, CorruptLogError, segmentName, type Warn } from '../lib/storage/log.ts'
import { realFiles, type FileOps } from '../lib/storage/files.ts'
import { encodeFrame, encodeRecordFrame } from '../lib/storage/framing.ts'
import { Store } from '../lib/storage/store.ts'
import { ChatError } from '../lib/errors.ts'
import type { LogRecord } from '../lib/records.ts'
import { tempDir, record, records, batch, frameSpans, flipByte, errnoError, thrown, faultyFiles, type FaultyFiles } from './helpers/storage.ts'

interface Warning { msg: string, fields?: Record<string, unknown> }

function openLog (dir: string, files: FileOps = realFiles): { log: SegmentLog, warnings: Warning[] } {
  const warnings: Warning[] = []
  const warn: Warn = (msg, fields) => { warnings.push({ msg, fields }) }
  return { log: new SegmentLog(dir, files, warn), warnings }
}

// A store over a file system whose calls can be intercepted, holding records 1..n in its first
// segment (`file`).
function faultyStore (t: Test, n: number): { dir: string, ff: FaultyFiles, store: Store, file: string } {
  const dir = tempDir(t)
  const ff = faultyFiles()
  const store = new Store({ dir, files: ff.files })
  store.recover()
  store.append(batch(records(1, n)))
  return { dir, ff, store, file: path.join(dir, segmentName(1)) }
}

// Recover the log in dir from scratch and close it again: the records it holds, and the result.
function readLog (dir: string, afterIndex = 0): { recs: LogRecord[], truncatedBytes: number, lastIndex: number, warnings: Warning[] } {
  const { log, warnings } = openLog(dir)
  const recs: LogRecord[] = []
  try {
    const r = log.recover(afterIndex, x => { recs.push(x) })
    return { recs, ...r, warnings }
  } finally {
    log.close()
  }
}

// A log in a fresh directory holding records 1..n, written in batches of up to three frames
// (group commit) through SegmentLog.append. Returns the path of its only segment.
function writeLog (t: Test, n: number): { dir: string, file: string, bytes: Buffer, spans: Array<{ start: number, end: number }> } {
  const dir = tempDir(t, 'log')
  const { log } = openLog(dir)
  t.same(log.recover(0, () => { throw new Error('an empty log has no records') }), { lastIndex: 0, truncatedBytes: 0 })
  for (let i = 1; i <= n; i += 3) {
    const b = batch(records(i, Math.min(n, i + 2)))
    log.append(b.frames, b.lastIndex)
    t.equal(log.lastIndex, b.lastIndex)
  }
  log.close()
  t.same(fs.readdirSync(dir), [segmentName(1)])
  const file = path.join(dir, segmentName(1))
  const bytes = fs.readFileSync(file)
  const spans = frameSpans(bytes)
  t.equal(spans.length, n, 'one frame per record')
  t.equal(spans[n - 1].end, bytes.length, 'nothing but frames')
  return { dir, file, bytes, spans }
}

function expectCorrupt (t: Test, e: unknown, file: string, offset: number, why: RegExp): void {
  t.type(e, CorruptLogError, 'CorruptLogError')
  if (!(e instanceof CorruptLogError)) return
  t.equal(e.file, file, 'names the file')
  t.equal(e.offset, offset, 'names the offset')
  t.ok(e.message.includes(`${file} at offset ${offset}`), `message names file and offset: ${e.message}`)
  t.match(e.message, why)
}

t.test('an empty directory starts an empty log after the snapshot index', async t => {
  const dir = tempDir(t)
  fs.writeFileSync(path.join(dir, 'notes.txt'), 'not a segment')
  fs.writeFileSync(path.join(dir, 'log-1.wal'), 'not a segment name either')
  const { log } = openLog(dir)
  t.same(log.recover(41, () => t.fail('no records')), { lastIndex: 41, truncatedBytes: 0 })
  t.equal(log.lastIndex, 41)
  t.ok(fs.existsSync(path.join(dir, segmentName(42))), 'first segment named after the next index')
  log.append(encodeRecordFrame(record(42)), 42)
  log.close()
  const back = readLog(dir, 41)
  t.same(back.recs, [record(42)])
  t.equal(back.lastIndex, 42)
  t.equal(fs.readFileSync(path.join(dir, 'log-1.wal'), 'utf8'), 'not a segment name either', 'foreign files are left alone')
})

t.test('records written in batches come back in order; afterIndex skips the ones a snapshot covers', async t => {
  const { dir, bytes } = writeLog(t, 10)
  const all = readLog(dir)
  t.same(all.recs, records(1, 10))
  t.same({ lastIndex: all.lastIndex, truncatedBytes: all.truncatedBytes, warnings: all.warnings }, { lastIndex: 10, truncatedBytes: 0, warnings: [] })
  const tail = readLog(dir, 6)
  t.same(tail.recs, records(7, 10))
  t.equal(tail.lastIndex, 10)
  const none = readLog(dir, 10)
  t.same(none.recs, [])
  t.equal(none.lastIndex, 10)
  t.same(fs.readFileSync(path.join(dir, segmentName(1))), bytes, 'recovery of a clean log changes nothing')
})

t.test('torn tail: the last record cut at every byte offset', async t => {
  const n = 6
  const { dir, file, bytes, spans } = writeLog(t, n)
  const last = spans[n - 1]
  t.ok(last.end - last.start > 40, 'a record of some size')
  for (let cut = last.start; cut < last.end; cut++) {
    fs.writeFileSync(file, bytes.subarray(0, cut))
    const { log, warnings } = openLog(dir)
    const recs: LogRecord[] = []
    const res = log.recover(0, r => { recs.push(r) })
    const ok = t.same(recs, records(1, n - 1), `cut at ${cut}: the earlier records`) &&
      t.same(res, { lastIndex: n - 1, truncatedBytes: cut - last.start }, `cut at ${cut}: truncatedBytes`) &&
      t.equal(fs.statSync(file).size, last.start, `cut at ${cut}: file truncated to the last good record`) &&
      t.equal(warnings.length, cut > last.start ? 1 : 0, `cut at ${cut}: one warning for a torn write`)
    if (cut > last.start) t.match(warnings[0], { msg: /torn write/, fields: { file, offset: last.start, bytes: cut - last.start } })
    // The log takes appends at the cut, and they are recovered next time.
    const replacement = record(n, 3)
    log.append(encodeRecordFrame(replacement), n)
    log.close()
    const back = readLog(dir)
    const ok2 = t.same(back.recs, [...records(1, n - 1), replacement], `cut at ${cut}: the new append is recovered`) &&
      t.equal(back.truncatedBytes, 0)
    if (!ok || !ok2) break
  }
})

t.test('a damaged record followed by good records is corruption: refuse, name file and offset, touch nothing', async t => {
  const n = 8
  const { dir, file, bytes, spans } = writeLog(t, n)
  for (const k of [0, 3, n - 2]) {
    const { start, end } = spans[k]
    for (const at of [start + 4, Math.floor((start + 8 + end) / 2), end - 1]) { // checksum, middle of payload, last byte
      fs.writeFileSync(file, bytes)
      flipByte(file, at, 0x10)
      const damaged = fs.readFileSync(file)
      const e = thrown(() => openLog(dir).log.recover(0, () => {}))
      expectCorrupt(t, e, file, start, /checksum mismatch/)
      t.ok(fs.readFileSync(file).equals(damaged), `record ${k + 1}, byte ${at}: file left untouched`)
    }
  }
  // Through the Store as well.
  fs.writeFileSync(file, bytes)
  flipByte(file, Math.floor((spans[2].start + spans[2].end) / 2))
  const damaged = fs.readFileSync(file)
  const store = new Store({ dir })
  expectCorrupt(t, thrown(() => store.recover()), file, spans[2].start, /checksum mismatch/)
  t.ok(fs.readFileSync(file).equals(damaged), 'Store.recover leaves it untouched too')
})

t.test('a damaged length field in an earlier record is corruption, not a torn tail', async t => {
  // The length now claims the frame runs past the end of the file, so it decodes as "short";
  // but three good records follow it, so this cannot be a torn write at the end.
  const n = 6
  const { dir, file, bytes, spans } = writeLog(t, n)
  const { start } = spans[2]
  flipByte(file, start + 2, 0x01) // length += 65536, still within recordBytesMax
  const damaged = fs.readFileSync(file)
  const recs: LogRecord[] = []
  const e = thrown(() => openLog(dir).log.recover(0, r => { recs.push(r) }))
  expectCorrupt(t, e, file, start, /./)
  t.equal(fs.statSync(file).size, bytes.length, 'records 4..6 are not cut off')
  t.ok(fs.readFileSync(file).equals(damaged), 'file left untouched')
})

t.test('a damaged last record is a torn tail', async t => {
  const n = 5
  const { dir, file, bytes, spans } = writeLog(t, n)
  const { start, end } = spans[n - 1]
  const positions = [start, start + 1, start + 3, start + 4, start + 7, start + 8, Math.floor((start + end) / 2), end - 1]
  for (const at of positions) {
    for (const mask of [0x01, 0xff]) {
      fs.writeFileSync(file, bytes)
      flipByte(file, at, mask)
      const r = readLog(dir)
      t.same(r.recs, records(1, n - 1), `byte ${at} ^ ${mask}: earlier records kept`)
      t.equal(r.truncatedBytes, end - start, `byte ${at} ^ ${mask}: the whole last record truncated`)
      t.equal(fs.statSync(file).size, start)
      t.equal(r.warnings.length, 1)
    }
  }
})

t.test('a run of zeros after the last record is preallocated space: the end of the records, left as it is', async t => {
  const n = 5
  const { dir, file, bytes } = writeLog(t, n)
  for (const zeros of [4096, 5, 1]) { // a zeroed header of fewer than eight bytes too
    fs.writeFileSync(file, Buffer.concat([bytes, Buffer.alloc(zeros)]))
    const r = readLog(dir)
    t.same(r.recs, records(1, n), `${zeros} zeros: all records`)
    t.same({ lastIndex: r.lastIndex, truncatedBytes: r.truncatedBytes, warnings: r.warnings }, { lastIndex: n, truncatedBytes: 0, warnings: [] }, `${zeros} zeros: no damage`)
    t.equal(fs.statSync(file).size, bytes.length + zeros, `${zeros} zeros: kept`)
  }
  // The next append goes over the zeros, not after them.
  const { log } = openLog(dir)
  log.recover(0, () => {})
  log.append(batch([record(n + 1)]).frames, n + 1)
  log.close()
  t.same(readLog(dir).recs, records(1, n + 1), 'the record after the zeros\' start is read back')
  t.same(frameSpans(fs.readFileSync(file)).length, n + 1)
})

t.test('garbage without any valid frame after the last record is a torn tail', async t => {
  const n = 4
  const { dir, file, bytes } = writeLog(t, n)
  const half = encodeRecordFrame(record(n + 1)).subarray(0, 30)
  const bad = encodeRecordFrame(record(n + 1))
  bad[bad.length - 5] ^= 0x01 // object-shaped frame with a bad checksum
  const noise = Buffer.alloc(700)
  let x = 99
  for (let k = 0; k < noise.length; k++) { x = (Math.imul(x, 1103515245) + 12345) >>> 0; noise[k] = x >>> 24 }
  for (const [name, tail] of [['text', Buffer.from('{"this is": "not a frame"}\n')], ['noise', noise], ['frame with bad crc then noise', Buffer.concat([bad, noise])], ['noise then half a frame', Buffer.concat([noise, half])]] as const) {
    fs.writeFileSync(file, Buffer.concat([bytes, tail]))
    const r = readLog(dir)
    t.same(r.recs, records(1, n), `${name}: all records`)
    t.equal(r.truncatedBytes, tail.length, `${name}: truncated`)
    t.same(fs.readFileSync(file), bytes, `${name}: file back to the good records`)
  }
})

t.test('garbage followed by a valid frame at the end is corruption', async t => {
  const n = 4
  const { dir, file, bytes } = writeLog(t, n)
  const tail = Buffer.concat([Buffer.from('junk junk junk'), encodeRecordFrame(record(n + 1))])
  fs.writeFileSync(file, Buffer.concat([bytes, tail]))
  expectCorrupt(t, thrown(() => readLog(dir)), file, bytes.length, /length \d+ out of range|checksum/)
  t.equal(fs.statSync(file).size, bytes.length + tail.length, 'not truncated')
})

t.test('record indexes must increase by exactly one', async t => {
  const cases: Array<[string, LogRecord[], number, string]> = [
    ['a skipped index', [record(1), record(2), record(3), record(5), record(6)], 3, 'record index 5 where 4 was expected'],
    ['a repeated index', [record(1), record(2), record(2), record(3)], 2, 'record index 2 where 3 was expected'],
    ['a skip in the very last record', [record(1), record(2), record(4)], 2, 'record index 4 where 3 was expected'],
    ['a segment whose first record does not match its name', [record(2), record(3)], 0, 'record index 2 where 1 was expected']
  ]
  for (const [name, rs, bad, why] of cases) {
    const dir = tempDir(t)
    const file = path.join(dir, segmentName(1))
    const frames = rs.map(r => encodeRecordFrame(r))
    fs.writeFileSync(file, Buffer.concat(frames))
    const offset = frames.slice(0, bad).reduce((s, f) => s + f.length, 0)
    t.test(name, async t => {
      expectCorrupt(t, thrown(() => readLog(dir)), file, offset, new RegExp(why))
      t.equal(fs.statSync(file).size, frames.reduce((s, f) => s + f.length, 0), 'nothing truncated')
    })
  }
})

t.test('a checksummed frame that is not a log record, followed by records, is corruption', async t => {
  const dir = tempDir(t)
  const file = path.join(dir, segmentName(1))
  const a = encodeRecordFrame(record(1))
  for (const [name, value] of [['no index', { op: 'noop', e: 0, ts: 1 }], ['index 0', { ...record(2), i: 0 }], ['string index', { ...record(2), i: '2' }], ['no op', { i: 2, e: 0, ts: 1 }], ['no ts', { i: 2, e: 0, op: 'noop' }]] as const) {
    t.test(name, async t => {
      fs.writeFileSync(file, Buffer.concat([a, encodeFrame(value), encodeRecordFrame(record(2))]))
      expectCorrupt(t, thrown(() => readLog(dir)), file, a.length, /not a log record/)
    })
  }
})

t.test('segments: roll, recovery across segments, compaction', async t => {
  const dir = tempDir(t)
  const { log } = openLog(dir)
  log.recover(0, () => {})
  log.roll()
  t.same(fs.readdirSync(dir), [segmentName(1)], 'rolling an empty segment is a no-op')
  log.append(batch(records(1, 4)).frames, 4)
  log.roll()
  t.equal(log.currentSegmentBytes, 0, 'appends go to the new segment')
  log.append(batch(records(5, 7)).frames, 7)
  log.roll()
  log.append(batch(records(8, 9)).frames, 9)
  log.close()
  t.same(fs.readdirSync(dir).sort(), [segmentName(1), segmentName(5), segmentName(8)])
  t.same(readLog(dir).recs, records(1, 9), 'one log across three segments')
  t.same(readLog(dir, 5).recs, records(6, 9))

  const { log: log2 } = openLog(dir)
  log2.recover(0, () => {})
  t.equal(log2.compact(3), 0, 'segment 1..4 still holds record 4')
  t.equal(log2.compact(4), 1, 'segment 1..4 is covered by a snapshot at 4')
  t.same(fs.readdirSync(dir).sort(), [segmentName(5), segmentName(8)])
  t.equal(log2.compact(100), 1, 'the last segment is never removed')
  t.same(fs.readdirSync(dir), [segmentName(8)])
  log2.close()
  t.same(readLog(dir, 7).recs, records(8, 9), 'what is left recovers after a snapshot at 7')
  expectCorrupt(t, thrown(() => readLog(dir, 5)), path.join(dir, segmentName(8)), 0, /log resumes at 8 but the snapshot ends at 5/)
  expectCorrupt(t, thrown(() => readLog(dir, 0)), path.join(dir, segmentName(8)), 0, /log resumes at 8 but the snapshot ends at 0/)
})

// The segments in dir, in order, with their first index and size.
function segmentFiles (dir: string): Array<{ first: number, bytes: number, file: string }> {
  return fs.readdirSync(dir).filter(f => f.endsWith('.wal')).sort()
    .map(f => ({ first: Number(f.slice(4, 24)), bytes: fs.statSync(path.join(dir, f)).size, file: path.join(dir, f) }))
}

t.test('segments: the open segment is closed once it holds segmentBytes, snapshot or not', async t => {
  const dir = tempDir(t)
  const warnings: Warning[] = []
  const log = new SegmentLog(dir, realFiles, (msg, fields) => { warnings.push({ msg, fields }) }, 0, 1000)
  log.recover(0, () => {})
  let biggestBatch = 0
  for (let i = 1; i <= 60; i += 3) {
    const b = batch(records(i, i + 2))
    biggestBatch = Math.max(biggestBatch, b.frames.length)
    log.append(b.frames, b.lastIndex)
  }
  log.close()
  const segs = segmentFiles(dir)
  t.ok(segs.length >= 4, `${segs.length} segments for about ${segs.reduce((n, x) => n + x.bytes, 0)} bytes`)
  for (const seg of segs.slice(0, -1)) {
    t.ok(seg.bytes >= 1000 && seg.bytes < 1000 + biggestBatch, `a closed segment holds its bound and at most one batch more (${seg.bytes} bytes)`)
  }
  t.same(segs.map(x => (x.first - 1) % 3), segs.map(() => 0), 'each segment starts with a batch')
  t.same(warnings, [])
  t.same(readLog(dir).recs, records(1, 60), 'one log across every segment')

  const { log: log2 } = openLog(dir)
  log2.recover(0, () => {})
  t.same([...log2.readFrom(1, 7)].flat(), records(1, 60), 'a peer catching up reads across them')
  t.same([...log2.readFrom(segs[1].first + 1, 7)].flat(), records(segs[1].first + 1, 60))
  const cut = segs[1].first + 1 // inside the second segment
  log2.truncateAfter(cut)
  t.same(segmentFiles(dir).map(x => x.first), [1, segs[1].first], 'later segments removed')
  log2.append(batch([record(cut + 1)]).frames, cut + 1)
  t.equal(log2.compact(segs[1].first - 1), 1, 'the first segment is covered by a snapshot at its last record')
  log2.close()
  t.same(readLog(dir, segs[1].first - 1).recs, records(segs[1].first, cut + 1))
})

t.test('segments: a new segment that is created but cannot be used is removed again; appends go on', async t => {
  const dir = tempDir(t)
  const ff = faultyFiles()
  const warnings: Warning[] = []
  const log = new SegmentLog(dir, ff.files, (msg, fields) => { warnings.push({ msg, fields }) }, 0, 500)
  log.recover(0, () => {})
  // The new segment file is created, and the directory synced, but opening it to write fails.
  const first = path.join(dir, segmentName(1))
  ff.hooks.openSync = ((p: fs.PathLike, flags: fs.OpenMode, mode?: fs.Mode) => {
    if (String(p).endsWith('.wal') && String(p) !== first && flags === 'r+') throw errnoError('EMFILE')
    return ff.real.openSync(p, flags, mode)
  }) as typeof fs.openSync
  for (let i = 1; i <= 30; i += 3) log.append(batch(records(i, i + 2)).frames, i + 2)
  t.same(segmentFiles(dir).map(x => x.first), [1], 'no new segment is left behind')
  t.ok(fs.statSync(first).size > 500, 'the records went on into the first segment')
  t.ok(warnings.length >= 1, `${warnings.length} warnings`)
  t.match(warnings[0], { msg: /could not start a new log segment/, fields: { error: /EMFILE/ } })
  t.ok(warnings.length < 10, 'not a try before every append: a sixteenth of a segment apart')
  t.equal(log.failed, null)

  delete ff.hooks.openSync
  log.append(batch(records(31, 33)).frames, 33)
  t.same(segmentFiles(dir).map(x => x.first), [1, 31], 'the next try after the fault is gone starts a new segment')
  log.close()
  t.same(readLog(dir).recs, records(1, 33))
})

t.test('segments: if an unusable new segment cannot be removed either, the log fails and what it holds recovers', async t => {
  const dir = tempDir(t)
  const ff = faultyFiles()
  const log = new SegmentLog(dir, ff.files, () => {}, 0, 500)
  log.recover(0, () => {})
  const first = path.join(dir, segmentName(1))
  let n = 0
  while (fs.statSync(first).size < 500) {
    log.append(batch([record(n + 1)]).frames, n + 1)
    n++
  }
  ff.hooks.openSync = ((p: fs.PathLike, flags: fs.OpenMode, mode?: fs.Mode) => {
    if (String(p).endsWith('.wal') && String(p) !== first && flags === 'r+') throw errnoError('EMFILE')
    return ff.real.openSync(p, flags, mode)
  }) as typeof fs.openSync
  ff.hooks.unlinkSync = () => { throw errnoError('EIO') }
  const e = thrown(() => log.append(batch([record(n + 1)]).frames, n + 1))
  t.match(e, { code: 'STORAGE_ERROR', message: /EIO/ }, 'the append is refused')
  t.match(log.failed, { code: 'STORAGE_ERROR' }, 'the log is failed')
  t.same(segmentFiles(dir).map(x => x.first), [1, n + 1], 'the empty new segment stays, right after the last record')
  delete ff.hooks.openSync
  delete ff.hooks.unlinkSync
  t.equal(thrown(() => log.append(batch([record(n + 1)]).frames, n + 1)), log.failed, 'later appends are refused too')
  log.close()
  const back = readLog(dir)
  t.same(back.recs, records(1, n), 'everything appended before recovers')
  t.equal(back.lastIndex, n)
})

t.test('an empty first segment that starts after the snapshot index is corruption', async t => {
  const dir = tempDir(t)
  const file = path.join(dir, segmentName(8))
  fs.writeFileSync(file, '')
  expectCorrupt(t, thrown(() => readLog(dir, 5)), file, 0, /log resumes at 8 but the snapshot ends at 5/)
  t.same(readLog(dir, 7), { recs: [], lastIndex: 7, truncatedBytes: 0, warnings: [] }, 'but fine right after it')
  t.same(fs.readdirSync(dir), [segmentName(8)])
})

t.test('a missing middle segment or a torn tail in a segment that is not the last is corruption', async t => {
  const dir = tempDir(t)
  const { log } = openLog(dir)
  log.recover(0, () => {})
  for (const [a, b] of [[1, 3], [4, 6], [7, 8]]) {
    log.append(batch(records(a, b)).frames, b)
    log.roll()
  }
  log.close()
  t.same(fs.readdirSync(dir).sort(), [segmentName(1), segmentName(4), segmentName(7), segmentName(9)], 'the last one empty')
  t.same(readLog(dir).recs, records(1, 8), 'an empty last segment is fine')

  const middle = path.join(dir, segmentName(4))
  const mid = fs.readFileSync(middle)
  fs.appendFileSync(middle, Buffer.alloc(100, 0xab))
  expectCorrupt(t, thrown(() => readLog(dir)), middle, mid.length, /out of range/)
  t.equal(fs.statSync(middle).size, mid.length + 100, 'not truncated')
  fs.writeFileSync(middle, mid.subarray(0, mid.length - 3))
  expectCorrupt(t, thrown(() => readLog(dir)), middle, frameSpans(mid)[2].start, /cut short/)

  fs.unlinkSync(middle)
  expectCorrupt(t, thrown(() => readLog(dir)), path.join(dir, segmentName(7)), 0, /segment starts at 7 but the previous one ends at 3/)
})

t.test('a log that ends before the snapshot index can be recovered, appended to, and recovered again', async t => {
  // A snapshot at 10 with a log that only reaches 5 (say, restored from a peer's snapshot):
  // the first recovery starts a fresh segment at 11; the restart after it must work as well.
  const { dir } = writeLog(t, 5)
  const { log } = openLog(dir)
  t.same(log.recover(10, () => t.fail('records 1..5 are covered')), { lastIndex: 10, truncatedBytes: 0 })
  log.append(encodeRecordFrame(record(11)), 11)
  log.close()
  const again = thrown(() => readLog(dir, 10))
  t.equal(again, undefined, `the second recovery succeeds (got ${String(again)})`)
  if (again === undefined) t.same(readLog(dir, 10).recs, [record(11)])
})

t.test('ENOSPC partway through a batch: cut back, still usable, nothing of it recovered', async t => {
  const { dir, ff, store, file } = faultyStore(t, 5)
  const before = fs.statSync(file).size
  t.equal(store.log.currentSegmentBytes, before)

  const failing = [record(6), record(7)]
  const firstLen = encodeRecordFrame(failing[0]).length
  let writes = 0
  const enospc = errnoError('ENOSPC', 'no space left on device')
  ff.hooks.writeSync = (fd, buf, offset, length, position) => {
    if (writes++ === 0) return ff.real.writeSync(fd, buf, offset, Math.min(length, firstLen + 5), position) // record 6 whole, a bit of 7
    throw enospc
  }
  const e = thrown(() => store.append(batch(failing)))
  t.type(e, ChatError)
  t.match(e, { code: 'STORAGE_ERROR', message: /ENOSPC/, cause: enospc })
  t.equal(writes, 2, 'a short write, then the failure')
  t.equal(ff.calls.ftruncateSync, 1)
  t.equal(fs.statSync(file).size, before, 'file cut back to its size before the append')
  t.equal(store.log.failed, null, 'the log stays usable')
  t.equal(store.log.lastIndex, 5)
  t.equal(store.log.currentSegmentBytes, before)
  const syncs = ff.calls.fdatasyncSync

  delete ff.hooks.writeSync
  const healed = [record(6, 1), record(7, 1)] // different bytes from the failed ones
  store.append(batch(healed))
  t.equal(ff.calls.fdatasyncSync, syncs + 1, 'the healed append is synced')
  t.equal(store.log.lastIndex, 7)
  store.append(batch([record(8)]))
  store.close()
  const back = readLog(dir)
  t.same(back.recs, [...records(1, 5), ...healed, record(8)], 'the healed append and the one after it, none of the failed one')
  t.equal(back.truncatedBytes, 0)
})

t.test('a failure to cut back a failed write fails the log', async t => {
  const { dir, ff, store, file } = faultyStore(t, 2)
  const before = fs.statSync(file).size
  let writes = 0
  ff.hooks.writeSync = (fd, buf, offset, length, position) => {
    if (writes++ === 0) return ff.real.writeSync(fd, buf, offset, 3, position)
    throw errnoError('EIO')
  }
  ff.hooks.ftruncateSync = () => { throw errnoError('EROFS') }
  const e = thrown(() => store.append(batch([record(3)])))
  t.match(e, { code: 'STORAGE_ERROR', message: /EIO/ }, 'the write error is reported')
  t.match(store.log.failed, { code: 'STORAGE_ERROR', message: /EROFS/ }, 'the log is failed: 3 stray bytes remain')
  delete ff.hooks.writeSync
  delete ff.hooks.ftruncateSync
  const writesBefore = ff.calls.writeSync
  t.equal(thrown(() => store.append(batch([record(3)]))), store.log.failed, 'later appends are refused')
  t.equal(ff.calls.writeSync, writesBefore, 'without writing')
  t.equal(fs.statSync(file).size, before + 3)
  store.close()
  const back = readLog(dir)
  t.same(back.recs, records(1, 2), 'the stray bytes are a torn tail at the next start')
  t.equal(back.truncatedBytes, 3)
})

t.test('fdatasync EIO fails the log: every later append throws without writing', async t => {
  const { ff, store, file } = faultyStore(t, 3)
  const eio = errnoError('EIO', 'i/o error')
  ff.hooks.fdatasyncSync = () => { throw eio }
  const e = thrown(() => store.append(batch([record(4)])))
  t.type(e, ChatError)
  t.match(e, { code: 'STORAGE_ERROR', message: /EIO/, cause: eio })
  t.equal(store.log.failed, e, 'log.failed is the error')
  t.equal(store.log.lastIndex, 3, 'the failed batch is not counted')
  const size = fs.statSync(file).size
  delete ff.hooks.fdatasyncSync // a healthy disk again does not help: the page cache cannot be trusted
  const counts = { ...ff.calls }
  for (const b of [[record(4)], [record(4, 1), record(5, 1)], [record(6)]]) {
    t.equal(thrown(() => store.append(batch(b))), e, `append of ${b.length} refused with the same error`)
  }
  t.equal(ff.calls.writeSync, counts.writeSync, 'nothing written')
  t.equal(ff.calls.fdatasyncSync, counts.fdatasyncSync, 'nothing synced')
  t.equal(fs.statSync(file).size, size, 'file size unchanged')
  t.equal(store.log.lastIndex, 3)
  store.close()
})

// appendAsync: the write is synchronous, the fdatasync runs in the thread pool.
function appendAsync (store: Store, rs: LogRecord[]): Promise<ChatError | null> {
  return new Promise(resolve => store.appendAsync(batch(rs), resolve))
}

t.test('appendAsync: durable and counted only once its fdatasync is done; one at a time', async t => {
  const { dir, ff, store, file } = faultyStore(t, 2)
  const done = appendAsync(store, records(3, 5))
  t.equal(ff.calls.fdatasync, 1, 'the fdatasync was started')
  t.equal(store.log.lastIndex, 2, 'not counted while the fdatasync runs')
  t.ok(fs.statSync(file).size > store.log.currentSegmentBytes, 'though the bytes are written')
  t.throws(() => store.append(batch([record(6)])), /in flight/, 'a synchronous append waits its turn')
  t.throws(() => store.appendAsync(batch([record(6)]), () => {}), /in flight/, 'so does another appendAsync')
  t.equal(await done, null)
  t.equal(store.log.lastIndex, 5)
  t.equal(store.log.currentSegmentBytes, fs.statSync(file).size)
  t.equal(await appendAsync(store, [record(6)]), null, 'the next one may go')
  store.append(batch([record(7)]))
  store.close()
  t.same(readLog(dir).recs, records(1, 7))
})

t.test('appendAsync: a failed fdatasync fails the log and takes the batch back out', async t => {
  const { dir, ff, store, file } = faultyStore(t, 3)
  const size = fs.statSync(file).size
  const eio = errnoError('EIO', 'i/o error')
  ff.hooks.fdatasync = (_fd, cb) => { setImmediate(cb, eio) }
  const e = await appendAsync(store, [record(4), record(5)])
  t.type(e, ChatError)
  t.match(e, { code: 'STORAGE_ERROR', message: /EIO/, cause: eio })
  t.equal(store.log.failed, e, 'the log is failed')
  t.equal(store.log.lastIndex, 3)
  t.equal(fs.statSync(file).size, size, 'the batch was cut back off')
  delete ff.hooks.fdatasync
  t.equal(thrown(() => store.appendAsync(batch([record(4)]), () => t.fail('no callback'))), e, 'later appends are refused')
  store.close()
  t.same(readLog(dir).recs, records(1, 3))
})

t.test('appendAsync: a log truncated while the fdatasync runs reports it and is not failed', async t => {
  const { dir, ff, store } = faultyStore(t, 3)
  let release: () => void = () => {}
  ff.hooks.fdatasync = (fd, cb) => { release = () => ff.real.fdatasync(fd, cb) }
  const done = appendAsync(store, records(4, 6))
  store.log.truncateAfter(3) // a replica discarding what the chain never committed
  t.equal(store.log.lastIndex, 3)
  release()
  t.match(await done, { code: 'UNAVAILABLE' }, 'the caller learns the write did not count')
  t.equal(store.log.failed, null, 'the log is not failed')
  t.equal(store.log.lastIndex, 3)
  delete ff.hooks.fdatasync
  store.append(batch([record(4, 2)])) // appends work again at once
  store.close()
  t.same(readLog(dir).recs, [...records(1, 3), record(4, 2)])
})

t.test('appendStats: appends counted once durable, with their records and bytes, and the time of the latest 1,024', async t => {
  // The log's clock is performance.now(): here it moves only when the file hooks move it, so the
  // times are exact, whatever else the machine is doing.
  let clock = 0
  const realNow = performance.now
  performance.now = () => clock
  t.teardown(() => { performance.now = realNow })
  const { ff, store, file } = faultyStore(t, 2)
  t.match(store.log.appendStats(), { appends: 1, records: 2, bytes: fs.statSync(file).size, syncMs: { p50: 0, p99: 0, max: 0 } }, 'the first append, two records')
  ff.hooks.fdatasyncSync = (fd) => { clock += 4; ff.real.fdatasyncSync(fd) }
  for (let i = 3; i < 13; i++) store.append(batch([record(i)]))
  let st = store.log.appendStats()
  t.match(st, { appends: 11, records: 12 })
  t.same(st.syncMs, { p50: 4, p99: 4, max: 4 }, 'ten fdatasyncs of 4 ms beside one of none')
  // The time runs from the write to the fdatasync's end as the event loop sees it.
  ff.hooks.fdatasync = (fd, cb) => { setTimeout(() => { clock += 30; ff.real.fdatasync(fd, cb) }, 5) }
  t.equal(await appendAsync(store, records(13, 15)), null)
  st = store.log.appendStats()
  t.match(st, { appends: 12, records: 15, bytes: fs.statSync(file).size })
  t.same(st.syncMs, { p50: 4, p99: 30, max: 30 }, 'an appendAsync counts its wait')
  // Neither a failed write nor one the log let go of while it ran counts.
  let release: () => void = () => {}
  ff.hooks.fdatasync = (fd, cb) => { release = () => ff.real.fdatasync(fd, cb) }
  const done = appendAsync(store, [record(16)])
  store.log.truncateAfter(15)
  release()
  t.match(await done, { code: 'UNAVAILABLE' })
  t.match(store.log.appendStats(), { appends: 12, records: 15 }, 'the append let go of is not counted')
  // Only the latest 1,024 make the times: after 1,024 instant ones, the slow ones are gone.
  ff.hooks.fdatasyncSync = () => {}
  for (let i = 16; i < 16 + 1024; i++) store.append(batch([record(i)]))
  st = store.log.appendStats()
  t.match(st, { appends: 12 + 1024, records: 15 + 1024, bytes: fs.statSync(file).size })
  t.same(st.syncMs, { p50: 0, p99: 0, max: 0 }, 'the slow ones left the window')
  store.close()
})

// ---- preallocation ------------------------------------------------------------------------

const prealloc = 4096

function openPreallocated (dir: string, files: FileOps = realFiles): { log: SegmentLog, warnings: Warning[] } {
  const warnings: Warning[] = []
  return { log: new SegmentLog(dir, files, (msg, fields) => { warnings.push({ msg, fields }) }, prealloc), warnings }
}

// A new preallocated log in a fresh directory, recovered (empty) and open; `file` is its first
// segment.
function newPreallocated (t: Test, files: FileOps = realFiles): { dir: string, file: string, log: SegmentLog, warnings: Warning[] } {
  const dir = tempDir(t)
  const { log, warnings } = openPreallocated(dir, files)
  log.recover(0, () => {})
  return { dir, file: path.join(dir, segmentName(1)), log, warnings }
}

// The bytes of a file after its frames: their count, and whether they are all zeros.
function tailAfterFrames (file: string): { frames: number, padding: number, zeros: boolean } {
  const buf = fs.readFileSync(file)
  const spans = frameSpans(buf)
  const end = spans.length > 0 ? spans[spans.length - 1].end : 0
  return { frames: spans.length, padding: buf.length - end, zeros: buf.subarray(end).every(b => b === 0) }
}

t.test('preallocation: the open segment runs ahead of its records in zeros, whole multiples at a time', async t => {
  const { dir, file, log, warnings } = newPreallocated(t)
  t.equal(fs.statSync(file).size, 0, 'nothing written, nothing allocated')
  let written = 0
  for (let i = 1; i <= 40; i += 4) {
    const b = batch(records(i, i + 3))
    log.append(b.frames, b.lastIndex)
    written += b.frames.length
    const size = fs.statSync(file).size
    t.equal(size % prealloc, 0, `after ${b.lastIndex}: a whole multiple`)
    t.ok(size > written, `after ${b.lastIndex}: ahead of the records`)
    t.same(tailAfterFrames(file), { frames: b.lastIndex, padding: size - written, zeros: true })
  }
  t.equal(log.currentSegmentBytes, written, 'the size counts records only')
  // A batch bigger than the step extends past it in one go.
  const big = batch([{ ...record(41), op: 'send', from: 'alice', to: 'bob', text: 'x'.repeat(3 * prealloc) } as LogRecord])
  log.append(big.frames, 41)
  written += big.frames.length
  t.equal(fs.statSync(file).size, Math.ceil((written + 1) / prealloc) * prealloc)
  log.close()
  const r = readLog(dir)
  t.equal(r.lastIndex, 41)
  t.same(r.recs.slice(0, 40), records(1, 40))
  t.same({ truncatedBytes: r.truncatedBytes, warnings: r.warnings, mine: warnings }, { truncatedBytes: 0, warnings: [], mine: [] }, 'zeros are no damage')

  // Reopened, it goes on over its own zeros.
  const again = openPreallocated(dir)
  t.same(again.log.recover(0, () => {}), { lastIndex: 41, truncatedBytes: 0 })
  const sizeBefore = fs.statSync(file).size
  again.log.append(batch([record(42)]).frames, 42)
  t.equal(fs.statSync(file).size, sizeBefore, 'written into the zeros')
  t.equal(again.log.currentSegmentBytes, written + encodeRecordFrame(record(42)).length)
  again.log.close()
  t.equal(readLog(dir).lastIndex, 42)
})

t.test('preallocation: rolling trims the old segment to its records; zeros left in an older segment still recover', async t => {
  const { dir, file: first, log } = newPreallocated(t)
  const b = batch(records(1, 4))
  log.append(b.frames, 4)
  log.roll()
  t.equal(fs.statSync(first).size, b.frames.length, 'trimmed')
  log.append(batch(records(5, 7)).frames, 7)
  log.close()
  t.same(readLog(dir).recs, records(1, 7))
  // A crash before the trim reached the disk leaves zeros after segment 1's records.
  fs.appendFileSync(first, Buffer.alloc(prealloc - 10))
  const r = readLog(dir)
  t.same(r.recs, records(1, 7))
  t.same(r.warnings, [])
})

t.test('preallocation: a torn frame over the zeros is a torn tail; the log is preallocated again after it', async t => {
  const { dir, file, log } = newPreallocated(t)
  const b = batch(records(1, 3))
  log.append(b.frames, 3)
  log.close()
  // A crash mid-write: the start of frame 4 reached the disk, the rest of the page did not.
  const fd = fs.openSync(file, 'r+')
  fs.writeSync(fd, encodeRecordFrame(record(4)).subarray(0, 20), 0, 20, b.frames.length)
  fs.closeSync(fd)
  const again = openPreallocated(dir)
  const res = again.log.recover(0, () => {})
  t.equal(res.lastIndex, 3)
  t.equal(res.truncatedBytes, prealloc - b.frames.length, 'the torn frame and the zeros after it')
  t.match(again.warnings, [{ msg: /torn write/, fields: { offset: b.frames.length } }])
  t.equal(fs.statSync(file).size, b.frames.length)
  again.log.append(batch([record(4)]).frames, 4)
  t.equal(fs.statSync(file).size, prealloc, 'preallocated again')
  again.log.close()
  t.same(readLog(dir).recs, records(1, 4))
})

t.test('preallocation: when the zeros cannot be written (a full disk), records are appended as without it', async t => {
  const ff = faultyFiles()
  const { dir, file, log } = newPreallocated(t, ff.files)
  const first = batch(records(1, 2))
  // The first zero write runs out of room halfway.
  let zeroWrites = 0
  ff.hooks.writeSync = (fd, buf, offset, length, position) => {
    if (buf.every(x => x === 0) && zeroWrites++ === 0) {
      ff.real.writeSync(fd, buf, offset, Math.floor(length / 2), position)
      throw errnoError('ENOSPC', 'no space left on device')
    }
    return ff.real.writeSync(fd, buf, offset, length, position)
  }
  log.append(first.frames, 2)
  t.equal(zeroWrites, 1)
  t.equal(fs.statSync(file).size, first.frames.length, 'the zeros cut back off; the records written')
  log.append(batch([record(3)]).frames, 3)
  t.equal(zeroWrites, 1, 'no second try in this segment')
  t.same(tailAfterFrames(file), { frames: 3, padding: 0, zeros: true })
  // The next segment tries again.
  log.roll()
  log.append(batch([record(4)]).frames, 4)
  t.equal(zeroWrites, 2)
  t.equal(fs.statSync(path.join(dir, segmentName(4))).size, prealloc)
  log.close()
  t.same(readLog(dir).recs, records(1, 4))
})

t.test('preallocation: a failed record write cuts back to the records, zeros and all', async t => {
  const ff = faultyFiles()
  const { dir, file, log } = newPreallocated(t, ff.files)
  const b = batch(records(1, 3))
  log.append(b.frames, 3)
  ff.hooks.writeSync = () => { throw errnoError('EIO') }
  t.match(thrown(() => log.append(batch([record(4)]).frames, 4)), { code: 'STORAGE_ERROR' })
  delete ff.hooks.writeSync
  t.equal(fs.statSync(file).size, b.frames.length)
  t.equal(log.failed, null)
  log.append(batch([record(4)]).frames, 4)
  t.equal(fs.statSync(file).size, prealloc, 'preallocated again on the next write')
  log.close()
  t.same(readLog(dir).recs, records(1, 4))
})
