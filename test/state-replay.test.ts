// Replay at start-up (ChatState.replay) leaves the messages of the sends it replays packed in the
// log's buffers, and their exactly-once replies too, and decodes them later. Whatever happens
// next, the state must be the one apply() builds from the same records.
import t from 'tap'
import { ChatState } from '../lib/state.ts'
import { decodeFrame, encodeRecordFrame } from '../lib/storage/framing.ts'
import { limits } from '../lib/limits.ts'
import type { LogRecord, PackedSendRecord } from '../lib/records.ts'
import { record, stateView } from './helpers/storage.ts'

// The record as recovery hands it over: a send with its names and text still in the frame.
function packed (r: LogRecord): LogRecord | PackedSendRecord {
  const f = decodeFrame(encodeRecordFrame(r), 0, limits.recordBytesMax, false, true)
  if (f.kind !== 'ok') throw new Error(`frame: ${f.kind}`)
  return f.value as unknown as LogRecord | PackedSendRecord
}

function applied (rs: LogRecord[]): ChatState {
  const st = new ChatState()
  for (const r of rs) st.apply(r)
  return st
}

function replayed (rs: LogRecord[]): ChatState {
  const st = new ChatState()
  for (const r of rs) st.replay(packed(r))
  st.endReplay()
  return st
}

function lcg (seed: number): (n: number) => number {
  let x = seed >>> 0
  return n => {
    x = (Math.imul(x, 1664525) + 1013904223) >>> 0
    return Math.floor((x / 2 ** 32) * n)
  }
}

// A random history, as a primary could have logged it: accounts registered, deleted and
// registered again under the same name in another case; sends between names written in any
// case, to and from names that do not exist; reads, push marks and deletions; retries of
// requests already applied (the same rid again), and no-ops.
function history (seed: number, count: number): { records: LogRecord[], rks: string[] } {
  const rand = lcg(seed)
  const pick = <T>(xs: readonly T[]): T => xs[rand(xs.length)]
  const names = ['ann', 'Ben', 'cy', 'Dee', 'eve']
  const cased = (name: string): string => [...name].map(c => rand(3) === 0 ? c.toUpperCase() : rand(2) === 0 ? c.toLowerCase() : c).join('')
  const created = new Map<string, number>() // key -> index of its register record
  const records: LogRecord[] = []
  const rks: string[] = []
  let sent = 0
  for (let i = 1; i <= count; i++) {
    const head = { i, e: 0, ts: 1_700_000_000_000 + i * 3 }
    const user = pick(names)
    const key = user.toLowerCase()
    const someIds = (): number[] => Array.from({ length: 1 + rand(4) }, () => Math.max(1, i - 1 - rand(60)))
    const rk = rand(10) < 8 ? `${key}\u0000r${i}` : undefined
    let r: LogRecord
    const roll = rand(100)
    if (!created.has(key) && roll < 30) {
      r = { ...head, op: 'register', user: cased(user), salt: 's', hash: 'h', rk }
      created.set(key, i)
    } else if (roll < 70 || sent < 5) {
      const to = rand(20) === 0 ? 'nobody' : cased(pick(names))
      r = { ...head, op: 'send', from: cased(user), to, text: `#${i} from ${user} ${'\u00e9\u{1f600}'.repeat(rand(3))}`, rk }
      sent++
    } else if (roll < 76) {
      r = { ...head, op: 'read', user: cased(user), limit: 1 + rand(5), rk }
    } else if (roll < 82) {
      r = { ...head, op: 'mark_read', user: key, ids: someIds() }
    } else if (roll < 87) {
      r = { ...head, op: 'delete_messages', user: cased(user), ids: someIds(), rk }
    } else if (roll < 89 && created.has(key)) {
      r = { ...head, op: 'delete_account', user: cased(user), created: created.get(key)!, rk }
      created.delete(key)
    } else if (roll < 95 && rks.length > 0) {
      const again = pick(rks.slice(-50)) // a retry that raced a failover: the same key again
      r = { ...head, op: 'send', from: again.slice(0, again.indexOf('\u0000')) || 'ann', to: 'ann', text: 'retried', rk: again }
    } else {
      r = { ...head, op: 'noop' }
    }
    if (r.rk !== undefined) rks.push(r.rk)
    records.push(r)
  }
  return { records, rks }
}

t.test('the fixed history: replayed packed, the same state as applied', async t => {
  for (const n of [4, 9, 20, 35, 200]) {
    const rs = Array.from({ length: n }, (_, k) => record(k + 1))
    t.same(stateView(replayed(rs)), stateView(applied(rs)), `${n} records`)
  }
})

