// Record framing, shared by log segments and snapshots.
//
//   offset 0: u32 little-endian  payload length in bytes (1 .. recordBytesMax)
//   offset 4: u32 little-endian  CRC-32 (zlib polynomial) of the payload
//   offset 8: payload            UTF-8 JSON object
//
// A frame is valid only if its length is in range, it lies wholly inside the file, its CRC
// matches, and its payload parses as a JSON object.

import zlib from 'node:zlib'
import { limits } from '../limits.ts'

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
  const payload = buf.subarray(offset + frameHeaderBytes, end)
  if (zlib.crc32(payload) !== buf.readUInt32LE(offset + 4)) return { kind: 'bad', why: 'checksum mismatch' }
  let value: unknown
  try {
    value = JSON.parse(payload.toString('utf8'))
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
    // Cheap filter before the checksum: payloads are JSON objects.
    if (buf[at + frameHeaderBytes] !== 0x7b || buf[at + frameHeaderBytes + len - 1] !== 0x7d) continue
    if (decodeFrame(buf, at).kind === 'ok') return true
  }
  return false
}
