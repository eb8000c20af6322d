// Record framing, shared by log segments and snapshots.
//
//   offset 0: u32 little-endian  payload length in bytes (1 .. recordBytesMax in a log,
//                                snapshotFrameBytesMax in a snapshot)
//   offset 4: u32 little-endian  CRC-32 (zlib polynomial) of the payload
//   offset 8: payload            a UTF-8 JSON object (first byte '{'), a binary send record
//                                (first byte 0x01) or read mark (0x04), or a binary messages
//                                (0x02) or rids (0x03) chunk, below
//
// A frame is valid only if its length is in range, it lies wholly inside the file, its CRC
// matches, and its payload parses as a JSON object or is well-formed binary (a send record or a
// read mark, or a snapshot's messages or rids chunk).
//
// Sends are most of any log, and parsing them as JSON was the largest single cost of replaying
// one, so the log writes them in binary (encodeRecordFrame): decoding one is a few reads at fixed
// offsets and four string slices. All numbers little-endian; strings UTF-8:
//
//   offset  0: u8   0x01
//   offset  1: f64  i        log index
//   offset  9: f64  e        epoch
//   offset 17: f64  ts       time, ms
//   offset 25: u16  bytes of from
//   offset 27: u16  bytes of to
//   offset 29: u16  bytes of rk, plus one (0: the record has no rk)
//   offset 31: u32  bytes of text
//   offset 35: from, to, rk, text, back to back, filling the rest of the payload exactly
//
// A read mark (mark_read, written when a push has been taken; one follows most sends to a
// recipient who is online) is binary too, as long as it carries no rk:
//
//   offset  0: u8   0x04
//   offset  1: f64  i, then f64 e at 9, f64 ts at 17
//   offset 25: u16  bytes of user
//   offset 27: u32  number of ids
//   offset 31: f64  each id, then the user, filling the rest of the payload exactly
//
// Every other record is JSON. A log may mix both kinds (a log written before sends were binary
// reads as it always did).
//
// Snapshots are mostly messages, so a snapshot's `messages` chunks (a run of one mailbox's
// messages, see state.ts) are binary too (encodeChunkFrame):
//
//   offset 0: u8   0x02
//   offset 1: u16  bytes of the mailbox owner's name, then the name (the `to` of every message)
//   then:     u32  number of messages, then each message:
//               f64 id, f64 ts, u8 read (0 or 1), u16 bytes of from, u32 bytes of text,
//               then from and text
//   the last message ends where the payload ends.
//
// So are its `rids` chunks (the exactly-once table, see state.ts), whose entries are mostly the
// stored replies of sends, each holding its whole message:
//
//   offset 0: u8   0x03
//   offset 1: u32  number of entries, then a head of 35 bytes for each entry:
//               u16 bytes of key, f64 ts, u8 kind, and for
//               kind 1, a send's reply { ok: true, message: { id, from, to, text, ts } }:
//                 f64 id, f64 ts, u16 bytes of from, u16 bytes of to, u32 bytes of text
//               kind 0, any other reply: 20 zero bytes, then u32 bytes of its JSON
//   then the strings of every entry in order, back to back: the key, then from, to and text
//   (kind 1) or the JSON (kind 0); the last ends where the payload ends.
//
// The other chunks are JSON. At start-up a server reads its snapshot's messages chunks packed
// (decodeFrame's packMessages): each is checked here, and decoded only when its mailbox is first
// used (state.ts, Mailbox.defer).

import zlib from 'node:zlib'
import { limits } from '../limits.ts'
import type { LogRecord, MarkReadRecord, PackedSendRecord, SendRecord } from '../records.ts'
import type { Message, Reply, SnapshotMessage } from '../state.ts'

export const frameHeaderBytes = 8

// A frame for a payload of `len` bytes, to be filled in from frameHeaderBytes on, then sealed.
function allocFrame (len: number, max: number): Buffer {
  if (len > max) throw new RangeError(`record of ${len} bytes exceeds ${max}`)
  return Buffer.allocUnsafe(frameHeaderBytes + len)
}

