import t from 'tap'
import zlib from 'node:zlib'
import { encodeFrame, encodeRecordFrame, encodeChunkFrame, decodeFrame, validFrameAfter, frameHeaderBytes } from '../lib/storage/framing.ts'
import { limits } from '../lib/limits.ts'
import { record } from './helpers/storage.ts'
import type { LogRecord, SendRecord } from '../lib/records.ts'
import type { Reply, SnapshotMessage } from '../lib/state.ts'

// A frame with the given payload bytes and a correct checksum, built by hand.
function rawFrame (payload: Buffer | string, len?: number): Buffer {
  const p = typeof payload === 'string' ? Buffer.from(payload, 'utf8') : payload
  const h = Buffer.alloc(frameHeaderBytes)
  h.writeUInt32LE(len ?? p.length, 0)
  h.writeUInt32LE(zlib.crc32(p), 4)
  return Buffer.concat([h, p])
}

t.test('encode/decode round trip, at offset 0 and after other frames', async t => {
  const values: object[] = [
    record(1),
    record(7),
    {},
    { nested: { a: [1, 2, { b: null }] }, s: 'caf\u00e9 \u{1f600} \u0000 "quoted"\n' }
  ]
  const frames = values.map(v => encodeFrame(v))
  for (const [k, f] of frames.entries()) {
    const payload = JSON.stringify(values[k])
    t.equal(f.length, frameHeaderBytes + Buffer.byteLength(payload), 'header plus UTF-8 payload')
    t.equal(f.readUInt32LE(0), Buffer.byteLength(payload), 'length field')
    t.equal(f.readUInt32LE(4), zlib.crc32(Buffer.from(payload)), 'CRC-32 of the payload')
    const d = decodeFrame(f, 0)
    t.same(d, { kind: 'ok', value: values[k], next: f.length })
  }
  const all = Buffer.concat(frames)
  let off = 0
  for (const v of values) {
    const d = decodeFrame(all, off)
    if (d.kind !== 'ok') throw new Error(`expected ok at ${off}, got ${JSON.stringify(d)}`)
    t.same(d.value, v)
    off = d.next
  }
  t.equal(off, all.length, 'the last next is the end of the buffer')
  t.same(decodeFrame(all, all.length), { kind: 'short' }, 'nothing at the end')
})

t.test('every truncation of a frame is short, never bad or ok', async t => {
  const f = encodeFrame(record(5))
  const prefix = encodeFrame(record(4))
  for (let cut = 0; cut < f.length; cut++) {
    t.same(decodeFrame(f.subarray(0, cut), 0), { kind: 'short' }, `cut at ${cut}`)
    const withPrefix = Buffer.concat([prefix, f.subarray(0, cut)])
    t.same(decodeFrame(withPrefix, prefix.length), { kind: 'short' }, `cut at ${cut} after another frame`)
  }
  t.equal(decodeFrame(f, 0).kind, 'ok', 'the whole frame decodes')
})

t.test('a flipped byte anywhere in a frame is detected', async t => {
  // The damaged frame is followed by another one, so a length that grows a little still lies
  // inside the buffer: then only the checksum can catch it.
  const f = encodeFrame(record(8))
  const after = encodeFrame(record(9))
  for (let at = 0; at < f.length; at++) {
    for (const mask of [0x01, 0x80, 0xff]) {
      const buf = Buffer.concat([f, after])
      buf[at] ^= mask
      const d = decodeFrame(buf, 0)
      if (at < 4) {
        const len = buf.readUInt32LE(0)
        if (len === 0 || len > limits.recordBytesMax) t.same(d, { kind: 'bad', why: `length ${len} out of range` }, `length byte ${at} ^ ${mask}`)
        else if (frameHeaderBytes + len > buf.length) t.same(d, { kind: 'short' }, `length byte ${at} ^ ${mask}: runs past the end`)
        else t.same(d, { kind: 'bad', why: 'checksum mismatch' }, `length byte ${at} ^ ${mask}`)
      } else {
        t.same(d, { kind: 'bad', why: 'checksum mismatch' }, `${at < frameHeaderBytes ? 'checksum' : 'payload'} byte ${at} ^ ${mask}`)
      }
    }
  }
})

