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

import { randomInt } from 'node:crypto'

export class KeySlots {
  private readonly table: Int32Array
  private readonly hashes: Int32Array
  private readonly keys: string[]
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

  // The slot holding `key`, or -1.
  get (key: string): number {
    const h = this.hash(key)
    for (let i = h & this.mask; ; i = (i + 1) & this.mask) {
      const s = this.table[i] - 1
      if (s < 0) return -1
      if (this.hashes[s] === h && this.keys[s] === key) return s
    }
  }

  // Put `key`, which must not be present, in `slot`, which must be free.
  set (key: string, slot: number): void {
    const h = this.hash(key)
    let i = h & this.mask
    while (this.table[i] !== 0) i = (i + 1) & this.mask
    this.table[i] = slot + 1
    this.hashes[slot] = h
    this.keys[slot] = key
    this.count++
  }

  // The key in `slot`, which must be in use.
  keyAt (slot: number): string { return this.keys[slot] }

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
    h ^= h >>> 13
    h = Math.imul(h, 0xc2b2ae35)
    return h ^ (h >>> 16)
  }
}