// Write the header of a filled-in frame: the payload's length and checksum.
function seal (frame: Buffer): Buffer {
  frame.writeUInt32LE(frame.length - frameHeaderBytes, 0)
  frame.writeUInt32LE(zlib.crc32(frame.subarray(frameHeaderBytes)), 4)
  return frame
}

export function encodeFrame (value: object, max: number = limits.recordBytesMax): Buffer {
  const json = JSON.stringify(value)
  const frame = allocFrame(Buffer.byteLength(json, 'utf8'), max)
  frame.write(json, frameHeaderBytes, 'utf8')
  return seal(frame)
}

const sendTag = 0x01
const sendHeadBytes = 35
const messagesTag = 0x02
const messageHeadBytes = 23
const ridsTag = 0x03
const markTag = 0x04
const markHeadBytes = 31
const ridHeadBytes = 35
// A messages chunk's payload before its messages: tag, name length, name, message count.
const messagesChunkHeadBytes = (nameLen: number): number => 1 + 2 + nameLen + 4

// The head every binary log record starts with, its payload's first 25 bytes: the tag, then
// f64 i, e and ts. Returns where the payload starts.
function putStamps (frame: Buffer, tag: number, r: LogRecord): number {
  const at = frameHeaderBytes
  frame[at] = tag
  frame.writeDoubleLE(r.i, at + 1)
  frame.writeDoubleLE(r.e, at + 9)
  frame.writeDoubleLE(r.ts, at + 17)
  return at
}

// A log record's frame: binary for a send and for a read mark without an rk, JSON for the rest.
export function encodeRecordFrame (r: LogRecord): Buffer {
  if (r.op === 'mark_read' && r.rk === undefined) return encodeMark(r)
  if (r.op !== 'send') return encodeFrame(r)
  const fromLen = Buffer.byteLength(r.from, 'utf8')
  const toLen = Buffer.byteLength(r.to, 'utf8')
  const rkLen = r.rk === undefined ? -1 : Buffer.byteLength(r.rk, 'utf8')
  const textLen = Buffer.byteLength(r.text, 'utf8')
  if (fromLen > 0xffff || toLen > 0xffff || rkLen >= 0xffff) throw new RangeError('a send record\'s names and key must be under 64 KiB each')
  const frame = allocFrame(sendHeadBytes + fromLen + toLen + Math.max(rkLen, 0) + textLen, limits.recordBytesMax)
  const at = putStamps(frame, sendTag, r)
  frame.writeUInt16LE(fromLen, at + 25)
  frame.writeUInt16LE(toLen, at + 27)
  frame.writeUInt16LE(rkLen + 1, at + 29)
  frame.writeUInt32LE(textLen, at + 31)
  let p = at + sendHeadBytes
  p += frame.write(r.from, p, 'utf8')
  p += frame.write(r.to, p, 'utf8')
  if (r.rk !== undefined) p += frame.write(r.rk, p, 'utf8')
  frame.write(r.text, p, 'utf8')
  return seal(frame)
}

function encodeMark (r: MarkReadRecord): Buffer {
  const ids = r.ids
  for (const id of ids) if (typeof id !== 'number') return encodeFrame(r)
  const userLen = Buffer.byteLength(r.user, 'utf8')
  if (userLen > 0xffff) throw new RangeError('a read mark\'s user must be under 64 KiB')
  const frame = allocFrame(markHeadBytes + ids.length * 8 + userLen, limits.recordBytesMax)
  const at = putStamps(frame, markTag, r)
  frame.writeUInt16LE(userLen, at + 25)
  frame.writeUInt32LE(ids.length, at + 27)
  let p = at + markHeadBytes
  for (const id of ids) p = frame.writeDoubleLE(id, p)
  frame.write(r.user, p, 'utf8')
  return seal(frame)
}