t.test('length zero and length beyond recordBytesMax are bad, even with a full buffer', async t => {
  t.same(decodeFrame(rawFrame(''), 0), { kind: 'bad', why: 'length 0 out of range' })
  t.same(decodeFrame(Buffer.alloc(64), 0), { kind: 'bad', why: 'length 0 out of range' }, 'zeros')
  const tooLong = limits.recordBytesMax + 1
  t.same(decodeFrame(rawFrame('{}', tooLong), 0), { kind: 'bad', why: `length ${tooLong} out of range` }, 'not short although the buffer is shorter')
  const huge = Buffer.alloc(frameHeaderBytes + 16, 0xff)
  t.same(decodeFrame(huge, 0), { kind: 'bad', why: `length ${0xffffffff} out of range` })
  // At the limit the length itself is accepted.
  const max = Buffer.alloc(limits.recordBytesMax, 0x20)
  max[0] = 0x7b
  max[max.length - 1] = 0x7d
  t.same(decodeFrame(rawFrame(max), 0), { kind: 'ok', value: {}, next: frameHeaderBytes + limits.recordBytesMax }, 'exactly recordBytesMax')
  t.same(decodeFrame(rawFrame(max).subarray(0, 100), 0), { kind: 'short' }, 'a maximal length cut short is short')
})

t.test('encodeFrame refuses a record beyond recordBytesMax', async t => {
  const text = 'x'.repeat(limits.recordBytesMax)
  t.throws(() => encodeFrame({ text }), RangeError)
  const fits = { t: 'x'.repeat(limits.recordBytesMax - 8) } // {"t":"..."} is 8 bytes of syntax
  t.equal(encodeFrame(fits).length, frameHeaderBytes + limits.recordBytesMax, 'exactly at the limit is fine')
})

t.test('a payload with a good checksum that is not a JSON object is bad', async t => {
  for (const p of ['[1,2]', '42', '"s"', 'null', 'true', '[]']) {
    t.same(decodeFrame(rawFrame(p), 0), { kind: 'bad', why: 'payload is not an object' }, p)
  }
  for (const p of ['{', 'not json', '{"a":1}x', '\u0000']) {
    t.same(decodeFrame(rawFrame(p), 0), { kind: 'bad', why: 'payload is not JSON' }, JSON.stringify(p))
  }
})

t.test('validFrameAfter', async t => {
  const a = encodeFrame(record(1))
  const b = encodeFrame(record(2))

  t.equal(validFrameAfter(Buffer.concat([a, b]), 0), true, 'the next frame')
  t.equal(validFrameAfter(Buffer.concat([a, b]), a.length), false, 'a frame at the offset itself does not count')
  t.equal(validFrameAfter(a, 0), false, 'a single frame')

  const damaged = Buffer.concat([a, Buffer.from('garbage'), b])
  damaged[20] ^= 0xff
  t.equal(decodeFrame(damaged, 0).kind, 'bad')
  t.equal(validFrameAfter(damaged, 0), true, 'a good frame after damage and garbage, at an unaligned offset')
  t.equal(validFrameAfter(damaged.subarray(0, damaged.length - 1), 0), false, 'the only later frame cut short')

  t.equal(validFrameAfter(Buffer.concat([a, Buffer.alloc(4096)]), a.length), false, 'zeros')
  const noise = Buffer.alloc(4096)
  let x = 12345
  for (let k = 0; k < noise.length; k++) { x = (Math.imul(x, 1103515245) + 12345) >>> 0; noise[k] = x >>> 24 }
  t.equal(validFrameAfter(noise, 0), false, 'pseudo-random bytes')

  const badCrc = Buffer.concat([Buffer.alloc(3), b])
  badCrc[7] ^= 0x01 // in b's checksum
  t.equal(validFrameAfter(badCrc, 0), false, 'a frame shaped like an object but with a bad checksum')

  t.equal(validFrameAfter(Buffer.concat([Buffer.alloc(5), rawFrame('{}')]), 0), true, 'the smallest object, ending exactly at the end')
  t.equal(validFrameAfter(Buffer.concat([Buffer.alloc(5), rawFrame('[1]')]), 0), false, 'a good frame that is not an object')
})

