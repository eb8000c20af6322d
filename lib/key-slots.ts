// A map from string keys to the slots (0 .. capacity-1) of a fixed-size table, for the
// exactly-once table's ring. It does what a Map<string, number> would, at a fraction of the cost
// when the map is large and the heap is full of other objects: replaying a million records makes
// a million lookups, inserts and evictions.
//
// Open addressing with linear probing over an Int32Array of slot+1 (0 is empty), sized to a power
// of two at least twice the capacity, so the load factor stays at or below one half. Each slot's
// key hash is kept in a second Int32Array: a probe compares hashes in the typed arrays and looks
// at a key string only when its hash matches, where a Map compares keys it must fetch from the
// heap. Deletion shifts the entries of the probe run back (no tombstones), so probes stay short
// however many keys come and go.
//
// Keys come from clients, so the hash is seeded per process: nobody can choose keys that collide
// on a server they cannot see. The seed changes only where keys sit in the table, never what is
// stored: every replica still holds the same state.
//
// A key may also be given as its UTF-8 bytes in a buffer (getBytes, setBytes): replay looks up
// and adds the key of every send it reads from the log, and most are evicted again before the end
// of the log. A key of ASCII characters stays in the buffer (one code unit a byte, so it hashes
// as its string does), and becomes a string only when keyAt asks for it, which lets the buffer go.
// A million replayed sends then make no string for their keys but the last capacity of them,
// where they made a million strings that lived long enough to be moved out of the young
// generation, and left there for the garbage collector to sweep.

import { randomInt } from 'node:crypto'

const utf8Slice = Buffer.prototype.utf8Slice as (this: Buffer, start: number, end: number) => string

export class KeySlots {
  private readonly table: Int32Array
  private readonly hashes: Int32Array
  private readonly keys: string[]
  // For a key kept as bytes: its buffer, and where in it the key lies; null for a string key.
  // Made with the first such key.
  private bytes: { bufs: Array<Buffer | null>, ats: Int32Array, lens: Int32Array } | null = null
  private held = 0 // keys kept as bytes
  private readonly mask: number
  private count = 0

  constructor (readonly capacity: number, private readonly seed = randomInt(2 ** 31)) {
    let size = 2
    while (size < 2 * capacity) size *= 2
    this.table = new Int32Array(size)
    this.mask = size - 1
    this.hashes = new Int32Array(capacity)
    this.keys = new Array<string>(capacity).fill('')
  }

  get size (): number { return this.count }

  // Keys kept as bytes, each holding on to its buffer.
  get keysInBuffers (): number { return this.held }

  // The slot holding `key`, or -1.
  get (key: string): number {
    const h = this.hash(key)
    for (let i = h & this.mask; ; i = (i + 1) & this.mask) {
      const s = this.table[i] - 1
      if (s < 0) return -1
      if (this.hashes[s] === h && (this.bytes === null || this.bytes.bufs[s] === null ? this.keys[s] === key : this.bytesAre(s, key))) return s
    }
  }

  // The slot holding the key whose UTF-8 bytes are buf[at, at + len), or -1.
  getBytes (buf: Buffer, at: number, len: number): number {
    const h = this.hashBytes(buf, at, len)
    if (!this.lastAscii) return this.get(utf8Slice.call(buf, at, at + len))
    for (let i = h & this.mask; ; i = (i + 1) & this.mask) {
      const s = this.table[i] - 1
      if (s < 0) return -1
      if (this.hashes[s] === h && this.holdsBytes(s, buf, at, len)) return s
    }
  }

  // Put `key`, which must not be present, in `slot`, which must be free.
  set (key: string, slot: number): void {
    this.place(this.hash(key), slot)
    this.keys[slot] = key
  }

  // The same for the key whose UTF-8 bytes are buf[at, at + len): kept there, unless it is not
  // all ASCII. The buffer must not change while the key is in it.
  setBytes (buf: Buffer, at: number, len: number, slot: number): void {
    const h = this.hashBytes(buf, at, len)
    if (!this.lastAscii) {
      this.set(utf8Slice.call(buf, at, at + len), slot)
      return
    }
    this.place(h, slot)
    const bytes = this.bytes ??= { bufs: new Array<Buffer | null>(this.capacity).fill(null), ats: new Int32Array(this.capacity), lens: new Int32Array(this.capacity) }
    bytes.bufs[slot] = buf
    bytes.ats[slot] = at
    bytes.lens[slot] = len
    this.held++
  }

