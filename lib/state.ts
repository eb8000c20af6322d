// The replicated state machine. apply() is pure in the sense that matters for replication: it
// reads only the record and the state, never the clock, the network or a random source, so every
// replica that applies the same records holds the same state and reports the same digest.
// Queries (login checks, listing, history) read the state and never change it.

import assert from 'node:assert/strict'
import type { LogRecord, PackedSendRecord } from './records.ts'
import { limits } from './limits.ts'
import { KeySlots } from './key-slots.ts'
import type { ErrorCode } from './errors.ts'
import { unpackMessages, unpackSend, packedSendMessage, sendNamesAt, sendFromBytes, sendToBytes, sendKeyBytes, sendTextBytes, packedMessagesBytes } from './storage/framing.ts'

export interface Message {
  id: number
  from: string
  to: string
  text: string
  ts: number
}

export interface Account {
  name: string // as registered
  key: string // lower case: names are unique without regard to case
  salt: string
  hash: string
  created: number // index of the register record
  mailbox: Mailbox
  bytes: number // what its mailbox's messages count toward storedBytes
}

// A reply as stored in the exactly-once table and sent on the wire, without the request id.
export type Reply = { ok: true, [field: string]: unknown } | { ok: false, error: { code: ErrorCode, message: string } }

// Side effects for the primary to carry out after a record is applied; replicas ignore them.
export interface Effects {
  push?: Message
  accountDeleted?: string // account key
}

export interface Applied {
  reply: Reply
  effects: Effects
  replayed?: boolean // the reply was stored from an earlier request with the same rid
  delivered?: boolean // set by the primary: a push was handed to a live session
}

// A user's messages, read and unread, in id order: sorted arrays, with no hash table per
// mailbox. Ids grow with the log index, so adding appends. `unread` holds the unread ids, in
// order, from `unreadHead` on: reading takes the oldest, so the array is trimmed at the head and
// compacted now and then. Finding a message or its read mark is a binary search. Message objects
// are never changed once made, so replies, pushes and the exactly-once table share them.
//
// A mailbox loaded from a snapshot starts deferred (see defer): the snapshot's messages for it
// are decoded the first time it is used, or a part at a time in the background (warmStep), not
// at start-up. Adding does not count as a use: what is added comes after everything deferred,
// so it waits in the arrays meanwhile. Nor do the counts (size, unreadCount; a login asks for
// the unread count): the snapshot's chunks say how many messages they hold, and how many unread.
//
// Recovery adds the messages of the sends it replays packed (see addPacked): they wait at the
// tail of the mailbox, after every other message and all unread, with their text still in the
// log's buffer, and are decoded the same way, when the mailbox is first used or a part at a time
// in the background. Messages added after them (add) wait in the tail too, to keep the order.
export class Mailbox {
  // This mailbox's share of the state's digest: the sum of its messages' hashes, in the digest's
  // two lanes (ChatState keeps it, see digestAdd), so that a deleted account's share comes out of
  // the digest at once. Messages still deferred count once they are decoded.
  hx = 0
  hy = 0
  private unreadHead = 0
  // Deferred messages: `next` decodes the next part of them into `early`, and says whether any
  // part is left; once none is, they go in front of whatever was added meanwhile. `count` and
  // `unread` say how many there are in all, and how many of them unread.
  private deferred: { next: (into: Mailbox) => boolean, early: Mailbox, count: number, unread: number } | null = null
  // The packed tail: from `next` on, each entry is a message's id (ids[k]) and either a send
  // record's payload, at starts[k] in its buffer, with its sender's name as the state knew it
  // (items[k]), or, where starts[k] is -1, a message added after them (items[k]). The buffers
  // come in runs: bufs[r] holds the payloads of the entries from bufAt[r] on; `run` is the one
  // of the entry at `next`. All are unread but those in `read` (marked while in the tail;
  // `readLeft` of them not yet moved out). `decode` makes a packed entry's message; `done` is
  // called once the tail is empty. lastId: of the last entry.
  private tail: {
    ids: number[]
    starts: number[]
    bufs: Buffer[]
    bufAt: number[]
    run: number
    lastId: number
    items: Array<string | Message>
    next: number
    read: Set<number> | null
    readLeft: number
    decode: (buf: Buffer, start: number, from: string, read: boolean) => Message
    done: () => void
  } | null = null

  constructor (
    private ids: number[] = [],
    private messages: Message[] = [], // parallel to ids
    private unread: number[] = []
  ) {}

  // While messages are deferred, nothing has been read or removed (either decodes them first).
  get size (): number { return this.ids.length + (this.deferred?.count ?? 0) + this.tailCount }
  get unreadCount (): number { return this.unread.length - this.unreadHead + (this.deferred?.unread ?? 0) + this.tailCount - (this.tail?.readLeft ?? 0) }
  private get tailCount (): number { return this.tail === null ? 0 : this.tail.ids.length - this.tail.next }

  add (m: Message, read: boolean): void {
    const t = this.tail
    if (t !== null) {
      if (read) { // not done while a tail waits (a new message is unread), but keep the order
        while (this.tailStep(Infinity));
      } else {
        if (t.lastId >= m.id) assert.fail('message ids must grow')
        t.ids.push(m.id)
        t.starts.push(-1)
        t.items.push(m)
        t.lastId = m.id
        return
      }
    }
    if (this.ids.length > 0 && this.ids[this.ids.length - 1] >= m.id) assert.fail('message ids must grow')
    this.ids.push(m.id)
    this.messages.push(m)
    if (!read) this.unread.push(m.id)
  }

  // Leave the messages before any added from now on to `next`, which adds them to the mailbox it
  // is given (with add, in order) a part at a time, and returns true while parts are left;
  // `count` of them, `unread` of those unread. Only a new, empty mailbox can be deferred: false
  // otherwise.
  defer (next: (into: Mailbox) => boolean, count: number, unread: number): boolean {
    if (this.ids.length > 0 || this.deferred !== null || this.tail !== null) return false
    this.deferred = { next, early: new Mailbox(), count, unread }
    return true
  }

  // `next` turns out to hold `count` more messages, `unread` of them unread (the snapshot had
  // more chunks for this mailbox). Only before anything has been decoded or added.
  deferMore (count: number, unread: number): void {
    const d = this.deferred
    assert.ok(d !== null && d.early.ids.length === 0 && this.ids.length === 0, 'deferMore on a mailbox in use')
    d.count += count
    d.unread += unread
  }

  get isDeferred (): boolean { return this.deferred !== null || this.tail !== null }

  // Whether a packed tail waits (see addPacked).
  get hasTail (): boolean { return this.tail !== null }