// The read mark in buf[start, end), or null if the lengths do not fill it exactly.
function decodeMark (buf: Buffer, start: number, end: number): MarkReadRecord | null {
  if (end - start < markHeadBytes) return null
  const userLen = buf.readUInt16LE(start + 25)
  const n = buf.readUInt32LE(start + 27)
  if (start + markHeadBytes + n * 8 + userLen !== end) return null
  const ids = new Array<number>(n)
  let p = start + markHeadBytes
  for (let k = 0; k < n; k++, p += 8) ids[k] = buf.readDoubleLE(p)
  return { op: 'mark_read', user: utf8Slice.call(buf, p, end), ids, i: buf.readDoubleLE(start + 1), e: buf.readDoubleLE(start + 9), ts: buf.readDoubleLE(start + 17) }
}

// What buf.toString('utf8', start, end) calls once it has checked its arguments and looked up
// the encoding; decodeSend has checked the bounds itself, and calls it four times per record.
const utf8Slice = (Buffer.prototype as unknown as { utf8Slice: (this: Buffer, start: number, end: number) => string }).utf8Slice
const utf8Write = (Buffer.prototype as unknown as { utf8Write: (this: Buffer, s: string, offset: number) => number }).utf8Write

// The send record in buf[start, end), or null if the lengths do not fill it exactly. With
// packText, its text is not decoded: the record says where its payload starts instead (see
// PackedSendRecord, and sendText).
function decodeSend (buf: Buffer, start: number, end: number, packText = false): SendRecord | PackedSendRecord | null {
  if (end - start < sendHeadBytes) return null
  const fromLen = sendFromBytes(buf, start)
  const toLen = sendToBytes(buf, start)
  const rkLen = sendKeyBytes(buf, start)
  const textLen = sendTextBytes(buf, start)
  if (start + sendHeadBytes + fromLen + toLen + Math.max(rkLen, 0) + textLen !== end) return null
  const i = buf.readDoubleLE(start + 1)
  const e = buf.readDoubleLE(start + 9)
  const ts = buf.readDoubleLE(start + 17)
  if (packText) return { op: 'send', i, e, ts, packed: buf, start }
  let p = start + sendHeadBytes
  const from = utf8Slice.call(buf, p, p += fromLen)
  const to = utf8Slice.call(buf, p, p += toLen)
  const rk = rkLen < 0 ? undefined : utf8Slice.call(buf, p, p += rkLen)
  const text = utf8Slice.call(buf, p, end)
  return rk === undefined ? { op: 'send', from, to, text, i, e, ts } : { op: 'send', from, to, text, rk, i, e, ts }
}

// What a packed send record (PackedSendRecord) left in its buffer, read from the payload at
// buf[start] (which decodeSend checked): where its names lie, the sender's from sendNamesAt,
// sendFromBytes long, then the recipient's, sendToBytes long; its exactly-once key's bytes right
// after them, sendKeyBytes long (-1: none); and its text.
export function sendNamesAt (start: number): number { return start + sendHeadBytes }
export function sendFromBytes (buf: Buffer, start: number): number { return buf.readUInt16LE(start + 25) }
export function sendToBytes (buf: Buffer, start: number): number { return buf.readUInt16LE(start + 27) }
export function sendKeyBytes (buf: Buffer, start: number): number { return buf.readUInt16LE(start + 29) - 1 }

export function sendTextBytes (buf: Buffer, start: number): number { return buf.readUInt32LE(start + 31) }

function sendText (buf: Buffer, start: number): string {
  const textAt = sendNamesAt(start) + sendFromBytes(buf, start) + sendToBytes(buf, start) + Math.max(sendKeyBytes(buf, start), 0)
  return utf8Slice.call(buf, textAt, textAt + sendTextBytes(buf, start))
}

// The message of the packed send record whose payload starts at buf[start], with the sender's
// and recipient's names as the state knows them (as apply makes it).
export function packedSendMessage (buf: Buffer, start: number, from: string, to: string): Message {
  return { id: buf.readDoubleLE(start + 1), from, to, text: sendText(buf, start), ts: buf.readDoubleLE(start + 17) }
}

