// Faults beyond a single crash: paused processes, the whole cluster restarting in every order,
// and a name raced for while the primary dies.

import t from 'tap'
import { Chain } from './helpers/chain.ts'
import { waitFor, RawConn } from './helpers/spawn.ts'
import { setupUsers, startSends, mailboxCounts, violations } from './helpers/workload.ts'
import { ChatClient, RequestError } from '../lib/client.ts'

const users = ['ann', 'ben', 'cat']

for (const [victim, name] of [[0, 'primary'], [1, 'middle']] as const) {
  t.test(`SIGSTOP the ${name}: detected, failed over, and the resumed process acknowledges nothing stale`, async t => {
    const chain = await Chain.create(t)
    await chain.startAll()
    await chain.waitConverged(3)
    await setupUsers(chain.servers, users)
    const load = await startSends(chain.servers, users, 6)
    await waitFor(() => load.acked() >= 200, 20_000, '200 acknowledged sends')
    // A client that stays with the member to be paused, with a write sent while it is stopped.
    const stale = await RawConn.open(chain.members[victim].port)
    await stale.req({ op: 'login', user: 'ann', password: 'pw' })
    const proc = chain.members[victim].proc!
    proc.kill('SIGSTOP')
    const staleWrite = stale.req({ op: 'send', to: 'ben', text: 'stale-write', rid: 'stale-1' }, 60_000).catch(e => ({ ok: false, error: { code: 'CLOSED', message: String(e) } }))
    const stoppedAt = Date.now()
    const base = load.acked()
    // Detection (0.5 s timeout here) and failover: writes resume without the paused member.
    await waitFor(() => load.acked() >= base + 200, 30_000, 'writes to resume without the paused member')
    const resumedAfter = Date.now() - stoppedAt
    t.ok(resumedAfter < 15_000, `writes resumed ${resumedAfter} ms after the pause`)
    const live = chain.members.map((_, k) => k).filter(k => k !== victim)
    const during = await chain.status(live[0])
    t.notOk((during?.chain as string[]).includes(chain.servers[victim]), 'the paused member was dropped from the chain')

    proc.kill('SIGCONT')
    const staleReply = await staleWrite
    t.not(staleReply.ok, true, `the resumed process acknowledges nothing stale (${JSON.stringify(staleReply.error)})`)
    // The resumed member finds the chain moved on and rejoins at the tail.
    const after = await chain.waitConverged(3, 30_000)
    t.not(after.primary, victim === 0 ? 0 : -1, 'the old primary did not take its role back')
    const s = await chain.status(after.primary)
    t.equal((s?.chain as string[])[2], chain.servers[victim], 'the resumed member rejoined at the tail')
    await load.stop()
    await chain.waitConverged(3, 30_000)
    const seen = await mailboxCounts(chain.servers, users)
    t.same(violations(load.outcomes, seen), [], `${load.acked()} acknowledged sends present exactly once`)
    t.ok((seen.get('stale-write') ?? 0) <= 1, 'the unacknowledged stale write applied at most once')
    stale.close()
  })
}

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

t.test('two clients race to register one name while the primary is killed: exactly one owns it', async t => {
  const chain = await Chain.create(t)
  await chain.startAll()
  await chain.waitConverged(3)
  const a = await ChatClient.connect({ servers: chain.servers })
  const b = await ChatClient.connect({ servers: chain.servers })
  const results: Array<Promise<string>> = []
  const outcome = (p: Promise<void>): Promise<string> => p.then(() => 'ok', e => e instanceof RequestError ? e.code : 'unknown')
  for (let k = 0; k < 10; k++) {
    results.push(outcome(a.register(`name${k}`, 'pw-a')))
    results.push(outcome(b.register(`name${k}`, 'pw-b')))
    if (k === 4) await chain.kill(0)
  }
  const got = await Promise.all(results)
  a.close()
  b.close()
  await chain.waitConverged(2, 30_000)
  const c = await ChatClient.connect({ servers: chain.servers })
  for (let k = 0; k < 10; k++) {
    const [ra, rb] = [got[2 * k], got[2 * k + 1]]
    t.ok([ra, rb].filter(x => x === 'ok').length === 1 && [ra, rb].includes('USER_EXISTS'), `name${k}: one ok and one USER_EXISTS (${ra}, ${rb})`)
    const winner = ra === 'ok' ? 'pw-a' : 'pw-b'
    const loser = ra === 'ok' ? 'pw-b' : 'pw-a'
    t.equal((await c.login(`name${k}`, winner)).user, `name${k}`, 'the acknowledged registrant owns the name')
    await t.rejects(c.login(`name${k}`, loser), { code: 'AUTH_FAILED' })
  }
  c.close()
})
