// Spawning real server processes for tests: wait for the JSON readiness line raced against an
// early exit, with a deadline; every spawned process is killed when the test ends, pass or fail.

import { spawn, type ChildProcess } from 'node:child_process'
import net from 'node:net'
import fs from 'node:fs'
import os from 'node:os'
import path from 'node:path'
import { fileURLToPath } from 'node:url'

export const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..')

const live = new Set<ChildProcess>()
process.on('exit', () => { for (const c of live) try { c.kill('SIGKILL') } catch { /* gone */ } })

export interface Teardown { teardown: (fn: () => unknown) => void }

export interface ServerProc {
  proc: ChildProcess
  pid: number
  port: number
  host: string
  data: string
  stderr: () => string
  exited: Promise<{ code: number | null, signal: NodeJS.Signals | null }>
  kill: (signal?: NodeJS.Signals) => void
  // SIGTERM, then wait for the exit; resolves with the exit code.
  stop: () => Promise<number | null>
}

export function tmpDir (t: Teardown, tag: string): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), `chainchat-${tag}-`))
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }))
  return dir
}

export interface SpawnOptions {
  port?: number
  host?: string
  data: string
  args?: string[]
  env?: Record<string, string>
  readyTimeoutMs?: number
  // What node runs in place of bin/server.js (a script and any arguments before the server's).
  script?: string[]
}

// Start `node bin/server.js` and resolve once it printed its readiness line.
export async function startServer (t: Teardown, opts: SpawnOptions): Promise<ServerProc> {
  const host = opts.host ?? '127.0.0.1'
  const argv = [...(opts.script ?? [path.join(root, 'bin/server.js')]), '--port', String(opts.port ?? 0), '--host', host, '--data', opts.data, ...(opts.args ?? [])]
  const proc = spawn(process.execPath, argv, { cwd: root, stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, ...opts.env } })
  live.add(proc)
  // A clean stop at the end lets the server write its coverage; a stuck one is killed.
  t.teardown(async () => {
    if (proc.exitCode !== null || proc.signalCode !== null) return
    proc.kill('SIGTERM')
    const timer = setTimeout(() => proc.kill('SIGKILL'), 5000)
    await new Promise(resolve => proc.once('exit', resolve))
    clearTimeout(timer)
  })
  let err = ''
  proc.stderr!.setEncoding('utf8').on('data', (d: string) => { err = (err + d).slice(-50_000) })
  const exited = new Promise<{ code: number | null, signal: NodeJS.Signals | null }>(resolve => {
    proc.on('exit', (code, signal) => { live.delete(proc); resolve({ code, signal }) })
  })
  const port = await new Promise<number>((resolve, reject) => {
    let out = ''
    const timer = setTimeout(() => reject(new Error(`server not ready in ${opts.readyTimeoutMs ?? 20_000} ms; stderr: ${err.slice(-2000)}`)), opts.readyTimeoutMs ?? 20_000)
    proc.stdout!.setEncoding('utf8').on('data', (d: string) => {
      out += d
      const nl = out.indexOf('\n')
      if (nl < 0) return
      try {
        const j = JSON.parse(out.slice(0, nl))
        if (j.event === 'listening') {
          clearTimeout(timer)
          resolve(j.port)
        }
      } catch { /* not the readiness line */ }
    })
    exited.then(({ code, signal }) => {
      clearTimeout(timer)
      reject(new Error(`server exited before it was ready (${code ?? signal}); stderr: ${err.slice(-2000)}`))
    })
  })
  return {
    proc,
    pid: proc.pid!,
    port,
    host,
    data: opts.data,
    stderr: () => err,
    exited,
    kill: (signal = 'SIGKILL') => { try { proc.kill(signal) } catch { /* gone */ } },
    stop: async () => {
      proc.kill('SIGTERM')
      return (await exited).code
    }
  }
}

// Run the server executable to completion (for flag errors and refusals to start).
export function runServer (args: string[], timeoutMs = 20_000): Promise<{ code: number | null, stdout: string, stderr: string }> {
  return new Promise((resolve, reject) => {
    const proc = spawn(process.execPath, [path.join(root, 'bin/server.js'), ...args], { cwd: root, stdio: ['ignore', 'pipe', 'pipe'] })
    live.add(proc)
    let stdout = ''
    let stderr = ''
    proc.stdout.setEncoding('utf8').on('data', (d: string) => { stdout += d })
    proc.stderr.setEncoding('utf8').on('data', (d: string) => { stderr += d })
    const timer = setTimeout(() => { proc.kill('SIGKILL'); reject(new Error(`server ${args.join(' ')} did not exit in ${timeoutMs} ms`)) }, timeoutMs)
    proc.on('exit', code => { clearTimeout(timer); live.delete(proc); resolve({ code, stdout, stderr }) })
  })
}

export interface WireLine {
  ok?: boolean
  id?: unknown
  event?: string
  error?: { code: string, message: string, [k: string]: unknown }
  [field: string]: unknown
}

