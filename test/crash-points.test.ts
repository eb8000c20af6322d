// The server killed at named points of the write path (test-only CHAINCHAT_CRASH_AT), under
// load; a failed fsync (CHAINCHAT_FAIL_FSYNC_AFTER); and a log cut back to its last fsync, as
// after a power loss (CHAINCHAT_TRACK_DURABLE). Every time, what was acknowledged survives.

import t from 'tap'
import fs from 'node:fs'
import path from 'node:path'
import { Chain } from './helpers/chain.ts'
import { startServer, tmpDir, waitFor } from './helpers/spawn.ts'
import { setupUsers, startSends, mailboxCounts, violations } from './helpers/workload.ts'

const users = ['ann', 'ben', 'cat']

const points: Array<[string, number, string[]]> = [
  ['after-append-before-fsync', 1, []],
  ['after-fsync-before-forward', 1, []],
  ['before-reply', 0, []],
  ['mid-snapshot', 2, ['--snapshot-every-records', '150', '--snapshot-growth-percent', '0']]
]

for (const [point, victim, args] of points) {
  t.test(`crash at ${point} under load`, async t => {
    const chain = await Chain.create(t, { args })
    await Promise.all(chain.members.map((_, k) => chain.start(k, [], k === victim ? { CHAINCHAT_CRASH_AT: `${point}:40` } : {})))
    await chain.waitConverged(3)
    await setupUsers(chain.servers, users)
    const load = await startSends(chain.servers, users, 6)
    const exit = await chain.members[victim].proc!.exited
    t.equal(exit.signal, 'SIGKILL', `the member died at ${point}`)
    t.match(chain.members[victim].proc!.stderr(), /test crash point reached/)
    chain.members[victim].proc = null
    const n = load.acked()
    await waitFor(() => load.acked() >= n + 150, 30_000, 'writes to go on without it')
    await chain.start(victim)
    await waitFor(() => load.acked() >= n + 300, 30_000, 'writes while it rejoins')
    await load.stop()
    await chain.waitConverged(3, 30_000)
    t.same(violations(load.outcomes, await mailboxCounts(chain.servers, users)), [], `${load.acked()} acknowledged sends present exactly once`)
  })
}

t.test('a failed fsync is fatal for that member; the chain carries on', async t => {
  const chain = await Chain.create(t)
  await Promise.all(chain.members.map((_, k) => chain.start(k, [], k === 1 ? { CHAINCHAT_FAIL_FSYNC_AFTER: '30' } : {})))
  await chain.waitConverged(3)
  await setupUsers(chain.servers, users)
  const load = await startSends(chain.servers, users, 4)
  const exit = await chain.members[1].proc!.exited
  t.equal(exit.code, 1, 'the member stopped for good (exit 1), not retrying')
  t.match(chain.members[1].proc!.stderr(), /fsync failed, the disk cannot be trusted/)
  chain.members[1].proc = null
  const n = load.acked()
  await waitFor(() => load.acked() >= n + 100, 30_000, 'writes to go on without it')
  await load.stop()
  await chain.start(1)
  await chain.waitConverged(3, 30_000)
  t.same(violations(load.outcomes, await mailboxCounts(chain.servers, users)), [])
})

t.test('a single server whose log is cut back to its last fsync (power loss) keeps every acknowledged write', async t => {
  const data = tmpDir(t, 'powerloss')
  let s = await startServer(t, { data, env: { CHAINCHAT_TRACK_DURABLE: '1' } })
  const servers = [`127.0.0.1:${s.port}`]
  await setupUsers(servers, users)
  const load = await startSends(servers, users, 6)
  await waitFor(() => load.acked() >= 300, 20_000, 'writes')
  s.kill('SIGKILL')
  await s.exited
  await load.stop()
  const durable = JSON.parse(fs.readFileSync(path.join(data, 'DURABLE'), 'utf8')) as { file: string, bytes: number }
  const file = path.join(data, durable.file)
  const size = fs.statSync(file).size
  t.ok(size >= durable.bytes, `the segment holds at least its durable bytes (${size} >= ${durable.bytes})`)
  fs.truncateSync(file, durable.bytes)
  s = await startServer(t, { data, port: s.port })
  t.same(violations(load.outcomes, await mailboxCounts([`127.0.0.1:${s.port}`], users)), [], `${load.acked()} acknowledged sends survive the lost page cache`)
})