  private place (h: number, slot: number): void {
    let i = h & this.mask
    while (this.table[i] !== 0) i = (i + 1) & this.mask
    this.table[i] = slot + 1
    this.hashes[slot] = h
    this.count++
  }

  // The key in `slot`, which must be in use. A key kept as bytes is made a string now, and its
  // buffer let go.
  keyAt (slot: number): string {
    const bytes = this.bytes
    if (bytes !== null) {
      const buf = bytes.bufs[slot]
      if (buf !== null) {
        this.keys[slot] = utf8Slice.call(buf, bytes.ats[slot], bytes.ats[slot] + bytes.lens[slot])
        bytes.bufs[slot] = null
        this.held--
      }
    }
    return this.keys[slot]
  }

  // Whether the key kept as bytes in `slot` is `key`.
  private bytesAre (slot: number, key: string): boolean {
    const { bufs, ats, lens } = this.bytes!
    return asciiIs(bufs[slot]!, ats[slot], lens[slot], key)
  }

  // Whether the key in `slot` has the ASCII bytes buf[at, at + len).
  private holdsBytes (slot: number, buf: Buffer, at: number, len: number): boolean {
    const bytes = this.bytes
    const own = bytes === null ? null : bytes.bufs[slot]
    if (own === null) return asciiIs(buf, at, len, this.keys[slot])
    return bytes!.lens[slot] === len && own.compare(buf, at, at + len, bytes!.ats[slot], bytes!.ats[slot] + len) === 0
  }

  // Free `slot`, which must be in use.
  delete (slot: number): void {
    const mask = this.mask
    let i = this.hashes[slot] & mask
    while (this.table[i] !== slot + 1) i = (i + 1) & mask
    // Close the gap at i: move back each later entry of the run whose home is not between the
    // gap and its place (cyclically), until the run ends.
    for (let j = (i + 1) & mask; this.table[j] !== 0; j = (j + 1) & mask) {
      const home = this.hashes[this.table[j] - 1] & mask
      const stays = i <= j ? (i < home && home <= j) : (i < home || home <= j)
      if (stays) continue
      this.table[i] = this.table[j]
      i = j
    }
    this.table[i] = 0
    this.keys[slot] = ''
    if (this.bytes !== null && this.bytes.bufs[slot] !== null) {
      this.bytes.bufs[slot] = null
      this.held--
    }
    this.count--
  }

  // The last key hashed, and its hash: a key is often looked up and then set (an exactly-once
  // check, then the entry), and the hash walks the whole key.
  private lastKey: string | null = null
  private lastHash = 0

  // A seeded 32-bit hash of the key's UTF-16 code units (murmur-style mixing).
  private hash (key: string): number {
    if (key === this.lastKey) return this.lastHash
    this.lastKey = key
    return (this.lastHash = this.mix(key))
  }

  private mix (key: string): number {
    let h = this.seed ^ key.length
    for (let k = 0; k < key.length; k++) {
      h = Math.imul(h ^ key.charCodeAt(k), 0x5bd1e995)
      h ^= h >>> 15
    }
    return finish(h)
  }

  // The same hash of the bytes buf[at, at + len), taken as code units: the key's own hash if they
  // are all ASCII, which lastAscii then says. (Not remembered as the last string key is: that
  // would hold on to the buffer.)
  private lastAscii = true

  private hashBytes (buf: Buffer, at: number, len: number): number {
    let h = this.seed ^ len
    let all = 0
    for (let k = at; k < at + len; k++) {
      const c = buf[k]
      all |= c
      h = Math.imul(h ^ c, 0x5bd1e995)
      h ^= h >>> 15
    }
    this.lastAscii = all < 0x80
    return finish(h)
  }
}

// Whether the ASCII bytes buf[at, at + len) are `key` (one code unit a byte).
function asciiIs (buf: Buffer, at: number, len: number, key: string): boolean {
  if (key.length !== len) return false
  for (let k = 0; k < len; k++) if (buf[at + k] !== key.charCodeAt(k)) return false
  return true
}

function finish (h: number): number {
  h ^= h >>> 13
  h = Math.imul(h, 0xc2b2ae35)
  return h ^ (h >>> 16)
}
