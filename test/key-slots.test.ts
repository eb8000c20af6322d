import t, { type Test } from 'tap'
import { KeySlots } from '../lib/key-slots.ts'

// KeySlots used the way the exactly-once ring uses it (the newest key takes the oldest one's
// slot once the table is full), against a Map, with a capacity small enough that probe runs are
// long, meet and wrap around the end of the table, and deletions shift entries back across the
// wrap. Each seed puts the keys in different places. With `bytes`, half the keys are looked up
// and set as UTF-8 bytes in a buffer (getBytes, setBytes: replay's keys) and half as strings (a
// client's request), so a key set one way is found the other way, and keyAt gives the string
// either way; some keys are not ASCII (kept as strings) and most are.
function ringAgainstMap (t: Test, seed: number, bytes: boolean): void {
  const capacity = 61
  const ks = new KeySlots(capacity, seed)
  const model = new Map<string, number>()
  const ring: string[] = []
  let start = 0
  let disagreements = 0
  let hits = 0
  let asBytes = 0
  let x = seed + 1
  const rand = (n: number): number => { x = (Math.imul(x, 1664525) + 1013904223) >>> 0; return (x >>> 8) % n }
  // Each key's bytes sit in a buffer of their own, between other bytes, as in a log segment.
  const inBuffer = (key: string): { buf: Buffer, at: number, len: number } => {
    const len = Buffer.byteLength(key)
    const at = 1 + rand(5)
    const buf = Buffer.alloc(at + len + 3, 0x7a)
    buf.write(key, at)
    return { buf, at, len }
  }
  for (let step = 0; step < 50_000; step++) {
    // Keys from a small pool, so that a good share of lookups find their key.
    const key = bytes ? `${['u', 'ü', 'v'][rand(3)]}${rand(5)}\u0000r-${rand(150)}` : `u${rand(7)}\u0000r-${rand(200)}`
    const b = bytes && rand(2) === 0 ? inBuffer(key) : null
    const want = model.get(key) ?? -1
    const got = b === null ? ks.get(key) : ks.getBytes(b.buf, b.at, b.len)
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
    if (b === null) ks.set(key, slot)
    else {
      ks.setBytes(b.buf, b.at, b.len, slot)
      asBytes++
    }
    model.set(key, slot)
    if (ks.size !== model.size) disagreements++
  }
  for (const [key, slot] of model) {
    if (ks.get(key) !== slot) disagreements++
    const b = inBuffer(key)
    if (bytes && ks.getBytes(b.buf, b.at, b.len) !== slot) disagreements++
  }
  t.equal(disagreements, 0)
  t.equal(ks.size, capacity)
  t.ok(hits > 1000 && hits < 49_000, `both hits and misses (${hits} hits)`)
  if (bytes) t.ok(asBytes > 1000, `${asBytes} keys set as bytes`)
}

for (const seed of [0, 1, 0x7fffffff, 12345]) {
  t.test(`agrees with a Map through a ring of evictions (seed ${seed})`, async t => { ringAgainstMap(t, seed, false) })
}

for (const seed of [3, 0x7ffffffe]) {
  t.test(`keys as bytes and as strings agree with a Map through a ring (seed ${seed})`, async t => { ringAgainstMap(t, seed, true) })
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

t.test('a key kept as bytes: told apart from keys that differ late or in length, and a string once keyAt asks', async t => {
  const ks = new KeySlots(8, 5)
  const buf = Buffer.from('xxuser0001\u0000AbC-10yy')
  ks.setBytes(buf, 2, 15, 0) // user0001\0AbC-10
  ks.setBytes(buf, 2, 14, 1) // user0001\0AbC-1
  ks.set('user0001\u0000AbC-2', 2)
  const wide = Buffer.from('ü\u0000k')
  ks.setBytes(wide, 0, wide.length, 3) // not ASCII: kept as a string from the start
  t.same(['user0001\u0000AbC-10', 'user0001\u0000AbC-1', 'user0001\u0000AbC-2', 'ü\u0000k', 'user0001\u0000AbC-'].map(k => ks.get(k)), [0, 1, 2, 3, -1])
  t.equal(ks.keysInBuffers, 2, 'the two ASCII keys given as bytes')
  t.equal(ks.getBytes(Buffer.from('user0001\u0000AbC-2'), 0, 14), 2, 'a string key found by its bytes')
  t.equal(ks.getBytes(Buffer.from('user0001\u0000AbC-3'), 0, 14), -1)
  t.equal(ks.getBytes(wide, 0, wide.length), 3)
  t.equal(ks.keyAt(1), 'user0001\u0000AbC-1')
  t.equal(ks.keysInBuffers, 1, 'one made a string')
  buf.fill(0) // the buffer let go of: the key is a string now; slot 0 still reads the buffer
  t.equal(ks.get('user0001\u0000AbC-1'), 1, 'found as the string keyAt made')
  t.equal(ks.get('user0001\u0000AbC-10'), -1, 'slot 0 is still the bytes, which changed')
  ks.delete(0)
  t.equal(ks.size, 3)
  t.equal(ks.keysInBuffers, 0, 'the other deleted')
})