// ---- binary send records ------------------------------------------------------------------

const sends: SendRecord[] = [
  { op: 'send', from: 'alice', to: 'bob', text: 'hi', rk: 'alice\u0000r1', i: 5, e: 2, ts: 1_700_000_000_123 },
  { op: 'send', from: 'Bob', to: 'ALICE', text: 'no rid', i: 6, e: 0, ts: 1 },
  { op: 'send', from: 'caf\u00e9', to: 'z\u{1f600}', text: 'caf\u00e9 \u{1f600} \u0000 "quoted"\n{}', rk: '', i: Number.MAX_SAFE_INTEGER, e: 2 ** 40, ts: 0 },
  { op: 'send', from: 'a', to: 'b', text: '', i: 1, e: 0, ts: 2 ** 52 + 1 }
]

t.test('send records are binary; they decode to the record, with no rk field when there was none', async t => {
  for (const r of sends) {
    const f = encodeRecordFrame(r)
    t.equal(f[frameHeaderBytes], 0x01, 'the binary tag')
    t.ok(f.length < encodeFrame(r).length, 'smaller than the JSON')
    t.equal(f.readUInt32LE(4), zlib.crc32(f.subarray(frameHeaderBytes)), 'CRC-32 of the payload')
    const d = decodeFrame(f, 0)
    t.same(d, { kind: 'ok', value: r, next: f.length })
    if (d.kind === 'ok') t.equal('rk' in d.value, r.rk !== undefined, 'rk present only when set')
  }
  const other: LogRecord = { op: 'read', user: 'bob', limit: 3, i: 9, e: 0, ts: 5 }
  t.same(encodeRecordFrame(other), encodeFrame(other), 'every other record is JSON')
})

t.test('a log may mix JSON sends (as logs were written before) and binary ones', async t => {
  const frames = sends.flatMap(r => [encodeFrame(r), encodeRecordFrame(r)])
  const all = Buffer.concat(frames)
  const got: unknown[] = []
  for (let off = 0; off < all.length;) {
    const d = decodeFrame(all, off)
    if (d.kind !== 'ok') throw new Error(`expected ok at ${off}, got ${JSON.stringify(d)}`)
    got.push(d.value)
    off = d.next
  }
  t.same(got, sends.flatMap(r => [r, r]))
})

t.test('a binary send frame: every truncation is short, every flipped byte is caught', async t => {
  const f = encodeRecordFrame(sends[0])
  for (let cut = 0; cut < f.length; cut++) t.same(decodeFrame(f.subarray(0, cut), 0), { kind: 'short' }, `cut at ${cut}`)
  const after = encodeRecordFrame(sends[1])
  for (let at = frameHeaderBytes; at < f.length; at++) {
    const buf = Buffer.concat([f, after])
    buf[at] ^= 0x01
    t.same(decodeFrame(buf, 0), { kind: 'bad', why: 'checksum mismatch' }, `payload byte ${at}`)
  }
})

t.test('a binary send whose lengths do not fill its payload exactly is bad, even with a good checksum', async t => {
  const payload = encodeRecordFrame(sends[0]).subarray(frameHeaderBytes)
  const cases: Array<[string, Buffer]> = [
    ['the tag alone', Buffer.from([0x01])],
    ['a head cut short', payload.subarray(0, 34)],
    ['a string cut short', payload.subarray(0, payload.length - 1)],
    ['a byte too many', Buffer.concat([payload, Buffer.from('x')])]
  ]
  for (const at of [25, 27, 29, 31]) {
    const p = Buffer.from(payload)
    p[at] += 1
    cases.push([`length field at ${at} one too big`, p])
  }
  const huge = Buffer.from(payload)
  huge.writeUInt32LE(0xffffffff, 31)
  cases.push(['a text length beyond everything', huge])
  for (const [what, p] of cases) t.same(decodeFrame(rawFrame(p), 0), { kind: 'bad', why: 'malformed send record' }, what)
})