  // Start a packed tail, to which addPacked adds: `decode` makes the message of a send record's
  // payload, given its sender's name (and whether it was read, for the digest); `done` is called
  // once the whole tail has been decoded.
  startTail (decode: (buf: Buffer, start: number, from: string, read: boolean) => Message, done: () => void): void {
    assert.ok(this.tail === null, 'a mailbox has one packed tail at a time')
    this.tail = { ids: [], starts: [], bufs: [], bufAt: [], run: 0, lastId: this.ids.length > 0 ? this.ids[this.ids.length - 1] : 0, items: [], next: 0, read: null, readLeft: 0, decode, done }
  }

  // Add, unread, the message of the send record (index `id`) whose payload starts at buf[start],
  // from `from`, without decoding it (see startTail).
  addPacked (buf: Buffer, start: number, from: string, id: number): void {
    const t = this.tail!
    if (t.lastId >= id) assert.fail('message ids must grow')
    if (t.bufs.length === 0 || t.bufs[t.bufs.length - 1] !== buf) {
      t.bufs.push(buf)
      t.bufAt.push(t.ids.length)
    }
    t.ids.push(id)
    t.starts.push(start)
    t.items.push(from)
    t.lastId = id
  }

  // Move up to `max` entries of the tail into the arrays, decoding the packed ones; true while
  // some are left.
  private tailStep (max: number): boolean {
    const t = this.tail!
    const end = Math.min(t.ids.length, t.next + max)
    this.tail = null // while entries move, add appends them to the arrays
    try {
      for (let k = t.next; k < end; k = ++t.next) {
        const start = t.starts[k]
        const item = t.items[k]
        const read = t.read !== null && t.read.has(t.ids[k])
        while (t.run + 1 < t.bufs.length && t.bufAt[t.run + 1] <= k) t.run++
        this.add(start < 0 ? item as Message : t.decode(t.bufs[t.run], start, item as string, read), read)
        if (read) t.readLeft--
      }
    } finally {
      if (t.next < t.ids.length) this.tail = t
    }
    if (this.tail !== null) return true
    t.done()
    return false
  }

  // Decode the next part of the deferred messages; true while some are still deferred.
  warmStep (): boolean {
    const d = this.deferred
    if (d === null) return this.tail !== null && this.tailStep(1000)
    if (d.next(d.early)) return true
    this.deferred = null
    // Those added meanwhile are later than every deferred message. Nothing was read or removed,
    // since either would have decoded the mailbox first, so the unread ids start at 0.
    const e = d.early
    for (const m of this.messages) e.add(m, true) // their unread marks follow, in order
    for (const id of this.unread) e.unread.push(id)
    this.ids = e.ids
    this.messages = e.messages
    this.unread = e.unread
    return this.tail !== null
  }

  // Decode all the deferred messages now; true if there were any.
  warm (): boolean {
    if (this.deferred === null && this.tail === null) return false
    while (this.warmStep());
    return true
  }

  get (id: number): Message | undefined {
    this.warm()
    const k = lowerBound(this.ids, id)
    return this.ids[k] === id ? this.messages[k] : undefined
  }

  // Whether the message `id`, which is in the mailbox, has been read.
  isRead (id: number): boolean {
    this.warm()
    return this.unread[lowerBound(this.unread, id, this.unreadHead)] !== id
  }

  // Mark `id` read; false if it was read already or is not here.
  markRead (id: number): boolean {
    return this.markReadWhere(id) !== null
  }

  // The same, saying what was marked: the message, or `packed` if it is still packed in the tail
  // (the state counts it in the digest, read, once it is decoded). A mark does not decode the
  // tail: a replayed log marks most pushed messages read right after their send (mark_read).
  markReadWhere (id: number): Message | 'packed' | null {
    const t = this.tail
    if (t !== null && t.next < t.ids.length && id >= t.ids[t.next]) {
      const k = lowerBound(t.ids, id, t.next)
      if (t.ids[k] !== id) return null
      t.read ??= new Set()
      if (t.read.has(id)) return null
      t.read.add(id)
      t.readLeft++
      return t.starts[k] < 0 ? t.items[k] as Message : 'packed'
    }
    while (this.deferred !== null) this.warmStep() // those are before anything added since
    const k = lowerBound(this.unread, id, this.unreadHead)
    if (this.unread[k] !== id) return null
    if (k > this.unreadHead) this.unread.splice(k, 1)
    else if (++this.unreadHead >= 1024 && this.unreadHead * 2 >= this.unread.length) {
      this.unread.splice(0, this.unreadHead)
      this.unreadHead = 0
    }
    return this.messages[lowerBound(this.ids, id)]
  }

  // Take `id` out; what it was, or undefined if it is not here.
  remove (id: number): { message: Message, read: boolean } | undefined {
    return this.removeMany([id])[0]
  }

  // Take out every message of `ids` (no id twice): for each, what it was, or undefined if it is
  // not here. One pass over the arrays from the first removed position, where removing them
  // one by one moved the rest of the arrays once per id: a delete of 1,000 ids near the start
  // of a mailbox of a million took 2.4 s, with the server waiting.
  removeMany (ids: readonly number[]): Array<{ message: Message, read: boolean } | undefined> {
    this.warm()
    const out: Array<{ message: Message, read: boolean } | undefined> = new Array(ids.length)
    const at: number[] = [] // positions in ids/messages to drop
    const unreadGone: number[] = []
    for (let j = 0; j < ids.length; j++) {
      const k = lowerBound(this.ids, ids[j])
      if (this.ids[k] !== ids[j]) continue
      const read = this.isRead(ids[j])
      out[j] = { message: this.messages[k], read }
      at.push(k)
      if (!read) unreadGone.push(ids[j])
    }
    if (at.length === 0) return out
    at.sort((x, y) => x - y)
    let w = at[0]
    for (let r = at[0], d = 0; r < this.ids.length; r++) {
      if (d < at.length && at[d] === r) {
        d++
        continue
      }
      this.ids[w] = this.ids[r]
      this.messages[w] = this.messages[r]
      w++
    }
    this.ids.length = w
    this.messages.length = w
    if (unreadGone.length > 0) { // a merge: both are sorted, and every one of these is in unread
      unreadGone.sort((x, y) => x - y)
      const u = this.unread
      let uw = lowerBound(u, unreadGone[0], this.unreadHead)
      for (let r = uw, g = 0; r < u.length; r++) {
        if (g < unreadGone.length && u[r] === unreadGone[g]) g++
        else u[uw++] = u[r]
      }
      u.length = uw
    }
    return out
  }

