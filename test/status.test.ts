// `chainchat-status` (bin/status.js): the judging and the table as pure functions, then the
// executable against a real three-member chain, in a plain pipe and in a terminal. Every wait
// polls with a deadline.

import t from 'tap'
import { spawn } from 'node:child_process'
import path from 'node:path'
import net from 'node:net'
import { assess, collect, formatReport, formatUptime, parseFlags, probe, type Probe, type Status } from '../lib/main/status.ts'
import { UsageError } from '../lib/config.ts'
import { root, waitFor, type Teardown } from './helpers/spawn.ts'
import { Chain } from './helpers/chain.ts'

const statusBin = path.join(root, 'bin/status.js')
const runTimeoutMs = 15_000

interface Run { code: number | null, stdout: string, stderr: string }

function run (t: Teardown, args: string[]): Promise<Run> {
  return new Promise((resolve, reject) => {
    const proc = spawn(process.execPath, [statusBin, ...args], { cwd: root, stdio: ['ignore', 'pipe', 'pipe'] })
    t.teardown(() => { if (proc.exitCode === null && proc.signalCode === null) proc.kill('SIGKILL') })
    let stdout = ''
    let stderr = ''
    proc.stdout.setEncoding('utf8').on('data', (d: string) => { stdout += d })
    proc.stderr.setEncoding('utf8').on('data', (d: string) => { stderr += d })
    const timer = setTimeout(() => { proc.kill('SIGKILL'); reject(new Error(`status ${args.join(' ')} did not exit in ${runTimeoutMs} ms`)) }, runTimeoutMs)
    proc.on('exit', code => { clearTimeout(timer); resolve({ code, stdout, stderr }) })
  })
}

// The rows of the table: [member, role, ...] for each line between the header and the summary.
function rows (out: string): string[][] {
  const lines = out.split('\n')
  const start = lines.findIndex(l => l.startsWith('MEMBER'))
  const end = lines.findIndex(l => l.startsWith('chain:'))
  return lines.slice(start + 1, end).map(l => l.split(/ {2,}/))
}

// ---- pure parts ---------------------------------------------------------------------------------

const chain3 = ['h:1', 'h:2', 'h:3']
function st (node: string, fields: Partial<Status> = {}): Status {
  return { node, role: 'backup', epoch: 4, chain: chain3, learner: null, primary: 'h:1', index: 10, digest: 'aaaaaaaabbbbbbbb', clients: 0, sessions: 0, uptimeMs: 192_000, storage: 'ok', stored: 1_048_576, quota: 4 * 1_048_576, ...fields }
}
const up = (s: Status): Probe => ({ member: s.node, status: s, error: null })
const down = (member: string): Probe => ({ member, status: null, error: 'connection refused' })

t.test('uptime is short and human', async t => {
  t.equal(formatUptime(0), '0s')
  t.equal(formatUptime(45_999), '45s')
  t.equal(formatUptime(192_000), '3m12s')
  t.equal(formatUptime(2 * 3600_000 + 5 * 60_000), '2h05m')
  t.equal(formatUptime(3 * 86400_000 + 4 * 3600_000), '3d04h')
})

t.test('a healthy chain: rows in chain order, lag, digest marks, summary, no problems', async t => {
  // Given in another order, with the tail behind: lagging is not a problem.
  const r = assess([up(st('h:3', { index: 8, digest: 'cccccccc00000000' })), up(st('h:1', { role: 'primary', clients: 2 })), up(st('h:2'))])
  t.same(r.problems, [])
  t.equal(r.primary?.node, 'h:1')
  const out = formatReport(r)
  t.same(rows(out), [
    ['h:1', 'primary', '4', '10', '-', 'aaaaaaaa', '2', '3m12s', 'ok', '25%', '-', '-'],
    ['h:2', 'backup', '4', '10', '0', 'aaaaaaaa =', '0', '3m12s', 'ok', '25%', '-', '-'],
    ['h:3', 'backup', '4', '8', '2', 'cccccccc ~', '0', '3m12s', 'ok', '25%', '-', '-']
  ])
  t.match(out, /^MEMBER +ROLE +EPOCH +INDEX +LAG +DIGEST +CLIENTS +UPTIME +STORAGE +QUOTA +FULLEST MAILBOX +SYNC P99$/m)
  t.match(out, /^chain: h:1 -> h:2 -> h:3 \(epoch 4\)$/m)
  t.notMatch(out, /problem/)
  // A learner is named in the summary and listed after the chain.
  const withLearner = assess([up(st('h:4', { role: 'joining', chain: chain3, learner: 'h:4' })), up(st('h:1', { role: 'primary', learner: 'h:4' })), up(st('h:2', { learner: 'h:4' })), up(st('h:3', { learner: 'h:4' }))])
  t.same(rows(formatReport(withLearner)).map(row => row[0]), ['h:1', 'h:2', 'h:3', 'h:4'])
  t.match(formatReport(withLearner), /^chain: h:1 -> h:2 -> h:3 \(epoch 4, learner h:4\)$/m)
})

