import t, { type Test } from 'tap'
import fs from 'node:fs'
import path from 'node:path'
import { writeSnapshot, loadNewestSnapshot, removeOldSnapshots, CorruptSnapshotError } from '../lib/storage/snapshot.ts'
import { realFiles } from '../lib/storage/files.ts'
import { decodeFrame, encodeFrame, frameHeaderBytes } from '../lib/storage/framing.ts'
import { ChatState } from '../lib/state.ts'
import { limits } from '../lib/limits.ts'
import type { LogRecord, RecordBody } from '../lib/records.ts'
import { tempDir, frameSpans, flipByte, errnoError, thrown, faultyFiles } from './helpers/storage.ts'

const snapName = (index: number): string => `snapshot-${String(index).padStart(20, '0')}.snap`

const chunks = [
  { kind: 'state', version: 1, index: 7, lastTs: 1234 },
  { kind: 'account', name: 'Alice', salt: 's', hash: 'h', created: 1, messages: [[3, 'Bob', 'Alice', 'hi \u00e9', 99, 0]] },
  { kind: 'account', name: 'Bob', salt: 's2', hash: 'h2', created: 2, messages: [] },
  { kind: 'rids', entries: [['alice\u0000r1', 5, { ok: true }]] }
]

function expectCorrupt (t: Test, e: unknown, file: string, offset: number, why: RegExp): void {
  t.type(e, CorruptSnapshotError, 'CorruptSnapshotError')
  if (!(e instanceof CorruptSnapshotError)) return
  t.equal(e.file, file, 'names the file')
  t.equal(e.offset, offset, 'names the offset')
  t.ok(e.message.includes(`${file} at offset ${offset}`), `message names file and offset: ${e.message}`)
  t.match(e.message, why)
}

function writeFrames (file: string, values: object[]): void {
  fs.writeFileSync(file, Buffer.concat(values.map(v => encodeFrame(v))))
}

t.test('writeSnapshot lays out head, chunks, end, and leaves no temporary file', async t => {
  const dir = tempDir(t, 'snap')
  const ff = faultyFiles()
  const file = writeSnapshot(ff.files, dir, 7, chunks).file
  t.equal(file, path.join(dir, snapName(7)))
  t.same(fs.readdirSync(dir), [snapName(7)])
  const buf = fs.readFileSync(file)
  const spans = frameSpans(buf)
  t.equal(spans[spans.length - 1].end, buf.length, 'nothing but frames')
  t.same(spans.map(s => (decodeFrame(buf, s.start) as { value: unknown }).value), [{ kind: 'head', index: 7 }, ...chunks, { kind: 'end', index: 7 }])
  t.equal(ff.calls.fsyncSync, 2, 'the file and then the directory are synced')
  t.equal(ff.calls.renameSync, 1)
})

t.test('write then load: the same chunks come back', async t => {
  const dir = tempDir(t, 'snap')
  const file = writeSnapshot(realFiles, dir, 7, chunks).file
  t.same(loadNewestSnapshot(realFiles, dir), { index: 7, file, chunks })
})

t.test('a snapshot with no chunks, and one larger than the write buffer, round trip', async t => {
  const dir = tempDir(t, 'snap')
  const { file: empty, bytes } = writeSnapshot(realFiles, dir, 1, [])
  t.equal(fs.statSync(empty).size, encodeFrame({ kind: 'head', index: 1 }).length + encodeFrame({ kind: 'end', index: 1 }).length)
  t.equal(bytes, fs.statSync(empty).size, 'its size, as returned')
  t.same(loadNewestSnapshot(realFiles, dir), { index: 1, file: empty, chunks: [] })

  const big = Array.from({ length: 80 }, (_, k) => ({ kind: 'account', k, pad: String(k % 10).repeat(30_000) })) // 2.4 MB in all
  const ff = faultyFiles()
  const file = writeSnapshot(ff.files, dir, 2, big).file
  t.ok(ff.calls.writeSync >= 3, `written in several flushes (${ff.calls.writeSync})`)
  t.ok(fs.statSync(file).size > 2_400_000)
  const loaded = loadNewestSnapshot(realFiles, dir)
  t.equal(loaded?.index, 2)
  t.equal(loaded?.chunks.length, big.length)
  t.ok(loaded !== null && loaded.chunks.every((c, k) => c.k === k && c.pad === big[k].pad), 'every chunk intact and in order')
})

