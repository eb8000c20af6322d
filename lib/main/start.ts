// `npm start`: a local chain of three chainchat servers, for trying things out and for
// development. It runs `node bin/server.js` three times on 127.0.0.1 (ports base, base+1,
// base+2), shows their JSON logs as readable lines, prints how to connect once a primary exists,
// restarts a member that dies, and stops all three on Ctrl-C.
//
// It never touches the data directories: each server recovers from its own, so `npm start`
// after a crash resumes where the chain left off.

import { spawn, type ChildProcess } from 'node:child_process'
import net from 'node:net'
import path from 'node:path'
import readline from 'node:readline'
import { fileURLToPath } from 'node:url'
import { parseArgs } from 'node:util'
import { UsageError, flagsOrExit } from '../config.ts'

// The project's root: two levels above lib/main/, or one above build/ when run compiled (bin/load.js).
const here = path.dirname(fileURLToPath(import.meta.url))
const root = path.basename(here) === 'build' ? path.dirname(here) : path.resolve(here, '../..')
const serverBin = path.join(root, 'bin/server.js')
const chatBin = path.join(root, 'bin/chat.js')
const host = '127.0.0.1'
const size = 3

const readyTimeoutMs = 30_000 // from spawn to the readiness line
const primaryWarnMs = 20_000 // no primary yet: say so (and keep waiting)
const settleMs = 3000 // after a primary appears, how long the banner waits for the backups
const statusTimeoutMs = 1000
const statusPollMs = 200
const restartDelayMs = 1000
const restartDelayMaxMs = 30_000
const quickExitMs = 5000 // a member that dies this soon after its start is restarted more slowly
// SIGTERM to exit; then SIGKILL. A server's own shutdown may take twice its grace period (5 s)
// to drain connections and let in-flight writes finish.
const stopTimeoutMs = 15_000
// The terminal sends Ctrl-C to the whole foreground process group, and `npm start` forwards the
// signal it got to us as well: a second signal this soon after the first is the same keypress.
const sameSignalMs = 500

export const usage = `usage: npm start [-- options]    (or: node bin/start.js [options])

Starts a local chain of three chainchat servers on ${host}, ports <base>, <base>+1 and <base>+2,
shows their logs, and restarts a member that dies. Ctrl-C stops all three.

  --base-port <n>  the first of the three ports (default 9001)
  --data <dir>     data directory: the member on port P keeps its data in <dir>/P (default ./data)
  -h, --help       show this help
`

export interface StartFlags { basePort: number, data: string, help: boolean }

export function parseFlags (argv: string[]): StartFlags {
  let values
  try {
    values = parseArgs({
      args: argv,
      strict: true,
      allowPositionals: false,
      options: {
        'base-port': { type: 'string' },
        data: { type: 'string' },
        help: { type: 'boolean', short: 'h' }
      }
    }).values
  } catch (e) {
    throw new UsageError((e as Error).message)
  }
  const text = values['base-port'] ?? '9001'
  const basePort = /^\d{1,5}$/.test(text) ? Number(text) : NaN
  if (!(basePort >= 1 && basePort <= 65536 - size)) throw new UsageError(`--base-port must be a whole number from 1 to ${65536 - size}, not ${JSON.stringify(text)}`)
  if (values.data === '') throw new UsageError('--data must not be empty')
  return { basePort, data: path.resolve(values.data ?? 'data'), help: values.help ?? false }
}

// ---- output -------------------------------------------------------------------------------------

const sgr = { reset: 0, bold: 1, dim: 2, red: 31, green: 32, yellow: 33, magenta: 35, cyan: 36 } as const
type Style = keyof typeof sgr
const memberColours: Style[] = ['cyan', 'magenta', 'green']

class Output {
  constructor (private readonly out: NodeJS.WriteStream, readonly colour: boolean) {
    out.on('error', () => { /* a closed pipe must not stop the chain */ })
  }

  paint (text: string, ...styles: Style[]): string {
    if (!this.colour || styles.length === 0 || text === '') return text
    return `\u001b[${styles.map(s => sgr[s]).join(';')}m${text}\u001b[0m`
  }