t.test('what is wrong is said', async t => {
  const unreachable = assess([up(st('h:1', { role: 'primary' })), up(st('h:2')), down('h:3')])
  t.same(unreachable.problems, ['h:3 unreachable (connection refused)'])
  t.same(rows(formatReport(unreachable))[2], ['h:3', 'unreachable', '-', '-', '-', '-', '-', '-', '-', '-', '-', '-'])
  t.match(formatReport(unreachable), /^problem: h:3 unreachable \(connection refused\)$/m)

  const diverged = assess([up(st('h:1', { role: 'primary' })), up(st('h:2', { digest: 'dddddddd00000000' })), up(st('h:3'))])
  t.same(diverged.problems, ['h:2 has a different digest than the primary at index 10'])
  t.equal(rows(formatReport(diverged))[1][5], 'dddddddd !')

  // A member still decoding what it left packed at start answers without its digest: not a
  // difference, and the table says why there is none.
  const decoding = assess([up(st('h:1', { role: 'primary' })), up(st('h:2', { digest: null })), up(st('h:3'))])
  t.same(decoding.problems, [])
  t.equal(rows(formatReport(decoding))[1][5], 'decoding')
  const primaryDecoding = assess([up(st('h:1', { role: 'primary', digest: null })), up(st('h:2')), up(st('h:3'))])
  t.same(primaryDecoding.problems, [])
  t.equal(rows(formatReport(primaryDecoding))[1][5], 'aaaaaaaa')

  const none = assess([up(st('h:1', { role: 'waiting', primary: null })), up(st('h:2', { role: 'waiting', primary: null }))])
  t.same(none.problems, ['no primary'])
  t.match(formatReport(none), /^chain: h:1 -> h:2 -> h:3 \(epoch 4, as seen by h:1\)$/m)
  t.equal(rows(formatReport(none))[0][4], '-', 'no lag without a primary')

  const two = assess([up(st('h:1', { role: 'primary' })), up(st('h:2', { role: 'primary', epoch: 5, chain: ['h:2'] }))])
  t.same(two.problems, [
    '2 primaries: h:1, h:2',
    'members disagree on the epoch: 4 (h:1); 5 (h:2)',
    'members disagree on the chain: h:1 -> h:2 -> h:3 (h:1); h:2 (h:2)'
  ])
  t.match(formatReport(two), /as seen by h:2/, 'without one primary the summary shows the highest epoch')

  const nobody = assess([down('h:1')])
  t.same(nobody.problems, ['h:1 unreachable (connection refused)', 'no member answered'])
  t.match(formatReport(nobody), /^chain: unknown \(no member answered\)$/m)

  // The quota: a member at it is a problem (the primary then refuses sends), and so are members
  // with different quotas (the next primary's applies after a failover).
  const full = assess([up(st('h:1', { role: 'primary', stored: 4 * 1_048_576 + 5 })), up(st('h:2', { stored: 4 * 1_048_576 + 5 })), up(st('h:3', { stored: 4 * 1_048_576 + 5, quota: 8 * 1_048_576 }))])
  t.same(full.problems, [
    'members disagree on the quota: 4 MiB (h:1, h:2); 8 MiB (h:3)',
    'h:1 holds as much as its quota allows (4 MiB): sends and registrations are refused',
    'h:2 holds as much as its quota allows (4 MiB)'
  ])
  t.same(rows(formatReport(full)).map(row => row[9]), ['100%', '100%', '50%'])
  const mailboxes = assess([up(st('h:1', { role: 'primary', mailboxQuota: 64 * 1_048_576 })), up(st('h:2', { mailboxQuota: 64 * 1_048_576 })), up(st('h:3', { mailboxQuota: 32 * 1_048_576 }))])
  t.same(mailboxes.problems, ['members disagree on the mailbox quota: 64 MiB (h:1, h:2); 32 MiB (h:3)'], 'so are members with different mailbox quotas')
  // The fullest mailbox, as a share of the mailbox quota: shown, not a problem (it is one
  // recipient's, and sends to others go on).
  const fullest = assess([
    up(st('h:1', { role: 'primary', mailboxQuota: 4 * 1_048_576, fullestMailbox: { user: 'ann', bytes: 1_048_576 } })),
    up(st('h:2', { mailboxQuota: 4 * 1_048_576, fullestMailbox: { user: 'bob', bytes: 4 * 1_048_576 + 1 } })),
    up(st('h:3', { mailboxQuota: 4 * 1_048_576, fullestMailbox: null }))
  ])
  t.same(fullest.problems, [])
  t.same(rows(formatReport(fullest)).map(row => row[10]), ['25% ann', '100% bob', '0%'])
  const older = assess([up(st('h:1', { role: 'primary', stored: undefined, quota: undefined }))])
  t.same(older.problems, [], 'a server that does not tell its quota is not a problem by itself')
  t.equal(rows(formatReport(older))[0][9], '-')
  t.equal(rows(formatReport(older))[0][10], '-', 'nor one that does not tell its fullest mailbox')
  t.equal(rows(formatReport(older))[0][11], '-', 'nor its log\'s appends')
  // The disk's time for an append, the 99th percentile: shown, so a slow member stands out.
  const log = (p99: number | null): Record<string, unknown> => ({ log: { appends: 5, records: 9, bytes: 900, syncMs: p99 === null ? null : { p50: p99 / 2, p99, max: p99 } } })
  const synced = assess([up(st('h:1', { role: 'primary', ...log(0.8123) })), up(st('h:2', log(37.6))), up(st('h:3', log(null)))])
  t.same(synced.problems, [])
  t.same(rows(formatReport(synced)).map(row => row[11]), ['0.81 ms', '38 ms', '-'])

  // A single server is its own primary.
  t.same(assess([up(st('h:9', { role: 'single', epoch: 0, chain: ['h:9'], primary: 'h:9' }))]).problems, [])
})