t.test('no snapshot: null, whatever else is in the directory', async t => {
  const dir = tempDir(t, 'snap')
  t.equal(loadNewestSnapshot(realFiles, dir), null)
  fs.writeFileSync(path.join(dir, snapName(5) + '.tmp'), 'partial')
  fs.writeFileSync(path.join(dir, 'snapshot-5.snap'), 'wrong name')
  fs.writeFileSync(path.join(dir, 'log-00000000000000000001.wal'), '')
  t.equal(loadNewestSnapshot(realFiles, dir), null)
})

t.test('the newest snapshot is loaded; older ones and temporary files are ignored', async t => {
  const dir = tempDir(t, 'snap')
  writeSnapshot(realFiles, dir, 9, [{ kind: 'x', n: 9 }])
  writeSnapshot(realFiles, dir, 100, [{ kind: 'x', n: 100 }])
  writeSnapshot(realFiles, dir, 30, [{ kind: 'x', n: 30 }])
  fs.writeFileSync(path.join(dir, snapName(200) + '.tmp'), 'an interrupted write')
  const got = loadNewestSnapshot(realFiles, dir)
  t.same(got, { index: 100, file: path.join(dir, snapName(100)), chunks: [{ kind: 'x', n: 100 }] })
})

t.test('a flipped byte in any frame: CorruptSnapshotError naming the file and the frame', async t => {
  const dir = tempDir(t, 'snap')
  const file = writeSnapshot(realFiles, dir, 7, chunks).file
  const good = fs.readFileSync(file)
  const spans = frameSpans(good)
  t.equal(spans.length, chunks.length + 2)
  for (const [k, { start, end }] of spans.entries()) {
    t.test(`frame ${k}`, async t => {
      fs.writeFileSync(file, good)
      flipByte(file, Math.floor((start + 8 + end) / 2), 0x04)
      expectCorrupt(t, thrown(() => loadNewestSnapshot(realFiles, dir)), file, start, /checksum mismatch/)
    })
  }
})

t.test('a snapshot cut short at any frame boundary or inside a frame is corrupt', async t => {
  const dir = tempDir(t, 'snap')
  const file = writeSnapshot(realFiles, dir, 7, chunks).file
  const good = fs.readFileSync(file)
  const spans = frameSpans(good)
  for (const { start, end } of spans) {
    for (const [cut, why] of [[start, /missing end/], [start + 3, /frame cut short/], [end - 1, /frame cut short/]] as const) {
      if (cut === 0) continue
      t.test(`cut at ${cut}`, async t => {
        fs.writeFileSync(file, good.subarray(0, cut))
        expectCorrupt(t, thrown(() => loadNewestSnapshot(realFiles, dir)), file, cut === start ? cut : start, why)
      })
    }
  }
  t.test('empty file', async t => {
    fs.writeFileSync(file, '')
    expectCorrupt(t, thrown(() => loadNewestSnapshot(realFiles, dir)), file, 0, /missing end/)
  })
})

