// Helpers for the storage tests: temporary data directories, a deterministic stream of log
// records, frame offsets in a file, byte damage, a fault-injecting FileOps wrapper, and a plain
// view of a ChatState for deep comparison.

import fs from 'node:fs'
import os from 'node:os'
import path from 'node:path'
import { type FileOps, realFiles } from '../../lib/storage/files.ts'
import { decodeFrame, encodeRecordFrame } from '../../lib/storage/framing.ts'
import type { LogRecord } from '../../lib/records.ts'
import { type ChatState, type Message, messageBytes } from '../../lib/state.ts'
import { limits } from '../../lib/limits.ts'

export interface Teardown { teardown: (fn: () => unknown) => void }

export function tempDir (t: Teardown, tag = 'storage'): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), `chainchat-${tag}-`))
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }))
  return dir
}

// Record i of a fixed, deterministic history, as the primary would stamp it: consecutive
// indexes, non-decreasing time, exactly-once keys on most client requests. It registers four
// accounts, then cycles through sends, reads, push acknowledgements, deletions and a no-op, and
// deletes one account (Dave) at index 20, so a state built from it has read and unread
// messages, a deleted account and a non-empty exactly-once table.
export function record (i: number, e = 0): LogRecord {
  const ts = 1_700_000_000_000 + i * 7
  const head = { i, e, ts }
  const names = ['alice', 'Bob', 'carol', 'Dave']
  if (i <= names.length) return { ...head, op: 'register', user: names[i - 1], salt: `salt${i}`, hash: `hash${i}`, rk: `\u0000reg${i}` }
  if (i === 20) return { ...head, op: 'delete_account', user: 'dave', created: 4, rk: `Dave\u0000bye${i}` }
  switch (i % 7) {
    case 0: return { ...head, op: 'send', from: 'alice', to: 'bob', text: `hello bob #${i} \u00e9\u{1f600}`, rk: `alice\u0000r${i}` }
    case 1: return { ...head, op: 'send', from: 'Bob', to: 'ALICE', text: `hi alice #${i}`, rk: `Bob\u0000r${i}` }
    case 2: return { ...head, op: 'send', from: 'carol', to: 'alice', text: `from carol #${i}` }
    case 3: return { ...head, op: 'read', user: 'bob', limit: 1, rk: `Bob\u0000read${i}` }
    case 4: return { ...head, op: 'mark_read', user: 'alice', ids: [i - 3, i - 2] }
    case 5: return { ...head, op: 'delete_messages', user: 'alice', ids: [i - 4, 999_999], rk: `alice\u0000del${i}` }
    default: return i % 2 === 0 ? { ...head, op: 'noop' } : { ...head, op: 'send', from: 'Dave', to: 'carol', text: `dave says #${i}` }
  }
}

export function records (from: number, to: number): LogRecord[] {
  const out: LogRecord[] = []
  for (let i = from; i <= to; i++) out.push(record(i))
  return out
}

// The batch the committer hands to Store.append / SegmentLog.append.
export function batch (rs: LogRecord[]): { frames: Buffer, lastIndex: number } {
  return { frames: Buffer.concat(rs.map(r => encodeRecordFrame(r))), lastIndex: rs[rs.length - 1].i }
}

// Start and end offsets of the valid frames at the beginning of buf, up to the first bad one.
export function frameSpans (buf: Buffer): Array<{ start: number, end: number }> {
  const spans: Array<{ start: number, end: number }> = []
  let off = 0
  while (off < buf.length) {
    const f = decodeFrame(buf, off)
    if (f.kind !== 'ok') break
    spans.push({ start: off, end: f.next })
    off = f.next
  }
  return spans
}

export function flipByte (file: string, offset: number, mask = 0xff): void {
  const buf = fs.readFileSync(file)
  if (offset >= buf.length) throw new RangeError(`offset ${offset} beyond ${file} (${buf.length} bytes)`)
  buf[offset] ^= mask
  fs.writeFileSync(file, buf)
}

export function errnoError (code: string, message = `${code}: injected fault`): NodeJS.ErrnoException {
  const e: NodeJS.ErrnoException = new Error(message)
  e.code = code
  return e
}

// The error a function throws, or undefined if it returns.
export function thrown (fn: () => unknown): unknown {
  try {
    fn()
  } catch (e) {
    return e
  }
  return undefined
}

// A FileOps over the real file system whose calls can be intercepted. Every call is counted; a
// hook, when set, runs instead of the real call (and may call `real` itself). The path each fd
// was opened with is remembered, so a hook can fail writes to one kind of file only.
export interface FaultyFiles {
  files: FileOps
  real: FileOps
  calls: Record<keyof FileOps, number>
  hooks: Partial<FileOps>
  pathOf: (fd: number) => string | undefined
}

export function faultyFiles (): FaultyFiles {
  const calls = {} as Record<keyof FileOps, number>
  const hooks: Partial<FileOps> = {}
  const fdPaths = new Map<number, string>()
  const files = {} as Record<keyof FileOps, unknown>
  for (const name of Object.keys(realFiles) as Array<keyof FileOps>) {
    calls[name] = 0
    files[name] = (...args: unknown[]) => {
      calls[name]++
      const fn = (hooks[name] ?? realFiles[name]) as (...a: unknown[]) => unknown
      const result = fn(...args)
      if (name === 'openSync') fdPaths.set(result as number, String(args[0]))
      return result
    }
  }
  return { files: files as unknown as FileOps, real: realFiles, calls, hooks, pathOf: fd => fdPaths.get(fd) }
}

// Everything a ChatState holds, as plain data, for t.same().
// What the quota counts (ChatState.storedBytes), counted again from scratch: every account, every
// message in a mailbox, and every message a stored reply holds.
export function recountStored (st: ChatState): number {
  const cost = (m: Message): number => messageBytes(Buffer.byteLength(m.text), Buffer.byteLength(m.from))
  let n = 0
  for (const a of st.accounts.values()) {
    n += limits.accountBytes
    for (const [m] of a.mailbox.entries()) n += cost(m)
  }
  for (const [, , reply] of st.ridEntries()) {
    const { message, messages } = reply as { message?: Message, messages?: Message[] }
    if (message !== undefined) n += cost(message)
    for (const m of messages ?? []) n += cost(m)
  }
  return n
}

// Every view checks that the count the state keeps is the one counted from scratch.
export function stateView (st: ChatState): Record<string, unknown> {
  const stored = st.storedBytes
  const counted = recountStored(st)
  if (stored !== counted) throw new Error(`storedBytes is ${stored}, counted again ${counted}`)
  return {
    index: st.index,
    stored,
    lastTs: st.lastTs,
    digest: st.digest(),
    sortedKeys: [...st.sortedKeys],
    accounts: [...st.accounts.values()].map(a => ({
      name: a.name,
      key: a.key,
      salt: a.salt,
      hash: a.hash,
      created: a.created,
      messages: [...a.mailbox.entries()].map(([m, read]) => ({ ...m, read }))
    })).sort((x, y) => x.key < y.key ? -1 : 1),
    rids: [...st.ridEntries()]
  }
}
