// Membership and trust: distinct addresses, the peer secret, a new server joining, a member
// removed on purpose, --min-chain, and catching up from a snapshot.

import t, { type Test } from 'tap'
import fs from 'node:fs'
import path from 'node:path'
import net from 'node:net'
import { spawn } from 'node:child_process'
import { Chain, freePorts } from './helpers/chain.ts'
import { RawConn, sendUntilRefused, startServer, tmpDir, waitFor, root, type WireLine } from './helpers/spawn.ts'
import { setupUsers, startSends, mailboxCounts, violations } from './helpers/workload.ts'
import { ChatClient } from '../lib/client.ts'

const users = ['ann', 'ben', 'cat']

t.test('members on distinct addresses (127.0.0.1, .2, .3) replicate and fail over', async t => {
  const chain = await Chain.create(t, { hosts: ['127.0.0.1', '127.0.0.2', '127.0.0.3'] })
  await chain.startAll()
  await chain.waitConverged(3)
  const st = await chain.status(2)
  t.same(st?.chain, chain.servers)
  t.ok(new Set(chain.members.map(m => m.host)).size === 3, 'three different addresses')
  await setupUsers(chain.servers, users)
  const load = await startSends(chain.servers, users, 4)
  await waitFor(() => load.acked() >= 100, 20_000, 'writes')
  await chain.kill(0)
  const n = load.acked()
  await waitFor(() => load.acked() >= n + 100, 20_000, 'writes after failover')
  await load.stop()
  await chain.waitConverged(2)
  t.same(violations(load.outcomes, await mailboxCounts(chain.servers, users)), [])
})

t.test('peer links need the secret: an impersonator changes nothing', async t => {
  const dir = tmpDir(t, 'secret')
  const secretFile = path.join(dir, 'secret')
  fs.writeFileSync(secretFile, 'correct horse battery staple\n')
  const chain = await Chain.create(t, { args: ['--secret-file', secretFile] })
  await chain.startAll()
  await chain.waitConverged(3)
  await setupUsers(chain.servers, users)
  const before = await chain.waitConverged(3)

  for (const m of chain.members) {
    // 1: replication messages without any handshake are just bad client requests.
    const raw = await RawConn.open(m.port)
    const r = await raw.send('{"t":"append","epoch":99,"records":[{"i":1,"e":99,"ts":1,"op":"register","user":"evil","salt":"","hash":""}]}\n', undefined)
    t.equal(r.error?.code, 'BAD_REQUEST', 'a replication message from a client is refused')
    raw.close()
    // 2: a peer_hello answered with a wrong proof is denied.
    const sock = net.connect(m.port, '127.0.0.1')
    await new Promise(resolve => sock.once('connect', resolve))
    const lines: string[] = []
    let buf = ''
    sock.on('data', d => {
      buf += d.toString()
      let k
      while ((k = buf.indexOf('\n')) >= 0) { lines.push(buf.slice(0, k)); buf = buf.slice(k + 1) }
    })
    sock.on('error', () => {})
    sock.write(JSON.stringify({ op: 'peer_hello', from: chain.servers[0], nonce: 'abc' }) + '\n')
    await waitFor(() => lines.length >= 1, 5000, 'challenge')
    t.equal(JSON.parse(lines[0]).t, 'challenge')
    sock.write(JSON.stringify({ t: 'auth', proof: 'forged' }) + '\n')
    sock.write(JSON.stringify({ t: 'sync', epoch: 999, chain: ['127.0.0.1:1', m.addr], learner: null, commit: 0 }) + '\n')
    await waitFor(() => lines.length >= 2, 5000, 'denial')
    t.equal(JSON.parse(lines[1]).t, 'denied', `${m.addr} denies a peer without the secret`)
    await waitFor(() => sock.destroyed || sock.readableEnded, 5000, 'the connection to close')
    sock.destroy()
  }
  // 3: a server with the wrong secret cannot join.
  const [port] = await freePorts(1)
  const wrong = path.join(dir, 'wrong')
  fs.writeFileSync(wrong, 'wrong secret\n')
  const intruder = await startServer(t, { port, data: tmpDir(t, 'intruder'), args: ['--join', chain.servers[0], '--secret-file', wrong, '--heartbeat-ms', '50', '--failure-timeout-ms', '500'] })
  await waitFor(() => /failed authentication|refused/.test(intruder.stderr()) || /peer connection refused/.test(chain.members[0].proc!.stderr()), 10_000, 'the intruder to be refused')
  const after = await chain.waitConverged(3)
  t.equal(after.digest, before.digest, 'the replicated state is unchanged')
  t.equal(after.epoch, before.epoch, 'the configuration is unchanged')
  const st = await chain.status(0)
  t.notOk((st?.chain as string[]).includes(`127.0.0.1:${port}`), 'the intruder is not in the chain')
})