// A packed send record made whole again, as decodeSend would have made it.
export function unpackSend (r: PackedSendRecord): SendRecord {
  const { packed: buf, start, i, e, ts } = r
  const text = sendText(buf, start)
  const fromAt = sendNamesAt(start)
  const toAt = fromAt + sendFromBytes(buf, start)
  const keyAt = toAt + sendToBytes(buf, start)
  const keyBytes = sendKeyBytes(buf, start)
  const from = utf8Slice.call(buf, fromAt, toAt)
  const to = utf8Slice.call(buf, toAt, keyAt)
  return keyBytes < 0 ? { op: 'send', from, to, text, i, e, ts } : { op: 'send', from, to, text, rk: utf8Slice.call(buf, keyAt, keyAt + keyBytes), i, e, ts }
}

// A snapshot chunk's frame: binary for a `messages` or `rids` chunk, JSON for the rest. A chunk
// whose messages are not all to its mailbox's owner, or with a key or name of 64 KiB or more
// (never the case in a real state), stays JSON.
export function encodeChunkFrame (chunk: object, max: number = limits.snapshotFrameBytesMax): Buffer {
  const c = chunk as { kind?: unknown, name?: unknown, messages?: SnapshotMessage[], entries?: Array<[string, number, Reply]> }
  if (c.kind === 'rids' && Array.isArray(c.entries)) return encodeRids(c.entries, max) ?? encodeFrame(chunk, max)
  if (c.kind !== 'messages' || typeof c.name !== 'string' || !Array.isArray(c.messages)) return encodeFrame(chunk, max)
  const name = c.name
  const nameLen = Buffer.byteLength(name, 'utf8')
  let len = messagesChunkHeadBytes(nameLen)
  // When every sender's name and text is ASCII (one call on them all tells), each one's bytes
  // are its length: no call per string, each of which costs more than a short name's bytes.
  let all = ''
  for (const m of c.messages) {
    if (m[2] !== name) return encodeFrame(chunk, max)
    all += m[1]
    all += m[3]
  }
  const ascii = Buffer.byteLength(all, 'utf8') === all.length
  for (const m of c.messages) {
    const fromLen = ascii ? m[1].length : Buffer.byteLength(m[1], 'utf8')
    if (fromLen > 0xffff) throw new RangeError('a sender\'s name must be under 64 KiB')
    len += messageHeadBytes + fromLen + (ascii ? m[3].length : Buffer.byteLength(m[3], 'utf8'))
  }
  if (nameLen > 0xffff) throw new RangeError('a name must be under 64 KiB')
  const frame = allocFrame(len, max)
  let p = frameHeaderBytes
  frame[p] = messagesTag
  frame.writeUInt16LE(nameLen, p + 1)
  p += 3
  p += frame.write(name, p, 'utf8')
  frame.writeUInt32LE(c.messages.length, p)
  p += 4
  for (const [id, from, , text, ts, read] of c.messages) {
    frame.writeDoubleLE(id, p)
    frame.writeDoubleLE(ts, p + 8)
    frame[p + 16] = read
    const fromLen = ascii && from.length <= shortAscii ? putAscii(frame, from, p + messageHeadBytes) : frame.write(from, p + messageHeadBytes, 'utf8')
    frame.writeUInt16LE(fromLen, p + 17)
    const textLen = frame.write(text, p + messageHeadBytes + fromLen, 'utf8')
    frame.writeUInt32LE(textLen, p + 19)
    p += messageHeadBytes + fromLen + textLen
  }
  return seal(frame)
}

// An ASCII string of at most shortAscii characters written byte by byte: 2 to 3 ns a character,
// where a call into Buffer's UTF-8 writer costs about 70 ns whatever the length.
const shortAscii = 16
function putAscii (buf: Buffer, s: string, at: number): number {
  for (let k = 0; k < s.length; k++) buf[at + k] = s.charCodeAt(k)
  return s.length
}

