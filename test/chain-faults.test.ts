// Paused processes: a SIGSTOP'd primary or middle is detected and failed over, and once
// resumed it acknowledges nothing stale and rejoins.

import t from 'tap'
import { Chain } from './helpers/chain.ts'
import { waitFor, RawConn } from './helpers/spawn.ts'
import { setupUsers, startSends, mailboxCounts, violations } from './helpers/workload.ts'

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