  line (text: string): void { this.out.write(text + '\n') }
}

const pad2 = (n: number): string => String(n).padStart(2, '0')
const clock = (d: Date): string => `${pad2(d.getHours())}:${pad2(d.getMinutes())}:${pad2(d.getSeconds())}`

// Fields every line has, or that only repeat what the prefix and the banner already show.
const shownElsewhere = new Set(['t', 'level', 'node', 'msg', 'listen', 'dir', 'peers'])
// Said by every member at every start, and the same each time: shown once.
const onceMessages = [/^no peer secret configured/]

// ---- the chain ---------------------------------------------------------------------------------

interface Member {
  port: number
  addr: string
  dir: string
  colour: Style
  proc: ChildProcess | null
  pid: number | null
  closed: Promise<void>
  startedAt: number
  quickExits: number // in a row
  restartTimer: NodeJS.Timeout | null
}

type Status = Record<string, unknown>

export class LocalChain {
  readonly members: Member[]
  private phase: 'starting' | 'running' | 'stopping' = 'starting'
  private stopSignalAt = 0
  private bannerShown = false
  private portTaken = false // a member said EADDRINUSE
  private readonly shownOnce = new Set<string>()
  private readonly prefixWidth: number
  private finish: (code: number) => void = () => {}
  private readonly finished = new Promise<number>(resolve => { this.finish = resolve })

  constructor (private readonly flags: StartFlags, private readonly out: Output) {
    this.members = Array.from({ length: size }, (_, k) => {
      const port = flags.basePort + k
      return { port, addr: `${host}:${port}`, dir: path.join(flags.data, String(port)), colour: memberColours[k], proc: null, pid: null, closed: Promise.resolve(), startedAt: 0, quickExits: 0, restartTimer: null }
    })
    this.prefixWidth = Math.max(...this.members.map(m => String(m.port).length))
  }

  get peers (): string { return this.members.map(m => m.addr).join(',') }

  // Start the chain; resolves with the exit code once it has been stopped.
  run (): Promise<number> {
    this.note(null, `starting three servers on ${host}, ports ${this.members.map(m => m.port).join(', ')}; data in ${shown(this.flags.data)}`)
    this.startUp().catch(e => this.fail(e as Error))
    return this.finished
  }

  private async startUp (): Promise<void> {
    try {
      await Promise.all(this.members.map(m => this.launch(m)))
    } catch (e) {
      if (this.phase !== 'stopping') this.fail(e as Error)
      return
    }
    if (this.phase !== 'starting') return
    this.phase = 'running'
    await this.waitForPrimary()
  }

  private fail (e: Error): void {
    if (this.phase === 'stopping') return
    this.phase = 'stopping'
    this.note(null, `could not start the chain: ${e.message}`, 'red', 'bold')
    if (this.portTaken) this.note(null, `(is another chain running on ports ${this.members[0].port}-${this.members[size - 1].port}? --base-port picks other ports)`)
    this.stopAll().then(() => this.finish(1), () => this.finish(1))
  }

  // SIGINT, SIGTERM, SIGHUP: stop cleanly; a second one kills at once.
  signal (name: NodeJS.Signals): void {
    if (this.phase !== 'stopping') {
      this.phase = 'stopping'
      this.stopSignalAt = Date.now()
      this.out.line('')
      this.note(null, `${name}: stopping the chain (Ctrl-C again kills at once)`, 'bold')
      this.stopAll().then(() => {
        this.note(null, `stopped; the data stays in ${shown(this.flags.data)}, and npm start resumes from it`, 'bold')
        this.finish(0)
      }, () => this.finish(1))
      return
    }
    if (Date.now() - this.stopSignalAt < sameSignalMs) return
    this.out.line('')
    this.note(null, `${name} again: killing the servers at once`, 'red', 'bold')
    this.killAll()
    process.exit(1)
  }

