// Messages of the largest size a send allows, each escaped to six times its bytes in JSON: a
// mailbox of them is megabytes, more than one snapshot frame or one line of the peer link holds.
// A member that missed them must still catch up, from a snapshot cut into pieces that fit.

import t from 'tap'
import { Chain } from './helpers/chain.ts'
import { RawConn, waitFor } from './helpers/spawn.ts'
import { setupUsers } from './helpers/workload.ts'
import { limits } from '../lib/limits.ts'

t.test('a member that missed megabytes of big messages catches up from a snapshot', async t => {
  const chain = await Chain.create(t, { args: ['--snapshot-every-records', '100'] })
  await chain.startAll()
  const { primary } = await chain.waitConverged(3)
  t.equal(primary, 0)
  await setupUsers(chain.servers, ['ann', 'bob'])
  await chain.kill(2)
  await chain.waitConverged(2)

  const c = await RawConn.open(chain.members[0].port)
  t.teardown(() => c.close())
  t.equal((await c.req({ op: 'login', user: 'ann', password: 'pw' })).ok, true)
  // 400 texts of textBytesMax control characters: 1.6 MB of binary snapshot chunk in bob's
  // mailbox, and about 10 MB of JSON there and again in the exactly-once table.
  const n = 400
  const body = '\u0001'.repeat(limits.textBytesMax - 8)
  const replies = await Promise.all(Array.from({ length: n }, (_, k) => c.req({ op: 'send', to: 'bob', text: `${String(k).padStart(6)} ${body}`, rid: `big-${k}` }, 60_000)))
  t.equal(replies.filter(r => r.ok === true).length, n, 'every send acknowledged')
  // Both live members snapshot and compact on their own schedule, after a write (one that comes
  // while a snapshot is being written does not start another): write a little more until both
  // have dropped the log the returning member would need. The middle one will catch it up.
  const compacted = /"msg":"snapshot written"[^\n]*"segmentsRemoved":[1-9]/
  let more = 0
  await waitFor(async () => {
    if ([0, 1].every(k => compacted.test(chain.members[k].proc!.stderr()))) return true
    const r = await Promise.all(Array.from({ length: 50 }, (_, k) => c.req({ op: 'send', to: 'bob', text: `small ${more}+${k}` })))
    more += r.filter(x => x.ok === true).length
    return false
  }, 60_000, 'snapshots that compact the log at both live members', 10)
  for (const k of [0, 1]) t.notMatch(chain.members[k].proc!.stderr(), /snapshot failed/, `no snapshot failed at member ${k}`)

  // The log it would need is compacted away: it gets the state as a snapshot, in pieces.
  await chain.start(2)
  const converged = await chain.waitConverged(3, 60_000)
  t.equal(converged.primary, 0)
  t.match(chain.members[2].proc!.stderr(), /installed a snapshot from the chain/, 'caught up from a snapshot')
  const bob = await RawConn.open(chain.members[0].port)
  t.teardown(() => bob.close())
  t.same(await bob.req({ op: 'login', user: 'bob', password: 'pw' }), { ok: true, id: 'r1', user: 'bob', unread: n + more })
})