t.test('structural damage: head, second head, data after the end', async t => {
  const dir = tempDir(t, 'snap')
  const file = path.join(dir, snapName(7))
  const head = { kind: 'head', index: 7 }
  const end = { kind: 'end', index: 7 }
  const len = (v: object): number => encodeFrame(v).length

  writeFrames(file, [chunks[0], end])
  expectCorrupt(t, thrown(() => loadNewestSnapshot(realFiles, dir)), file, 0, /missing head/)

  writeFrames(file, [{ kind: 'head', index: 6 }, chunks[0], end])
  expectCorrupt(t, thrown(() => loadNewestSnapshot(realFiles, dir)), file, 0, /missing head/)

  writeFrames(file, [head, chunks[0], head, end])
  expectCorrupt(t, thrown(() => loadNewestSnapshot(realFiles, dir)), file, len(head) + len(chunks[0]), /second head|head out of place/)

  writeFrames(file, [head, chunks[0], end, chunks[1]])
  expectCorrupt(t, thrown(() => loadNewestSnapshot(realFiles, dir)), file, len(head) + len(chunks[0]) + len(end), /data after the end/)

  fs.writeFileSync(file, Buffer.concat([encodeFrame(head), encodeFrame(end), Buffer.alloc(16)]))
  expectCorrupt(t, thrown(() => loadNewestSnapshot(realFiles, dir)), file, len(head) + len(end), /data after the end/)
})

t.test('removeOldSnapshots keeps the given one and newer, drops older ones and temporary files', async t => {
  const dir = tempDir(t, 'snap')
  for (const i of [3, 5, 9, 12]) writeSnapshot(realFiles, dir, i, [])
  const keep = ['log-00000000000000000004.wal', 'snapshot-notes.txt', 'snapshot-5.snap', 'other.snap.tmp']
  for (const f of keep) fs.writeFileSync(path.join(dir, f), 'keep me')
  fs.writeFileSync(path.join(dir, snapName(13) + '.tmp'), 'partial')
  fs.writeFileSync(path.join(dir, snapName(2) + '.tmp'), '')
  const ff = faultyFiles()
  removeOldSnapshots(ff.files, dir, 9)
  t.same(fs.readdirSync(dir).sort(), [...keep, snapName(9), snapName(12)].sort())
  t.equal(ff.calls.unlinkSync, 4)
  t.equal(ff.calls.fsyncSync, 1, 'the directory is synced after removing')

  const ff2 = faultyFiles()
  removeOldSnapshots(ff2.files, dir, 9)
  t.equal(ff2.calls.unlinkSync, 0)
  t.equal(ff2.calls.fsyncSync, 0, 'nothing removed, nothing synced')
  t.same(fs.readdirSync(dir).sort(), [...keep, snapName(9), snapName(12)].sort())
})

t.test('a failed snapshot write leaves no file behind and the previous snapshot intact', async t => {
  const dir = tempDir(t, 'snap')
  const prev = writeSnapshot(realFiles, dir, 3, [{ kind: 'x', n: 3 }]).file
  const prevBytes = fs.readFileSync(prev)
  const faults: Array<[string, (ff: ReturnType<typeof faultyFiles>) => void]> = [
    ['ENOSPC on the first write', ff => { ff.hooks.writeSync = () => { throw errnoError('ENOSPC') } }],
    ['ENOSPC after a short write', ff => {
      let n = 0
      ff.hooks.writeSync = (fd, buf, off, len, pos) => {
        if (n++ === 0) return ff.real.writeSync(fd, buf, off, Math.max(1, len >> 1), pos)
        throw errnoError('ENOSPC')
      }
    }],
    ['EIO on fsync', ff => { ff.hooks.fsyncSync = () => { throw errnoError('EIO') } }]
  ]
  for (const [name, inject] of faults) {
    t.test(name, async t => {
      const ff = faultyFiles()
      inject(ff)
      const e = thrown(() => writeSnapshot(ff.files, dir, 8, [{ kind: 'x', n: 8 }]))
      t.match(e, { code: /ENOSPC|EIO/ }, 'the error is passed on')
      t.equal(ff.calls.renameSync, 0, 'never renamed into place')
      t.same(fs.readdirSync(dir), [snapName(3)], 'the temporary file is removed')
      t.ok(fs.readFileSync(prev).equals(prevBytes), 'the previous snapshot is untouched')
    })
  }
  t.test('a chunk too large for a frame', async t => {
    t.throws(() => writeSnapshot(realFiles, dir, 8, [{ kind: 'x', pad: 'x'.repeat(limits.snapshotFrameBytesMax) }]), RangeError)
    t.same(fs.readdirSync(dir), [snapName(3)])
  })
})

