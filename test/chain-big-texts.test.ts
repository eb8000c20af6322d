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
  await waitFor(() => /snapshot written/.test(chain.members[0].proc!.stderr()), 20_000, 'a snapshot at the primary')
  t.notMatch(chain.members[0].proc!.stderr(), /snapshot failed/, 'no snapshot failed')

  // The log it would need is compacted away: it gets the state as a snapshot, in pieces.
  await chain.start(2)
  const converged = await chain.waitConverged(3, 60_000)
  t.equal(converged.primary, 0)
  t.match(chain.members[2].proc!.stderr(), /installed a snapshot from the chain/, 'caught up from a snapshot')
  const bob = await RawConn.open(chain.members[0].port)
  t.teardown(() => bob.close())
  t.same(await bob.req({ op: 'login', user: 'bob', password: 'pw' }), { ok: true, id: 'r1', user: 'bob', unread: n })
})