t.test('random histories: replayed packed, then used in every way, the same state as applied', async t => {
  for (let seed = 1; seed <= 12; seed++) {
    const { records: rs, rks } = history(seed, 3000)
    const half = rs.length >> 1
    const a = applied(rs.slice(0, half))
    const b = replayed(rs.slice(0, half))
    t.ok(b.deferredMailboxes > 0 && b.digestPending, `seed ${seed}: replay left messages packed`)
    // Then, live: the rest of the records applied to both, with the packed state asked for
    // stored replies, decoded a slice at a time, and checked, in between.
    const rand = lcg(seed * 7919)
    for (const r of rs.slice(half)) {
      a.apply(r)
      b.apply(r)
      if (rand(50) === 0) {
        const rk = rks[rand(rks.length)]
        t.same(b.ridReply(rk), a.ridReply(rk), `seed ${seed}: the stored reply of ${JSON.stringify(rk)} at ${r.i}`)
      }
      if (rand(200) === 0) b.warmSome(0)
      if (rand(500) === 0) t.equal(b.digest(), a.digest(), `seed ${seed}: the digest at ${r.i}`)
    }
    t.same(stateView(b), stateView(a), `seed ${seed}: the same state at the end`)
  }
})

t.test('replayed packed: a snapshot and the stored replies come out the same before anything is decoded', async t => {
  const { records: rs, rks } = history(99, 4000)
  const a = applied(rs)
  const b = replayed(rs)
  const c = replayed(rs)
  t.ok(b.digestPending)
  t.same(ChatState.fromSnapshotChunks(b.snapshotChunks()) && stateView(ChatState.fromSnapshotChunks(b.snapshotChunks())), stateView(a), 'the snapshot holds the same state')
  for (const rk of rks.slice(-300)) t.same(c.ridReply(rk), a.ridReply(rk), `stored reply of ${JSON.stringify(rk)}`)
  t.equal(c.digest(), a.digest(), 'the digest after the replies were made from the log')
})

t.test('replayed packed past the size of the exactly-once table: evicted entries leave the digest as apply leaves it', async t => {
  // Sends only, each with a rid: the table fills and wraps, and every mailbox stays packed.
  const rs: LogRecord[] = []
  const users = ['ann', 'ben', 'cy']
  let i = 0
  for (const user of users) rs.push({ op: 'register', user, salt: 's', hash: 'h', i: ++i, e: 0, ts: i })
  while (i < limits.ridsMax + 20_000) {
    const from = users[i % 3]
    rs.push({ op: 'send', from, to: users[(i + 1) % 3], text: `m${i}`, rk: `${from}\u0000${i}`, i: ++i, e: 0, ts: i })
  }
  const a = applied(rs)
  const b = replayed(rs)
  t.equal(b.deferredMailboxes, 3, 'three mailboxes left packed')
  t.equal(b.account('ann')!.mailbox.size, a.account('ann')!.mailbox.size, 'sizes are known while packed')
  t.equal(b.account('ann')!.mailbox.unreadCount, a.account('ann')!.mailbox.unreadCount)
  t.equal(b.ridCount, limits.ridsMax)
  t.equal(b.ridReply('ann\u0000100'), undefined, 'an early key was evicted')
  t.equal(b.digest(), a.digest())
  t.equal(JSON.stringify(stateView(b)), JSON.stringify(stateView(a)), 'the same state') // t.same takes seconds here
})

t.test('replay looks names up from their bytes, and an account deleted and registered again is a new one', async t => {
  const rs: LogRecord[] = [
    { op: 'register', user: 'Eve', salt: 's', hash: 'h', i: 1, e: 0, ts: 1 },
    { op: 'register', user: 'bob', salt: 's', hash: 'h', i: 2, e: 0, ts: 2 },
    { op: 'send', from: 'eve', to: 'bob', text: 'one', i: 3, e: 0, ts: 3 },
    { op: 'delete_account', user: 'Eve', created: 1, i: 4, e: 0, ts: 4 },
    { op: 'send', from: 'eve', to: 'bob', text: 'nobody sends this', i: 5, e: 0, ts: 5 },
    { op: 'register', user: 'EVE', salt: 's2', hash: 'h2', i: 6, e: 0, ts: 6 },
    { op: 'send', from: 'eve', to: 'bob', text: 'two', i: 7, e: 0, ts: 7 },
    { op: 'send', from: 'bob', to: 'eve', text: 'to the new eve', i: 8, e: 0, ts: 8 }
  ]
  const st = replayed(rs)
  t.same([...st.account('bob')!.mailbox.entries()].map(([m]) => [m.id, m.from, m.text]), [[3, 'Eve', 'one'], [7, 'EVE', 'two']], 'each message from the sender as named when it was sent')
  t.same([...st.account('eve')!.mailbox.entries()].map(([m]) => [m.to, m.text]), [['EVE', 'to the new eve']])
  t.same(stateView(st), stateView(applied(rs)))
})