  // Last resort when this process exits: no server outlives it.
  killAll (): void {
    for (const m of this.members) {
      if (m.restartTimer) clearTimeout(m.restartTimer)
      m.restartTimer = null
      try { m.proc?.kill('SIGKILL') } catch { /* gone */ }
    }
  }

  // Spawn one member; resolves once it printed its readiness line, rejects if it exits first or
  // takes too long (then it is killed).
  private launch (m: Member): Promise<void> {
    const proc = spawn(process.execPath, [serverBin, '--port', String(m.port), '--peers', this.peers, '--data', m.dir], {
      stdio: ['ignore', 'pipe', 'pipe'],
      // Its own process group: Ctrl-C at the terminal reaches only us, and we stop the servers
      // in order (a server that got the terminal's SIGINT and then our SIGTERM would give up
      // its orderly shutdown).
      detached: true
    })
    m.proc = proc
    m.pid = proc.pid ?? null
    m.startedAt = Date.now()
    let ready = false
    let settle: { resolve: () => void, reject: (e: Error) => void } | null = null
    const readiness = new Promise<void>((resolve, reject) => { settle = { resolve, reject } })
    readiness.catch(() => { /* reported by whoever awaits it, or by the restart logic */ })
    const timer = setTimeout(() => {
      settle?.reject(new Error(`${m.port} was not ready within ${readyTimeoutMs / 1000} s`))
      settle = null
      proc.kill('SIGKILL')
    }, readyTimeoutMs)
    readline.createInterface({ input: proc.stdout! }).on('line', line => {
      if (ready) return
      try {
        if (JSON.parse(line).event !== 'listening') return
      } catch {
        return
      }
      ready = true
      clearTimeout(timer)
      settle?.resolve()
      settle = null
    })
    readline.createInterface({ input: proc.stderr! }).on('line', line => this.showLog(m, line))
    let markClosed = (): void => {}
    m.closed = new Promise(resolve => { markClosed = resolve })
    proc.on('error', e => {
      // Could not spawn at all; 'close' follows.
      this.note(m, `could not run ${shown(serverBin)}: ${e.message}`, 'red')
    })
    // 'close' rather than 'exit': the member's last log lines come first.
    proc.on('close', (code, signal) => {
      clearTimeout(timer)
      if (m.proc === proc) m.proc = null
      markClosed()
      const how = signal ? `killed by ${signal}` : `exit code ${code}`
      settle?.reject(new Error(`${m.port} exited before it was ready (${how}); its log is above`))
      settle = null
      if (this.phase === 'stopping') return
      if (this.phase === 'starting' && !ready) return // startUp reports it
      this.scheduleRestart(m, how)
    })
    return readiness
  }

  private scheduleRestart (m: Member, how: string): void {
    const quick = Date.now() - m.startedAt < quickExitMs
    const delay = quick ? Math.min(restartDelayMs * 2 ** m.quickExits, restartDelayMaxMs) : restartDelayMs
    m.quickExits = quick ? m.quickExits + 1 : 0
    const later = quick && m.quickExits > 1 ? ' (it keeps exiting soon after it starts)' : ''
    this.note(m, `exited unexpectedly (${how}); restarting it in ${delay / 1000} s${later}`, 'red', 'bold')
    m.restartTimer = setTimeout(() => {
      m.restartTimer = null
      if (this.phase === 'stopping') return
      this.launch(m).then(
        () => this.note(m, `restarted, pid ${m.pid}; it rejoins the chain`, 'bold'),
        () => { /* its 'close' schedules the next attempt */ }
      )
    }, delay)
  }

  // SIGTERM to every member, wait for them to exit, SIGKILL the ones that do not in time.
  private async stopAll (): Promise<void> {
    for (const m of this.members) {
      if (m.restartTimer) clearTimeout(m.restartTimer)
      m.restartTimer = null
      try { m.proc?.kill('SIGTERM') } catch { /* gone */ }
    }
    const all = Promise.all(this.members.map(m => m.closed))
    let timer: NodeJS.Timeout | undefined
    const timedOut = await Promise.race([all.then(() => false), new Promise<boolean>(resolve => { timer = setTimeout(() => resolve(true), stopTimeoutMs) })])
    clearTimeout(timer)
    if (!timedOut) return
    for (const m of this.members) {
      if (!m.proc) continue
      this.note(m, `still running ${stopTimeoutMs / 1000} s after SIGTERM; killing it`, 'yellow')
      try { m.proc.kill('SIGKILL') } catch { /* gone */ }
    }
    await all
  }

