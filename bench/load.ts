// Closed-loop send load for bench.ts. A share of the benchmark's clients runs here: each one is
// its own ChatClient connection logged in as its own user, and sends to its recipient
// back-to-back, awaiting every reply before the next request. Latency is measured per
// acknowledged send with process.hrtime.bigint().
//
// This module runs either in the bench's main thread (--workers 0) or in a worker thread, where
// it talks to the main thread over parentPort:
//   worker -> main  { type: 'ready' }                     all clients connected and logged in
//   main -> worker  { type: 'go', t0 }                    t0: hrtime.bigint() as a string
//   worker -> main  { type: 'done', result }              result.latUs is transferred, not copied
//   worker -> main  { type: 'error', message }            setup failed; the worker then exits
// hrtime.bigint() reads CLOCK_MONOTONIC, which is shared by every thread of the process, so
// all workers measure the same warm-up and measurement window.

import { parentPort, workerData, isMainThread } from 'node:worker_threads'
import { ChatClient } from '../lib/client.ts'

export interface Pair { user: string, to: string }

export interface LoadSpec {
  kind: 'chainchat-load'
  port: number // a single server
  servers?: string[] // or, given, a chain: host:port of every member (the library's failover client)
  password: string
  pairs: Pair[]
  warmupMs: number
  durationMs: number
  requestTimeoutMs: number
}

export interface LoadResult {
  latUs: Float64Array // latency in microseconds of every send acknowledged inside the window
  errors: number // sends that failed (error reply, timeout or lost connection) inside the window
  firstError: string | null
}

export interface LoggedIn {
  clients: Array<{ client: ChatClient, to: string, user: string, gone: () => boolean }>
  close: () => void
}

// Connect and log in every client of this share; on any failure close what was opened.
export async function connectAll (spec: LoadSpec): Promise<LoggedIn> {
  const opened: ChatClient[] = []
  const close = (): void => { for (const c of opened) c.close() }
  try {
    // At most 16 logins at a time: each is a scrypt on the server's thread pool, and 64 at once
    // on a busy machine can outlast requestTimeoutMs. This is set-up, before the clock starts.
    const clients: LoggedIn['clients'] = new Array(spec.pairs.length)
    let next = 0
    let failing = false
    const one = async (): Promise<void> => {
      while (next < spec.pairs.length && !failing) {
        const k = next++
        const p = spec.pairs[k]
        const target = spec.servers === undefined ? { port: spec.port } : { servers: spec.servers }
        const client = await ChatClient.connect({ ...target, connectTimeoutMs: 10_000, requestTimeoutMs: spec.requestTimeoutMs })
        opened.push(client)
        // 'close' is the client giving up for good: the connection dropped (single server), or
        // no primary was found in time (failover client), or close(). A failover client is
        // briefly `closed` (no socket) while it reconnects, so that property is not the test.
        let gone = false
        client.once('close', () => { gone = true })
        await client.login(p.user, spec.password).catch((e: unknown) => { failing = true; throw e })
        clients[k] = { client, to: p.to, user: p.user, gone: () => gone }
      }
    }
    const settled = await Promise.allSettled(Array.from({ length: Math.min(16, spec.pairs.length) }, one))
    const failed = settled.find((r): r is PromiseRejectedResult => r.status === 'rejected')
    if (failed !== undefined) throw failed.reason
    return { clients, close }
  } catch (e) {
    close()
    throw e
  }
}

// Run the closed loops. Sends that start before the end of the warm-up or finish after the end of
// the window are not counted; no send starts after the window ends.
export async function runLoad (li: LoggedIn, t0: bigint, warmupMs: number, durationMs: number): Promise<LoadResult> {
  const measureFrom = t0 + BigInt(Math.round(warmupMs * 1e6))
  const measureTo = measureFrom + BigInt(Math.round(durationMs * 1e6))
  let lat = new Float64Array(1 << 16)
  let n = 0
  let errors = 0
  let firstError: string | null = null
  const record = (us: number): void => {
    if (n === lat.length) {
      const bigger = new Float64Array(lat.length * 2)
      bigger.set(lat)
      lat = bigger
    }
    lat[n++] = us
  }
  const loop = async (c: LoggedIn['clients'][number], k: number): Promise<void> => {
    let seq = 0
    for (;;) {
      const start = process.hrtime.bigint()
      if (start >= measureTo) return
      // Realistic, varying text: 40..70 bytes.
      const text = `msg ${++seq} from ${c.user} to ${c.to}: the quick brown fox ${'.'.repeat((seq * 7 + k) % 30)}`
      try {
        await c.client.send(c.to, text)
        const end = process.hrtime.bigint()
        if (start >= measureFrom && end <= measureTo) record(Number(end - start) / 1e3)
      } catch (e) {
        if (start >= measureFrom) {
          errors++
          firstError ??= `${c.user}: ${(e as Error).message}`
        }
        if (c.gone()) return // would fail at once, again and again
      }
    }
  }
  await Promise.all(li.clients.map((c, k) => loop(c, k)))
  return { latUs: lat.slice(0, n), errors, firstError }
}

// Worker thread entry.
if (!isMainThread && (workerData as LoadSpec | undefined)?.kind === 'chainchat-load') {
  const spec = workerData as LoadSpec
  const port = parentPort!
  let li: LoggedIn | null = null
  try {
    li = await connectAll(spec)
    port.postMessage({ type: 'ready' })
    const t0 = await new Promise<bigint>(resolve => port.once('message', (m: { type: string, t0: string }) => resolve(BigInt(m.t0))))
    const result = await runLoad(li, t0, spec.warmupMs, spec.durationMs)
    port.postMessage({ type: 'done', result }, [result.latUs.buffer as ArrayBuffer])
  } catch (e) {
    port.postMessage({ type: 'error', message: String((e as Error)?.stack ?? e) })
  } finally {
    li?.close()
    port.close()
  }
}
