// A chain of real server processes on fixed ports, with kill, stop, restart and status checks.

import fs from 'node:fs'
import net from 'node:net'
import path from 'node:path'
import { startServer, tmpDir, waitFor, RawConn, type ServerProc, type Teardown, type WireLine } from './spawn.ts'

// Where a free port is looked for: below the system's ephemeral range when there is room. The
// kernel hands out ports from that range to every listen on port 0 and every outgoing
// connection, so a test running alongside could take a member's port between a stop and the
// restart on the same port; below it, only a fixed choice like ours can.
function portRange (): [number, number] {
  let ephemeralFrom = 32768
  try {
    ephemeralFrom = Number(fs.readFileSync('/proc/sys/net/ipv4/ip_local_port_range', 'utf8').trim().split(/\s+/)[0]) || ephemeralFrom
  } catch { /* not Linux: the usual default */ }
  return ephemeralFrom - 3 > 10_000 ? [10_000, ephemeralFrom - 3] : [0, 0]
}

// A listener on `port` (0: any), or null if it is taken.
export function listenOn (port: number, host = '127.0.0.1'): Promise<net.Server | null> {
  return new Promise(resolve => {
    const s = net.createServer()
    s.once('error', () => resolve(null))
    s.listen(port, host, () => resolve(s))
  })
}

// A port that was free a moment ago, from portRange(), held open until the caller closes it.
export async function holdFreePort (host = '127.0.0.1'): Promise<net.Server> {
  const [lo, hi] = portRange()
  for (let attempt = 0; attempt < 100; attempt++) {
    const s = await listenOn(hi > lo ? lo + Math.floor(Math.random() * (hi - lo)) : 0, host)
    if (s) return s
  }
  throw new Error('no free port')
}

// n distinct free ports, sorted.
export async function freePorts (n: number, host = '127.0.0.1'): Promise<number[]> {
  const servers: net.Server[] = []
  while (servers.length < n) servers.push(await holdFreePort(host))
  const ports = servers.map(s => (s.address() as net.AddressInfo).port)
  for (const s of servers) await new Promise(resolve => s.close(resolve))
  return ports.sort((a, b) => a - b)
}

export interface Member {
  addr: string
  host: string
  port: number
  data: string
  proc: ServerProc | null
}

export interface ChainOptions {
  hosts?: string[] // one per member; default all 127.0.0.1
  n?: number
  args?: string[]
  env?: Record<string, string>
}

export class Chain {
  readonly members: Member[]
  constructor (private readonly t: Teardown, members: Member[], private readonly args: string[], private readonly env: Record<string, string>) {
    this.members = members
  }

  static async create (t: Teardown, opts: ChainOptions = {}): Promise<Chain> {
    const n = opts.n ?? 3
    const hosts = opts.hosts ?? new Array(n).fill('127.0.0.1')
    const members: Member[] = []
    const base = tmpDir(t, 'chain')
    for (let k = 0; k < n; k++) {
      // Each call frees its port again before the next: the same one can come back.
      let port: number
      do [port] = await freePorts(1, hosts[k])
      while (members.some(m => m.host === hosts[k] && m.port === port))
      members.push({ addr: `${hosts[k]}:${port}`, host: hosts[k], port, data: path.join(base, `m${k}`), proc: null })
    }
    // The initial order is by port: make member 0 the lowest so tests can name positions.
    members.sort((a, b) => a.port - b.port)
    const chain = new Chain(t, members, ['--heartbeat-ms', '50', '--failure-timeout-ms', '500', ...(opts.args ?? [])], opts.env ?? {})
    return chain
  }

  get peers (): string { return this.members.map(m => m.addr).join(',') }
  get servers (): string[] { return this.members.map(m => m.addr) }

  async start (k: number, extra: string[] = [], env: Record<string, string> = {}): Promise<Member> {
    const m = this.members[k]
    m.proc = await startServer(this.t, { port: m.port, host: m.host, data: m.data, args: ['--peers', this.peers, ...this.args, ...extra], env: { ...this.env, ...env } })
    return m
  }

  async startAll (): Promise<void> {
    await Promise.all(this.members.map((_, k) => this.start(k)))
  }

  async kill (k: number, signal: NodeJS.Signals = 'SIGKILL'): Promise<void> {
    const p = this.members[k].proc
    if (!p) return
    p.kill(signal)
    await p.exited
    this.members[k].proc = null
  }

  // After the primary at `old` was stopped: wait until another member is the primary, and
  // return its position.
  async newPrimary (old: number, timeoutMs = 15_000): Promise<number> {
    return await waitFor(async () => {
      for (let k = 0; k < this.members.length; k++) if (k !== old && (await this.status(k))?.role === 'primary') return k
      return undefined
    }, timeoutMs, 'a new primary')
  }

  member (addr: string): number {
    return this.members.findIndex(m => m.addr === addr)
  }

  async status (k: number): Promise<WireLine | null> {
    const m = this.members[k]
    if (!m.proc) return null
    let c: RawConn | null = null
    try {
      c = await RawConn.open(m.port, m.host)
      return await c.req({ op: 'status' }, 2000)
    } catch {
      return null
    } finally {
      c?.close()
    }
  }

  async statuses (): Promise<Array<WireLine | null>> {
    return await Promise.all(this.members.map((_, k) => this.status(k)))
  }

  // Wait until the running members form one chain of `size` with a primary, all at the same
  // epoch, all with the same digest and index. Returns the primary's position.
  async waitConverged (size: number, timeoutMs = 20_000): Promise<{ primary: number, digest: string, epoch: number }> {
    return await waitFor(async () => {
      const all = (await this.statuses()).filter((s): s is WireLine => s !== null)
      if (all.length !== size) return null
      const primaries = all.filter(s => s.role === 'primary')
      if (primaries.length !== 1) return null
      const p = primaries[0]
      if ((p.chain as string[]).length !== size || p.learner !== null) return null
      const ok = all.every(s => s.epoch === p.epoch && s.digest === p.digest && s.index === p.index && (s.role === 'primary' || s.role === 'backup'))
      return ok ? { primary: this.member(p.node as string), digest: p.digest as string, epoch: p.epoch as number } : null
    }, timeoutMs, `a converged chain of ${size}`, 100)
  }
}