  // The oldest unread messages, at most `limit` of them.
  oldestUnread (limit: number): Message[] {
    this.warm()
    const end = Math.min(this.unread.length, this.unreadHead + limit)
    const out: Message[] = []
    for (let k = this.unreadHead; k < end; k++) out.push(this.get(this.unread[k])!)
    return out
  }

  // Newest first, ids strictly below `before` when given.
  newest (limit: number, before?: number): Message[] {
    this.warm()
    let end = before === undefined ? this.ids.length : lowerBound(this.ids, before)
    const out: Message[] = []
    while (end > 0 && out.length < limit) out.push(this.messages[--end])
    return out
  }

  // A copy that later changes to this mailbox do not affect: the arrays are copied, the message
  // objects (never changed) are shared.
  clone (): Mailbox {
    this.warm()
    return new Mailbox(this.ids.slice(), this.messages.slice(), this.unread.slice(this.unreadHead))
  }

  // Every message in id order, as a snapshot holds it, in runs of at most `per` (made without a
  // pair per message, as entries makes them: a snapshot takes every message there is).
  * runs (per: number): Generator<SnapshotMessage[]> {
    this.warm()
    const { ids, messages, unread } = this
    let u = this.unreadHead
    for (let k0 = 0; k0 < ids.length; k0 += per) {
      const run = new Array<SnapshotMessage>(Math.min(per, ids.length - k0))
      for (let j = 0; j < run.length; j++) {
        const m = messages[k0 + j]
        const isUnread = unread[u] === ids[k0 + j]
        if (isUnread) u++
        run[j] = [m.id, m.from, m.to, m.text, m.ts, isUnread ? 0 : 1]
      }
      yield run
    }
  }

  // Every message in id order, with its read mark.
  * entries (): Generator<[Message, boolean]> {
    this.warm()
    let u = this.unreadHead
    for (let k = 0; k < this.ids.length; k++) {
      const unread = this.unread[u] === this.ids[k]
      if (unread) u++
      yield [this.messages[k], !unread]
    }
  }
}

// Whether `s` matches the glob `pattern`: `*` matches any run of characters, `?` any one, and
// every other character itself. Greedy, with backtracking only to the last `*`: at most
// pattern.length * s.length steps. (A pattern turned into a regular expression backtracks
// through every way of placing each `*`: `*a*a*a*a*a*a*a*a*a*a*a*a*b` took 8.7 s against one
// name of 32 a's, and the request holds up the whole server.)
export function globMatch (pattern: string, s: string): boolean {
  let p = 0
  let i = 0
  let star = -1 // position in pattern of the last `*` seen
  let from = 0 // where in s that `*` currently stops matching
  while (i < s.length) {
    const c = p < pattern.length ? pattern.charCodeAt(p) : -1
    if (c === 0x2a) { // '*': match nothing for now; come back here to take one more character
      star = p++
      from = i
    } else if (c === 0x3f || c === s.charCodeAt(i)) { // '?' or the same character
      p++
      i++
    } else if (star >= 0) {
      p = star + 1
      i = ++from
    } else {
      return false
    }
  }
  while (p < pattern.length && pattern.charCodeAt(p) === 0x2a) p++
  return p === pattern.length
}

// The first position at or after `lo` whose element is not below x.
export function lowerBound (sorted: ArrayLike<number | string>, x: number | string, lo = 0): number {
  let hi = sorted.length
  while (lo < hi) {
    const mid = (lo + hi) >>> 1
    if (sorted[mid] < x) lo = mid + 1
    else hi = mid
  }
  return lo
}

// An order-independent digest of the state: the sum, in two 32-bit lanes, of a hash of every
// account, message and exactly-once entry. Adding and removing entries keeps it current in O(1),
// and two replicas with the same state have the same digest however they got there.
//
// Entries are hashed field by field into two module-level lanes (hx, hy), with no string built
// and nothing allocated: replaying a million-record log hashes a million messages.
let hx = 0
let hy = 0

function hBegin (tag: number): void {
  hx = 0x811c9dc5 ^ tag
  hy = 0x01000193 ^ tag
}

// Two independent 32-bit FNV-1a style hashes over the UTF-16 code units, then the length, which
// also separates one field from the next.
function hStr (s: string): void {
  let x = hx
  let y = hy
  for (let i = 0; i < s.length; i++) {
    const c = s.charCodeAt(i)
    x = Math.imul(x ^ c, 0x01000193)
    y = Math.imul(y ^ c, 0x5bd1e995)
    y ^= y >>> 15
  }
  hx = Math.imul(x ^ s.length, 0x01000193)
  hy = Math.imul(y ^ s.length, 0x5bd1e995) ^ 0x9e3779b9
}

// A safe integer, as its low and high 32 bits.
function hNum (n: number): void {
  const lo = n >>> 0
  const hi = Math.floor(n / 4294967296) >>> 0
  hx = Math.imul(Math.imul(hx ^ lo, 0x01000193) ^ hi, 0x01000193)
  let y = Math.imul(hy ^ lo, 0x5bd1e995)
  y ^= y >>> 15
  hy = Math.imul(y ^ hi, 0x5bd1e995) ^ (y >>> 13)
}

function hEnd (): void {
  let x = hx
  x ^= x >>> 13
  x = Math.imul(x, 0xc2b2ae35)
  x ^= x >>> 16
  let y = hy
  y ^= y >>> 16
  y = Math.imul(y, 0x85ebca6b)
  y ^= y >>> 13
  hx = x >>> 0
  hy = y >>> 0
}

function hashAccount (a: Account): void {
  hBegin(0x75)
  hStr(a.key); hStr(a.name); hStr(a.salt); hStr(a.hash); hNum(a.created)
  hEnd()
}

function hashMessage (owner: string, m: Message, read: boolean): void {
  hBegin(read ? 0x6d01 : 0x6d00)
  hStr(owner); hNum(m.id); hStr(m.from); hStr(m.to); hNum(m.ts); hStr(m.text)
  hEnd()
}

// An exactly-once entry is hashed by its key, time and outcome (ok, or the error code), not by
// the whole reply: the reply was computed from the record and the state before it, and both
// are covered by the digest already. Two replicas can only differ in a stored reply's details
// after they differed elsewhere.
function hashRid (key: string, ts: number, reply: Reply): void {
  hBegin(0x72)
  hStr(key); hNum(ts); hStr(reply.ok ? '' : reply.error.code)
  hEnd()
}

