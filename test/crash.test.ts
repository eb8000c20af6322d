// kill -9 at any moment loses nothing that was acknowledged, and applies nothing twice.

import t, { type Test } from 'tap'
import fs from 'node:fs'
import { startServer, tmpDir, waitFor } from './helpers/spawn.ts'
import { ChatClient, RequestError } from '../lib/client.ts'

interface Outcome { text: string, rid: string, to: string, status: 'ok' | 'unknown' | 'fail' }

async function historyOf (port: number, user: string): Promise<Array<{ id: number, text: string }>> {
  const c = await ChatClient.connect({ port })
  try {
    await c.login(user, 'pw')
    const all: Array<{ id: number, text: string }> = []
    let before: number | undefined
    for (;;) {
      const page = await c.history({ limit: 1000, before })
      all.push(...page.messages)
      if (page.messages.length < 1000) return all
      before = page.messages[page.messages.length - 1].id
    }
  } finally {
    c.close()
  }
}

async function digest (port: number): Promise<string> {
  const c = await ChatClient.connect({ port })
  try { return (await c.status()).digest as string } finally { c.close() }
}

// Three times: with a small snapshot interval, so the crash also lands around snapshots and
// compaction; with no snapshot at all but small log segments, so it lands around segments
// started for their size, and the restart replays a log of many segments; and with every
// recovery reading the log and the snapshot on the helper thread (storage/checksums.ts), 512
// bytes at a time, so that decoding catches up with it inside frames, the last one torn.
const setups: Array<{ name: string, args: string[], segments: boolean, env?: Record<string, string> }> = [
  { name: 'snapshots every 150 records', args: ['--snapshot-every-records', '150'], segments: false },
  { name: 'no snapshots, 4 KiB log segments', args: ['--snapshot-every-records', '1000000', '--segment-bytes', '4096'], segments: true },
  { name: 'read on the helper thread, 512 bytes at a time; snapshots every 300 records', args: ['--snapshot-every-records', '300', '--snapshot-growth-percent', '0'], segments: false, env: { CHAINCHAT_HELPER_READS: '512' } }
]

for (const setup of setups) {
  t.test(`kill -9 during concurrent sends, then restart (${setup.name})`, async t => crashAndRestart(t, setup))
}

async function crashAndRestart (t: Test, opts: { args: string[], segments: boolean, env?: Record<string, string> }): Promise<void> {
  const data = tmpDir(t, 'crash')
  const { args, env } = opts
  let s = await startServer(t, { data, args, env })
  const users = ['u0', 'u1', 'u2', 'u3']
  const setup = await ChatClient.connect({ port: s.port })
  for (const u of users) await setup.register(u, 'pw')
  setup.close()

  // Phase 1: a quiet server killed and restarted keeps exactly its state.
  const before = await digest(s.port)
  s.kill('SIGKILL')
  await s.exited
  s = await startServer(t, { data, args, env })
  t.equal(await digest(s.port), before, 'digest before the kill equals the digest after the restart')

  // Phase 2: 8 clients sending back to back; the server is killed mid-stream.
  const outcomes: Outcome[] = []
  const senders = await Promise.all(Array.from({ length: 8 }, async (_, k) => {
    const c = await ChatClient.connect({ port: s.port })
    await c.login(users[k % users.length], 'pw')
    return c
  }))
  let stop = false
  const loops = senders.map(async (c, k) => {
    for (let n = 0; !stop && n < 5000; n++) {
      const o: Outcome = { text: `c${k}-n${n}`, rid: `c${k}-r${n}`, to: users[(k + 1) % users.length], status: 'unknown' }
      outcomes.push(o)
      try {
        await c.send(o.to, o.text, o.rid)
        o.status = 'ok'
      } catch (e) {
        o.status = e instanceof RequestError ? 'fail' : 'unknown'
        return
      }
    }
  })
  await waitFor(() => outcomes.filter(o => o.status === 'ok').length >= 400, 20_000, '400 acknowledged sends')
  s.kill('SIGKILL')
  await s.exited
  stop = true
  await Promise.all(loops)
  for (const c of senders) c.close()
  const acked = outcomes.filter(o => o.status === 'ok')
  const unknown = outcomes.filter(o => o.status === 'unknown')
  t.equal(outcomes.filter(o => o.status === 'fail').length, 0, 'no send failed outright')
  t.ok(unknown.length >= 1, `some sends were in flight at the kill (${unknown.length})`)

  if (opts.segments) {
    const segments = fs.readdirSync(data).filter(f => f.endsWith('.wal'))
    t.ok(segments.length >= 10, `the log is in many segments (${segments.length})`)
    t.same(fs.readdirSync(data).filter(f => f.endsWith('.snap')), [], 'and no snapshot')
  }
  s = await startServer(t, { data, args, env })
  if (env !== undefined) t.match(s.stderr(), /"msg":"recovered".*"checksums":"parallel"/, 'recovered through the helper thread')
  const seen = new Map<string, number>()
  for (const u of users) for (const m of await historyOf(s.port, u)) seen.set(m.text, (seen.get(m.text) ?? 0) + 1)
  const lost = acked.filter(o => seen.get(o.text) !== 1)
  t.same(lost.map(o => o.text), [], `all ${acked.length} acknowledged sends present exactly once`)
  t.ok(unknown.every(o => (seen.get(o.text) ?? 0) <= 1), 'in-flight sends applied at most once')
  t.equal(seen.size, acked.length + unknown.filter(o => seen.has(o.text)).length, 'nothing else appeared')

  // Retrying the in-flight sends with their rids applies each exactly once.
  const retry = new Map<number, ChatClient>()
  for (const o of unknown) {
    const k = Number(/^c(\d+)-/.exec(o.text)![1])
    let c = retry.get(k)
    if (!c) {
      c = await ChatClient.connect({ port: s.port })
      await c.login(users[k % users.length], 'pw')
      retry.set(k, c)
    }
    const r = await c.send(o.to, o.text, o.rid)
    t.equal(r.message.text, o.text)
  }
  for (const c of retry.values()) c.close()
  const after = new Map<string, number>()
  for (const u of users) for (const m of await historyOf(s.port, u)) after.set(m.text, (after.get(m.text) ?? 0) + 1)
  t.ok([...acked, ...unknown].every(o => after.get(o.text) === 1), 'after retries every send is present exactly once')

  const d = await digest(s.port)
  t.equal(await s.stop(), 0)
  s = await startServer(t, { data, args, env })
  t.equal(await digest(s.port), d, 'a clean restart keeps the digest')
  await s.stop()
}
