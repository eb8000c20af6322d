import t from 'tap'
import { KeySlots } from '../lib/key-slots.ts'

// KeySlots used the way the exactly-once ring uses it (the newest key takes the oldest one's
// slot once the table is full), against a Map, with a capacity small enough that probe runs are
// long, meet and wrap around the end of the table, and deletions shift entries back across the
// wrap. Each seed puts the keys in different places.
for (const seed of [0, 1, 0x7fffffff, 12345]) {
  t.test(`agrees with a Map through a ring of evictions (seed ${seed})`, async t => {
    const capacity = 61
    const ks = new KeySlots(capacity, seed)
    const model = new Map<string, number>()
    const ring: string[] = []
    let start = 0
    let disagreements = 0
    let hits = 0
    let x = seed + 1
    const rand = (n: number): number => { x = (Math.imul(x, 1664525) + 1013904223) >>> 0; return x % n }
    for (let step = 0; step < 50_000; step++) {
      // Keys from a small pool, so that a good share of lookups find their key.
      const key = `u${rand(7)}\u0000r-${rand(200)}`
      const want = model.get(key) ?? -1
      const got = ks.get(key)
      if (got !== want) disagreements++
      if (got >= 0) { hits++; continue }
      let slot = ring.length
      if (slot < capacity) ring.push(key)
      else {
        slot = start
        start = (start + 1) % capacity
        if (ks.keyAt(slot) !== ring[slot]) disagreements++
        ks.delete(slot)
        model.delete(ring[slot])
        ring[slot] = key
      }
      ks.set(key, slot)
      model.set(key, slot)
      if (ks.size !== model.size) disagreements++
    }
    for (const [key, slot] of model) if (ks.get(key) !== slot) disagreements++
    t.equal(disagreements, 0)
    t.equal(ks.size, capacity)
    t.ok(hits > 1000 && hits < 49_000, `both hits and misses (${hits} hits)`)
  })
}

t.test('keys that differ only late, or only in length, are told apart', async t => {
  const ks = new KeySlots(8, 99)
  const keys = ['', '\u0000', 'a', 'a\u0000', 'user0001\u0000AbC-1', 'user0001\u0000AbC-10', 'user0001\u0000AbC-2', 'ünï\u{1f600}']
  keys.forEach((k, slot) => ks.set(k, slot))
  t.same(keys.map(k => ks.get(k)), [0, 1, 2, 3, 4, 5, 6, 7])
  t.equal(ks.get('user0001\u0000AbC-3'), -1)
  ks.delete(4)
  t.same(keys.map(k => ks.get(k)), [0, 1, 2, 3, -1, 5, 6, 7])
  t.equal(ks.size, 7)
})