class MultisetDigest {
  private a = 0
  private b = 0
  addAccount (a: Account): void { hashAccount(a); this.addLanes(hx, hy) }
  removeAccount (a: Account): void { hashAccount(a); this.removeLanes(hx, hy) }
  addLanes (x: number, y: number): void { this.a = (this.a + x) >>> 0; this.b = (this.b + y) >>> 0 }
  removeLanes (x: number, y: number): void { this.a = (this.a - x) >>> 0; this.b = (this.b - y) >>> 0 }
  hex (): string { return this.a.toString(16).padStart(8, '0') + this.b.toString(16).padStart(8, '0') }
  get lanes (): [number, number] { return [this.a, this.b] }
}

// The two lanes of a digest written by hex().
function digestLanes (hex: string): [number, number] {
  assert.match(hex, /^[0-9a-f]{16}$/, 'a digest')
  return [parseInt(hex.slice(0, 8), 16), parseInt(hex.slice(8), 16)]
}

const fail = (code: ErrorCode, message: string): Reply => ({ ok: false, error: { code, message } })

// What the state holds, counted as the server's quota counts it (ChatState.storedBytes): a
// message counts its text and its sender's name in UTF-8 bytes, plus a fixed share for the rest
// of what it takes in memory; an account counts a fixed share.
export function messageBytes (textBytes: number, fromBytes: number): number { return textBytes + fromBytes + limits.messageOverheadBytes }
// A message's count. Names are ASCII (protocol.md), so a name's length is its UTF-8 bytes. A
// send's message is counted twice in a row (its mailbox, its stored reply): the last is kept.
let lastCounted: Message | null = null
let lastCount = 0
function costOf (m: Message): number {
  if (m !== lastCounted) {
    lastCount = messageBytes(Buffer.byteLength(m.text, 'utf8'), m.from.length)
    lastCounted = m
  }
  return lastCount
}

// What a stored reply counts: the messages it holds (a send's, a read's). They are counted again
// even while the mailbox still holds them too: a stored reply outlives their deletion.
function replyBytes (reply: Reply): number {
  if (!reply.ok) return 0
  const { message, messages } = reply as { message?: Message, messages?: Message[] }
  let n = message === undefined ? 0 : costOf(message)
  if (messages !== undefined) for (const m of messages) n += costOf(m)
  return n
}

// Snapshot chunks: one `state` chunk; per account, an `account` chunk, then its mailbox in
// `messages` chunks of messagesPerChunk (the snapshot file writes those in binary, see
// storage/framing.ts); then the exactly-once table in chunks of ridsPerChunk. Small chunks keep
// every frame small. A reader also takes messages inside an `account` chunk, as snapshots
// written before held the first of them there.
export type SnapshotMessage = [number, string, string, string, number, 0 | 1] // id, from, to, text, ts, read
export type SnapshotChunk =
  | { kind: 'state', version: 1, index: number, lastEpoch: number, lastTs: number, digest?: string } // digest: of the state (absent in older snapshots)
  | { kind: 'account', name: string, salt: string, hash: string, created: number, messages: SnapshotMessage[] }
  | { kind: 'messages', name: string, messages: SnapshotMessage[] } // the last account's mailbox, in order
  | { kind: 'rids', entries: Array<[string, number, Reply]> }
// A messages chunk as a snapshot file is read at start-up: checked, but still in binary, for the
// mailbox to decode when first used (storage/framing.ts, unpackMessages).
type PackedMessagesChunk = { kind: 'messages', name: string, packed: Buffer, count: number, unread: number }
// A messages or rids chunk cut in two, in order, for a chunk too big to send or store whole
// (texts of up to textBytesMax make 1,000 messages several megabytes); null if it holds fewer
// than two entries.
function splitChunk (c: SnapshotChunk): [SnapshotChunk, SnapshotChunk] | null {
  if (c.kind === 'messages' && c.messages.length >= 2) {
    const half = c.messages.length >> 1
    return [{ ...c, messages: c.messages.slice(0, half) }, { ...c, messages: c.messages.slice(half) }]
  }
  if (c.kind === 'rids' && c.entries.length >= 2) {
    const half = c.entries.length >> 1
    return [{ kind: 'rids', entries: c.entries.slice(0, half) }, { kind: 'rids', entries: c.entries.slice(half) }]
  }
  return null
}

// `c` encoded by `encode`; or, while an encoding comes to more than `max` by `size` (or `encode`
// refuses the chunk with a RangeError), its two halves from splitChunk, each encoded the same
// way, in order. A chunk that cannot be cut keeps its one encoding however big, or its RangeError.
// Used for snapshot files (frames) and for the peer link (JSON).
export function encodeInPieces<T> (c: SnapshotChunk, encode: (c: SnapshotChunk) => T, size: (encoded: T) => number, max: number): T[] {
  let encoded: T | null = null
  let tooBig: unknown = null
  try {
    encoded = encode(c)
  } catch (e) {
    if (!(e instanceof RangeError)) throw e
    tooBig = e
  }
  if (encoded === null || size(encoded) > max) {
    const halves = splitChunk(c)
    if (halves) return [...encodeInPieces(halves[0], encode, size, max), ...encodeInPieces(halves[1], encode, size, max)]
  }
  if (encoded === null) throw tooBig
  return [encoded]
}

const nameCacheMax = 100_000
const ridsPerChunk = 1000
const messagesPerChunk = 1000

export class ChatState {
  index = 0 // last applied log index
  lastEpoch = 0 // epoch of the record at `index`
  lastTs = 0
  readonly accounts = new Map<string, Account>()
  readonly sortedKeys: string[] = [] // account keys, sorted, for listing and prefix search
  // The exactly-once table: a ring of at most ridsMax entries in the order they were applied,
  // oldest (the next to evict) at ridStart, and an index from key to slot that holds the keys.
  // Each entry's digest lanes are kept so that eviction need not recompute them.
  private readonly ridSlots = new KeySlots(limits.ridsMax)
  private readonly ridTs: number[] = []
  // null: a send's reply that replay left packed, in ridPacked's lanes at the same slot.
  private readonly ridReplies: Array<Reply | null> = []
  private readonly ridHx: number[] = []
  private readonly ridHy: number[] = []
  private readonly ridBytes: number[] = [] // what each entry's reply counts (replyBytes)
  private ridStart = 0
  // Where the sends whose replies replay left packed are: the payload (buf, start) of each, and
  // the names its message had. No object per entry: a million replayed sends fill the table ten
  // times over.
  private ridPackedLanes: { bufs: Array<Buffer | null>, starts: number[], froms: string[], tos: string[] } | null = null
  private ridPacked = 0 // entries packed
  private ridUnpackAt = 0 // where warmSome goes on looking for them
  private readonly digestAcc = new MultisetDigest()
  // Accounts whose mailbox may still be deferred (loaded packed from a snapshot, or with a packed
  // tail from replay), for warmSome.
  private deferred: Account[] = []
  private deferredNext = 0
  private undecoded = 0 // of them, not decoded yet
  private tailsPending = 0 // mailboxes whose packed tail (see replay) is not decoded yet
  private tailsOnly = 0 // of them, those the snapshot did not leave packed as well
  private stored = 0
  private fullest: Account | null = null // see fullestMailbox
  private fullestKnown = true