  // Poll every member's status until one is the primary, then print the banner.
  private async waitForPrimary (): Promise<void> {
    const start = Date.now()
    let primarySince = 0
    let warned = false
    while (this.phase === 'running') {
      const statuses = await Promise.all(this.members.map(m => queryStatus(m.port, statusTimeoutMs)))
      if (this.phase !== 'running') return
      const primary = statuses.find(s => s?.role === 'primary')
      if (primary) {
        primarySince ||= Date.now()
        const settled = statuses.every(s => s?.role === 'primary' || s?.role === 'backup')
        if (settled || Date.now() - primarySince >= settleMs) {
          this.banner(primary, statuses)
          return
        }
      } else {
        primarySince = 0
        if (!warned && Date.now() - start >= primaryWarnMs) {
          warned = true
          this.note(null, `no primary after ${primaryWarnMs / 1000} s; still waiting (the log above says why; Ctrl-C stops)`, 'yellow', 'bold')
        }
      }
      await new Promise(resolve => setTimeout(resolve, statusPollMs))
    }
  }

  private banner (primary: Status, statuses: Array<Status | null>): void {
    const p = this.member(String(primary.node)) ?? this.members[0]
    const rows = this.members.map((m, k) => {
      const role = String(statuses[k]?.role ?? 'not answering')
      return `    ${String(m.port).padStart(this.prefixWidth)} pid ${String(m.pid ?? '-').padEnd(7)} ${role.padEnd(9)} ${shown(m.dir)}`
    })
    const b = (text: string): string => this.out.paint(text, 'bold')
    this.out.line([
      '',
      b(`  chainchat is running: a chain of three servers, primary ${p.addr}`),
      '',
      ...rows,
      '',
      '  Talk to the primary with nc, one JSON request per line (a backup answers NOT_PRIMARY):',
      `    ${b(`nc ${host} ${p.port}`)}`,
      '    {"op":"register","user":"alice","password":"secret"}',
      '    {"op":"login","user":"alice","password":"secret"}',
      '    {"op":"send","to":"alice","text":"hello"}',
      '  Or use the interactive client, which finds the primary and follows failovers:',
      `    ${b(`node ${shown(chatBin)} --server ${this.peers}`)}`,
      '',
      `  A member that dies is restarted after ${restartDelayMs / 1000} s. Ctrl-C stops all three; the data stays in ${shown(this.flags.data)}.`,
      ''
    ].join('\n'))
    this.bannerShown = true
  }

  private member (addr: string): Member | undefined {
    return this.members.find(m => m.addr === addr)
  }

  // ---- printing ----

  private prefix (m: Member | null): string {
    const label = (m ? String(m.port) : '').padStart(this.prefixWidth)
    return m ? this.out.paint(label, m.colour) + ' | ' : label + ' | '
  }

  // A line of our own: about one member, or (m null) about the chain.
  private note (m: Member | null, text: string, ...styles: Style[]): void {
    this.out.line(`${this.prefix(m)}${this.out.paint(clock(new Date()), 'dim')} ${this.out.paint(`>>> ${text}`, ...styles)}`)
  }