// The message of a send's stored reply, { ok: true, message: { id, from, to, text, ts } } and
// nothing else, as state.ts makes it; null for any other reply. Only such a reply is written as
// kind 1 of a rids chunk: it decodes to an equal object, its fields in the same order.
function sentMessage (reply: Reply): Message | null {
  if (reply.ok !== true) return null
  const m = reply.message as Message | undefined
  if (m === undefined || typeof m !== 'object' || m === null) return null
  const top = Object.keys(reply)
  if (top.length !== 2 || top[0] !== 'ok' || top[1] !== 'message') return null
  const keys = Object.keys(m)
  if (keys.length !== 5 || keys[0] !== 'id' || keys[1] !== 'from' || keys[2] !== 'to' || keys[3] !== 'text' || keys[4] !== 'ts') return null
  if (typeof m.id !== 'number' || typeof m.from !== 'string' || typeof m.to !== 'string' || typeof m.text !== 'string' || typeof m.ts !== 'number') return null
  return m
}

// A rids chunk's payload (see the top of this file), or null if an entry cannot be written in
// it (a key or a name of 64 KiB or more), for the caller to write JSON instead. The strings go
// last, as one: one call into Buffer's UTF-8 writer instead of four per entry, each of which
// costs more than the whole of a short name's bytes (about 70 ns).
function encodeRids (entries: Array<[string, number, Reply]>, max: number): Buffer | null {
  const n = entries.length
  const sent = new Array<Message | null>(n)
  const parts: string[] = [] // per entry: the key, then from, to and text, or the reply's JSON
  for (let k = 0; k < n; k++) {
    const [key, , reply] = entries[k]
    const m = sent[k] = sentMessage(reply)
    if (m !== null) parts.push(key, m.from, m.to, m.text)
    else parts.push(key, JSON.stringify(reply))
  }
  const strings = parts.join('')
  const stringsLen = Buffer.byteLength(strings, 'utf8')
  const bytes = stringsLen === strings.length ? (s: string) => s.length : (s: string) => Buffer.byteLength(s, 'utf8') // all ASCII, or not
  const frame = allocFrame(5 + n * ridHeadBytes + stringsLen, max)
  let p = frameHeaderBytes
  frame[p] = ridsTag
  frame.writeUInt32LE(n, p + 1)
  p += 5
  let at = 0 // in parts
  for (let k = 0; k < n; k++) {
    const m = sent[k]
    const keyLen = bytes(parts[at++])
    if (keyLen > 0xffff) return null
    frame.writeUInt16LE(keyLen, p)
    frame.writeDoubleLE(entries[k][1], p + 2)
    if (m === null) {
      frame.fill(0, p + 10, p + 31)
      frame.writeUInt32LE(bytes(parts[at++]), p + 31)
    } else {
      const fromLen = bytes(parts[at++])
      const toLen = bytes(parts[at++])
      if (fromLen > 0xffff || toLen > 0xffff) return null
      frame[p + 10] = 1
      frame.writeDoubleLE(m.id, p + 11)
      frame.writeDoubleLE(m.ts, p + 19)
      frame.writeUInt16LE(fromLen, p + 27)
      frame.writeUInt16LE(toLen, p + 29)
      frame.writeUInt32LE(bytes(parts[at++]), p + 31)
    }
    p += ridHeadBytes
  }
  utf8Write.call(frame, strings, p)
  return seal(frame)
}