  // How much the state holds, as the quota counts it: every account (limits.accountBytes), every
  // message in a mailbox, and every message held by a reply in the exactly-once table (see
  // messageBytes). A function of the state, the same on every replica; not in the digest.
  get storedBytes (): number { return this.stored }

  // The mailbox that counts the most toward the quota, for status; null if every one is empty.
  // Followed as mailboxes grow; found again by going over every account only when the one
  // followed shrank or went, and only when asked. Among equals, any of them.
  get fullestMailbox (): { user: string, bytes: number } | null {
    if (!this.fullestKnown) {
      this.fullest = null
      for (const a of this.accounts.values()) if (this.fullest === null || a.bytes > this.fullest.bytes) this.fullest = a
      this.fullestKnown = true
    }
    const a = this.fullest
    return a === null || a.bytes <= 0 ? null : { user: a.name, bytes: a.bytes }
  }

  // The digest of the state. A state loaded from a snapshot that recorded its digest knows it
  // before its mailboxes are decoded; one loaded from an older snapshot, or with messages that
  // recovery left packed (replay), decodes them first.
  digest (): string {
    if (this.digestPending) while (this.warmSome(Infinity));
    return this.digestAcc.hex()
  }

  // Whether digest() would first decode mailboxes (a request for it waits while warmSome does).
  get digestPending (): boolean { return this.tailsPending > 0 || this.ridPacked > 0 || (this.deferredCheck === null && this.undecoded > 0) }

  // Mailboxes still deferred.
  get deferredMailboxes (): number { return this.undecoded + this.tailsOnly }

  // Whether warmSome has work: mailboxes still deferred, or replies left packed.
  get undecodedWork (): boolean { return this.undecoded + this.tailsPending + this.ridPacked > 0 }

  // Decode deferred mailboxes for about `ms` milliseconds, a chunk of up to 1,000 messages at a
  // time (at least one), then the exactly-once table's packed replies; true while some remain.
  // The server calls this between other work after a start from a snapshot, so that mailboxes
  // are not decoded in the middle of a request, and the snapshot's memory is let go.
  warmSome (ms: number): boolean {
    const until = performance.now() + ms
    while (this.deferredNext < this.deferred.length) {
      const mailbox = this.deferred[this.deferredNext].mailbox
      if (!mailbox.isDeferred) { // decoded on use meanwhile
        this.deferredNext++
        continue
      }
      if (!mailbox.warmStep()) this.deferredNext++
      if (performance.now() >= until) break
    }
    if (this.deferredNext < this.deferred.length) return true
    this.deferred = []
    this.deferredNext = 0
    // Replies left packed keep the log's buffers in memory: make them, 1,000 at a time, in one
    // pass over the table (replay, which packs them, is over).
    while (this.ridPacked > 0) {
      assert.ok(this.ridUnpackAt < this.ridReplies.length, 'packed replies miscounted')
      const end = Math.min(this.ridReplies.length, this.ridUnpackAt + 1000)
      for (let slot = this.ridUnpackAt; slot < end; slot++) this.ridReplyAt(slot)
      this.ridUnpackAt = end
      if (performance.now() >= until) break
    }
    if (this.ridPacked === 0) {
      this.ridPackedLanes = null
      // Every key replay left in the log's buffers belongs to an entry whose reply it left packed.
      assert.equal(this.ridSlots.keysInBuffers, 0, 'exactly-once keys still in the log\'s buffers')
    }
    return this.ridPacked > 0
  }

  // The stored reply in a slot of the exactly-once table, made now (and the entry counted in the
  // digest) if replay left it packed.
  private ridReplyAt (slot: number): Reply {
    const r = this.ridReplies[slot]
    if (r !== null) return r
    const { bufs, starts, froms, tos } = this.ridPackedLanes!
    const reply: Reply = this.ridReplies[slot] = { ok: true, message: packedSendMessage(bufs[slot]!, starts[slot], froms[slot], tos[slot]) }
    bufs[slot] = null
    this.ridPacked--
    hashRid(this.ridSlots.keyAt(slot), this.ridTs[slot], reply)
    this.digestAcc.addLanes(hx, hy)
    this.ridHx[slot] = hx
    this.ridHy[slot] = hy
    return reply
  }

  // The stored reply of an applied request with this exactly-once key, if any.
  ridReply (rk: string): Reply | undefined {
    const slot = this.ridSlots.get(rk)
    return slot < 0 ? undefined : this.ridReplyAt(slot)
  }

  // Entries in the exactly-once table.
  get ridCount (): number { return this.ridSlots.size }

  // The table's entries, oldest first: key, time, stored reply.
  * ridEntries (): Generator<[string, number, Reply]> {
    const { keys, ts, replies } = this.ridLanes()
    for (let k = 0; k < keys.length; k++) yield [keys[k], ts[k], replies[k]]
  }

  // The same in three lanes, copied out of the ring with no object per entry.
  private ridLanes (): { keys: string[], ts: number[], replies: Reply[] } {
    const n = this.ridTs.length
    const keys = new Array<string>(n)
    const ts = new Array<number>(n)
    const replies = new Array<Reply>(n)
    for (let k = 0; k < n; k++) {
      const slot = (this.ridStart + k) % n
      keys[k] = this.ridSlots.keyAt(slot)
      ts[k] = this.ridTs[slot]
      replies[k] = this.ridReplyAt(slot)
    }
    return { keys, ts, replies }
  }

  account (name: string): Account | undefined { return this.accounts.get(name.toLowerCase()) }