t.test('if the temporary file cannot be removed either, the write error is still the one reported', async t => {
  const dir = tempDir(t, 'snap')
  const ff = faultyFiles()
  const enospc = errnoError('ENOSPC')
  ff.hooks.writeSync = () => { throw enospc }
  ff.hooks.unlinkSync = () => { throw errnoError('EACCES') }
  t.equal(thrown(() => writeSnapshot(ff.files, dir, 6, [{ kind: 'x' }])), enospc)
  t.equal(ff.calls.unlinkSync, 1, 'removal was tried')
  t.same(fs.readdirSync(dir), [snapName(6) + '.tmp'], 'left for the next start to remove')
  t.equal(loadNewestSnapshot(realFiles, dir), null, 'and ignored meanwhile')
  removeOldSnapshots(realFiles, dir, 0)
  t.same(fs.readdirSync(dir), [])
})

t.test('a stale temporary file of the same index is overwritten, not appended to', async t => {
  const dir = tempDir(t, 'snap')
  fs.writeFileSync(path.join(dir, snapName(4) + '.tmp'), Buffer.alloc(10_000, 0x61))
  const file = writeSnapshot(realFiles, dir, 4, [{ kind: 'x' }]).file
  t.equal(fs.statSync(file).size, [{ kind: 'head', index: 4 }, { kind: 'x' }, { kind: 'end', index: 4 }].reduce((s, v) => s + encodeFrame(v).length, 0))
  t.same(fs.readdirSync(dir), [snapName(4)])
})

// Texts of up to textBytesMax make a chunk of 1,000 messages or exactly-once entries several
// megabytes, and a read's stored reply may hold a thousand such messages. A snapshot cuts such
// chunks in two until every frame is within recordBytesMax; only the one entry that cannot be
// cut makes a bigger frame. (Before, the snapshot was refused for good, and the log grew.)
t.test('a state with big texts: chunks are cut to recordBytesMax, the state comes back whole', async t => {
  const st = new ChatState()
  let i = 0
  const apply = (body: RecordBody): void => { st.apply({ ...body, i: ++i, e: 0, ts: i } as LogRecord) }
  apply({ op: 'register', user: 'a', salt: 's', hash: 'h' })
  apply({ op: 'register', user: 'b', salt: 's', hash: 'h' })
  const big = 'x'.repeat(limits.textBytesMax - 10)
  for (let k = 0; k < 700; k++) apply({ op: 'send', from: 'a', to: 'b', text: `${k} ${big}`, rk: `a\u0000s${k}` })
  apply({ op: 'read', user: 'b', limit: 400, rk: 'b\u0000read' }) // a stored reply of about 1.6 MB
  const dir = tempDir(t, 'snap')
  const file = writeSnapshot(realFiles, dir, st.index, st.snapshotChunks()).file
  const buf = fs.readFileSync(file)
  const sizes: number[] = []
  for (let off = 0; off < buf.length;) {
    const f = decodeFrame(buf, off, limits.snapshotFrameBytesMax)
    if (f.kind !== 'ok') throw new Error(`bad frame at ${off}`)
    sizes.push(f.next - off - frameHeaderBytes)
    off = f.next
  }
  const over = sizes.filter(n => n > limits.recordBytesMax)
  t.equal(over.length, 1, `one frame over recordBytesMax (${over.join(', ')} bytes): the read's reply`)
  t.ok(sizes.length > 8, `${sizes.length} frames`)
  const back = ChatState.fromSnapshotChunks(loadNewestSnapshot(realFiles, dir)!.chunks)
  t.equal(back.digest(), st.digest())
  t.equal(back.account('b')!.mailbox.size, 700)
  t.equal(back.account('b')!.mailbox.unreadCount, 300)
  t.same(back.ridReply('b\u0000read'), st.ridReply('b\u0000read'))
})
