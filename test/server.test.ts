// One real server process, driven over raw sockets exactly as `nc` would.

import t, { type Test } from 'tap'
import fs from 'node:fs'
import net from 'node:net'
import path from 'node:path'
import { ChatState } from '../lib/state.ts'
import { limits } from '../lib/limits.ts'
import { segmentName } from '../lib/storage/log.ts'
import { records, batch } from './helpers/storage.ts'
import type { LogRecord } from '../lib/records.ts'
import { startServer, runServer, tmpDir, RawConn, sendUntilRefused, waitFor, floodWithoutReading, root, type Teardown } from './helpers/spawn.ts'

// Opens connections to port, each closed when the test ends.
function opener (t: Teardown, port: number): () => Promise<RawConn> {
  const conns: RawConn[] = []
  t.teardown(() => { for (const c of conns) c.close() })
  return async () => {
    const c = await RawConn.open(port)
    conns.push(c)
    return c
  }
}

// A small heap filled the way the two tests below fill it: ann and 32 recipients registered,
// ann logged in on c, then 3,996 ASCII characters and an emoji sent 64 at a time, spread over the
// recipients, until a send is refused with STORE_FULL or maxSends went through. V8 holds such a
// text with two bytes per character, twice what the quota counts; a mailbox may hold only a
// sixteenth of the default quota, so the sends go to more mailboxes than it takes to fill it.
// Returns the recipients, the text, the sends applied to each, whether STORE_FULL came, and the
// first reply that was neither (null if none).
async function floodUntilFull (t: Test, c: RawConn, maxSends = 40_000): Promise<{ to: string[], text: string, sent: Map<string, number>, total: number, full: boolean, unexpected: unknown }> {
  t.match(await c.req({ op: 'register', user: 'ann', password: 'pa' }), { ok: true })
  const to = Array.from({ length: 32 }, (_, k) => `r${k}`) // two of every 64 sends each
  for (const u of to) t.match(await c.req({ op: 'register', user: u, password: 'pb' }), { ok: true })
  t.match(await c.req({ op: 'login', user: 'ann', password: 'pa' }), { ok: true })
  const text = 'x'.repeat(3996) + '\u{1f600}'
  const sent = new Map<string, number>(to.map(u => [u, 0]))
  let total = 0
  let full = false
  let unexpected: unknown = null
  while (!full && unexpected === null && total < maxSends) {
    const replies = await Promise.all(Array.from({ length: 64 }, async (_, k) => c.req({ op: 'send', to: to[k % to.length], text })))
    replies.forEach((r, k) => {
      if (r.ok === true) {
        sent.set(to[k % to.length], sent.get(to[k % to.length])! + 1)
        total++
      } else if (r.error?.code === 'STORE_FULL') full = true
      else unexpected ??= r
    })
  }
  return { to, text, sent, total, full, unexpected }
}