// The rids chunk in buf[start, end), or null if it is not well formed.
function decodeRids (buf: Buffer, start: number, end: number): Record<string, unknown> | null {
  if (end - start < 5) return null
  const n = buf.readUInt32LE(start + 1)
  const stringsAt = start + 5 + n * ridHeadBytes
  if (stringsAt > end) return null
  let stringsLen = 0
  for (let p = start + 5; p < stringsAt; p += ridHeadBytes) {
    const kind = buf[p + 10]
    if (kind > 1) return null
    stringsLen += buf.readUInt16LE(p) + buf.readUInt16LE(p + 27) + buf.readUInt16LE(p + 29) + buf.readUInt32LE(p + 31)
  }
  if (stringsAt + stringsLen !== end) return null
  // Each string decoded on its own: substrings of one string for all would keep it whole in
  // memory for as long as any of them lives.
  let q = stringsAt
  const take = (len: number): string => utf8Slice.call(buf, q, q += len)
  const entries = new Array<[string, number, Reply]>(n)
  for (let k = 0, p = start + 5; k < n; k++, p += ridHeadBytes) {
    const key = take(buf.readUInt16LE(p))
    const ts = buf.readDoubleLE(p + 2)
    let reply: Reply
    if (buf[p + 10] === 1) {
      const from = take(buf.readUInt16LE(p + 27))
      const to = take(buf.readUInt16LE(p + 29))
      reply = { ok: true, message: { id: buf.readDoubleLE(p + 11), from, to, text: take(buf.readUInt32LE(p + 31)), ts: buf.readDoubleLE(p + 19) } }
    } else {
      let value: unknown
      try {
        value = JSON.parse(take(buf.readUInt32LE(p + 31)))
      } catch {
        return null
      }
      if (value === null || typeof value !== 'object' || Array.isArray(value)) return null
      reply = value as Reply
    }
    entries[k] = [key, ts, reply]
  }
  return { kind: 'rids', entries }
}

// Walk the messages chunk in buf[start, end): its owner's name and how many messages it holds,
// read or not, or null if it is not well formed. With `visit`, each message's fields are handed
// to it in order; without, nothing is decoded but the name, and the walk only checks that the
// lengths fill the chunk exactly.
function walkMessages (buf: Buffer, start: number, end: number, visit?: (id: number, from: string, text: string, ts: number, read: 0 | 1) => void): { name: string, count: number, unread: number } | null {
  let p = start + 3
  if (p + 4 > end) return null
  const nameLen = buf.readUInt16LE(start + 1)
  if (p + nameLen + 4 > end) return null
  const name = utf8Slice.call(buf, p, p += nameLen)
  const count = buf.readUInt32LE(p)
  p += 4
  if (count * messageHeadBytes > end - p) return null
  let unread = 0
  for (let k = 0; k < count; k++) {
    if (p + messageHeadBytes > end) return null
    const read = buf[p + 16]
    if (read === 0) unread++
    const fromLen = buf.readUInt16LE(p + 17)
    const textLen = buf.readUInt32LE(p + 19)
    const at = p
    p += messageHeadBytes + fromLen + textLen
    if (read > 1 || p > end) return null
    if (visit !== undefined) {
      const textAt = at + messageHeadBytes + fromLen
      visit(buf.readDoubleLE(at), utf8Slice.call(buf, at + messageHeadBytes, textAt), utf8Slice.call(buf, textAt, p), buf.readDoubleLE(at + 8), read as 0 | 1)
    }
  }
  return p === end ? { name, count, unread } : null
}

// The messages chunk in buf[start, end), or null if it is not well formed.
function decodeMessages (buf: Buffer, start: number, end: number): Record<string, unknown> | null {
  const messages: SnapshotMessage[] = []
  const walked = walkMessages(buf, start, end, (id, from, text, ts, read) => { messages.push([id, from, '', text, ts, read]) })
  if (walked === null) return null
  const name = walked.name
  for (const m of messages) m[2] = name // every message is to the owner
  return { kind: 'messages', name, messages }
}

// The same chunk checked but left packed: { kind: 'messages', name, packed, count, unread },
// where `packed` is the chunk's payload (a view into buf), to be decoded later by
// unpackMessages, and count and unread say how many messages it holds, and how many unread.
function packedMessages (buf: Buffer, start: number, end: number): Record<string, unknown> | null {
  const walked = walkMessages(buf, start, end)
  return walked === null ? null : { kind: 'messages', name: walked.name, packed: buf.subarray(start, end), count: walked.count, unread: walked.unread }
}

// The UTF-8 bytes of the senders' names and texts of the `count` messages of a packed messages
// chunk (see packedMessages), all together, from its length: everything else in it has a fixed
// size (see encodeChunkFrame).
export function packedMessagesBytes (packed: Buffer, count: number): number {
  return packed.length - messagesChunkHeadBytes(packed.readUInt16LE(1)) - count * messageHeadBytes
}

