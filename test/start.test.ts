// `npm start` (bin/start.js) as a person runs it: a local three-server chain that prints a
// banner, keeps serving when a member is killed, restarts that member, stops cleanly on Ctrl-C
// and resumes from its data after a crash. Every wait polls with a deadline.

import t from 'tap'
import { spawn, type ChildProcess } from 'node:child_process'
import fs from 'node:fs'
import net from 'node:net'
import path from 'node:path'
import { ChatClient, type Message } from '../lib/client.ts'
import { root, tmpDir, waitFor, RawConn, type Teardown } from './helpers/spawn.ts'
import { holdFreePort, listenOn } from './helpers/chain.ts'

const startBin = path.join(root, 'bin/start.js')
const bannerTimeoutMs = 30_000

// Three consecutive free ports: a free one (below the ephemeral range, see holdFreePort), then
// the next two if they are free too; otherwise try again.
async function freeRun (): Promise<number> {
  for (let attempt = 0; attempt < 50; attempt++) {
    const first = await holdFreePort()
    const base = (first.address() as net.AddressInfo).port
    const held = [first]
    if (base + 2 <= 65535) {
      for (const p of [base + 1, base + 2]) {
        const s = await listenOn(p)
        if (!s) break
        held.push(s)
      }
    }
    for (const s of held) await new Promise(resolve => s.close(resolve))
    if (held.length === 3) return base
  }
  throw new Error('no three consecutive free ports')
}

// Gone for good: a zombie still holds its pid (and the server's data directory lock treats a
// live pid as a live holder), so wait until it has been reaped.
function alive (pid: number): boolean {
  try {
    process.kill(pid, 0)
    return true
  } catch {
    return false
  }
}

