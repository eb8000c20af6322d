import t from 'tap'
import { snapshotBatches } from '../lib/replication/chain-node.ts'
import { ChatState } from '../lib/state.ts'
import { limits } from '../lib/limits.ts'
import type { LogRecord, RecordBody } from '../lib/records.ts'

// A primary sends a lagging peer its state as snapshot chunks, many to a line of the peer link.
// With big texts a chunk of 1,000 messages is megabytes, and 50 of them would overflow a line:
// batches are bounded in bytes, and chunks bigger than a batch are cut in two.
t.test('snapshot batches for the peer link are bounded, and carry the whole state', async t => {
  const st = new ChatState()
  let i = 0
  const apply = (body: RecordBody): void => { st.apply({ ...body, i: ++i, e: 0, ts: i } as LogRecord) }
  for (const user of ['a', 'b', 'c']) apply({ op: 'register', user, salt: 's', hash: 'h' })
  const big = 'y'.repeat(limits.textBytesMax - 10)
  for (let k = 0; k < 1200; k++) apply({ op: 'send', from: 'a', to: k % 3 === 0 ? 'c' : 'b', text: `${k} ${k % 2 === 0 ? big : 'short'}`, rk: `a\u0000${k}` })
  apply({ op: 'read', user: 'b', limit: 300, rk: 'b\u0000r' }) // a stored reply of about 600 kB
  for (let k = 0; k < 2500; k++) apply({ op: 'noop', rk: `n${k}` }) // many small chunks' worth of rids

  const batchBytes = 512 * 1024
  const batches = [...snapshotBatches(st.snapshotChunks(), batchBytes)]
  const original = [...st.snapshotChunks()].length
  const sent = batches.flat().length
  t.ok(sent > original, `big chunks were cut (${original} chunks became ${sent})`)
  const sizes = batches.map(b => b.reduce((n, json) => n + json.length, 0))
  const over = batches.filter((b, k) => sizes[k] > batchBytes && b.length > 1)
  t.same(over, [], 'no batch of several chunks is over the bound')
  const single = batches.filter((b, k) => sizes[k] > batchBytes).map(b => JSON.parse(b[0]) as { kind: string })
  t.same(single.map(c => c.kind), ['rids'], 'only the read\'s exactly-once entry, which cannot be cut, goes over')
  t.ok(batches.every(b => b.length <= 50), 'at most 50 chunks a batch')
  t.ok(batches.length > 10, `${batches.length} batches`)
  const back = ChatState.fromSnapshotChunks(batches.flat().map(json => JSON.parse(json) as Record<string, unknown>))
  t.equal(back.digest(), st.digest())
  t.equal(back.ridCount, st.ridCount)

  const small = [...snapshotBatches(new ChatState().snapshotChunks())]
  t.equal(small.length, 1, 'an empty state is one batch')
  t.same(small[0].map(json => (JSON.parse(json) as { kind: string }).kind), ['state'])
})