t.test('a message added after packed ones waits behind them, and a read takes them in order', async t => {
  const rs: LogRecord[] = [
    { op: 'register', user: 'ann', salt: 's', hash: 'h', i: 1, e: 0, ts: 1 },
    { op: 'register', user: 'ben', salt: 's', hash: 'h', i: 2, e: 0, ts: 2 }
  ]
  for (let i = 3; i <= 2502; i++) rs.push({ op: 'send', from: 'ben', to: 'ann', text: `m${i}`, i, e: 0, ts: i })
  const st = replayed(rs)
  const mailbox = st.account('ann')!.mailbox
  t.ok(mailbox.isDeferred && mailbox.hasTail)
  st.apply({ op: 'send', from: 'ben', to: 'ann', text: 'live', i: 2503, e: 0, ts: 2503 })
  t.ok(mailbox.hasTail, 'adding a message does not decode the tail')
  t.equal(mailbox.size, 2501)
  t.equal(mailbox.unreadCount, 2501)
  t.ok(mailbox.warmStep(), 'decoded a part at a time')
  t.equal(mailbox.size, 2501, 'the count holds while part of the tail is decoded')
  st.apply({ op: 'send', from: 'ben', to: 'ann', text: 'live 2', i: 2504, e: 0, ts: 2504 })
  const read = st.apply({ op: 'read', user: 'ann', limit: 3, i: 2505, e: 0, ts: 2505 }).reply as unknown as { messages: Array<{ id: number }>, remaining: number }
  t.same(read.messages.map(m => m.id), [3, 4, 5], 'oldest first')
  t.equal(read.remaining, 2499)
  t.notOk(mailbox.isDeferred)
  t.same(mailbox.newest(2).map(m => m.text), ['live 2', 'live'])
  t.same(stateView(st), stateView(applied([...rs, ...[2503, 2504].map(i => ({ op: 'send', from: 'ben', to: 'ann', text: i === 2503 ? 'live' : 'live 2', i, e: 0, ts: i }) as LogRecord), { op: 'read', user: 'ann', limit: 3, i: 2505, e: 0, ts: 2505 }])))
})

t.test('a read mark on a packed message does not decode the mailbox, and counts once decoded', async t => {
  const rs: LogRecord[] = [
    { op: 'register', user: 'ann', salt: 's', hash: 'h', i: 1, e: 0, ts: 1 },
    { op: 'register', user: 'ben', salt: 's', hash: 'h', i: 2, e: 0, ts: 2 }
  ]
  let i = 2
  while (i < 600) {
    rs.push({ op: 'send', from: 'ben', to: 'ann', text: `m${i + 1}`, i: ++i, e: 0, ts: i })
    if (i % 3 === 0) rs.push({ op: 'mark_read', user: 'ann', ids: [i, i, 1, 2], i: ++i, e: 0, ts: i }) // the push's mark; twice; not messages
  }
  const st = replayed(rs)
  const mailbox = st.account('ann')!.mailbox
  t.ok(mailbox.hasTail, 'still packed')
  const whole = applied(rs)
  t.equal(mailbox.size, whole.account('ann')!.mailbox.size)
  t.equal(mailbox.unreadCount, whole.account('ann')!.mailbox.unreadCount, 'the unread count knows the marks')
  t.equal(mailbox.markReadWhere(3), null, 'marked by the log already')
  t.equal(mailbox.markReadWhere(5), 'packed', 'a message in the tail is marked there')
  t.equal(mailbox.markReadWhere(5), null, 'once')
  t.equal(mailbox.markReadWhere(4), null, 'an index that is not a message in the tail')
  t.ok(mailbox.hasTail)
  whole.account('ann')!.mailbox.markRead(5)
  st.apply({ op: 'send', from: 'ann', to: 'ben', text: 'x', i: ++i, e: 0, ts: i })
  whole.apply({ op: 'send', from: 'ann', to: 'ben', text: 'x', i, e: 0, ts: i })
  // The digest of `whole` missed the direct mark above; compare the messages and marks.
  const view = (s: ChatState): unknown => [...s.account('ann')!.mailbox.entries()].map(([m, read]) => [m.id, m.text, read])
  t.same(view(st), view(whole), 'the same messages and marks once decoded')
  t.same(stateView(replayed(rs)), stateView(applied(rs)), 'and the same state, digest included')
})
