// The whole chain killed, then restarted in every order: the last survivor must come back
// before a chain forms again, and no acknowledged write is lost.

import t from 'tap'
import { Chain } from './helpers/chain.ts'
import { waitFor } from './helpers/spawn.ts'
import { setupUsers, startSends, mailboxCounts, violations } from './helpers/workload.ts'

const users = ['ann', 'ben', 'cat']

// All six orders of restarting a chain killed whole. The last survivor must come back before a
// chain forms again; until then the others wait.
const orders = [[0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]]
t.test('kill all three, restart in every order: no acknowledged write is lost', async t => {
  for (const order of orders) {
    await t.test(`restart order ${order.join(',')}`, async t => {
      const chain = await Chain.create(t)
      await chain.startAll()
      await chain.waitConverged(3)
      await setupUsers(chain.servers, users)
      // Lose the members one by one while writing, so the last survivor holds writes the others
      // never saw: kill the tail, then the middle, writing in between.
      const load = await startSends(chain.servers, users, 4, 'a')
      await waitFor(() => load.acked() >= 60, 20_000, 'writes')
      await chain.kill(2)
      let n = load.acked()
      await waitFor(() => load.acked() >= n + 60, 20_000, 'writes after the first kill')
      await chain.kill(1)
      n = load.acked()
      await waitFor(() => load.acked() >= n + 60, 20_000, 'writes on the last survivor')
      await chain.kill(0)
      await load.stop()

      for (const k of order) {
        await chain.start(k)
        if (k !== 0) {
          // Member 0 was the last survivor: until it is back, nobody may serve.
          const s = await chain.status(k)
          t.equal(s?.role, 'waiting', `member ${k} waits for the last survivor`)
        }
      }
      await chain.waitConverged(3, 30_000)
      const seen = await mailboxCounts(chain.servers, users)
      t.same(violations(load.outcomes, seen), [], `${load.acked()} acknowledged sends survive`)
    })
  }
})