t.test('validFrameAfter finds a binary send frame, and only a good one', async t => {
  const a = encodeFrame(record(1))
  const b = encodeRecordFrame(sends[1])
  t.equal(validFrameAfter(Buffer.concat([a, Buffer.from('junk'), b]), 0), true)
  const bad = Buffer.concat([a, b])
  bad[a.length + 4] ^= 0x01 // b's checksum
  t.equal(validFrameAfter(bad, 0), false)
})

t.test('encodeRecordFrame refuses a send beyond recordBytesMax, or a name or key of 64 KiB', async t => {
  const base = sends[0]
  t.throws(() => encodeRecordFrame({ ...base, text: 'x'.repeat(limits.recordBytesMax) }), RangeError)
  const fits = encodeRecordFrame({ ...base, text: 'x'.repeat(limits.recordBytesMax - 35 - 5 - 3 - 8) })
  t.equal(fits.length, frameHeaderBytes + limits.recordBytesMax, 'exactly at the limit is fine')
  t.equal(decodeFrame(fits, 0).kind, 'ok')
  t.throws(() => encodeRecordFrame({ ...base, from: 'x'.repeat(0x10000) }), RangeError)
  t.throws(() => encodeRecordFrame({ ...base, rk: 'x'.repeat(0xffff) }), RangeError, 'rk length + 1 must fit in 16 bits')
  t.equal(decodeFrame(encodeRecordFrame({ ...base, rk: 'x'.repeat(0xfffe) }), 0).kind, 'ok', 'the longest rk')
})

// ---- binary messages chunks (snapshots) ---------------------------------------------------

const mailbox: SnapshotMessage[] = [
  [3, 'alice', 'Bob', 'hi', 1_700_000_000_000, 0],
  [9, 'caf\u00e9', 'Bob', 'caf\u00e9 \u{1f600} \u0000 "q"\n', 2 ** 52, 1],
  [Number.MAX_SAFE_INTEGER, '', 'Bob', '', 0, 1]
]

t.test('a messages chunk is binary and decodes to the same chunk', async t => {
  for (const messages of [mailbox, [], mailbox.slice(0, 1)]) {
    const chunk = { kind: 'messages', name: 'Bob', messages }
    const f = encodeChunkFrame(chunk)
    t.equal(f[frameHeaderBytes], 0x02, 'the binary tag')
    t.same(decodeFrame(f, 0), { kind: 'ok', value: chunk, next: f.length })
  }
  // All ASCII (lengths taken from the strings, short names written byte by byte), with a name
  // of 16 characters and one of 17, and one with a character beyond ASCII in a text.
  const ascii: SnapshotMessage[] = [[1, 'a'.repeat(16), 'Bob', 'hello', 5, 0], [2, 'b'.repeat(17), 'Bob', '', 6, 1], [3, '', 'Bob', 'x'.repeat(70_000), 7, 0]]
  for (const messages of [ascii, [...ascii, [4, 'c', 'Bob', 'caf\u00e9', 8, 1] as SnapshotMessage], [[5, 'caf\u00e9', 'Bob', 'plain', 9, 0] as SnapshotMessage, ...ascii]]) {
    const chunk = { kind: 'messages', name: 'Bob', messages }
    const f = encodeChunkFrame(chunk)
    t.same(decodeFrame(f, 0, limits.snapshotFrameBytesMax), { kind: 'ok', value: chunk, next: f.length }, `${messages.length} messages`)
  }
  const unicode = { kind: 'messages', name: 'z\u{1f600}', messages: [[1, 'a', 'z\u{1f600}', 'x', 2, 0]] }
  t.same(decodeFrame(encodeChunkFrame(unicode), 0), { kind: 'ok', value: unicode, next: encodeChunkFrame(unicode).length })
  t.ok(encodeChunkFrame({ kind: 'messages', name: 'Bob', messages: mailbox }).length < encodeFrame({ kind: 'messages', name: 'Bob', messages: mailbox }).length, 'smaller than the JSON')
})