  // Apply a record read back from the log at start-up (Store.recover): as apply does, except
  // that a send whose text recovery left in the log's buffer (PackedSendRecord) and that
  // succeeds leaves its message packed at the tail of the recipient's mailbox (Mailbox.addPacked),
  // and its stored reply packed too (ridPackedLanes). They are decoded, and the messages counted in
  // the digest, when first used or in the background (warmSome). Replaying a million sends then
  // makes no message, text or reply for them, most of what replay cost.
  replay (r: LogRecord | PackedSendRecord): void {
    if (!('packed' in r)) {
      this.apply(r)
      return
    }
    const buf = r.packed
    const fromAt = sendNamesAt(r.start)
    const fromBytes = sendFromBytes(buf, r.start)
    const toBytes = sendToBytes(buf, r.start)
    const keyAt = fromAt + fromBytes + toBytes
    const keyBytes = sendKeyBytes(buf, r.start) // -1: none
    const from = this.accountNamed(buf, fromAt, fromBytes)
    const to = this.accountNamed(buf, fromAt + fromBytes, toBytes)
    if (to === undefined || from === undefined || r.i !== this.index + 1 || (keyBytes >= 0 && this.ridSlots.getBytes(buf, keyAt, keyBytes) >= 0)) {
      this.apply(unpackSend(r)) // fails, or changes nothing, as apply says
      return
    }
    this.index = r.i
    this.lastEpoch = r.e
    if (r.ts > this.lastTs) this.lastTs = r.ts
    const mailbox = to.mailbox
    if (!mailbox.hasTail) {
      const owner = to
      const only = !mailbox.isDeferred // one the snapshot left packed is counted once
      mailbox.startTail((buf, start, fromName, read) => {
        const m = packedSendMessage(buf, start, fromName, owner.name)
        this.digestAdd(owner, m, read)
        return m
      }, () => {
        this.tailsPending--
        if (only) this.tailsOnly--
      })
      this.tailsPending++
      if (only) this.tailsOnly++
      this.deferred.push(to)
    }
    mailbox.addPacked(r.packed, r.start, from.name, r.i)
    const bytes = messageBytes(sendTextBytes(buf, r.start), fromBytes)
    this.addBytes(to, bytes)
    if (keyBytes >= 0) {
      // The key stays in the log's buffer too, until the entry is evicted or its reply made.
      const slot = this.ridSlot(r.ts, null, bytes, -1, -1)
      this.ridSlots.setBytes(buf, keyAt, keyBytes, slot)
      const lanes = this.ridPackedLanes ??= { bufs: new Array<Buffer | null>(limits.ridsMax).fill(null), starts: new Array<number>(limits.ridsMax).fill(0), froms: new Array<string>(limits.ridsMax).fill(''), tos: new Array<string>(limits.ridsMax).fill('') }
      lanes.bufs[slot] = buf
      lanes.starts[slot] = r.start
      lanes.froms[slot] = from.name
      lanes.tos[slot] = to.name
    }
  }

  // Apply one committed record. Records must arrive in index order, each exactly once.
  apply (r: LogRecord): Applied {
    if (r.i !== this.index + 1) assert.fail(`record ${r.i} applied after ${this.index}`)
    this.index = r.i
    this.lastEpoch = r.e
    if (r.ts > this.lastTs) this.lastTs = r.ts
    if (r.rk !== undefined) {
      const seen = this.ridReply(r.rk)
      // The primary never logs a second record for a key it knows; a repeat can only come from
      // a retry that raced a failover, and it must change nothing.
      if (seen) return { reply: seen, effects: {} }
    }
    const applied = this.applyOp(r)
    if (r.rk !== undefined) this.rememberRid(r.rk, r.ts, applied.reply, replyBytes(applied.reply))
    return applied
  }

  private applyOp (r: LogRecord): Applied {
    switch (r.op) {
      case 'register': {
        const key = r.user.toLowerCase()
        if (this.accounts.has(key)) return { reply: fail('USER_EXISTS', `the name ${r.user} is taken`), effects: {} }
        const a: Account = { name: r.user, key, salt: r.salt, hash: r.hash, created: r.i, mailbox: new Mailbox(), bytes: 0 }
        this.addAccount(a)
        return { reply: { ok: true }, effects: {} }
      }
      case 'send': {
        const to = this.accounts.get(r.to.toLowerCase())
        if (!to) return { reply: fail('NO_SUCH_USER', `no user named ${r.to}`), effects: {} }
        const from = this.accounts.get(r.from.toLowerCase())
        if (!from) return { reply: fail('NOT_LOGGED_IN', 'your account no longer exists'), effects: {} }
        const m: Message = { id: r.i, from: from.name, to: to.name, text: r.text, ts: r.ts }
        to.mailbox.add(m, false)
        this.digestAdd(to, m, false)
        this.addBytes(to, costOf(m))
        return { reply: { ok: true, message: m }, effects: { push: m } }
      }
      case 'read': {
        const a = this.accounts.get(r.user.toLowerCase())
        if (!a) return { reply: fail('NOT_LOGGED_IN', 'your account no longer exists'), effects: {} }
        const taken = a.mailbox.oldestUnread(r.limit)
        for (const m of taken) this.markRead(a, m.id)
        return { reply: { ok: true, messages: taken, remaining: a.mailbox.unreadCount }, effects: {} }
      }
      case 'mark_read': {
        const a = this.accounts.get(r.user.toLowerCase())
        if (a) for (const id of r.ids) this.markRead(a, id)
        return { reply: { ok: true }, effects: {} }
      }
      case 'delete_messages': {
        const a = this.accounts.get(r.user.toLowerCase())
        if (!a) return { reply: fail('NOT_LOGGED_IN', 'your account no longer exists'), effects: {} }
        let deleted = 0
        const missing: number[] = []
        const ids = [...new Set(r.ids)]
        const removed = a.mailbox.removeMany(ids)
        for (let j = 0; j < ids.length; j++) {
          const gone = removed[j]
          if (gone) {
            this.digestRemove(a, gone.message, gone.read)
            this.addBytes(a, -costOf(gone.message))
            deleted++
          } else missing.push(ids[j])
        }
        return { reply: { ok: true, deleted, missing }, effects: {} }
      }
      case 'delete_account': {
        const a = this.accounts.get(r.user.toLowerCase())
        if (!a || a.created !== r.created) return { reply: fail('NO_SUCH_USER', `no user named ${r.user}`), effects: {} }
        this.removeAccount(a)
        return { reply: { ok: true }, effects: { accountDeleted: a.key } }
      }
      case 'noop':
        return { reply: { ok: true }, effects: {} }
    }
  }

  // A message's hash into the digest (or `into`: see deferredCheck), and into its mailbox's
  // share of it; and out again.
  private digestAdd (a: Account, m: Message, read: boolean, into: MultisetDigest = this.digestAcc): void {
    hashMessage(a.key, m, read)
    into.addLanes(hx, hy)
    a.mailbox.hx = (a.mailbox.hx + hx) >>> 0
    a.mailbox.hy = (a.mailbox.hy + hy) >>> 0
  }