t.test('a new server joins a running chain with --join, under load, and becomes the tail', async t => {
  const chain = await Chain.create(t, { args: ['--snapshot-every-records', '200'] })
  await chain.startAll()
  await chain.waitConverged(3)
  await setupUsers(chain.servers, users)
  const load = await startSends(chain.servers, users, 4)
  await waitFor(() => load.acked() >= 600, 30_000, 'a log long enough to be compacted')
  const [port] = await freePorts(1)
  const addr = `127.0.0.1:${port}`
  const fourth = await startServer(t, { port, data: tmpDir(t, 'fourth'), args: ['--join', chain.servers[1], '--heartbeat-ms', '50', '--failure-timeout-ms', '500', '--snapshot-every-records', '200'] })
  const n = load.acked()
  await waitFor(async () => {
    const s = await chain.status(0)
    return (s?.chain as string[]).length === 4 && (s?.chain as string[])[3] === addr
  }, 30_000, 'the new server at the tail')
  t.ok(load.acked() > n, 'writes continued while it caught up')
  await load.stop()
  // All four converge on one digest.
  const digests = await waitFor(async () => {
    const all = await Promise.all([...chain.members.map((_, k) => chain.status(k)), (async () => {
      const c = await RawConn.open(port)
      try { return await c.req({ op: 'status' }) } finally { c.close() }
    })()])
    const ds = new Set(all.map(s => `${s?.digest}/${s?.index}/${s?.epoch}/${s?.role === 'primary' ? 'p' : s?.role}`))
    return ds.size === 2 ? all : null
  }, 20_000, 'four equal digests')
  t.equal(digests[3]?.role, 'backup')
  t.match(fourth.stderr(), /installed a snapshot from the chain/, 'it caught up from a snapshot: the log was compacted')
  t.same(violations(load.outcomes, await mailboxCounts(chain.servers, users)), [])
})

t.test('an operator removes a member on purpose; it stays out', async t => {
  const chain = await Chain.create(t)
  await chain.startAll()
  await chain.waitConverged(3)
  await setupUsers(chain.servers, users)
  const out = await new Promise<{ code: number | null, stdout: string, stderr: string }>(resolve => {
    const p = spawn(process.execPath, [path.join(root, 'bin/admin.js'), 'remove', chain.servers[1], '--servers', chain.servers.join(',')], { cwd: root })
    let stdout = ''
    let stderr = ''
    p.stdout.on('data', d => { stdout += d })
    p.stderr.on('data', d => { stderr += d })
    p.on('exit', code => resolve({ code, stdout, stderr }))
  })
  t.equal(out.code, 0, out.stderr)
  t.match(out.stdout, /removed/)
  const st = await waitFor(async () => {
    const s = await chain.status(1)
    return s?.role === 'retired' ? s : null
  }, 10_000, 'the member to retire')
  t.equal(st.role, 'retired')
  const conv = await waitFor(async () => {
    const s = await chain.status(0)
    return (s?.chain as string[]).length === 2 ? s : null
  }, 10_000, 'a chain of two')
  t.same(conv.chain, [chain.servers[0], chain.servers[2]])
  const c = await ChatClient.connect({ servers: chain.servers })
  await c.login('ann', 'pw')
  await c.send('ben', 'after removal')
  c.close()
  // Restarted without --join, it stays retired.
  await chain.kill(1)
  await chain.start(1)
  t.equal((await chain.status(1))?.role, 'retired', 'a retired member stays out across restarts')
  const r = await (await RawConn.open(chain.members[1].port)).req({ op: 'register', user: 'z', password: 'p' })
  t.equal(r.error?.code, 'UNAVAILABLE')
})