t.test('other chunks, and a messages chunk with a message to someone else, are JSON', async t => {
  for (const chunk of [{ kind: 'state', index: 4 }, { kind: 'account', name: 'Bob', messages: mailbox }, { kind: 'messages', name: 'Carol', messages: mailbox }, { kind: 'messages', name: 7, messages: [] }]) {
    t.same(encodeChunkFrame(chunk), encodeFrame(chunk), JSON.stringify(chunk).slice(0, 40))
  }
})

t.test('a messages chunk that is not well formed is bad, even with a good checksum', async t => {
  const payload = encodeChunkFrame({ kind: 'messages', name: 'Bob', messages: mailbox }).subarray(frameHeaderBytes)
  const with_ = (at: number, edit: (p: Buffer) => void): Buffer => { const p = Buffer.from(payload); edit(p); return p.subarray(0, at) }
  const cases: Array<[string, Buffer]> = [
    ['the tag alone', Buffer.from([0x02])],
    ['a name cut short', payload.subarray(0, 5)],
    ['no count', payload.subarray(0, 6)],
    ['a message cut short', payload.subarray(0, payload.length - 1)],
    ['a byte too many', Buffer.concat([payload, Buffer.from('x')])],
    ['a count beyond the bytes', with_(payload.length, p => p.writeUInt32LE(1000, 6))],
    ['a count of one more', with_(payload.length, p => p.writeUInt32LE(4, 6))],
    ['a read mark of 2', with_(payload.length, p => { p[10 + 16] = 2 })],
    ['a text length beyond everything', with_(payload.length, p => p.writeUInt32LE(0xffffffff, 10 + 19))]
  ]
  for (const [what, p] of cases) t.same(decodeFrame(rawFrame(p), 0), { kind: 'bad', why: 'malformed messages chunk' }, what)
})

t.test('encodeChunkFrame refuses a chunk beyond the bound it is given (snapshotFrameBytesMax by default)', async t => {
  const big: SnapshotMessage[] = [[1, 'a', 'Bob', 'x'.repeat(limits.recordBytesMax), 1, 0]]
  t.equal(decodeFrame(encodeChunkFrame({ kind: 'messages', name: 'Bob', messages: big }), 0, limits.snapshotFrameBytesMax).kind, 'ok', 'over recordBytesMax is fine in a snapshot')
  t.throws(() => encodeChunkFrame({ kind: 'messages', name: 'Bob', messages: big }, limits.recordBytesMax), RangeError)
  t.throws(() => encodeChunkFrame({ kind: 'state', pad: 'x'.repeat(limits.recordBytesMax) }, limits.recordBytesMax), RangeError, 'JSON chunks too')
  t.throws(() => encodeChunkFrame({ kind: 'messages', name: 'Bob', messages: [[1, 'a'.repeat(0x10000), 'Bob', '', 1, 0]] }), RangeError)
})

// ---- binary rids chunks (the exactly-once table in snapshots) ------------------------------

type RidEntry = [string, number, Reply]
const sentReply = (id: number, from: string, to: string, text: string, ts: number): Reply => ({ ok: true, message: { id, from, to, text, ts } })
const rids: RidEntry[] = [
  ['alice\u0000r1', 1_700_000_000_000, sentReply(3, 'alice', 'Bob', 'hi', 1_700_000_000_000)],
  ['alice\u0000r2', 5, { ok: true }],
  ['caf\u00e9\u0000r\u{1f600}', 2 ** 52, sentReply(2 ** 52, 'caf\u00e9', 'z\u{1f600}', 'caf\u00e9 \u{1f600} \u0000 "q"\n', 7)],
  ['bob\u0000r3', 6, { ok: false, error: { code: 'NO_SUCH_USER', message: 'no user named nobody' } }],
  ['bob\u0000r4', 8, { ok: true, messages: [{ id: 3, from: 'alice', to: 'Bob', text: 'hi', ts: 1 }], remaining: 0 }],
  ['', 0, sentReply(Number.MAX_SAFE_INTEGER, '', '', '', 0)]
]