// Kill a server process by pid, but only if the pid still belongs to a chainchat server.
function killServer (pid: number): void {
  try {
    if (process.platform === 'linux' && !fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8').includes('bin/server.js')) return
    process.kill(pid, 'SIGKILL')
  } catch { /* gone */ }
}

// A running `node bin/start.js` and everything it printed.
class Start {
  readonly proc: ChildProcess
  out = ''
  err = ''
  readonly exited: Promise<{ code: number | null, signal: NodeJS.Signals | null }>
  readonly serverPids = new Set<number>() // every server pid it ever named

  constructor (t: Teardown, readonly basePort: number, readonly data: string) {
    this.proc = spawn(process.execPath, [startBin, '--base-port', String(basePort), '--data', data], { cwd: root, stdio: ['ignore', 'pipe', 'pipe'] })
    this.proc.stdout!.setEncoding('utf8').on('data', (d: string) => {
      this.out += d
      for (const m of this.out.matchAll(/(?:^ +\d+ pid |restarted, pid )(\d+)/gm)) this.serverPids.add(Number(m[1]))
    })
    this.proc.stderr!.setEncoding('utf8').on('data', (d: string) => { this.err += d })
    this.exited = new Promise(resolve => this.proc.on('exit', (code, signal) => resolve({ code, signal })))
    t.teardown(() => {
      if (this.proc.exitCode === null && this.proc.signalCode === null) this.proc.kill('SIGKILL')
      // The servers run in their own process group: they do not die with a killed start.
      for (const pid of this.serverPids) killServer(pid)
    })
  }

  get ports (): number[] { return [0, 1, 2].map(k => this.basePort + k) }
  get servers (): string[] { return this.ports.map(p => `127.0.0.1:${p}`) }

  // Wait for the banner; returns the primary's port and each member's pid.
  async banner (): Promise<{ primary: number, pids: Map<number, number> }> {
    const primary = await waitFor(async () => {
      const m = /chainchat is running: .*primary 127\.0\.0\.1:(\d+)/.exec(this.out)
      if (m) return Number(m[1])
      if (this.proc.exitCode !== null) throw new Error(`start exited (${this.proc.exitCode}):\n${this.out.slice(-3000)}\n${this.err}`)
      return null
    }, bannerTimeoutMs, `the banner; output so far:\n${this.out.slice(-3000)}`)
    const pids = new Map<number, number>()
    for (const m of this.out.matchAll(/^ +(\d+) pid (\d+) /gm)) pids.set(Number(m[1]), Number(m[2]))
    return { primary, pids }
  }
}

// Start on free ports; a port taken between the probe and the servers' bind gets another try.
async function launch (t: Teardown, data: string, basePort?: number): Promise<Start & { primary: number, pids: Map<number, number> }> {
  for (let attempt = 0; ; attempt++) {
    const start = new Start(t, basePort ?? await freeRun(), data)
    try {
      return Object.assign(start, await start.banner())
    } catch (e) {
      const collided = /EADDRINUSE/.test(start.out)
      if (!collided || basePort !== undefined || attempt >= 2) throw e
      await start.exited
    }
  }
}

async function status (port: number): Promise<Record<string, unknown> | null> {
  let c: RawConn | null = null
  try {
    c = await RawConn.open(port)
    return await c.req({ op: 'status' }, 2000)
  } catch {
    return null
  } finally {
    c?.close()
  }
}

async function client (t: Teardown, servers: string[]): Promise<ChatClient> {
  const c = await ChatClient.connect({ servers })
  t.teardown(() => c.close())
  return c
}

async function stop (t: Teardown & { equal: (a: unknown, b: unknown, m: string) => void }, start: Start): Promise<void> {
  const pids = [...start.serverPids].filter(alive)
  start.proc.kill('SIGINT')
  let timer: NodeJS.Timeout | undefined
  const exit = await Promise.race([start.exited, new Promise<null>(resolve => { timer = setTimeout(() => resolve(null), 30_000) })])
  clearTimeout(timer)
  t.equal(exit?.code, 0, 'SIGINT: start exits 0')
  await waitFor(() => pids.every(pid => !alive(pid)), 10_000, 'every server process to be gone')
}

t.test('flags: --help, and a bad flag prints the usage and exits 2', async t => {
  const run = (args: string[]): Promise<{ code: number | null, out: string, err: string }> => new Promise(resolve => {
    const p = spawn(process.execPath, [startBin, ...args], { cwd: root, stdio: ['ignore', 'pipe', 'pipe'] })
    let out = ''
    let err = ''
    p.stdout.setEncoding('utf8').on('data', (d: string) => { out += d })
    p.stderr.setEncoding('utf8').on('data', (d: string) => { err += d })
    p.on('close', code => resolve({ code, out, err }))
  })
  const help = await run(['--help'])
  t.equal(help.code, 0)
  t.match(help.out, /--base-port <n>/)
  for (const args of [['--bogus'], ['--base-port', 'x'], ['--base-port', '65535'], ['stray']]) {
    const r = await run(args)
    t.equal(r.code, 2, `${args.join(' ')} exits 2`)
    t.match(r.err, /usage: npm start/, 'and prints the usage')
  }
})

t.test('npm start: banner, serving, a killed member is restarted, Ctrl-C stops all, data survives', async t => {
  const data = tmpDir(t, 'start')
  const start = await launch(t, data)
  t.same([...start.pids.keys()].sort(), start.ports, 'the banner names each member with its pid')
  t.ok(start.ports.includes(start.primary), 'and a primary among them')
  t.match(start.out, `nc 127.0.0.1 ${start.primary}`, 'how to connect with nc')
  t.match(start.out, `--server ${start.servers.join(',')}`, 'how to connect with the CLI')
  t.match(start.out, /\d+ \| \d\d:\d\d:\d\d info {2}role change from=waiting to=primary/, 'the servers\' logs, made readable')
  t.notMatch(start.out, /"level":/, 'no raw JSON log lines')
  t.notOk(start.out.includes('\u001b['), 'no colours when stdout is not a terminal')

  const alice = await client(t, start.servers)
  const bob = await client(t, start.servers)
  await alice.register('alice', 'pw-a')
  await bob.register('bob', 'pw-b')
  await alice.login('alice', 'pw-a')
  await bob.login('bob', 'pw-b')
  const inbox: Message[] = []
  bob.on('message', (m: Message) => inbox.push(m))
  await alice.send('bob', 'before the kill')
  await waitFor(() => inbox.some(m => m.text === 'before the kill'), 10_000, 'the push to bob')

  // SIGKILL the primary: the chain keeps serving, and start brings the member back.
  const victim = start.primary
  const victimPid = start.pids.get(victim)!
  const seen = start.out.length
  process.kill(victimPid, 'SIGKILL')
  const sent = await alice.send('bob', 'after the kill')
  t.ok(sent.message.id > 0, 'a send after the kill is acknowledged')
  // Pushed if bob's client had logged in again on the new primary by then, else waiting unread.
  const got = (): boolean => inbox.some(m => m.text === 'after the kill')
  await waitFor(async () => got() || (await bob.read()).messages.some(m => m.text === 'after the kill') || got(), 10_000, 'bob to get the message sent after the kill', 200)
  const restarted = await waitFor(() => {
    const m = new RegExp(`^${victim} \\| .*>>> restarted, pid (\\d+)`, 'm').exec(start.out.slice(seen))
    return m ? Number(m[1]) : null
  }, 20_000, 'start to restart the killed member')
  t.match(start.out.slice(seen), new RegExp(`${victim} \\| .*>>> exited unexpectedly \\(killed by SIGKILL\\); restarting it in 1 s`), 'the death is reported')
  t.not(restarted, victimPid, 'a new process')
  t.ok(alive(restarted), 'that is running')
  // A write lets the rejoining member catch up and be promoted into the chain.
  await waitFor(async () => {
    await alice.send('bob', 'while it rejoins')
    const s = await status(victim)
    return s?.role === 'backup' && (s.chain as string[]).length === 3
  }, 30_000, `${victim} back in the chain as a backup`, 200)

  alice.close()
  bob.close()
  await stop(t, start)
  t.notOk(alive(restarted), 'the restarted member was stopped too')
  t.ok(fs.existsSync(path.join(data, String(victim))), 'the data stays')

  // Again, then a crash of everything (kill -9), then again: each run resumes from the data.
  const second = await launch(t, data, start.basePort)
  const c2 = await client(t, second.servers)
  await c2.login('bob', 'pw-b')
  const { messages } = await c2.history()
  t.same(messages.map(m => m.text).filter(x => x !== 'while it rejoins').reverse(), ['before the kill', 'after the kill'], 'the mailbox survived a clean stop')
  await c2.send('alice', 'before the crash')
  c2.close()
  second.proc.kill('SIGKILL')
  await second.exited
  for (const pid of second.serverPids) killServer(pid)
  await waitFor(() => [...second.serverPids].every(pid => !alive(pid)), 10_000, 'the crashed servers to be gone')

  const third = await launch(t, data, start.basePort)
  const c3 = await client(t, third.servers)
  await c3.login('alice', 'pw-a')
  t.same((await c3.history()).messages.map(m => m.text), ['before the crash'], 'the mailbox survived kill -9 of everything')
  c3.close()
  await stop(t, third)
})
