// Record framing, shared by log segments and snapshots.
//
//   offset 0: u32 little-endian  payload length in bytes (1 .. recordBytesMax)
//   offset 4: u32 little-endian  CRC-32 (zlib polynomial) of the payload
//   offset 8: payload            a UTF-8 JSON object (first byte '{'), or a binary send record
//                                (first byte 0x01, below)
//
// A frame is valid only if its length is in range, it lies wholly inside the file, its CRC
// matches, and its payload parses as a JSON object or is a well-formed binary send record.
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
// Every other record, and every snapshot chunk, is JSON. A log may mix both kinds (a log written
// before sends were binary reads as it always did).

import zlib from 'node:zlib'
import { limits } from '../limits.ts'
import type { LogRecord, SendRecord } from '../records.ts'

export const frameHeaderBytes = 8

export function encodeFrame (value: object): Buffer {
  const json = JSON.stringify(value)
  const len = Buffer.byteLength(json, 'utf8')
  if (len > limits.recordBytesMax) throw new RangeError(`record of ${len} bytes exceeds ${limits.recordBytesMax}`)
  const frame = Buffer.allocUnsafe(frameHeaderBytes + len)
  frame.write(json, frameHeaderBytes, 'utf8')
  frame.writeUInt32LE(len, 0)
  frame.writeUInt32LE(zlib.crc32(frame.subarray(frameHeaderBytes)), 4)
  return frame
}

const sendTag = 0x01
const sendHeadBytes = 35

// A log record's frame: binary for a send, JSON for the rest.
export function encodeRecordFrame (r: LogRecord): Buffer {
  if (r.op !== 'send') return encodeFrame(r)
  const fromLen = Buffer.byteLength(r.from, 'utf8')
  const toLen = Buffer.byteLength(r.to, 'utf8')
  const rkLen = r.rk === undefined ? -1 : Buffer.byteLength(r.rk, 'utf8')
  const textLen = Buffer.byteLength(r.text, 'utf8')
  if (fromLen > 0xffff || toLen > 0xffff || rkLen >= 0xffff) throw new RangeError('a send record\'s names and key must be under 64 KiB each')
  const len = sendHeadBytes + fromLen + toLen + Math.max(rkLen, 0) + textLen
  if (len > limits.recordBytesMax) throw new RangeError(`record of ${len} bytes exceeds ${limits.recordBytesMax}`)
  const frame = Buffer.allocUnsafe(frameHeaderBytes + len)
  const at = frameHeaderBytes
  frame[at] = sendTag
  frame.writeDoubleLE(r.i, at + 1)
  frame.writeDoubleLE(r.e, at + 9)
  frame.writeDoubleLE(r.ts, at + 17)
  frame.writeUInt16LE(fromLen, at + 25)
  frame.writeUInt16LE(toLen, at + 27)
  frame.writeUInt16LE(rkLen + 1, at + 29)
  frame.writeUInt32LE(textLen, at + 31)
  let p = at + sendHeadBytes
  p += frame.write(r.from, p, 'utf8')
  p += frame.write(r.to, p, 'utf8')
  if (r.rk !== undefined) p += frame.write(r.rk, p, 'utf8')
  frame.write(r.text, p, 'utf8')
  frame.writeUInt32LE(len, 0)
  frame.writeUInt32LE(zlib.crc32(frame.subarray(frameHeaderBytes)), 4)
  return frame
}

// What buf.toString('utf8', start, end) calls once it has checked its arguments and looked up
// the encoding; decodeSend has checked the bounds itself, and calls it four times per record.
const utf8Slice = (Buffer.prototype as unknown as { utf8Slice: (this: Buffer, start: number, end: number) => string }).utf8Slice

// The send record in buf[start, end), or null if the lengths do not fill it exactly.
function decodeSend (buf: Buffer, start: number, end: number): SendRecord | null {
  if (end - start < sendHeadBytes) return null
  const fromLen = buf.readUInt16LE(start + 25)
  const toLen = buf.readUInt16LE(start + 27)
  const rkLen = buf.readUInt16LE(start + 29) - 1
  const textLen = buf.readUInt32LE(start + 31)
  if (start + sendHeadBytes + fromLen + toLen + Math.max(rkLen, 0) + textLen !== end) return null
  const i = buf.readDoubleLE(start + 1)
  const e = buf.readDoubleLE(start + 9)
  const ts = buf.readDoubleLE(start + 17)
  let p = start + sendHeadBytes
  const from = utf8Slice.call(buf, p, p += fromLen)
  const to = utf8Slice.call(buf, p, p += toLen)
  const rk = rkLen < 0 ? undefined : utf8Slice.call(buf, p, p += rkLen)
  const text = utf8Slice.call(buf, p, end)
  return rk === undefined ? { op: 'send', from, to, text, i, e, ts } : { op: 'send', from, to, text, rk, i, e, ts }
}

export type FrameResult =
  | { kind: 'ok', value: Record<string, unknown>, next: number }
  | { kind: 'short' } // the frame runs past the end of the buffer: a torn write if it is the tail
  | { kind: 'bad', why: string } // length out of range, CRC mismatch or not a JSON object

// Decode the frame at `offset`. Never throws on bad input.
export function decodeFrame (buf: Buffer, offset: number): FrameResult {
  if (buf.length - offset < frameHeaderBytes) return { kind: 'short' }
  const len = buf.readUInt32LE(offset)
  if (len === 0 || len > limits.recordBytesMax) return { kind: 'bad', why: `length ${len} out of range` }
  const end = offset + frameHeaderBytes + len
  if (end > buf.length) return { kind: 'short' }
  const start = offset + frameHeaderBytes
  if (zlib.crc32(buf.subarray(start, end)) !== buf.readUInt32LE(offset + 4)) return { kind: 'bad', why: 'checksum mismatch' }
  if (buf[start] === sendTag) {
    const r = decodeSend(buf, start, end)
    return r === null ? { kind: 'bad', why: 'malformed send record' } : { kind: 'ok', value: r as unknown as Record<string, unknown>, next: end }
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
    // Cheap filter before the checksum: payloads are JSON objects or binary send records.
    const first = buf[at + frameHeaderBytes]
    if (first === 0x7b ? buf[at + frameHeaderBytes + len - 1] !== 0x7d : first !== sendTag) continue
    if (decodeFrame(buf, at).kind === 'ok') return true
  }
  return false
}
