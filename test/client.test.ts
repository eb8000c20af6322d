// The client library against a scripted server on a loopback socket: how it splits the lines it
// reads, and when requests time out. The spawned-server tests cover it against the real thing.

import t from 'tap'
import net from 'node:net'
import { once } from 'node:events'
import { ChatClient } from '../lib/client.ts'

interface Script {
  port: number
  lines: string[] // every request line the server read, in order
  socket: () => Promise<net.Socket> // the connection the client kept (its first one is a probe)
  close: () => void
}

// A server that answers the client's status probe as a single server would and otherwise only
// records what it reads (so the tests use no other status request); the test writes whatever it wants to the connection.
async function scripted (): Promise<Script> {
  const lines: string[] = []
  const sockets: net.Socket[] = []
  let kept: ((s: net.Socket) => void) | null = null
  const server = net.createServer(socket => {
    sockets.push(socket)
    let rest = ''
    socket.setEncoding('utf8')
    socket.on('data', (d: string) => {
      const parts = (rest + d).split('\n')
      rest = parts.pop()!
      for (const line of parts) {
        const req = JSON.parse(line) as { op: string, id: unknown }
        if (req.op === 'status') {
          socket.write(JSON.stringify({ ok: true, id: req.id, role: 'single' }) + '\n')
          kept?.(socket)
        } else lines.push(line)
      }
    })
    socket.on('error', () => {})
  })
  server.listen(0, '127.0.0.1')
  await once(server, 'listening')
  const socketPromise = new Promise<net.Socket>(resolve => { kept = resolve })
  return {
    port: (server.address() as net.AddressInfo).port,
    lines,
    socket: () => socketPromise,
    close: () => {
      for (const s of sockets) s.destroy()
      server.close()
    }
  }
}

// p, or a rejection if it is still pending after ms: a request the client forgot fails the test
// instead of hanging it.
function within<T> (p: Promise<T>, ms: number): Promise<T> {
  let timer: NodeJS.Timeout | undefined
  const late = new Promise<never>((_resolve, reject) => { timer = setTimeout(() => reject(new Error(`still pending after ${ms} ms`)), ms) })
  return Promise.race([p, late]).finally(() => clearTimeout(timer))
}

// Wait until the server has read n request lines.
async function requests (s: Script, n: number): Promise<Array<{ op: string, id: number }>> {
  const deadline = Date.now() + 5000
  while (s.lines.length < n) {
    if (Date.now() > deadline) throw new Error(`only ${s.lines.length} of ${n} requests arrived`)
    await new Promise(resolve => setTimeout(resolve, 5))
  }
  return s.lines.slice(0, n).map(l => JSON.parse(l))
}

t.test('replies split across reads, several in one read, and a character split between reads', async t => {
  const s = await scripted()
  t.teardown(s.close)
  const c = await ChatClient.connect({ port: s.port })
  t.teardown(() => c.close())
  const socket = await s.socket()
  const a = c.ping()
  const b = c.users()
  const h = c.history()
  const [pa, pb, ph] = await requests(s, 3)
  t.same([pa.op, pb.op, ph.op], ['ping', 'users', 'history'])
  // The first reply in three pieces; then the second and the start of the third in one write,
  // the third's text cut inside the four bytes of an emoji; then a blank line and the rest.
  const text = 'caf\u00e9 \u{1F600}!'
  const third = Buffer.from(JSON.stringify({ ok: true, id: ph.id, messages: [{ id: 1, from: 'ann', to: 'bob', text, ts: 1 }] }) + '\r\n')
  const cut = third.indexOf(Buffer.from('\u{1F600}')) + 2
  const first = JSON.stringify({ ok: true, id: pa.id })
  const writes = [
    Buffer.from(first.slice(0, 5)),
    Buffer.from(first.slice(5, 9)),
    Buffer.from(first.slice(9) + '\n'),
    Buffer.concat([Buffer.from(JSON.stringify({ ok: true, id: pb.id, users: ['second'], total: 1 }) + '\n'), third.subarray(0, cut)]),
    Buffer.concat([third.subarray(cut), Buffer.from('\n')])
  ]
  for (const w of writes) {
    socket.write(w)
    await new Promise(resolve => setTimeout(resolve, 20)) // separate reads on the client's side
  }
  await a
  t.same((await b).users, ['second'])
  t.equal((await h).messages[0].text, text, 'the character split between two reads comes out whole')
  // Still in step after all that: one more round trip.
  const d = c.ping()
  const [, , , pd] = await requests(s, 4)
  socket.write(JSON.stringify({ ok: true, id: pd.id }) + '\n')
  await d
})

t.test('an unanswered request fails after requestTimeoutMs; answered ones never do', async t => {
  const s = await scripted()
  t.teardown(s.close)
  const c = await ChatClient.connect({ port: s.port, requestTimeoutMs: 300 })
  t.teardown(() => c.close())
  const socket = await s.socket()
  const started = Date.now()
  const answered = c.ping()
  const unanswered = c.ping()
  const [first] = await requests(s, 2)
  socket.write(JSON.stringify({ ok: true, id: first.id }) + '\n')
  await answered
  // A request made later has a later deadline: it must not fail with the first timer.
  await new Promise(resolve => setTimeout(resolve, 150))
  const later = c.ping()
  const later2 = c.users()
  await t.rejects(within(unanswered, 3000), /ping: no reply within 300 ms/)
  const failedAfter = Date.now() - started
  t.ok(failedAfter >= 290 && failedAfter < 2000, `the first unanswered request failed after ${failedAfter} ms`)
  // The later ones are still waiting: one answered now resolves, the other fails on its own time.
  const [, , p3] = await requests(s, 4)
  socket.write(JSON.stringify({ ok: true, id: p3.id }) + '\n')
  await later
  await t.rejects(within(later2, 3000), /users: no reply within 300 ms/)
  const secondAfter = Date.now() - started
  t.ok(secondAfter >= 440, `the later request failed after ${secondAfter} ms, not with the first`)
  // Idle, then a request again: the timer is armed afresh.
  await new Promise(resolve => setTimeout(resolve, 400))
  const again = Date.now()
  await t.rejects(within(c.ping(), 3000), /no reply within 300 ms/)
  t.ok(Date.now() - again >= 290, 'a request after an idle spell gets its whole timeout')
})

t.test('an unanswered request does not keep the process alive once the client is closed', async t => {
  const s = await scripted()
  t.teardown(s.close)
  const c = await ChatClient.connect({ port: s.port, requestTimeoutMs: 60_000 })
  const p = c.ping()
  await requests(s, 1)
  c.close()
  await t.rejects(p, /client closed/)
})

t.test('fields that cannot be sent reject the request instead of throwing', async t => {
  const s = await scripted()
  t.teardown(s.close)
  const c = await ChatClient.connect({ port: s.port })
  t.teardown(() => c.close())
  let p: Promise<unknown> | undefined
  t.doesNotThrow(() => { p = c.request('ping', { n: 1n }) })
  await t.rejects(p!, /BigInt/)
})