t.test('--min-chain 2 refuses writes with fewer than two members, and serves reads', async t => {
  const chain = await Chain.create(t, { args: ['--min-chain', '2'] })
  await chain.startAll()
  await chain.waitConverged(3)
  await setupUsers(chain.servers, users)
  await chain.kill(2)
  await chain.kill(1)
  await waitFor(async () => ((await chain.status(0))?.chain as string[])?.length === 1, 10_000, 'a chain of one')
  const c = await RawConn.open(chain.members[0].port)
  t.equal((await c.req({ op: 'login', user: 'ann', password: 'pw' })).ok, true, 'login still works')
  const r = await c.req({ op: 'send', to: 'ben', text: 'x' })
  t.equal(r.error?.code, 'UNAVAILABLE', 'a write is refused')
  t.match(r.error?.message, /min-chain/)
  t.equal((await c.req({ op: 'history' })).ok, true, 'reads are served')
  c.close()
})

// A chain started with `args` and the users set up; ann, logged in at the primary, sends 4,000
// characters at a time to ben until a send is refused. Returns the chain, the primary's position,
// ann's connection and the refusal.
async function sendAtPrimaryUntilRefused (t: Test, args: string[]): Promise<{ chain: Chain, primary: number, c: RawConn, refused: WireLine | null }> {
  const chain = await Chain.create(t, { args })
  await chain.startAll()
  const { primary } = await chain.waitConverged(3)
  await setupUsers(chain.servers, users)
  const c = await RawConn.open(chain.members[primary].port)
  t.teardown(() => c.close())
  t.match(await c.req({ op: 'login', user: 'ann', password: 'pw' }), { ok: true })
  const { refused } = await sendUntilRefused(c, 'ben', 'z'.repeat(4000))
  return { chain, primary, c, refused }
}

// Kill the primary at `primary`, wait for the next, and log ann in there: its position and ann's
// connection to it.
async function annAtNextPrimary (t: Test, chain: Chain, primary: number): Promise<{ next: number, d: RawConn }> {
  await chain.kill(primary)
  const next = await chain.newPrimary(primary)
  const d = await RawConn.open(chain.members[next].port)
  t.teardown(() => d.close())
  t.match(await d.req({ op: 'login', user: 'ann', password: 'pw' }), { ok: true })
  return { next, d }
}

t.test('the mailbox quota holds at the next primary after a failover too', async t => {
  const { chain, primary, c, refused } = await sendAtPrimaryUntilRefused(t, ['--mailbox-quota-mb', '1'])
  t.match(refused, { ok: false, error: { code: 'MAILBOX_FULL', to: 'ben', quota: 1024 * 1024 } }, 'the primary refuses a send to a full mailbox')
  c.close()
  await chain.waitConverged(3)
  const { d } = await annAtNextPrimary(t, chain, primary)
  t.match(await d.req({ op: 'send', to: 'ben', text: 'one more' }), { ok: false, error: { code: 'MAILBOX_FULL' } }, 'so does the new primary')
  t.match(await d.req({ op: 'send', to: users.find(u => u !== 'ann' && u !== 'ben')!, text: 'to someone else' }), { ok: true }, 'a send to another mailbox goes through')
})

t.test('the quota holds on every member: the primary refuses, and so does the next one after a failover', async t => {
  const { chain, primary, c, refused } = await sendAtPrimaryUntilRefused(t, ['--quota-mb', '1'])
  t.match(refused, { ok: false, error: { code: 'STORE_FULL', quota: 1024 * 1024 } }, 'the primary refuses a send once the quota is reached')
  const { digest } = await chain.waitConverged(3)
  const counts = (await chain.statuses()).map(s => s?.stored)
  t.ok(counts.every(n => typeof n === 'number' && n === counts[0] && n >= 1024 * 1024), `every member counts the same: ${counts.join(', ')}`)
  c.close()
  const { next, d } = await annAtNextPrimary(t, chain, primary)
  t.match(await d.req({ op: 'send', to: 'ben', text: 'one more' }), { ok: false, error: { code: 'STORE_FULL' } }, 'so does the new primary')
  t.equal((await chain.status(next))?.digest, digest, 'nothing was applied')
})