// Send `text` to `to` over c, one send at a time, until one is refused or `max` went through:
// how many went through, and the refusal (null if none came). With ridPrefix, each send carries
// the rid ridPrefix followed by its number.
export async function sendUntilRefused (c: RawConn, to: string, text: string, ridPrefix?: string, max = 1000): Promise<{ sent: number, refused: WireLine | null }> {
  let sent = 0
  while (sent < max) {
    const r = await c.req(ridPrefix === undefined ? { op: 'send', to, text } : { op: 'send', to, text, rid: `${ridPrefix}${sent}` })
    if (r.ok !== true) return { sent, refused: r }
    sent++
  }
  return { sent, refused: null }
}

// A raw line connection, exactly what `nc` sends: replies matched by id, events collected.
export class RawConn {
  private buf = ''
  private next = 1
  private readonly waiting = new Map<unknown, { resolve: (v: WireLine) => void, reject: (e: Error) => void }>()
  readonly events: WireLine[] = []
  readonly lines: WireLine[] = []
  closed = false
  private readonly closeWaiters: Array<() => void> = []

  static async open (port: number, host = '127.0.0.1'): Promise<RawConn> {
    const sock = net.connect(port, host)
    await new Promise<void>((resolve, reject) => {
      sock.once('connect', () => resolve())
      sock.once('error', reject)
    })
    return new RawConn(sock)
  }

  constructor (readonly sock: net.Socket) {
    sock.setEncoding('utf8')
    sock.on('data', (d: string) => {
      this.buf += d
      let i
      while ((i = this.buf.indexOf('\n')) >= 0) {
        const line = this.buf.slice(0, i)
        this.buf = this.buf.slice(i + 1)
        if (!line.trim()) continue
        const j = JSON.parse(line)
        this.lines.push(j)
        if (j.event !== undefined && j.ok === undefined) { this.events.push(j); continue }
        const w = this.waiting.get(j.id)
        if (w) { this.waiting.delete(j.id); w.resolve(j) }
      }
    })
    sock.on('error', () => {})
    sock.on('close', () => {
      this.closed = true
      for (const w of this.closeWaiters.splice(0)) w()
      for (const w of this.waiting.values()) w.reject(new Error('connection closed'))
      this.waiting.clear()
    })
  }

  // Send a request and wait for the reply with its id.
  req (obj: Record<string, unknown>, timeoutMs = 10_000): Promise<WireLine> {
    const id = obj.id ?? `r${this.next++}`
    return this.send(JSON.stringify({ ...obj, id }) + '\n', id, timeoutMs)
  }

  // Send raw text and wait for the reply carrying `id` (undefined for replies without an id).
  send (text: string, id: unknown, timeoutMs = 10_000): Promise<WireLine> {
    return new Promise((resolve, reject) => {
      if (this.closed) {
        reject(new Error('connection closed'))
        return
      }
      const timer = setTimeout(() => { this.waiting.delete(id); reject(new Error(`no reply to ${text.slice(0, 80)} in ${timeoutMs} ms`)) }, timeoutMs)
      this.waiting.set(id, { resolve: v => { clearTimeout(timer); resolve(v) }, reject: e => { clearTimeout(timer); reject(e) } })
      this.sock.write(text)
    })
  }

  async waitEvent (pred: (e: WireLine) => boolean, timeoutMs = 5000): Promise<WireLine> {
    return await waitFor(() => {
      const i = this.events.findIndex(pred)
      return i >= 0 ? this.events.splice(i, 1)[0] : undefined
    }, timeoutMs, 'event')
  }

  waitClosed (timeoutMs = 5000): Promise<void> {
    if (this.closed) return Promise.resolve()
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error('connection still open')), timeoutMs)
      this.closeWaiters.push(() => { clearTimeout(timer); resolve() })
    })
  }

  close (): void { this.sock.destroy() }
}

// Poll fn until it returns a truthy value, or fail after the deadline.
// A client that sends requests and never reads the replies: pings with 100-byte ids, up to
// 40 MB, written until its own socket stops taking more. Destroyed at teardown at the latest.
export async function floodWithoutReading (t: Teardown, port: number, host = '127.0.0.1'): Promise<{ sock: net.Socket, written: number }> {
  const sock = net.connect(port, host)
  sock.on('error', () => {})
  t.teardown(() => { sock.destroy() })
  await new Promise(resolve => sock.once('connect', resolve))
  sock.pause()
  const ping = Buffer.from(JSON.stringify({ op: 'ping', id: 'x'.repeat(100) }) + '\n')
  const chunk = Buffer.concat(new Array(1000).fill(ping))
  let written = 0
  while (written < 40_000_000 && sock.write(chunk)) written += chunk.length
  return { sock, written }
}

export async function waitFor<T> (fn: () => T | Promise<T>, timeoutMs: number, what: string, everyMs = 20): Promise<NonNullable<T>> {
  const end = Date.now() + timeoutMs
  let last: unknown
  for (;;) {
    try {
      const v = await fn()
      if (v) return v as NonNullable<T>
    } catch (e) { last = e }
    if (Date.now() > end) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}${last ? ': ' + String(last) : ''}`)
    await new Promise(resolve => setTimeout(resolve, everyMs))
  }
}