t.test('flags', async t => {
  t.same(parseFlags(['a:1,b:2', 'c:3', 'a:1']), { addrs: ['a:1', 'b:2', 'c:3'], watch: false, intervalMs: 1000, json: false, help: false })
  t.same(parseFlags(['[::1]:9001', '--watch', '--interval-ms', '250', '--json']), { addrs: ['[::1]:9001'], watch: true, intervalMs: 250, json: true, help: false })
  t.equal(parseFlags(['-h']).help, true)
  for (const bad of [[], ['--watch'], ['a'], ['a:0'], ['a:70000'], ['a:1', '--interval-ms', '0'], ['a:1', '--interval-ms', 'x'], ['a:1', '--bogus']]) {
    t.throws(() => parseFlags(bad), UsageError, bad.join(' '))
  }
})

// A server that answers every connection with `answer` (nothing when it is null).
async function fakeServer (t: Teardown, answer: (sock: net.Socket) => void): Promise<string> {
  const socks = new Set<net.Socket>()
  const server = net.createServer(sock => { socks.add(sock); sock.on('error', () => {}); answer(sock) })
  await new Promise<void>(resolve => server.listen(0, '127.0.0.1', resolve))
  t.teardown(() => new Promise(resolve => {
    server.close(resolve)
    for (const sock of socks) sock.destroy()
  }))
  return `127.0.0.1:${(server.address() as net.AddressInfo).port}`
}

t.test('a member that does not answer properly is unreachable, and says why', async t => {
  const silent = await fakeServer(t, () => {})
  const notJson = await fakeServer(t, sock => sock.end('hello\n'))
  const refusing = await fakeServer(t, sock => sock.end('{"ok":false,"id":1,"error":{"code":"INTERNAL","message":"x"}}\n'))
  const closing = await fakeServer(t, sock => sock.destroy())
  const t0 = Date.now()
  const got = await collect([silent, notJson, refusing, closing], 300)
  t.ok(Date.now() - t0 < 2000, 'asked in parallel, each with its own timeout')
  t.same(got.map(p => [p.member, p.status, p.error]), [
    [silent, null, 'no answer in 300 ms'],
    [notJson, null, 'reply is not JSON'],
    [refusing, null, 'bad reply: {"ok":false,"id":1,"error":{"code":"INTERNAL","message":"x"}}'],
    [closing, null, 'connection closed']
  ])
  // A reply in pieces is put together; the member is named as it names itself.
  const slow = await fakeServer(t, sock => {
    sock.write('{"ok":true,"id":1,"node":"h:1","role":"single",')
    setTimeout(() => sock.end('"epoch":0,"chain":["h:1"]}\n'), 50)
  })
  t.same(await probe(slow), { member: 'h:1', status: { node: 'h:1', role: 'single', epoch: 0, chain: ['h:1'] }, error: null })
})

// ---- the executable against a real chain ------------------------------------------------------

