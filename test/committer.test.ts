// The single server's write path: when a write is synced on the event loop and when it is
// batched with others into one write whose fdatasync runs in the thread pool.

import t from 'tap'
import { Committer } from '../lib/committer.ts'
import { Store } from '../lib/storage/store.ts'
import type { RecordBody } from '../lib/records.ts'
import { tempDir, faultyFiles } from './helpers/storage.ts'

const register = (k: number): RecordBody => ({ op: 'register', user: `user${k}`, salt: 'c2FsdA==', hash: 'aGFzaA==', rk: `\u0000r${k}` })

function open (t: Parameters<typeof tempDir>[0]): { committer: Committer, store: Store, calls: ReturnType<typeof faultyFiles>['calls'] } {
  const ff = faultyFiles()
  const store = new Store({ dir: tempDir(t), files: ff.files })
  const { state } = store.recover()
  const committer = new Committer(store, state, 0, () => {})
  t.teardown(() => store.close())
  return { committer, store, calls: ff.calls }
}

// Let the current turn of the event loop end (the committer allows one write at once per turn).
const nextTurn = (): Promise<void> => new Promise(resolve => setImmediate(resolve))

const syncs = (calls: ReturnType<typeof faultyFiles>['calls']): { onLoop: number, inPool: number } => ({ onLoop: calls.fdatasyncSync, inPool: calls.fdatasync })

t.test('a lone write is synced at once on the loop; writes that arrive together share one fdatasync in the pool', async t => {
  const { committer, store, calls } = open(t)
  const a = await committer.submit(register(1))
  t.match(a.reply, { ok: true })
  t.same(syncs(calls), { onLoop: 1, inPool: 0 }, 'one record: synced on the loop')
  t.equal(store.log.lastIndex, 1)
  await nextTurn()

  // Five in one turn: the first still goes at once (recent writes were lone records), the other
  // four wait for the end of the turn and go as one batch.
  const five = await Promise.all([2, 3, 4, 5, 6].map(k => committer.submit(register(k))))
  t.same(five.map(x => x.reply.ok), [true, true, true, true, true])
  t.same(syncs(calls), { onLoop: 2, inPool: 1 }, 'one at once, then one batch of four')
  t.equal(store.log.lastIndex, 6)
  await nextTurn()

  // After a batch, even a lone write waits for the end of its turn (load is likely), then goes
  // alone, on the loop. Writes go at once again only when the last few averaged under one and a
  // half records: here, after two more lone ones (averages 1.75, 1.56, then 1.42).
  for (const k of [7, 8]) {
    const p = committer.submit(register(k))
    t.equal(calls.fdatasyncSync, k - 5, `write ${k} waits for the end of its turn`)
    await p
    await nextTurn()
  }
  t.same(syncs(calls), { onLoop: 4, inPool: 1 })
  const both = Promise.all([committer.submit(register(9)), committer.submit(register(10))])
  t.equal(calls.fdatasyncSync, 5, 'write 9 went at once')
  await both
  t.same(syncs(calls), { onLoop: 6, inPool: 1 }, 'the first at once, the second at the end of the turn, each alone on the loop')
  await nextTurn()

  // Under load, one lone write among batches does not switch to writing at once: a client that
  // sends right after it would otherwise hold up the event loop for a whole fdatasync.
  await Promise.all(Array.from({ length: 20 }, (_, k) => committer.submit(register(11 + k))))
  await nextTurn()
  for (const k of [31, 32]) {
    const p = committer.submit(register(k))
    t.equal(calls.fdatasyncSync, 7 + k - 31, `write ${k} after a batch of 19 waits for the end of its turn`)
    await p
    await nextTurn()
  }
  t.equal(store.log.lastIndex, 32)
})

t.test('while a batch is being synced, new writes make up the next batch', async t => {
  const { committer, store, calls } = open(t)
  await committer.submit(register(1))
  await nextTurn()
  const first = Promise.all([2, 3, 4].map(k => committer.submit(register(k))))
  // Let the end-of-turn batch start its fdatasync, then submit more while it runs.
  await nextTurn()
  t.equal(calls.fdatasync, 1, 'a batch is in flight')
  const second = Promise.all([5, 6, 7].map(k => committer.submit(register(k))))
  await Promise.all([first, second])
  t.same(syncs(calls), { onLoop: 2, inPool: 2 }, '2 at once; 3 and 4 as a batch; the three that came meanwhile shared one more')
  t.equal(store.log.lastIndex, 7)
  t.same((await committer.submit(register(3))).replayed, true, 'an applied rid is answered from the table')
})