// Hand every message of a packed messages chunk (see packedMessages) to `visit`, in order.
export function unpackMessages (packed: Buffer, visit: (id: number, from: string, text: string, ts: number, read: 0 | 1) => void): void {
  if (walkMessages(packed, 0, packed.length, visit) === null) throw new Error('malformed packed messages chunk')
}

export type FrameResult =
  | { kind: 'ok', value: Record<string, unknown>, next: number }
  | { kind: 'short' } // the frame runs past the end of the buffer: a torn write if it is the tail
  | { kind: 'bad', why: string } // length out of range, CRC mismatch or not a JSON object

// Decode the frame at `offset`. Never throws on bad input. With packMessages, a binary messages
// chunk is checked but not decoded (see packedMessages); with packSends, a send record's text
// is left in buf (see PackedSendRecord). checkCrc false skips the checksum, for a caller that
// has it checked otherwise (checksums.ts).
export function decodeFrame (buf: Buffer, offset: number, max: number = limits.recordBytesMax, packMessages = false, packSends = false, checkCrc = true): FrameResult {
  if (buf.length - offset < frameHeaderBytes) return { kind: 'short' }
  const len = buf.readUInt32LE(offset)
  if (len === 0 || len > max) return { kind: 'bad', why: `length ${len} out of range` }
  const end = offset + frameHeaderBytes + len
  if (end > buf.length) return { kind: 'short' }
  const start = offset + frameHeaderBytes
  if (checkCrc && zlib.crc32(buf.subarray(start, end)) !== buf.readUInt32LE(offset + 4)) return { kind: 'bad', why: 'checksum mismatch' }
  if (buf[start] === sendTag) {
    const r = decodeSend(buf, start, end, packSends)
    return r === null ? { kind: 'bad', why: 'malformed send record' } : { kind: 'ok', value: r as unknown as Record<string, unknown>, next: end }
  }
  if (buf[start] === messagesTag) {
    const c = packMessages ? packedMessages(buf, start, end) : decodeMessages(buf, start, end)
    return c === null ? { kind: 'bad', why: 'malformed messages chunk' } : { kind: 'ok', value: c, next: end }
  }
  if (buf[start] === markTag) {
    const r = decodeMark(buf, start, end)
    return r === null ? { kind: 'bad', why: 'malformed read mark' } : { kind: 'ok', value: r as unknown as Record<string, unknown>, next: end }
  }
  if (buf[start] === ridsTag) {
    const c = decodeRids(buf, start, end)
    return c === null ? { kind: 'bad', why: 'malformed rids chunk' } : { kind: 'ok', value: c, next: end }
  }
  let value: unknown
  try {
    value = JSON.parse(buf.toString('utf8', start, end))
  } catch {
    return { kind: 'bad', why: 'payload is not JSON' }
  }
  if (value === null || typeof value !== 'object' || Array.isArray(value)) return { kind: 'bad', why: 'payload is not an object' }
  return { kind: 'ok', value: value as Record<string, unknown>, next: end }
}

// True if any valid frame starts anywhere after `offset`. Used to tell a torn tail (nothing
// valid follows the damage) from corruption in the middle (good records follow it).
export function validFrameAfter (buf: Buffer, offset: number): boolean {
  for (let at = offset + 1; at + frameHeaderBytes < buf.length; at++) {
    const len = buf.readUInt32LE(at)
    if (len < 2 || len > limits.recordBytesMax || at + frameHeaderBytes + len > buf.length) continue
    // Cheap filter before the checksum: payloads are JSON objects or binary.
    const first = buf[at + frameHeaderBytes]
    if (first === 0x7b ? buf[at + frameHeaderBytes + len - 1] !== 0x7d : first !== sendTag && first !== messagesTag && first !== ridsTag && first !== markTag) continue
    if (decodeFrame(buf, at).kind === 'ok') return true
  }
  return false
}
