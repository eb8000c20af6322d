// After a start from a snapshot, a request that uses a mailbox still packed waits while it is
// decoded a slice at a time between other work (dispatcher.ts, decoded), instead of decoding it
// at once with every client waiting; and what waits for the same mailbox keeps its order.
import t from 'tap'
import { ChatState, Mailbox, type Applied } from '../lib/state.ts'
import { Dispatcher, type Session } from '../lib/dispatcher.ts'
import { encodeChunkFrame, decodeFrame, encodeRecordFrame } from '../lib/storage/framing.ts'
import { limits } from '../lib/limits.ts'
import type { LogRecord, PackedSendRecord, RecordBody } from '../lib/records.ts'

const bigCount = 30_000 // 30 chunks of up to 1,000 messages: many 2 ms slices

// A state with a big mailbox and a small one, loaded from its snapshot's frames with the
// messages left packed, as a server loads it at start-up.
function loaded (): ChatState {
  const st = new ChatState()
  let ts = 1_000
  const apply = (body: RecordBody): Applied => st.apply({ ...body, i: st.index + 1, e: 0, ts: ts += 10 } as LogRecord)
  for (const user of ['Big', 'small']) apply({ op: 'register', user, salt: 's', hash: 'h' })
  for (let k = 0; k < bigCount; k++) apply({ op: 'send', from: 'small', to: 'big', text: `m${k}` })
  apply({ op: 'send', from: 'big', to: 'small', text: 'hello' })
  const chunks = [...st.snapshotChunks()].map(c => {
    const f = decodeFrame(encodeChunkFrame(c), 0, limits.snapshotFrameBytesMax, true)
    if (f.kind !== 'ok') throw new Error(`frame: ${f.kind}`)
    return f.value
  })
  return ChatState.fromSnapshotChunks(chunks)
}

// A dispatcher over the state, whose host applies each record as it is submitted, and notes
// the op of each.
function serve (st: ChatState, status: () => Record<string, unknown> = () => ({})): { d: Dispatcher, submitted: string[], session: (user: string) => Session & { pushed: string[] } } {
  const submitted: string[] = []
  let ts = 10_000_000
  const d = new Dispatcher({
    state: () => st,
    submit: async (body: RecordBody) => {
      submitted.push(body.op)
      const r = { ...body, i: st.index + 1, e: 0, ts: ts += 10 } as LogRecord
      const applied = st.apply(r)
      d.onApplied(r, applied)
      return applied
    },
    refuse: () => null,
    status
  })
  let id = 1
  const session = (user: string): Session & { pushed: string[] } => {
    const pushed: string[] = []
    const s = { id: id++, user: null, failedLogins: 0, pushed, pushEvent: (line: string, taken: (err?: Error | null) => void) => { pushed.push(line); taken() } }
    d.setUser(s, user)
    return s
  }
  return { d, submitted, session }
}

// Turns of the event loop from now until stop(), counted with setImmediate.
function countTurns (): { readonly now: number, stop: () => number } {
  let turns = 0
  let done = false
  const tick = (): void => {
    if (done) return
    turns++
    setImmediate(tick)
  }
  setImmediate(tick)
  return { get now () { return turns }, stop: () => { done = true; return turns } }
}

t.test('a request on a packed mailbox waits while it is decoded a slice at a time; others go on', async t => {
  const st = loaded()
  const { d, session } = serve(st)
  const big = session('big')
  const mailbox = st.account('big')!.mailbox
  t.ok(mailbox.isDeferred, 'the big mailbox starts packed')
  t.equal(d.isPipelined('read', big), false, 'a read on it waits for what came before it, and holds up what comes after')
  t.equal(d.isPipelined('delete_messages', big), false)
  t.equal(d.isPipelined('send', big), true, 'a send does not use the mailbox: pipelined as ever')
  const small = session('small')
  t.equal(d.isPipelined('read', small), false, 'small\'s one message is packed too')
  st.account('small')!.mailbox.warm()
  t.equal(d.isPipelined('read', small), true, 'a read on a mailbox already decoded is not held up')

  const turns = countTurns()
  const pinged = d.handle(session('small'), { op: 'ping', id: 'p', fields: {} }).then(() => turns.now)
  const reply = await d.handle(big, { op: 'history', id: 1, fields: { limit: 3 } })
  const decodedOver = turns.stop()
  t.ok(decodedOver >= 3, `decoded over ${decodedOver} turns of the event loop`)
  t.ok(await pinged < decodedOver, 'a request from another client was answered meanwhile')
  t.same((reply as unknown as { messages: Array<{ text: string }> }).messages.map(m => m.text), [`m${bigCount - 1}`, `m${bigCount - 2}`, `m${bigCount - 3}`])
  t.notOk(mailbox.isDeferred)
  t.equal(d.isPipelined('read', big), true, 'decoded: reads are pipelined again')
  t.equal(st.digest(), st.digest(), 'and the state is whole')
})