  private digestRemove (a: Account, m: Message, read: boolean): void {
    hashMessage(a.key, m, read)
    this.digestAcc.removeLanes(hx, hy)
    a.mailbox.hx = (a.mailbox.hx - hx) >>> 0
    a.mailbox.hy = (a.mailbox.hy - hy) >>> 0
  }

  private markRead (a: Account, id: number): void {
    const m = a.mailbox.markReadWhere(id)
    if (m === null || m === 'packed') return // read already, no such message, or counted once decoded
    this.digestRemove(a, m, false)
    this.digestAdd(a, m, true)
  }

  // A message of `bytes` (negative: taken out) in a's mailbox.
  private addBytes (a: Account, bytes: number): void {
    a.bytes += bytes
    this.stored += bytes
    if (bytes < 0) {
      if (a === this.fullest) this.fullestKnown = false
    } else this.mayBeFullest(a)
  }

  private mayBeFullest (a: Account): void {
    if (this.fullestKnown && (this.fullest === null || a.bytes > this.fullest.bytes)) this.fullest = a
  }

  private addAccount (a: Account): void {
    this.stored += limits.accountBytes + a.bytes
    this.accounts.set(a.key, a)
    this.sortedKeys.splice(lowerBound(this.sortedKeys, a.key), 0, a.key)
    this.digestAcc.addAccount(a)
    this.mayBeFullest(a)
  }

  private removeAccount (a: Account): void {
    this.nameCache = null
    a.mailbox.warm() // a deferred mailbox's share is known once it is decoded
    this.digestAcc.removeLanes(a.mailbox.hx, a.mailbox.hy)
    this.digestAcc.removeAccount(a)
    this.stored -= limits.accountBytes + a.bytes
    if (a === this.fullest) this.fullestKnown = false
    this.accounts.delete(a.key)
    this.sortedKeys.splice(lowerBound(this.sortedKeys, a.key), 1)
  }

  // The account named by the UTF-8 bytes buf[at, at + len), as account() finds it. Replay looks
  // up two names per send: a small cache from the exact bytes to the account spares making the
  // strings for most of them. An entry holds until an account is removed.
  private accountNamed (buf: Buffer, at: number, len: number): Account | undefined {
    let h = 0x811c9dc5
    for (let k = at; k < at + len; k++) h = Math.imul(h ^ buf[k], 0x01000193)
    h &= 0x3fffffff // a small integer, as a Map key
    const cache = this.nameCache ??= new Map()
    const cached = cache.get(h)
    if (cached !== undefined && cached.bytes.length === len) {
      const bytes = cached.bytes
      let k = 0
      while (k < len && bytes[k] === buf[at + k]) k++
      if (k === len) return cached.account
    }
    const a = this.account(buf.toString('utf8', at, at + len))
    if (a !== undefined && cache.size < nameCacheMax) cache.set(h, { bytes: Buffer.from(buf.subarray(at, at + len)), account: a })
    return a
  }

  private nameCache: Map<number, { bytes: Buffer, account: Account }> | null = null

  // Replay is over (Store.recover): let its cache go.
  endReplay (): void { this.nameCache = null }

  // Add an entry to the exactly-once table; the slot it takes.
  private rememberRid (key: string, ts: number, reply: Reply, bytes: number): number {
    hashRid(key, ts, reply)
    this.digestAcc.addLanes(hx, hy)
    const slot = this.ridSlot(ts, reply, bytes, hx, hy)
    this.ridSlots.set(key, slot)
    return slot
  }

  // Take the slot of a new entry in the exactly-once table (evicting the oldest entry once the
  // table is full) and fill it in but for its key, which the caller puts in ridSlots. x, y: the
  // entry's digest lanes, already added to the digest. A null reply is one replay left packed
  // (its lanes filled in by the caller), and the entry's hash is left for later too (x and y -1):
  // most entries replay adds are evicted before the end of the log, and would be hashed for
  // nothing. ridReplyAt hashes it into the digest. bytes: what the reply counts toward
  // storedBytes (replyBytes), until the entry is evicted.
  private ridSlot (ts: number, reply: Reply | null, bytes: number, x: number, y: number): number {
    this.stored += bytes
    if (reply === null) this.ridPacked++
    let slot = this.ridTs.length
    if (slot < limits.ridsMax) {
      this.ridTs.push(ts)
      this.ridReplies.push(reply)
      this.ridHx.push(x)
      this.ridHy.push(y)
      this.ridBytes.push(bytes)
    } else { // full: the newest entry takes the oldest one's slot
      slot = this.ridStart
      this.ridStart = (slot + 1) % limits.ridsMax
      this.ridSlots.delete(slot)
      if (this.ridHx[slot] >= 0) this.digestAcc.removeLanes(this.ridHx[slot], this.ridHy[slot])
      if (this.ridReplies[slot] === null) {
        this.ridPacked--
        this.ridPackedLanes!.bufs[slot] = null
      }
      this.stored -= this.ridBytes[slot]
      this.ridBytes[slot] = bytes
      this.ridTs[slot] = ts
      this.ridReplies[slot] = reply
      this.ridHx[slot] = x
      this.ridHy[slot] = y
    }
    return slot
  }

  // Accounts whose name matches a glob (`*`, `?`), case-insensitive, sorted; one page of them.
  listUsers (pattern: string, offset: number, limit: number): { users: string[], total: number } {
    const lower = pattern.toLowerCase()
    const wild = lower.search(/[*?]/)
    const prefix = wild < 0 ? lower : lower.slice(0, wild)
    const users: string[] = []
    let total = 0
    // A name is at most limits.userLengthMax characters: a pattern that needs more matches none.
    if (lower.replace(/\*/g, '').length > limits.userLengthMax) return { users, total }
    // Names sharing the literal prefix are contiguous in sorted order.
    for (let k = lowerBound(this.sortedKeys, prefix); k < this.sortedKeys.length; k++) {
      const key = this.sortedKeys[k]
      if (!key.startsWith(prefix)) break
      if (!globMatch(lower, key)) continue
      if (total >= offset && users.length < limit) users.push(this.accounts.get(key)!.name)
      total++
    }
    return { users, total }
  }

  // The state's snapshot chunks, from a copy of the state taken now: they may be asked for a slice
  // at a time while the state goes on changing. The copy makes no object per message (messages
  // are never changed, so it shares them): it copies the arrays that list them, and the
  // exactly-once table's lanes, which takes milliseconds for a million messages.
  snapshotChunks (): Generator<SnapshotChunk> {
    const head: SnapshotChunk = { kind: 'state', version: 1, index: this.index, lastEpoch: this.lastEpoch, lastTs: this.lastTs, digest: this.digest() }
    const accounts = this.sortedKeys.map(key => {
      const a = this.accounts.get(key)!
      return { ...a, mailbox: a.mailbox.clone() }
    })
    return chunksOf(head, accounts, this.ridLanes())
  }