  // One line of a member's stderr: a JSON log line made readable, anything else as it is.
  private showLog (m: Member, line: string): void {
    if (line.includes('EADDRINUSE')) this.portTaken = true
    let entry: Record<string, unknown> | null = null
    try {
      const j = JSON.parse(line)
      if (j !== null && typeof j === 'object' && typeof j.msg === 'string') entry = j
    } catch { /* not JSON */ }
    if (!entry) {
      if (line.trim() !== '') this.out.line(this.prefix(m) + line)
      return
    }
    const msg = String(entry.msg)
    if (onceMessages.some(re => re.test(msg))) {
      if (this.shownOnce.has(msg)) return
      this.shownOnce.add(msg)
    }
    const level = String(entry.level ?? 'info')
    const time = typeof entry.t === 'string' && !Number.isNaN(Date.parse(entry.t)) ? new Date(entry.t) : new Date()
    let stack: string | null = null
    const fields: string[] = []
    for (const [key, value] of Object.entries(entry)) {
      if (shownElsewhere.has(key) || value === null || value === undefined) continue
      if (key === 'stack' && typeof value === 'string') {
        stack = value
        continue
      }
      fields.push(`${key}=${this.formatValue(value)}`)
    }
    const styles: Style[] = level === 'error' ? ['red', 'bold'] : level === 'warn' ? ['yellow'] : level === 'debug' ? ['dim'] : []
    const head = this.out.paint(`${level.padEnd(5)} ${msg}`, ...styles)
    const tail = fields.length === 0 ? '' : ' ' + this.out.paint(fields.join(' '), ...(styles.length > 0 ? styles : ['dim' as Style]))
    this.out.line(`${this.prefix(m)}${this.out.paint(clock(time), 'dim')} ${head}${tail}`)
    if (stack) for (const s of stack.split('\n').slice(1)) this.out.line(`${this.prefix(m)}    ${this.out.paint(s.trim(), 'dim')}`)
    if (msg === 'role change' && entry.to === 'primary' && this.bannerShown && this.phase === 'running') {
      this.note(null, `${m.port} is now the primary: nc ${host} ${m.port}`, 'bold')
    }
  }

  // key=value: members' addresses shortened to their ports, text quoted when it has spaces.
  private formatValue (value: unknown): string {
    if (typeof value === 'string') {
      const s = value.replace(/\b127\.0\.0\.1:(\d{1,5})\b/g, (whole, port: string) => this.member(`${host}:${port}`) ? port : whole)
      return /^[^\s"'=]+$/.test(s) ? s : JSON.stringify(s)
    }
    if (Array.isArray(value)) {
      if (value.length > 0 && value.every(v => typeof v === 'string' || typeof v === 'number')) return value.map(v => this.formatValue(v)).join(',')
      return JSON.stringify(value)
    }
    if (typeof value === 'object') return JSON.stringify(value)
    return String(value)
  }
}

// A path as a person would type it: relative to here when it is below here.
function shown (p: string): string {
  const rel = path.relative(process.cwd(), p)
  return rel !== '' && !rel.startsWith('..') && !path.isAbsolute(rel) ? rel : p
}

// One status request on a fresh connection; null when the member does not answer in time.
function queryStatus (port: number, timeoutMs: number): Promise<Status | null> {
  return new Promise(resolve => {
    const socket = net.connect(port, host)
    let buf = ''
    let done = false
    const finish = (v: Status | null): void => {
      if (done) return
      done = true
      clearTimeout(timer)
      socket.destroy()
      resolve(v)
    }
    const timer = setTimeout(() => finish(null), timeoutMs)
    socket.setEncoding('utf8')
    socket.on('connect', () => socket.write('{"op":"status","id":"start"}\n'))
    socket.on('data', (d: string) => {
      buf += d
      const nl = buf.indexOf('\n')
      if (nl < 0) return
      try {
        const j = JSON.parse(buf.slice(0, nl))
        finish(j?.ok === true ? j : null)
      } catch {
        finish(null)
      }
    })
    socket.on('error', () => finish(null))
    socket.on('close', () => finish(null))
  })
}

// ---- the executable ---------------------------------------------------------------------------

export async function main (argv: string[]): Promise<void> {
  const flags = flagsOrExit('start', usage, () => parseFlags(argv))
  if (!flags) return
  const colour = process.stdout.isTTY === true && !process.env.NO_COLOR
  const chain = new LocalChain(flags, new Output(process.stdout, colour))
  for (const name of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) process.on(name, () => chain.signal(name))
  process.on('exit', () => chain.killAll())
  const code = await chain.run()
  process.exit(code)
}
