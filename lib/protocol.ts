// The wire format (protocol.md, "Transport" and "Requests and replies"): one JSON object per
// line. parseRequest turns a line into a Request or throws a ChatError carrying the request id
// when one could be read; the encoders turn replies and events back into lines. No I/O here.

import { ChatError, errors } from './errors.ts'
import { limits } from './limits.ts'
import type { Reply } from './state.ts'

export type RequestId = string | number | null

export interface Request {
  op: string
  id: RequestId | undefined
  fields: Record<string, unknown>
}

// A parse failure that still knows the id of the request it failed, so the reply can echo it.
export class RequestParseError extends Error {
  constructor (readonly error: ChatError, readonly id: RequestId | undefined) {
    super(error.message)
  }
}

// Parse one line (without its line ending). Blank lines are the caller's to skip.
export function parseRequest (line: string): Request {
  let value: unknown
  try {
    value = JSON.parse(line)
  } catch (e) {
    throw new RequestParseError(errors.badJson((e as Error).message.slice(0, 120)), undefined)
  }
  if (value === null || typeof value !== 'object' || Array.isArray(value)) {
    throw new RequestParseError(errors.badRequest('request', 'must be a JSON object'), undefined)
  }
  const obj = value as Record<string, unknown>
  const rawId = Object.hasOwn(obj, 'id') ? obj.id : undefined
  let id: RequestId | undefined
  if (rawId === undefined || rawId === null || (typeof rawId === 'number' && Number.isFinite(rawId)) || (typeof rawId === 'string' && rawId.length <= limits.idLengthMax)) {
    id = rawId as RequestId | undefined
  } else {
    throw new RequestParseError(errors.badRequest('id', `must be a number or a string of at most ${limits.idLengthMax} characters`), undefined)
  }
  const op = Object.hasOwn(obj, 'op') ? obj.op : undefined
  if (typeof op !== 'string') throw new RequestParseError(errors.badRequest('op', 'required, a string'), id)
  // Copy own fields into a prototype-free object: a "__proto__" key stays an inert field.
  const fields: Record<string, unknown> = Object.create(null)
  for (const k of Object.keys(obj)) if (k !== 'op' && k !== 'id') fields[k] = obj[k]
  return { op, id, fields }
}

const okTrue = '{"ok":true'
const okFalse = '{"ok":false'

export function encodeReply (id: RequestId | undefined, reply: Reply): string {
  // id goes second so a person reading `nc` output sees ok and id first. Replies are made with
  // `ok` as their first field, so the id is spliced into the encoded text after it rather than
  // copying the reply into a new object.
  const json = JSON.stringify(reply)
  const at = json.startsWith(okTrue) ? okTrue.length : json.startsWith(okFalse) ? okFalse.length : -1
  if (at < 0) { // not made that way: put ok (and the id) first by copying
    const { ok, ...rest } = reply
    return JSON.stringify(id === undefined ? { ok, ...rest } : { ok, id, ...rest }) + '\n'
  }
  if (id === undefined) return json + '\n'
  return json.slice(0, at) + ',"id":' + JSON.stringify(id) + json.slice(at) + '\n'
}

export function encodeError (id: RequestId | undefined, e: ChatError): string {
  return encodeReply(id, { ok: false, error: e.toWire() } as Reply)
}

export function encodeEvent (event: string, body: Record<string, unknown> = {}): string {
  return JSON.stringify({ event, ...body }) + '\n'
}

// ---- field validation, shared by the command table -------------------------------------------

export function optionalField (f: Record<string, unknown>, name: string): unknown {
  return Object.hasOwn(f, name) ? f[name] : undefined
}

export function stringField (f: Record<string, unknown>, name: string, opts: { minBytes?: number, maxBytes: number, pattern?: RegExp, patternText?: string, optional?: boolean }): string | undefined {
  const v = optionalField(f, name)
  if (v === undefined && opts.optional) return undefined
  if (typeof v !== 'string') throw errors.badRequest(name, v === undefined ? 'required' : 'must be a string')
  const bytes = Buffer.byteLength(v, 'utf8')
  if (bytes < (opts.minBytes ?? 1)) throw errors.badRequest(name, 'must not be empty')
  if (bytes > opts.maxBytes) throw errors.badRequest(name, `at most ${opts.maxBytes} bytes`)
  if (opts.pattern && !opts.pattern.test(v)) throw errors.badRequest(name, opts.patternText ?? 'invalid')
  return v
}

export function intField (f: Record<string, unknown>, name: string, opts: { min: number, max: number, default: number }): number {
  const v = optionalField(f, name)
  if (v === undefined || v === null) return opts.default
  if (typeof v !== 'number' || !Number.isSafeInteger(v)) throw errors.badRequest(name, 'must be an integer')
  if (v < opts.min || v > opts.max) throw errors.badRequest(name, `must be between ${opts.min} and ${opts.max}`)
  return v
}

export const userPattern = /^[A-Za-z0-9_.-]{1,32}$/
export const userPatternText = '1 to 32 characters of A-Z a-z 0-9 _ . -'