t.test('the executable: readiness line, flags, signals', async t => {
  const data = tmpDir(t, 'exe')
  const s = await startServer(t, { data })
  t.ok(s.port > 0, 'port 0 picks a free port and the readiness line names it')

  const bad = await runServer(['--port', '1', '--bogus'])
  t.equal(bad.code, 2, 'an unknown flag exits 2')
  t.match(bad.stderr, /usage: chainchat-server/, 'and prints the usage')
  const noPort = await runServer([])
  t.equal(noPort.code, 2, 'a missing --port exits 2')
  const badPort = await runServer(['--port', 'x1'])
  t.equal(badPort.code, 2)
  const help = await runServer(['--help'])
  t.equal(help.code, 0)
  t.match(help.stdout, /--snapshot-every-records/)
  t.match(help.stdout, /--segment-bytes/)
  for (const v of ['100', '2147483648', 'x']) {
    const badSegment = await runServer(['--port', '0', '--segment-bytes', v])
    t.equal(badSegment.code, 2, `--segment-bytes ${v} exits 2`)
    t.match(badSegment.stderr, /--segment-bytes/, 'naming the flag')
  }
  t.match(help.stdout, /--snapshot-growth-percent <n>.*\(default 50; 0: no such bound\)/s)
  for (const v of ['-1', '1.5', 'x']) {
    const badGrowth = await runServer(['--port', '0', '--snapshot-growth-percent', v])
    t.equal(badGrowth.code, 2, `--snapshot-growth-percent ${v} exits 2`)
    t.match(badGrowth.stderr, /--snapshot-growth-percent/, 'naming the flag')
  }
  t.match(help.stdout, /--quota-mb <n> .*\(default \d+: a sixth of/s, 'the default quota is told')
  t.match(help.stdout, /--mailbox-quota-mb <n> .*\(default \d+: a sixteenth of the default quota\)/s, 'and the mailbox quota')
  for (const v of ['0', '-5', '1.5']) {
    const badQuota = await runServer(['--port', '0', '--quota-mb', v])
    t.equal(badQuota.code, 2, `--quota-mb ${v} exits 2`)
    t.match(badQuota.stderr, /--quota-mb/, 'naming the flag')
  }

  const second = await runServer(['--port', '0', '--data', data])
  t.equal(second.code, 1, 'a second server on the same data directory exits non-zero')
  t.match(second.stderr, /in use by another server \(pid \d+\)/, 'with a clear error')
  if (fs.existsSync('/proc/self')) {
    // mkdir there fails with ENOENT though /proc exists; Node's recursive mkdir would spin forever.
    const unmakeable = await runServer(['--port', '0', '--data', '/proc/chainchat-no-such/data'])
    t.equal(unmakeable.code, 1, 'a data directory that cannot be made exits 1')
    t.match(unmakeable.stderr, /ENOENT.*mkdir/, 'saying why')
  }

  const c = await RawConn.open(s.port)
  t.same(await c.req({ op: 'ping', id: 1 }), { ok: true, id: 1 })
  t.equal(await s.stop(), 0, 'SIGTERM exits 0')
  await c.waitClosed()
  t.ok(fs.existsSync(data), 'data directory kept')
  t.notOk(fs.existsSync(`${data}/LOCK`), 'the lock is released')

  const again = await startServer(t, { data, args: [] })
  t.ok(again.port > 0, 'the directory can be used again after a clean stop')
  again.kill('SIGKILL')
  await again.exited
  const afterKill = await startServer(t, { data })
  t.ok(afterKill.port > 0, 'a lock left by a killed server is taken over at once')
  afterKill.kill('SIGINT')
  t.equal((await afterKill.exited).code, 0, 'SIGINT also stops cleanly')

  t.equal(fs.readFileSync(`${data}/FORMAT`, 'utf8'), 'chainchat data format 3\n', 'the directory is marked with its format')
  fs.writeFileSync(`${data}/FORMAT`, 'chainchat data format 4\n')
  const newer = await runServer(['--port', '0', '--data', data])
  t.equal(newer.code, 1, 'a directory in a newer format: exits non-zero')
  t.match(newer.stderr, /format 4, and this server knows formats up to 3: it was written by a newer version; refusing to start/)
  t.notMatch(newer.stderr, /\bat .*\.ts:\d+/, 'no stack trace')
})

t.test('an account has at most sessionsPerUserMax sessions: the next login is refused until one logs out', async t => {
  const s = await startServer(t, { data: tmpDir(t, 'sessions') })
  const open = opener(t, s.port)
  const first = await open()
  t.match(await first.req({ op: 'register', user: 'bob', password: 'pb' }), { ok: true })
  t.match(await first.req({ op: 'register', user: 'ann', password: 'pa' }), { ok: true })
  const bobs = await Promise.all(Array.from({ length: limits.sessionsPerUserMax }, async () => open()))
  const logins = await Promise.all(bobs.map(async c => c.req({ op: 'login', user: 'bob', password: 'pb' })))
  t.equal(logins.filter(r => r.ok === true).length, limits.sessionsPerUserMax, `${limits.sessionsPerUserMax} sessions of bob`)
  const extra = await open()
  t.match(await extra.req({ op: 'login', user: 'ann', password: 'pa' }), { ok: true })
  t.match(await extra.req({ op: 'login', user: 'bob', password: 'pb' }), { ok: false, error: { code: 'TOO_MANY_REQUESTS', message: /bob has 100 sessions open/ } }, 'one more is refused')
  t.match(await extra.req({ op: 'send', to: 'bob', text: 'still ann' }), { ok: true, delivered: true }, 'the refused connection is still logged in as before, and every session of bob is pushed to')
  t.match(await bobs[0].req({ op: 'login', user: 'bob', password: 'pb' }), { ok: true }, 'a session of bob logging in again is not one more')
  t.match(await bobs[0].req({ op: 'logout' }), { ok: true })
  t.match(await extra.req({ op: 'login', user: 'bob', password: 'pb' }), { ok: true, user: 'bob' }, 'after a logout, the login goes through')
})

t.test('the quota: sends and registrations refused once the state holds as much, everything else served, room made by deleting', async t => {
  const data = tmpDir(t, 'quota')
  const quota = 1024 * 1024
  let s = await startServer(t, { data, args: ['--quota-mb', '1', '--snapshot-every-records', '100'] })
  let c = await RawConn.open(s.port)
  t.teardown(() => c.close())
  t.match(await c.req({ op: 'register', user: 'ann', password: 'pa' }), { ok: true })
  t.match(await c.req({ op: 'register', user: 'bob', password: 'pb' }), { ok: true })
  t.match(await c.req({ op: 'login', user: 'ann', password: 'pa' }), { ok: true })
  const text = 'x'.repeat(4000)
  // Each send counts twice: in bob's mailbox, and in its stored reply (it has a rid).
  const each = 2 * (4000 + 3 + limits.messageOverheadBytes)
  const { sent, refused } = await sendUntilRefused(c, 'bob', text, 'q')
  t.match(refused, { ok: false, error: { code: 'STORE_FULL', quota } }, 'a send is refused once the quota is reached')
  t.ok(sent >= Math.floor((quota - 2 * limits.accountBytes) / each) && sent <= Math.ceil((quota - 2 * limits.accountBytes) / each), `${sent} sends of 4,000 bytes fit in 1 MiB as counted`)
  const full = await c.req({ op: 'status' })
  t.match(full, { ok: true, quota }, 'status tells the quota')
  t.ok((full.stored as number) >= quota, `and what the state holds: ${String(full.stored)}`)
  t.match(await c.req({ op: 'register', user: 'cy', password: 'pc' }), { ok: false, error: { code: 'STORE_FULL' } }, 'so is a registration')
  t.match(await c.req({ op: 'send', to: 'bob', text, rid: 'q0' }), { ok: true, message: { id: 3, text } }, 'a retry of an applied send still gets its stored reply')
  t.match(await c.req({ op: 'history', limit: 1 }), { ok: true }, 'queries are served')
  const bob = await RawConn.open(s.port)
  t.teardown(() => bob.close())
  t.match(await bob.req({ op: 'login', user: 'bob', password: 'pb' }), { ok: true, unread: sent }, 'a login is served')
  const read = await bob.req({ op: 'read', limit: 1000 })
  t.equal((read.messages as unknown[]).length, sent, 'so is a read')
  const ids = (read.messages as Array<{ id: number }>).map(m => m.id)
  t.match(await bob.req({ op: 'delete_messages', ids }), { ok: true, deleted: sent }, 'and a deletion')
  const after = await c.req({ op: 'status' })
  t.ok((after.stored as number) < quota, `the deletion made room: ${String(after.stored)}`)
  t.match(await c.req({ op: 'send', to: 'bob', text: 'there is room again' }), { ok: true }, 'sends go through again')
  // The count is a function of the state: the same after a restart (from a snapshot and the
  // log after it), before and after the packed messages are decoded.
  const before = await c.req({ op: 'status' })
  c.close()
  bob.close()
  await s.stop()
  s = await startServer(t, { data, args: ['--quota-mb', '1'] })
  c = await RawConn.open(s.port)
  t.match(await c.req({ op: 'status', digest: false }), { ok: true, stored: before.stored, index: before.index }, 'the same count after a restart, at once')
  t.match(await c.req({ op: 'status' }), { ok: true, stored: before.stored, digest: before.digest }, 'and once everything is decoded')
})

t.test('the mailbox quota: sends to a full mailbox refused, to others served; the recipient makes room by deleting', async t => {
  const s = await startServer(t, { data: tmpDir(t, 'mailbox-quota'), args: ['--mailbox-quota-mb', '1'] })
  const quota = 1024 * 1024
  const c = await RawConn.open(s.port)
  t.teardown(() => c.close())
  for (const u of ['ann', 'bob', 'cy']) t.match(await c.req({ op: 'register', user: u, password: 'pw' }), { ok: true })
  t.match(await c.req({ op: 'login', user: 'ann', password: 'pw' }), { ok: true })
  const text = 'x'.repeat(4000)
  const each = 4000 + 3 + limits.messageOverheadBytes // in bob's mailbox, as the quota counts it
  const { sent, refused } = await sendUntilRefused(c, 'BOB', text, 'm')
  t.match(refused, { ok: false, error: { code: 'MAILBOX_FULL', to: 'bob', quota } }, 'a send to bob is refused once his mailbox holds 1 MiB')
  t.equal(sent, Math.ceil(quota / each), `${sent} sends of 4,000 bytes fit`)
  t.match(await c.req({ op: 'status' }), { ok: true, mailboxQuota: quota, fullestMailbox: { user: 'bob', bytes: sent * each } }, 'status tells the mailbox quota, and the fullest mailbox')
  t.match(await c.req({ op: 'send', to: 'cy', text }), { ok: true }, 'a send to another mailbox goes through')
  t.match(await c.req({ op: 'send', to: 'bob', text, rid: 'm0' }), { ok: true, message: { to: 'bob' } }, 'a retry of an applied send to bob still gets its stored reply')
  const bob = await RawConn.open(s.port)
  t.teardown(() => bob.close())
  t.match(await bob.req({ op: 'login', user: 'bob', password: 'pw' }), { ok: true, unread: sent })
  const read = await bob.req({ op: 'read', limit: 10 })
  t.match(await c.req({ op: 'send', to: 'bob', text }), { ok: false, error: { code: 'MAILBOX_FULL' } }, 'reading alone makes no room')
  t.match(await bob.req({ op: 'delete_messages', ids: (read.messages as Array<{ id: number }>).map(m => m.id) }), { ok: true, deleted: 10 })
  t.match(await c.req({ op: 'send', to: 'bob', text: 'there is room again' }), { ok: true }, 'a deletion does')
  t.match(await c.req({ op: 'status' }), { fullestMailbox: { user: 'bob', bytes: (sent - 10) * each + 19 + 3 + limits.messageOverheadBytes } }, 'and the fullest mailbox shows it')
  const bad = await runServer(['--port', '0', '--mailbox-quota-mb', '0'])
  t.equal(bad.code, 2, '--mailbox-quota-mb 0 exits 2')
})

t.test('status tells the log\'s appends since the start: their records, bytes and times', async t => {
  const data = tmpDir(t, 'append-stats')
  let s = await startServer(t, { data })
  let c = await RawConn.open(s.port)
  t.match(await c.req({ op: 'status' }), { ok: true, log: { appends: 0, records: 0, bytes: 0, syncMs: null } }, 'nothing appended yet')
  for (const u of ['ann', 'bob']) t.match(await c.req({ op: 'register', user: u, password: 'pw' }), { ok: true })
  t.match(await c.req({ op: 'login', user: 'ann', password: 'pw' }), { ok: true })
  // 40 sends in one write: the server batches them into fewer appends.
  const replies = await Promise.all(Array.from({ length: 40 }, (_, k) => c.req({ op: 'send', to: 'bob', text: `m${k}` })))
  t.ok(replies.every(r => r.ok === true), 'every send applied')
  t.match(await c.req({ op: 'users' }), { ok: true }, 'a query appends nothing')
  const st = await c.req({ op: 'status' }) as { log: { appends: number, records: number, bytes: number, syncMs: { p50: number, p99: number, max: number } } }
  t.equal(st.log.records, 42, 'two registrations and 40 sends')
  t.ok(st.log.appends >= 3 && st.log.appends < 42, `in fewer appends than records: ${st.log.appends}`)
  const segment = path.join(data, segmentName(1))
  t.ok(st.log.bytes > 42 * 30 && st.log.bytes <= fs.statSync(segment).size, `the bytes of the records: ${st.log.bytes}`)
  t.ok(st.log.syncMs.p50 >= 0 && st.log.syncMs.p50 <= st.log.syncMs.p99 && st.log.syncMs.p99 <= st.log.syncMs.max, `times in order: ${JSON.stringify(st.log.syncMs)}`)
  c.close()
  t.equal(await s.stop(), 0)
  s = await startServer(t, { data })
  c = await RawConn.open(s.port)
  t.teardown(() => c.close())
  t.match(await c.req({ op: 'status' }), { ok: true, index: 42, log: { appends: 0, records: 0, syncMs: null } }, 'counted since the start: a restart begins again')
})

t.test('the default quota keeps a flood of texts held two bytes per character from filling a small heap', async t => {
  // 3,996 ASCII characters and an emoji: V8 holds the text with two bytes per character, twice
  // what the quota counts. With a third of the heap limit as the default this server aborted.
  const s = await startServer(t, { data: tmpDir(t, 'quota-heap'), script: ['--max-old-space-size=96', path.join(root, 'bin/server.js')] })
  const c = await RawConn.open(s.port)
  t.teardown(() => c.close())
  const { quota } = await c.req({ op: 'status' })
  t.ok(typeof quota === 'number' && quota > 20 * 1048576 && quota < 48 * 1048576, `a sixth of the heap limit: ${String(quota)} bytes`)
  const { total, full, unexpected } = await floodUntilFull(t, c)
  t.equal(unexpected, null, 'no reply but ok or STORE_FULL')
  t.ok(full, `STORE_FULL after ${total} sends of about 8 KiB of heap each`)
  t.match(await c.req({ op: 'ping' }), { ok: true }, 'the server is still up')
  t.equal(s.proc.exitCode, null, 'and did not exit')
})

t.test('clients that ask for big replies and never read are disconnected once their output together passes its bound', async t => {
  // What piles up for a client waits in the heap; each is bounded (8 MiB), but 30 of them
  // together aborted a server with a heap limit of 112 MiB before there was a bound on the sum.
  // One mailbox holds the 900 messages: beyond what it may hold by default with this heap.
  const s = await startServer(t, { data: tmpDir(t, 'outbound'), args: ['--mailbox-quota-mb', '8'], script: ['--max-old-space-size=64', path.join(root, 'bin/server.js')] })
  const open = opener(t, s.port)
  const ann = await open()
  t.match(await ann.req({ op: 'register', user: 'ann', password: 'pa' }), { ok: true })
  t.match(await ann.req({ op: 'login', user: 'ann', password: 'pa' }), { ok: true })
  const text = 'z'.repeat(4000)
  for (let k = 0; k < 900; k += 100) {
    const replies = await Promise.all(Array.from({ length: 100 }, async () => ann.req({ op: 'send', to: 'ann', text })))
    t.ok(replies.every(r => r.ok === true), `sends ${k + 1} to ${k + 100} applied`)
  }
  await Promise.all(Array.from({ length: 30 }, async () => {
    const c = await open()
    t.match(await c.req({ op: 'login', user: 'ann', password: 'pa' }), { ok: true })
    c.sock.pause() // never reads again
    for (let j = 0; j < 3; j++) c.sock.write(JSON.stringify({ op: 'history', limit: 900 }) + '\n') // 3.7 MB each
  }))
  const line = await waitFor(() => s.stderr().split('\n').find(l => l.includes('passed its bound')), 20_000, 'the warning')
  t.match(JSON.parse(line), { level: 'warn', max: Number }, 'the server says it disconnected clients')
  const fresh = await open()
  t.match(await fresh.req({ op: 'login', user: 'ann', password: 'pa' }), { ok: true }, 'the server is up')
  // The stalled clients do not read, so they do not see the close: the server counts them.
  const { clients } = await fresh.req({ op: 'status' })
  t.ok(typeof clients === 'number' && clients <= 12, `most of the 30 stalled clients disconnected: ${String(clients)} connections left`)
  const h = await fresh.req({ op: 'history', limit: 900 })
  t.equal((h.messages as unknown[]).length, 900, 'and a client that reads gets a big reply')
  t.equal(s.proc.exitCode, null)
})

t.test('clients that each send most of a line and never end it are disconnected once their unfinished lines together pass a bound', async t => {
  // split2 holds an unfinished line until its newline comes. Each is bounded by the line limit,
  // but 1,500 of 60 KiB each aborted a server with a heap limit of 112 MiB before there was a
  // bound on the sum.
  const s = await startServer(t, { data: tmpDir(t, 'partial'), script: ['--max-old-space-size=64', path.join(root, 'bin/server.js')] })
  const socks: net.Socket[] = []
  t.teardown(() => { for (const sock of socks) sock.destroy() })
  const part = '{"op":"ping","pad":"' + 'a'.repeat(60 * 1024)
  let closed = 0
  for (let k = 0; k < 1500; k++) {
    const sock = net.connect(s.port, '127.0.0.1')
    sock.on('error', () => {})
    sock.on('close', () => { closed++ })
    socks.push(sock)
    await new Promise(resolve => sock.once('connect', resolve))
    sock.write(part)
  }
  const line = await waitFor(() => s.stderr().split('\n').find(l => l.includes('unfinished lines passed their bound')), 20_000, 'the warning')
  t.match(JSON.parse(line), { level: 'warn', max: Number }, 'the server says it disconnected clients')
  await waitFor(() => closed >= 1000 ? true : undefined, 20_000, 'most of them disconnected')
  t.pass(`${closed} of 1,500 disconnected`)
  const c = await RawConn.open(s.port)
  t.teardown(() => c.close())
  t.match(await c.req({ op: 'ping' }), { ok: true }, 'the server is up')
  t.match(await c.req({ op: 'ping', pad: 'b'.repeat(60 * 1024) }), { ok: true }, 'and a line as long, once whole, is served')
  t.equal(s.proc.exitCode, null)
})

t.test('the quota, the bound on output and the bound on unfinished lines, all reached at once in a small heap', async t => {
  // Each bound is a share of the heap limit, and each is tested alone above. Here all three are
  // reached together: a full store, held two bytes per character; 30 clients asking for their
  // whole mailbox again and again and never reading; 300 unfinished lines of 60 KiB. The server
  // must stay up and keep every send it acknowledged.
  const s = await startServer(t, { data: tmpDir(t, 'bounds'), script: ['--max-old-space-size=96', path.join(root, 'bin/server.js')] })
  const open = opener(t, s.port)
  const ann = await open()
  const { to, text, sent, total, full, unexpected } = await floodUntilFull(t, ann)
  t.equal(unexpected, null, 'no reply but ok or STORE_FULL')
  t.ok(full, `STORE_FULL after ${total} sends`)

  // Now all at once: readers that stall, unfinished lines, and sends still being refused.
  const socks: net.Socket[] = []
  t.teardown(() => { for (const sock of socks) sock.destroy() })
  const stalled = Promise.all(to.slice(0, 30).map(async u => {
    const c = await open()
    t.match(await c.req({ op: 'login', user: u, password: 'pb' }), { ok: true })
    c.sock.pause() // never reads again
    // Each asks for its whole mailbox (about 0.8 MB) ten times: more than the kernel's socket
    // buffers take, less than one connection may hold.
    for (let j = 0; j < 10; j++) c.sock.write(JSON.stringify({ op: 'history', limit: limits.historyLimitMax }) + '\n')
  }))
  const part = '{"op":"ping","pad":"' + 'a'.repeat(60 * 1024)
  const partial = (async () => {
    for (let k = 0; k < 300; k++) {
      const sock = net.connect(s.port, '127.0.0.1')
      sock.on('error', () => {})
      socks.push(sock)
      await new Promise(resolve => sock.once('connect', resolve))
      sock.write(part)
    }
  })()
  const refused = (async () => {
    for (let k = 0; k < 20; k++) {
      const r = await ann.req({ op: 'send', to: to[k % to.length], text })
      if (r.ok === true || !['STORE_FULL', 'MAILBOX_FULL'].includes(r.error?.code as string)) return r
    }
    return null
  })()
  await Promise.all([stalled, partial])
  t.equal(await refused, null, 'sends went on being refused while the store was full')
  const warned = (what: string): Promise<string> => waitFor(() => s.stderr().split('\n').find(l => l.includes(what)), 20_000, what)
  t.match(JSON.parse(await warned('passed its bound')), { level: 'warn' }, 'stalled readers were disconnected')
  t.match(JSON.parse(await warned('unfinished lines passed their bound')), { level: 'warn' }, 'unfinished lines were cut off')

  // Still up, and every acknowledged send is there, once each.
  const check = await open()
  t.match(await check.req({ op: 'ping' }), { ok: true }, 'the server is up')
  for (const u of to) {
    t.match(await check.req({ op: 'login', user: u, password: 'pb' }), { ok: true })
    const h = await check.req({ op: 'history', limit: limits.historyLimitMax })
    const ids = (h.messages as Array<{ id: number }>).map(m => m.id)
    if (ids.length !== sent.get(u) || new Set(ids).size !== ids.length) t.fail(`${u}: ${ids.length} messages, ${sent.get(u)!} acknowledged`)
  }
  t.pass(`all ${total} acknowledged sends present once each in 32 mailboxes`)
  t.equal(s.proc.exitCode, null, 'and it did not exit')
})

t.test('a restart replaying a log of over 16 MiB: checksums on a second thread, messages left packed, the same state', async t => {
  const data = tmpDir(t, 'replay')
  const n = 200_000
  const rs = records(1, n) // the storage tests' history: sends, reads, marks, deletions, a deleted account
  const log = path.join(data, segmentName(1))
  fs.writeFileSync(log, batch(rs).frames)
  t.ok(fs.statSync(log).size >= limits.parallelChecksumBytes, `${fs.statSync(log).size} bytes`)
  const expected = new ChatState()
  for (const r of rs) expected.apply(r)
  const s = await startServer(t, { data, args: ['--snapshot-every-records', String(Number.MAX_SAFE_INTEGER)] })
  const rec = JSON.parse(await waitFor(() => s.stderr().split('\n').find(l => l.includes('"recovered"')), 10_000, 'the recovered line'))
  t.match(rec, { replayed: n, checksums: 'parallel' }, 'the checksums were checked on the second thread')
  t.ok(rec.packedMailboxes > 0, 'messages were left packed')
  const c = await RawConn.open(s.port)
  t.teardown(() => c.close())
  t.match(await c.req({ op: 'status' }), { ok: true, index: n, digest: expected.digest() }, 'the state applying the records builds')
  t.notMatch(s.stderr(), /recovering again/)
})

t.test('a snapshot due right after a replay is written once the packed messages are decoded, without another write', async t => {
  const data = tmpDir(t, 'replay-snap')
  const rs: LogRecord[] = [
    { op: 'register', user: 'ann', salt: 's', hash: 'h', i: 1, e: 0, ts: 1 },
    { op: 'register', user: 'bob', salt: 's', hash: 'h', i: 2, e: 0, ts: 2 }
  ]
  for (let i = 3; i <= 300_000; i++) rs.push({ op: 'send', from: 'ann', to: 'bob', text: `message ${i}`, i, e: 0, ts: i })
  fs.writeFileSync(path.join(data, segmentName(1)), batch(rs).frames)
  const s = await startServer(t, { data, args: ['--snapshot-every-records', '1'] })
  const rec = JSON.parse(await waitFor(() => s.stderr().split('\n').find(l => l.includes('"recovered"')), 10_000, 'the recovered line'))
  t.equal(rec.packedMailboxes, 1, 'bob\'s 299,998 messages left packed')
  const c = await RawConn.open(s.port)
  t.teardown(() => c.close())
  // One write: the snapshot is due (300,000 records since none), and waits for the decoding.
  t.match(await c.req({ op: 'register', user: 'cy', password: 'pc' }), { ok: true })
  const line = await waitFor(() => s.stderr().split('\n').find(l => l.includes('"snapshot written"')), 20_000, 'the snapshot written line')
  t.match(JSON.parse(line), { index: 300_001 }, 'the snapshot covers the write')
})

t.test('a restart from a snapshot: mailboxes decoded in the background, the same messages served', async t => {
  const data = tmpDir(t, 'deferred')
  const args = ['--snapshot-every-records', '50']
  let s = await startServer(t, { data, args })
  let a = await RawConn.open(s.port)
  await a.req({ op: 'register', user: 'alice', password: 'pa' })
  await a.req({ op: 'register', user: 'bob', password: 'pb' })
  const sendAs = async (from: string, password: string, texts: string[]): Promise<void> => {
    await a.req({ op: 'login', user: from, password })
    for (const text of texts) t.equal((await a.req({ op: 'send', to: 'bob', text })).ok, true)
    await a.req({ op: 'logout' })
  }
  const texts = Array.from({ length: 120 }, (_, k) => `m${k}`)
  await sendAs('alice', 'pa', texts.slice(0, 5))
  // Bob reads before the last snapshot, so that the log after it holds only sends: his mailbox
  // is then still packed when the server is ready (a read replayed would decode it).
  await a.req({ op: 'login', user: 'bob', password: 'pb' })
  t.equal(((await a.req({ op: 'read', limit: 5 })).messages as unknown[]).length, 5)
  await a.req({ op: 'logout' })
  await sendAs('alice', 'pa', texts.slice(5))
  const digest = (await a.req({ op: 'status' })).digest
  a.close()
  t.equal(await s.stop(), 0)
  t.ok(fs.readdirSync(data).some(f => f.endsWith('.snap')), 'a snapshot was written')

  s = await startServer(t, { data, args })
  const first = await RawConn.open(s.port)
  t.equal((await first.req({ op: 'status' })).digest, digest, 'the same digest, known at once')
  first.close()
  const line = await waitFor(() => s.stderr().split('\n').find(l => l.includes('"mailboxes decoded"')), 10_000, 'the mailboxes decoded line')
  t.match(JSON.parse(line), { level: 'info', msg: 'mailboxes decoded', mailboxes: 1 }, 'bob\'s mailbox was packed in the snapshot, and decoded after the start')
  a = await RawConn.open(s.port)
  t.teardown(() => a.close())
  t.match(await a.req({ op: 'login', user: 'bob', password: 'pb' }), { ok: true, unread: 115 })
  const h = await a.req({ op: 'history', limit: 3 })
  t.same((h.messages as Array<{ text: string }>).map(m => m.text), ['m119', 'm118', 'm117'])
  const r = await a.req({ op: 'read', limit: 2 })
  t.same((r.messages as Array<{ text: string }>).map(m => m.text), ['m5', 'm6'], 'the read marks survived')
  t.notMatch(s.stderr(), /snapshot digest mismatch/)
})

t.test('the whole feature list over a raw socket', async t => {
  const s = await startServer(t, { data: tmpDir(t, 'features') })
  const a = await RawConn.open(s.port)
  const b = await RawConn.open(s.port)
  t.teardown(() => { a.close(); b.close() })

  t.same(await a.req({ op: 'register', user: 'Alice', password: 'pa' }), { ok: true, id: 'r1' })
  t.equal((await a.req({ op: 'register', user: 'alice', password: 'x' })).error?.code, 'USER_EXISTS')
  t.same(await a.req({ op: 'register', user: 'bob', password: 'pb', rid: 'reg-bob' }), { ok: true, id: 'r3' })
  t.same(await a.req({ op: 'register', user: 'bob', password: 'pb', rid: 'reg-bob' }), { ok: true, id: 'r4' }, 'a retried register gets its original ok')
  t.equal((await a.req({ op: 'login', user: 'nobody', password: 'x' })).error?.code, 'AUTH_FAILED', 'unknown user: AUTH_FAILED')
  const login = await a.req({ op: 'login', user: 'ALICE', password: 'pa' })
  t.same(login, { ok: true, id: 'r6', user: 'Alice', unread: 0 }, 'login in any case, name as registered')

  // offline then online delivery
  const s1 = await a.req({ op: 'send', to: 'bob', text: 'one' })
  t.equal(s1.delivered, false)
  const msg = s1.message as { id: number, ts: number }
  t.ok(Number.isInteger(msg.id) && msg.ts > 0, 'server-assigned id and time')
  t.same(await b.req({ op: 'login', user: 'bob', password: 'pb' }), { ok: true, id: 'r1', user: 'bob', unread: 1 }, 'unread count at login')
  const live = await a.req({ op: 'send', to: 'bob', text: 'two' })
  t.equal(live.delivered, true)
  const ev = await b.waitEvent(e => e.event === 'message')
  t.same(ev, { event: 'message', message: live.message }, 'push carries the message')
  const read = await b.req({ op: 'read' })
  t.same((read.messages as Array<{ text: string }>).map(m => m.text), ['one'], 'the pushed message counts as read')
  t.equal(read.remaining, 0)

  // history paging
  for (let k = 0; k < 5; k++) await a.req({ op: 'send', to: 'bob', text: `p${k}` })
  const h1 = await b.req({ op: 'history', limit: 3 })
  const page1 = h1.messages as Array<{ id: number, text: string }>
  t.same(page1.map(m => m.text), ['p4', 'p3', 'p2'])
  const h2 = await b.req({ op: 'history', limit: 10, before: page1[2].id })
  t.same((h2.messages as Array<{ text: string }>).map(m => m.text), ['p1', 'p0', 'two', 'one'])

  // users
  const u = await b.req({ op: 'users', pattern: '*', limit: 1, offset: 1 })
  t.same(u, { ok: true, id: u.id, users: ['bob'], total: 2 })

  // a message to oneself
  const self = await a.req({ op: 'send', to: 'alice', text: 'note to self' })
  t.equal(self.ok, true)

  // status
  const st = await a.req({ op: 'status' })
  t.match(st, { ok: true, node: `127.0.0.1:${s.port}`, role: 'single', chain: [`127.0.0.1:${s.port}`], primary: `127.0.0.1:${s.port}`, storage: 'ok' })
  t.match(st.digest, /^[0-9a-f]{16}$/)
  t.equal(st.clients, 2)
  t.equal(st.sessions, 2)

  // logout
  t.same(await b.req({ op: 'logout' }), { ok: true, id: 'r6' })
  t.equal((await b.req({ op: 'history' })).error?.code, 'NOT_LOGGED_IN')
  t.equal((await b.req({ op: 'logout' })).error?.code, 'NOT_LOGGED_IN')
  const off = await a.req({ op: 'send', to: 'bob', text: 'after logout' })
  t.equal(off.delivered, false, 'no push to a logged-out connection')
})

t.test('the bad-input table leaves the connection and the data intact', async t => {
  const s = await startServer(t, { data: tmpDir(t, 'badinput') })
  const c = await RawConn.open(s.port)
  t.teardown(() => c.close())
  await c.req({ op: 'register', user: 'u', password: 'p' })
  await c.req({ op: 'login', user: 'u', password: 'p' })
  const before = (await c.req({ op: 'status' })).digest
  const table: Array<[string, string | undefined, string]> = [
    ['{"op":"send","to":', undefined, 'BAD_JSON'],
    ['{"op":"send","id":1,"to":"u","text":7}', '1', 'BAD_REQUEST'],
    ['{"op":"send","id":2,"to":"no one","text":"x"}', '2', 'BAD_REQUEST'],
    ['{"op":"send","id":3,"to":"ghost","text":"x"}', '3', 'NO_SUCH_USER'],
    ['{"op":"read","id":4,"limit":"all"}', '4', 'BAD_REQUEST'],
    ['{"op":"delete_messages","id":5,"ids":[{"a":1}]}', '5', 'BAD_REQUEST'],
    ['{"op":"nope","id":6}', '6', 'UNKNOWN_OP'],
    ['{"op":"constructor","id":7}', '7', 'UNKNOWN_OP'],
    ['{"op":"__proto__","id":8}', '8', 'UNKNOWN_OP'],
    ['{"id":9}', '9', 'BAD_REQUEST'],
    ['["op","ping"]', undefined, 'BAD_REQUEST'],
    ['42', undefined, 'BAD_REQUEST'],
    ['\u0000\u0001\u0002', undefined, 'BAD_JSON'],
    ['{"op":"register","id":10,"user":"evil","password":"p","__proto__":{"ok":true}}', '10', 'OK'],
    ['{"op":"users","id":11,"pattern":"(a+)+$"}', '11', 'BAD_REQUEST'],
    ['{"op":"ping","id":12,"deep":' + '['.repeat(5000) + ']'.repeat(5000) + '}', '12', 'OK']
  ]
  for (const [line, id, code] of table) {
    const r = await c.send(line + '\n', id === undefined ? undefined : Number(id))
    t.equal(r.ok ? 'OK' : (r.error as { code: string }).code, code, line.slice(0, 60))
    if (code === 'BAD_REQUEST' && r.error) t.match((r.error as { message: string }).message, /^[a-z_]+: /, 'the message names the field')
  }
  t.equal((await c.req({ op: 'ping' })).ok, true, 'still usable')
  await c.send('\n\r\n   \n', undefined, 0).catch(() => 'no reply to blank lines')
  t.same(await c.req({ op: 'ping', id: 'after-blank' }), { ok: true, id: 'after-blank' }, 'blank lines are ignored')
  // state changed only by the one valid register in the table
  const after = await c.req({ op: 'users' })
  t.same(after.users, ['evil', 'u'])
  t.not((await c.req({ op: 'status' })).digest, before)
})

t.test('a users pattern made to backtrack is answered at once; other clients are not held up', async t => {
  // `users` needs no login, and anyone can register a name of 32 a's. Matched as a regular
  // expression, the first pattern below took minutes against it, with the whole server waiting.
  const s = await startServer(t, { data: tmpDir(t, 'glob') })
  const c = await RawConn.open(s.port)
  for (const user of ['a'.repeat(32), 'a'.repeat(31) + 'b']) t.equal((await c.req({ op: 'register', user, password: 'p' })).ok, true)
  const other = await RawConn.open(s.port)
  const started = Date.now()
  const slow = c.req({ op: 'users', pattern: '*a'.repeat(15) + '*b' })
  const ping = await other.req({ op: 'ping', id: 'meanwhile' })
  t.same(ping, { ok: true, id: 'meanwhile' }, 'another client is answered')
  t.same((await slow).users, ['a'.repeat(31) + 'b'])
  const longest = await c.req({ op: 'users', pattern: '*a'.repeat(127) + '*' })
  t.same([longest.users, longest.total], [[], 0], 'a pattern with more letters than a name holds matches none')
  t.ok(Date.now() - started < 5000, `answered in ${Date.now() - started} ms`)
  await s.stop()
})

t.test('a burst of logins does not hold up writes', async t => {
  // Password hashes share libuv's thread pool with the log's fdatasync. Before their number was
  // bounded, 60 logins in flight made a round of concurrent sends wait for all of them.
  const s = await startServer(t, { data: tmpDir(t, 'logins') })
  const setup = await RawConn.open(s.port)
  for (const user of ['ann', 'ben']) t.equal((await setup.req({ op: 'register', user, password: 'pw' })).ok, true)
  const senders = await Promise.all(Array.from({ length: 16 }, async () => {
    const c = await RawConn.open(s.port)
    t.equal((await c.req({ op: 'login', user: 'ann', password: 'pw' })).ok, true)
    return c
  }))
  const guessers = await Promise.all(Array.from({ length: 60 }, () => RawConn.open(s.port)))
  let answered = 0
  const logins = guessers.map(c => c.req({ op: 'login', user: 'ben', password: 'wrong' }, 60_000).then(r => {
    answered++
    return r
  }))
  // A round of sends at once: written together, so synced in the thread pool.
  const sent = await Promise.all(senders.map((c, k) => c.req({ op: 'send', to: 'ben', text: `m${k}` })))
  t.ok(sent.every(r => r.ok === true), 'every send acknowledged')
  t.ok(answered < 30, `the sends were answered while ${60 - answered} of 60 logins still waited`)
  t.ok((await Promise.all(logins)).every(r => (r.error as { code?: string } | undefined)?.code === 'AUTH_FAILED'), 'and every login is answered in the end')
  for (const c of [setup, ...senders, ...guessers]) c.close()
  await s.stop()
})

t.test('an over-long line: LINE_TOO_LONG after earlier replies, then close', async t => {
  const s = await startServer(t, { data: tmpDir(t, 'long'), args: ['--line-bytes-max', '2048'] })
  const c = await RawConn.open(s.port)
  const longLine = JSON.stringify({ op: 'ping', id: 'big', pad: 'z'.repeat(3000) })
  c.sock.write(JSON.stringify({ op: 'ping', id: 'first' }) + '\n' + longLine + '\n')
  await c.waitClosed()
  t.same(c.lines.map(l => (l as { id?: string }).id ?? (l as { error: { code: string } }).error.code), ['first', 'LINE_TOO_LONG'])
  // multi-byte characters count as bytes, and a line split across many writes is still caught
  const d = await RawConn.open(s.port)
  const wide = JSON.stringify({ op: 'ping', pad: 'é'.repeat(1100) }) // under 2048 chars, over 2048 bytes
  for (let k = 0; k < wide.length; k += 100) d.sock.write(wide.slice(k, k + 100))
  d.sock.write('\n')
  await d.waitClosed()
  t.equal((d.lines[0] as { error: { code: string } }).error.code, 'LINE_TOO_LONG')
  // an endless line without a newline is cut off too, without buffering it all
  const e = await RawConn.open(s.port)
  e.sock.write('x'.repeat(100_000))
  await e.waitClosed()
  t.equal((e.lines[0] as { error: { code: string } }).error.code, 'LINE_TOO_LONG')
  const ok = await RawConn.open(s.port)
  t.equal((await ok.req({ op: 'ping' })).ok, true, 'the server is fine')
  ok.close()
})

t.test('pipelined requests on one connection are answered in order', async t => {
  const s = await startServer(t, { data: tmpDir(t, 'pipeline') })
  const c = await RawConn.open(s.port)
  t.teardown(() => c.close())
  await c.req({ op: 'register', user: 'p', password: 'p' })
  await c.req({ op: 'register', user: 'q', password: 'q' })
  let batch = JSON.stringify({ op: 'login', id: 0, user: 'p', password: 'p' }) + '\n'
  for (let k = 1; k <= 200; k++) batch += JSON.stringify(k % 50 === 0 ? { op: 'history', id: k, limit: 1 } : { op: 'send', id: k, to: 'p', text: `n${k}` }) + '\n'
  const last = c.send(batch, 200)
  await last
  t.equal(c.events.length, 199 - 3, 'sending to oneself pushes to oneself')
  const ids = c.lines.filter(l => l.ok !== undefined).slice(2).map(l => (l as { id: number }).id)
  t.same(ids, Array.from({ length: 201 }, (_, k) => k), 'replies in request order')
  const h = c.lines.find(l => (l as { id: number }).id === 50) as { messages: Array<{ text: string }> }
  t.equal(h.messages[0].text, 'n49', 'a query sees the writes sent before it on its connection')
})

t.test('thousands of requests in one write, writes, queries and bad lines mixed: every reply, in order', async t => {
  // Deeper than the per-connection limit of requests in flight, so reading pauses and resumes
  // while the connection's queue of unanswered requests never empties.
  const s = await startServer(t, { data: tmpDir(t, 'deep') })
  const c = await RawConn.open(s.port)
  t.teardown(() => c.close())
  await c.req({ op: 'register', user: 'deep', password: 'p' })
  await c.req({ op: 'register', user: 'sink', password: 'p' })
  await c.req({ op: 'login', user: 'deep', password: 'p' })
  const n = 5000
  let batch = ''
  for (let k = 0; k < n; k++) {
    if (k % 997 === 500) batch += '{"op": "send", "id": ' + k + ', "to": \n' // not JSON: answered in its place, without an id
    else batch += JSON.stringify(k % 3 === 2 ? { op: 'ping', id: k } : { op: 'send', id: k, to: 'sink', text: `d${k}` }) + '\n'
  }
  const before = c.lines.length
  c.sock.write(batch)
  await waitFor(() => c.lines.length - before >= n, 60_000, 'every reply')
  const replies = c.lines.slice(before) as Array<{ ok: boolean, id?: number, error?: { code: string } }>
  const expected = Array.from({ length: n }, (_, k) => k % 997 === 500 ? 'BAD_JSON' : k)
  t.same(replies.map(r => r.ok ? r.id : r.error?.code), expected, 'one reply per line, in order')
  const sends = expected.filter(x => typeof x === 'number' && x % 3 !== 2).length
  const sink = await RawConn.open(s.port)
  t.teardown(() => sink.close())
  await sink.req({ op: 'login', user: 'sink', password: 'p' })
  t.equal((await sink.req({ op: 'read', limit: 1 }) as { remaining: number }).remaining, sends - 1, 'every send applied once')
})

t.test('a client that never reads: bounded buffers, others still served', async t => {
  const s = await startServer(t, { data: tmpDir(t, 'slow') })
  const setup = await RawConn.open(s.port)
  await setup.req({ op: 'register', user: 'slow', password: 'p' })
  await setup.req({ op: 'register', user: 'fast', password: 'p' })
  await setup.req({ op: 'login', user: 'fast', password: 'p' })

  // 1: requests without reading the replies. The server stops reading this connection once its
  // replies back up; it must not buffer the 40 MB of requests.
  const { sock } = await floodWithoutReading(t, s.port)
  const started = Date.now()
  t.same(await setup.req({ op: 'ping', id: 'meanwhile' }), { ok: true, id: 'meanwhile' })
  t.ok(Date.now() - started < 1000, 'another client is served promptly')
  const rssKb = Number(/VmRSS:\s+(\d+)/.exec(fs.readFileSync(`/proc/${s.pid}/status`, 'utf8'))![1])
  t.ok(rssKb < 300_000, `server memory stays bounded (${rssKb} kB)`)
  sock.destroy()

  // 2: pushes to a logged-in client that never reads: past the outbound bound it is cut off,
  // and the pushes it never took stay unread.
  const slow = net.connect(s.port, '127.0.0.1')
  await new Promise(resolve => slow.once('connect', resolve))
  slow.write(JSON.stringify({ op: 'login', user: 'slow', password: 'p' }) + '\n')
  slow.pause()
  await waitFor(async () => (await setup.req({ op: 'status' })).sessions === 2, 5000, 'slow to log in')
  const text = 'y'.repeat(4000)
  let sent = 0
  for (; sent < 4000; sent++) {
    const r = await setup.req({ op: 'send', to: 'slow', text })
    t.equal(r.ok, true)
    if ((await setup.req({ op: 'status' })).sessions === 1) break
  }
  t.ok(sent < 4000, `the non-reading client was disconnected after ${sent} pushes`)
  slow.destroy()
  const again = await RawConn.open(s.port)
  const login = await again.req({ op: 'login', user: 'slow', password: 'p' })
  t.ok((login.unread as number) > 0, `pushes it never took stay unread (${login.unread as number})`)
  again.close()
  setup.close()
})