t.test('a push read mark and a read behind the same decode keep their order', async t => {
  const st = loaded()
  const { d, submitted, session } = serve(st)
  const big = session('big')
  // A message to big arrives and is pushed to its session; the push is taken at once, so its
  // read mark is due, but the mailbox is still packed: the mark waits for it.
  const sent = await d.handle(session('small'), { op: 'send', id: 1, fields: { to: 'big', text: 'live' } })
  t.match(sent, { ok: true, delivered: true })
  t.equal(big.pushed.length, 1, 'pushed')
  t.same(submitted, ['send'], 'the mark waits for the mailbox')
  // Having seen the push, big reads its oldest unread messages.
  const read = await d.handle(big, { op: 'read', id: 2, fields: { limit: 1000 } }) as unknown as { messages: Array<{ text: string }>, remaining: number }
  t.same(submitted, ['send', 'mark_read', 'read'], 'the mark went first')
  t.notOk(read.messages.some(m => m.text === 'live'), 'so the read does not return the pushed message again')
  t.equal(read.messages.length, 1000)
  t.equal(read.remaining, bigCount - 1000)
})

t.test('a mailbox that fails to decode fails the request that needs it, not the server', async t => {
  const st = loaded()
  const { d, session } = serve(st)
  const broken = new Mailbox()
  broken.defer(() => { throw new Error('malformed packed messages chunk') }, 1, 1)
  st.account('small')!.mailbox = broken
  const reply = await d.handle(session('small'), { op: 'history', id: 1, fields: {} })
  t.match(reply, { ok: false, error: { code: 'INTERNAL' } }, 'the request gets the error')
  t.match(await d.handle(session('small'), { op: 'ping', id: 2, fields: {} }), { ok: true }, 'and the dispatcher goes on')
})

t.test('a status after a replay that left messages packed waits while they are decoded; others go on', async t => {
  // As recovery replays a log: the sends' messages stay packed at the tail of the mailbox.
  const records: LogRecord[] = []
  let i = 0
  for (const user of ['big', 'small']) records.push({ op: 'register', user, salt: 's', hash: 'h', i: ++i, e: 0, ts: i })
  while (i < bigCount) records.push({ op: 'send', from: 'small', to: 'big', text: `m${i}`, rk: `small\u0000${i}`, i: ++i, e: 0, ts: i })
  const st = new ChatState()
  const whole = new ChatState()
  for (const r of records) {
    const f = decodeFrame(encodeRecordFrame(r), 0, limits.recordBytesMax, false, true)
    if (f.kind !== 'ok') throw new Error(`frame: ${f.kind}`)
    st.replay(f.value as unknown as LogRecord | PackedSendRecord)
    whole.apply(r)
  }
  t.ok(st.digestPending, 'the digest needs the packed messages')
  // As the server's status does (lib/node.ts): null while pending.
  const { d, session } = serve(st, () => ({ digest: st.digestPending ? null : st.digest(), pending: st.digestPending }))
  const quick = countTurns()
  const probe = await d.handle(session('small'), { op: 'status', id: 0, fields: { digest: false } })
  t.ok(quick.stop() <= 1, 'a status without the digest is answered at once')
  t.match(probe, { ok: true, digest: null, pending: true }, 'saying the digest is not known yet')
  t.match(await d.handle(session('small'), { op: 'status', id: 0, fields: { digest: 'no' } }), { ok: false, error: { code: 'BAD_REQUEST', message: /digest/ } })
  const turns = countTurns()
  const pinged = d.handle(session('small'), { op: 'ping', id: 'p', fields: {} }).then(() => turns.now)
  const reply = await d.handle(session('small'), { op: 'status', id: 1, fields: {} })
  const decodedOver = turns.stop()
  t.ok(decodedOver >= 3, `decoded over ${decodedOver} turns of the event loop`)
  t.ok(await pinged < decodedOver, 'a request from another client was answered meanwhile')
  t.match(reply, { ok: true, digest: whole.digest(), pending: false }, 'the digest of the whole state, known when asked for')
})
