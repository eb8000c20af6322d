// A three-server chain of real processes: formation, routing, and SIGKILL of each position
// under a stream of concurrent sends.

import t from 'tap'
import { Chain } from './helpers/chain.ts'
import { RawConn, waitFor } from './helpers/spawn.ts'
import { setupUsers, startSends, mailboxCounts, violations } from './helpers/workload.ts'
import { ChatClient, RequestError } from '../lib/client.ts'

const users = ['ann', 'ben', 'cat', 'dan']

t.test('a chain forms in any start order; only the primary serves', async t => {
  const chain = await Chain.create(t)
  // Start the tail first, then the primary, then the middle.
  await chain.start(2)
  const waiting = await chain.status(2)
  t.equal(waiting?.role, 'waiting', 'a member whose peers are not up waits')
  t.equal((await (await RawConn.open(chain.members[2].port)).req({ op: 'register', user: 'x', password: 'p' })).error?.code, 'UNAVAILABLE', 'and refuses requests with UNAVAILABLE')
  await chain.start(0)
  await chain.start(1)
  const { primary, epoch } = await chain.waitConverged(3)
  t.equal(primary, 0, 'the lowest port is the first primary')
  t.ok(epoch >= 1)
  const s = await chain.status(1)
  t.same(s?.chain, chain.servers, 'chain ordered by port')
  t.equal(s?.primary, chain.servers[0])

  const backup = await RawConn.open(chain.members[1].port)
  const r = await backup.req({ op: 'register', user: 'x', password: 'p' })
  t.equal(r.error?.code, 'NOT_PRIMARY')
  t.equal(r.error?.primary, chain.servers[0], 'NOT_PRIMARY names the primary')
  t.same(await backup.req({ op: 'ping', id: 1 }), { ok: true, id: 1 }, 'backups answer ping')
  backup.close()

  // The client library finds the primary whichever server it is given first.
  const c = await ChatClient.connect({ servers: [chain.servers[2], chain.servers[1], chain.servers[0]] })
  t.equal(c.address, chain.servers[0])
  await c.register('x', 'p')
  await c.register('y', 'p')
  await c.login('x', 'p')
  for (let k = 0; k < 20; k++) await c.send('y', `m${k}`)
  c.close()
  const done = await chain.waitConverged(3)
  t.equal(done.primary, 0)
  const st = await chain.statuses()
  t.ok(st.every(x => x?.index === st[0]?.index && (x?.index as number) >= 22), 'every member applied every record', { indexes: st.map(x => x?.index) })
})

for (const [victim, name] of [[0, 'primary'], [1, 'middle'], [2, 'tail']] as const) {
  t.test(`SIGKILL the ${name} under concurrent sends`, async t => {
    const chain = await Chain.create(t)
    await chain.startAll()
    await chain.waitConverged(3)
    await setupUsers(chain.servers, users)
    const load = await startSends(chain.servers, users, 8)
    await waitFor(() => load.acked() >= 300, 20_000, '300 acknowledged sends')
    await chain.kill(victim)
    const killedAt = load.acked()
    await waitFor(() => load.acked() >= killedAt + 300, 30_000, '300 more acknowledged sends after the kill')
    await load.stop()
    const { primary } = await chain.waitConverged(2)
    if (victim === 0) t.equal(primary, 1, 'the next member took over')
    else t.equal(primary, 0, 'the primary kept its role')
    const live = chain.servers.filter((_, k) => k !== victim)
    const seen = await mailboxCounts(live, users)
    t.same(violations(load.outcomes, seen), [], `${load.acked()} acknowledged sends present exactly once; nothing applied twice`)
    t.equal(load.outcomes.filter(o => o.status === 'fail').length, 0, 'no send failed: the client retried through the failover')

    // The killed member restarts, catches up and rejoins at the tail.
    await chain.start(victim)
    const after = await chain.waitConverged(3, 30_000)
    const s = await chain.status(after.primary)
    t.equal((s?.chain as string[])[2], chain.servers[victim], 'the restarted member rejoined at the tail')
    if (victim === 0) t.not(after.primary, 0, 'and did not take the primary role back')
  })
}

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