  // Add a packed messages chunk (storage/framing.ts) to a's mailbox, to be decoded and counted
  // in the digest when the mailbox is first used, or a chunk at a time by warmSome. A mailbox
  // that already holds messages decodes the chunk now. name: one string per sender's name, shared.
  private deferMessages (a: Account, c: PackedMessagesChunk, name: (s: string) => string): void {
    const packed = c.packed
    this.addBytes(a, packedMessagesBytes(packed, c.count) + c.count * limits.messageOverheadBytes) // as messageBytes, summed
    if (this.loading?.account === a) {
      this.loading.chunks.push(packed)
      a.mailbox.deferMore(c.count, c.unread)
      return
    }
    const chunks = [packed]
    let k = 0
    const next = (into: Mailbox): boolean => {
      unpackMessages(chunks[k++], (id, from, text, ts, read) => {
        const m: Message = { id, from: name(from), to: a.name, text, ts }
        into.add(m, read === 1)
        this.digestAdd(a, m, read === 1, this.deferredCheck ?? this.digestAcc)
      })
      if (k < chunks.length) return true
      this.undecoded--
      if (this.deferredCheck !== null && this.undecoded === 0) this.checkDeferred()
      return false
    }
    this.undecoded++ // next counts it down once it has decoded the last chunk
    if (!a.mailbox.defer(next, c.count, c.unread)) {
      while (next(a.mailbox));
      return
    }
    this.loading = { account: a, chunks }
    this.deferred.push(a)
  }

  // While a snapshot loads: the mailbox whose packed chunks are being gathered.
  private loading: { account: Account, chunks: Buffer[] } | null = null
  // When the snapshot recorded its digest, the digest counts the deferred messages from the start
  // (what the recorded digest has beyond everything loaded at once), and the deferred messages
  // are hashed here as they are decoded, to be checked against that once the last is decoded.
  private deferredCheck: MultisetDigest | null = null
  private deferredWant: [number, number] = [0, 0]
  // Set if the deferred messages did not add up to what the snapshot's digest says.
  snapshotMismatch: string | null = null

  private checkDeferred (): void {
    const [a, b] = this.deferredCheck!.lanes
    const [wa, wb] = this.deferredWant
    this.deferredCheck = null
    if (a === wa && b === wb) return
    // The state is what the snapshot holds; let the digest say so, so that it differs from the
    // peers' if the state does.
    this.digestAcc.removeLanes(wa, wb)
    this.digestAcc.addLanes(a, b)
    this.snapshotMismatch = `the snapshot's messages do not add up to the digest it recorded (state at ${this.index}; digest now ${this.digestAcc.hex()})`
  }

  // Rebuild the state from snapshot chunks, in the order snapshotChunks() produced them.
  static fromSnapshotChunks (chunks: Iterable<Record<string, unknown>>): ChatState {
    const st = new ChatState()
    let sawState = false
    let recorded: [number, number] | null = null
    // One string per sender's name, shared by all their messages, as in a state built by apply.
    const names = new Map<string, string>()
    const name = (s: string): string => {
      const had = names.get(s)
      if (had !== undefined) return had
      names.set(s, s)
      return s
    }
    for (const raw of chunks) {
      const c = raw as SnapshotChunk | PackedMessagesChunk
      switch (c.kind) {
        case 'state':
          assert.equal(c.version, 1, 'snapshot version')
          if (c.digest !== undefined) recorded = digestLanes(c.digest)
          st.index = c.index
          st.lastEpoch = c.lastEpoch ?? 0
          st.lastTs = c.lastTs
          sawState = true
          break
        case 'account':
        case 'messages': {
          let a = st.accounts.get(c.name.toLowerCase())
          if (c.kind === 'account') {
            assert.ok(!a, `account ${c.name} twice in a snapshot`)
            a = { name: c.name, key: c.name.toLowerCase(), salt: c.salt, hash: c.hash, created: c.created, mailbox: new Mailbox(), bytes: 0 }
            st.addAccount(a)
          }
          assert.ok(a, `messages for unknown account ${c.name}`)
          if ('packed' in c) {
            st.deferMessages(a, c, name)
            break
          }
          st.loading = null // a later packed chunk must not join the ones deferred before these
          for (const [id, from, to, text, ts, read] of c.messages) {
            const m: Message = { id, from: name(from), to: to === a.name ? a.name : to, text, ts }
            a.mailbox.add(m, read === 1)
            st.digestAdd(a, m, read === 1)
            st.addBytes(a, costOf(m))
          }
          break
        }
        case 'rids':
          for (const [k, ts, reply] of c.entries) {
            assert.ok(typeof reply === 'object' && reply !== null, 'an exactly-once entry without its reply')
            st.rememberRid(k, ts, reply, replyBytes(reply))
          }
          break
        default:
          throw new Error(`unknown snapshot chunk ${JSON.stringify((c as { kind: unknown }).kind)}`)
      }
    }
    st.loading = null
    assert.ok(sawState, 'snapshot has no state chunk')
    if (recorded !== null) {
      const [a, b] = st.digestAcc.lanes
      if (st.deferred.length === 0) {
        assert.ok(a === recorded[0] && b === recorded[1], `snapshot at ${st.index}: the state it holds does not match the digest it recorded`)
      } else {
        st.deferredWant = [(recorded[0] - a) >>> 0, (recorded[1] - b) >>> 0]
        st.digestAcc.addLanes(...st.deferredWant)
        st.deferredCheck = new MultisetDigest() // checked once `undecoded` comes down to 0
      }
    }
    return st
  }
}

// Snapshot chunks from a copy of the state (see ChatState.snapshotChunks), made as they are asked
// for; the exactly-once table comes oldest first, in three lanes.
function * chunksOf (head: SnapshotChunk, accounts: Account[], { keys, ts, replies }: { keys: string[], ts: number[], replies: Reply[] }): Generator<SnapshotChunk> {
  yield head
  for (const a of accounts) {
    yield { kind: 'account', name: a.name, salt: a.salt, hash: a.hash, created: a.created, messages: [] }
    for (const messages of a.mailbox.runs(messagesPerChunk)) yield { kind: 'messages', name: a.name, messages }
  }
  for (let k = 0; k < keys.length; k += ridsPerChunk) {
    const entries: Array<[string, number, Reply]> = []
    for (let j = k; j < Math.min(keys.length, k + ridsPerChunk); j++) entries.push([keys[j], ts[j], replies[j]])
    yield { kind: 'rids', entries }
  }
}