t.test('a rids chunk is binary and decodes to the same chunk, replies field for field in the same order', async t => {
  for (const entries of [rids, [], rids.slice(0, 1), rids.slice(1, 2)]) {
    const chunk = { kind: 'rids', entries }
    const f = encodeChunkFrame(chunk)
    t.equal(f[frameHeaderBytes], 0x03, 'the binary tag')
    const back = decodeFrame(f, 0)
    t.same(back, { kind: 'ok', value: chunk, next: f.length })
    t.equal(back.kind === 'ok' && JSON.stringify(back.value), JSON.stringify(chunk), 'the same JSON: fields in the same order')
  }
  t.ok(encodeChunkFrame({ kind: 'rids', entries: rids }).length < encodeFrame({ kind: 'rids', entries: rids }).length, 'smaller than the JSON')
})

t.test('a rids chunk writes a reply shaped otherwise than a send\'s as JSON inside it, and it comes back as it was', async t => {
  const odd: RidEntry[] = [
    ['k1', 1, { ok: true, message: { id: 1, from: 'a', to: 'b', text: 'x', ts: 2 }, delivered: true }], // a field more
    ['k2', 1, { ok: true, message: { from: 'a', id: 1, to: 'b', text: 'x', ts: 2 } }], // another order
    ['k3', 1, { ok: true, message: { id: '1', from: 'a', to: 'b', text: 'x', ts: 2 } }], // a string id
    ['k4', 1, { ok: true, message: { id: 1, from: 'a', to: 'b', text: 'x', ts: 2, read: true } }],
    ['k5', 1, { message: { id: 1, from: 'a', to: 'b', text: 'x', ts: 2 }, ok: true }]
  ]
  const chunk = { kind: 'rids', entries: odd }
  const f = encodeChunkFrame(chunk)
  t.equal(f[frameHeaderBytes], 0x03)
  const back = decodeFrame(f, 0)
  t.equal(back.kind === 'ok' && JSON.stringify(back.value), JSON.stringify(chunk))
})

t.test('a rids chunk with a key or a name of 64 KiB is JSON', async t => {
  for (const entries of [[['k'.repeat(0x10000), 1, { ok: true }]], [['k', 1, sentReply(1, 'a'.repeat(0x10000), 'b', '', 1)]], [['k', 1, sentReply(1, 'a', 'b'.repeat(0x10000), '', 1)]]]) {
    const chunk = { kind: 'rids', entries }
    t.same(encodeChunkFrame(chunk), encodeFrame(chunk, limits.snapshotFrameBytesMax))
  }
  const longest = { kind: 'rids', entries: [['k'.repeat(0xffff), 1, sentReply(1, 'a'.repeat(0xffff), 'b'.repeat(0xffff), 'x', 1)]] }
  const f = encodeChunkFrame(longest)
  t.equal(f[frameHeaderBytes], 0x03, 'just under is binary')
  t.same(decodeFrame(f, 0, limits.snapshotFrameBytesMax), { kind: 'ok', value: longest, next: f.length })
})

t.test('a rids chunk that is not well formed is bad, even with a good checksum; every truncation is short', async t => {
  const f = encodeChunkFrame({ kind: 'rids', entries: rids })
  for (let cut = 0; cut < f.length; cut++) t.same(decodeFrame(f.subarray(0, cut), 0), { kind: 'short' }, `cut at ${cut}`)
  const payload = f.subarray(frameHeaderBytes)
  const edited = (edit: (p: Buffer) => void): Buffer => { const p = Buffer.from(payload); edit(p); return p }
  const head = (k: number): number => 5 + 35 * k // where entry k's head starts
  const cases: Array<[string, Buffer]> = [
    ['the tag alone', Buffer.from([0x03])],
    ['no whole count', payload.subarray(0, 4)],
    ['heads cut short', payload.subarray(0, head(2) + 3)],
    ['a string cut short', payload.subarray(0, payload.length - 1)],
    ['a byte too many', Buffer.concat([payload, Buffer.from('x')])],
    ['a count beyond the bytes', edited(p => p.writeUInt32LE(100_000, 1))],
    ['a count of one more', edited(p => p.writeUInt32LE(rids.length + 1, 1))],
    ['a count of one less', edited(p => p.writeUInt32LE(rids.length - 1, 1))],
    ['a kind of 2', edited(p => { p[head(0) + 10] = 2 })],
    ['a key length one too big', edited(p => p.writeUInt16LE(p.readUInt16LE(head(0)) + 1, head(0)))],
    ['a text length beyond everything', edited(p => p.writeUInt32LE(0xffffffff, head(0) + 31))],
    ['a reply that is not JSON', edited(p => { p[p.indexOf('{"ok":true}')] = 0x78 })],
    ['a reply that is JSON but no object', edited(p => p.write('[ "ok",true]', p.indexOf('{"ok":true}')))]
  ]
  for (const [what, p] of cases) t.same(decodeFrame(rawFrame(p), 0), { kind: 'bad', why: 'malformed rids chunk' }, what)
})