t.test('bin/status.js against a running chain', async t => {
  const chain = await Chain.create(t)
  await chain.startAll()
  const { primary } = await chain.waitConverged(3)
  t.equal(primary, 0, 'the lowest port starts as the primary')
  const [a, b, c] = chain.servers

  // In this process: one address leads to the others.
  const found = await collect([b])
  t.same(found.map(p => [p.member, p.status?.role]), [[b, 'backup'], [a, 'primary'], [c, 'backup']])
  t.same(assess(found).problems, [])

  const all = await run(t, [chain.peers])
  t.equal(all.code, 0, all.stdout + all.stderr)
  t.same(rows(all.stdout).map(r => [r[0], r[1]]), [[a, 'primary'], [b, 'backup'], [c, 'backup']])
  t.match(all.stdout, `chain: ${a} -> ${b} -> ${c} (epoch `)
  t.notMatch(all.stdout, /problem/)

  // One address is enough: the others are found in its chain.
  const one = await run(t, [b])
  t.equal(one.code, 0, one.stdout + one.stderr)
  t.same(rows(one.stdout).map(r => r[0]), [a, b, c])

  const json = await run(t, [a, '--json'])
  t.equal(json.code, 0, json.stderr)
  const parsed = JSON.parse(json.stdout)
  t.equal(parsed.ok, true)
  t.same(parsed.problems, [])
  t.same(parsed.members.map((m: Probe) => [m.member, m.status?.role]), [[a, 'primary'], [b, 'backup'], [c, 'backup']])
  t.equal(new Set(parsed.members.map((m: Probe) => m.status?.digest)).size, 1)

  const usage = await run(t, [])
  t.equal(usage.code, 2)
  t.match(usage.stderr, /usage: chainchat-status/)
  t.equal(usage.stdout, '')
  t.equal((await run(t, [a, '--nope'])).code, 2)

  await chain.kill(2)
  const failed = await waitFor(async () => {
    const r = await run(t, [chain.peers])
    return r.code === 1 && r.stdout.includes(`problem: ${c} unreachable`) ? r : null
  }, 20_000, `status to report ${c} unreachable`, 100)
  t.same(rows(failed.stdout).find(r => r[0] === c)?.[1], 'unreachable')
  t.equal(rows(failed.stdout).filter(r => r[1] === 'primary').length, 1)
  t.equal((await probe(c)).error, 'connection refused')
  const failedJson = JSON.parse((await run(t, [chain.peers, '--json'])).stdout)
  t.equal(failedJson.ok, false)
  t.match(failedJson.problems, [new RegExp(`^${c} unreachable`)])
})

t.test('--watch refreshes until Ctrl-C, in a pipe and in a terminal', async t => {
  const chain = await Chain.create(t, { n: 2 })
  await chain.startAll()
  await chain.waitConverged(2)

  // A pipe: one table per refresh, separated by a blank line; SIGINT ends it with 0.
  const proc = spawn(process.execPath, [statusBin, chain.peers, '--watch', '--interval-ms', '100'], { cwd: root, stdio: ['ignore', 'pipe', 'pipe'] })
  t.teardown(() => { if (proc.exitCode === null && proc.signalCode === null) proc.kill('SIGKILL') })
  let out = ''
  proc.stdout.setEncoding('utf8').on('data', (d: string) => { out += d })
  const exited = new Promise<number | null>(resolve => proc.on('exit', code => resolve(code)))
  await waitFor(() => (out.match(/^chain: /gm) ?? []).length >= 3, 10_000, 'three refreshes')
  proc.kill('SIGINT')
  t.equal(await exited, 0)
  t.notOk(out.includes('\u001b'), 'no escapes in a pipe')
  t.match(out, /chain: .*\n\n\d\d:\d\d:\d\d {2}every 100 ms/)

  // A terminal (under `script`): the screen is cleared before each refresh; Ctrl-C exits 0.
  // `exec`: a shell that stayed as the parent (dash does) would take the Ctrl-C's SIGINT itself.
  const command = 'exec ' + [process.execPath, statusBin, chain.peers, '--watch', '--interval-ms', '100'].map(x => `'${x}'`).join(' ')
  const term = spawn('script', ['-qfec', command, '/dev/null'], { cwd: root, stdio: ['pipe', 'pipe', 'pipe'] })
  t.teardown(() => { if (term.exitCode === null && term.signalCode === null) term.kill('SIGKILL') })
  let screen = ''
  term.stdout.setEncoding('utf8').on('data', (d: string) => { screen += d })
  const termExited = new Promise<number | null>(resolve => term.on('exit', code => resolve(code)))
  await waitFor(() => screen.split('\u001b[H\u001b[2J').length >= 3, 10_000, 'two cleared refreshes')
  term.stdin.write('\u0003')
  t.equal(await termExited, 0)
})