t.test('validFrameAfter finds a rids chunk frame', async t => {
  const a = encodeFrame(record(1))
  const b = encodeChunkFrame({ kind: 'rids', entries: rids })
  t.equal(validFrameAfter(Buffer.concat([a, Buffer.from('junk'), b]), 0), true)
})

// ---- binary read marks (the log) -------------------------------------------------------------

const marks: LogRecord[] = [
  { op: 'mark_read', user: 'alice', ids: [7], i: 8, e: 2, ts: 1_700_000_000_123 },
  { op: 'mark_read', user: 'z\u{1f600}', ids: [1, 2 ** 52, Number.MAX_SAFE_INTEGER, 1], i: Number.MAX_SAFE_INTEGER, e: 2 ** 40, ts: 0 },
  { op: 'mark_read', user: '', ids: [], i: 1, e: 0, ts: 2 ** 52 + 1 }
]

t.test('read marks are binary and decode to the record; one with an rk, or ids that are not all numbers, stays JSON', async t => {
  for (const r of marks) {
    const f = encodeRecordFrame(r)
    t.equal(f[frameHeaderBytes], 0x04, 'the binary tag')
    t.ok(f.length < encodeFrame(r).length, 'smaller than the JSON')
    t.same(decodeFrame(f, 0), { kind: 'ok', value: r, next: f.length })
  }
  const withRk = { ...marks[0], rk: 'alice\u0000r1' } as LogRecord
  t.same(encodeRecordFrame(withRk), encodeFrame(withRk))
  const odd = { ...marks[0], ids: [1, '2'] } as unknown as LogRecord
  t.same(encodeRecordFrame(odd), encodeFrame(odd))
  t.throws(() => encodeRecordFrame({ ...marks[0], user: 'x'.repeat(0x10000) } as LogRecord), RangeError)
})

t.test('a binary read mark that is not well formed is bad, even with a good checksum; every truncation is short', async t => {
  const f = encodeRecordFrame(marks[1])
  for (let cut = 0; cut < f.length; cut++) t.same(decodeFrame(f.subarray(0, cut), 0), { kind: 'short' }, `cut at ${cut}`)
  const payload = f.subarray(frameHeaderBytes)
  const edited = (edit: (p: Buffer) => void): Buffer => { const p = Buffer.from(payload); edit(p); return p }
  const cases: Array<[string, Buffer]> = [
    ['the tag alone', Buffer.from([0x04])],
    ['a head cut short', payload.subarray(0, 30)],
    ['the user cut short', payload.subarray(0, payload.length - 1)],
    ['a byte too many', Buffer.concat([payload, Buffer.from('x')])],
    ['a count of one more', edited(p => p.writeUInt32LE(5, 27))],
    ['a count beyond everything', edited(p => p.writeUInt32LE(0xffffffff, 27))],
    ['a user length one more', edited(p => p.writeUInt16LE(p.readUInt16LE(25) + 1, 25))]
  ]
  for (const [what, p] of cases) t.same(decodeFrame(rawFrame(p), 0), { kind: 'bad', why: 'malformed read mark' }, what)
  t.equal(validFrameAfter(Buffer.concat([Buffer.from('junk'), f]), 0), true, 'validFrameAfter finds one')
})
