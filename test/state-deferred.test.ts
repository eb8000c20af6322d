// Mailboxes loaded from a snapshot file start packed (Mailbox.defer): decoded on first use, by
// warmSome, or when the digest is asked for. Whatever the order, a state loaded that way must
// behave exactly as one loaded whole.
import t from 'tap'
import { ChatState } from '../lib/state.ts'
import { encodeChunkFrame, decodeFrame } from '../lib/storage/framing.ts'
import { limits } from '../lib/limits.ts'
import type { LogRecord, RecordBody } from '../lib/records.ts'

function feeder (st: ChatState): (body: RecordBody) => ReturnType<ChatState['apply']> {
  let ts = 1_000
  return (body: RecordBody) => st.apply({ ...body, i: st.index + 1, e: 0, ts: ts += 10 } as LogRecord)
}

// A state with three mailboxes: b's spans several chunks, some read, one deleted; c's is small;
// d's is empty. Non-ASCII texts and names, and exactly-once keys.
function source (): ChatState {
  const st = new ChatState()
  const apply = feeder(st)
  for (const user of ['a', 'Bé', 'c', 'd']) apply({ op: 'register', user, salt: 's', hash: 'h' })
  for (let k = 0; k < 2300; k++) apply({ op: 'send', from: k % 3 ? 'a' : 'c', to: k % 5 ? 'bé' : 'c', text: `m${k} ünïcode ✓`, rk: `a\u0000${k}` })
  apply({ op: 'read', user: 'bé', limit: 700 })
  apply({ op: 'delete_messages', user: 'bé', ids: [10, 11, 12] })
  apply({ op: 'mark_read', user: 'c', ids: [5] })
  return st
}

// The state's snapshot as the file holds it, read back as recovery reads it: packed or whole.
function throughFrames (st: ChatState, packed: boolean): ChatState {
  const chunks = [...st.snapshotChunks()].map(c => {
    const frame = encodeChunkFrame(c)
    const f = decodeFrame(frame, 0, limits.snapshotFrameBytesMax, packed)
    if (f.kind !== 'ok') throw new Error(`frame: ${f.kind}`)
    return f.value
  })
  return ChatState.fromSnapshotChunks(chunks)
}

const texts = (ms: Array<{ text: string }>): string[] => ms.map(m => m.text)

t.test('packed frames: messages chunks stay binary until used, and decode to what a whole load holds', async t => {
  const st = source()
  const chunk = [...st.snapshotChunks()].find(c => c.kind === 'messages')!
  const f = decodeFrame(encodeChunkFrame(chunk), 0, limits.snapshotFrameBytesMax, true)
  t.equal(f.kind, 'ok')
  const value = (f as { value: Record<string, unknown> }).value
  t.equal(value.kind, 'messages')
  t.equal(value.name, 'Bé')
  t.ok(Buffer.isBuffer(value.packed), 'packed, not decoded')
  t.notOk('messages' in value)

  const whole = throughFrames(st, false)
  const lazy = throughFrames(st, true)
  for (const name of ['a', 'bé', 'c', 'd']) t.equal(lazy.account(name)!.mailbox.warm(), name !== 'a' && name !== 'd', `${name}: deferred only if it has messages`)
  for (const name of ['a', 'bé', 'c', 'd']) {
    t.same([...lazy.account(name)!.mailbox.entries()], [...whole.account(name)!.mailbox.entries()], `${name}: same messages and read marks`)
  }
  t.equal(lazy.digest(), st.digest())
  t.equal(whole.digest(), st.digest())
  const m = lazy.account('bé')!.mailbox.newest(1)[0]
  t.equal(m.to, lazy.account('bé')!.name, 'to is the owner\'s name')
})

t.test('a deferred mailbox tells its size and unread count without being decoded', async t => {
  const st = source()
  const whole = throughFrames(st, false)
  const lazy = throughFrames(st, true)
  const chunk = [...st.snapshotChunks()].find(c => c.kind === 'messages')! as { messages: Array<[number, string, string, string, number, 0 | 1]> }
  const value = (decodeFrame(encodeChunkFrame(chunk), 0, limits.snapshotFrameBytesMax, true) as { value: Record<string, unknown> }).value
  t.equal(value.count, 1000, 'a packed chunk says how many messages it holds')
  const unread = chunk.messages.filter(m => m[5] === 0).length
  t.ok(unread > 0 && unread < 1000, 'bé\'s first chunk holds read and unread messages')
  t.equal(value.unread, unread, 'and how many of them unread')
  for (const name of ['a', 'bé', 'c', 'd']) {
    const box = lazy.account(name)!.mailbox
    t.equal(box.size, whole.account(name)!.mailbox.size, `${name}: size`)
    t.equal(box.unreadCount, whole.account(name)!.mailbox.unreadCount, `${name}: unread count`)
  }
  t.ok(lazy.account('bé')!.mailbox.isDeferred && lazy.account('c')!.mailbox.isDeferred, 'still packed: counting decoded nothing')
  t.equal(lazy.deferredMailboxes, 2)
  // Sends meanwhile count too; one decode step (a chunk of bé's) changes no count.
  const apply = feeder(lazy)
  const applyWhole = feeder(whole)
  for (const to of ['bé', 'c', 'd']) {
    apply({ op: 'send', from: 'a', to, text: 'later' })
    applyWhole({ op: 'send', from: 'a', to, text: 'later' })
  }
  t.ok(lazy.account('bé')!.mailbox.warmStep(), 'bé has chunks left after one')
  for (const name of ['bé', 'c', 'd']) {
    const box = lazy.account(name)!.mailbox
    t.same([box.size, box.unreadCount], [whole.account(name)!.mailbox.size, whole.account(name)!.mailbox.unreadCount], `${name}: counts after sends and part of a decode`)
  }
  t.ok(lazy.account('bé')!.mailbox.isDeferred, 'bé is still partly packed')
  while (lazy.warmSome(Infinity));
  for (const name of ['bé', 'c', 'd']) t.equal(lazy.account(name)!.mailbox.unreadCount, whole.account(name)!.mailbox.unreadCount, `${name}: unread count once decoded`)
  t.equal(lazy.digest(), whole.digest())
})

t.test('a malformed messages chunk is refused when packed too', async t => {
  const st = source()
  const frame = encodeChunkFrame([...st.snapshotChunks()].find(c => c.kind === 'messages')!)
  // Make the first text one byte longer: the lengths no longer fill the chunk. Re-seal the CRC.
  const textLenAt = 8 + 1 + 2 + Buffer.byteLength('Bé') + 4 + 19
  frame.writeUInt32LE(frame.readUInt32LE(textLenAt) + 1, textLenAt)
  const zlib = await import('node:zlib')
  frame.writeUInt32LE(zlib.crc32(frame.subarray(8)), 4)
  t.same(decodeFrame(frame, 0, limits.snapshotFrameBytesMax, true), { kind: 'bad', why: 'malformed messages chunk' })
  t.same(decodeFrame(frame, 0, limits.snapshotFrameBytesMax, false), { kind: 'bad', why: 'malformed messages chunk' })
})

t.test('every operation on a deferred mailbox gives what it gives on a whole one', async t => {
  const st = source()
  const whole = throughFrames(st, false)
  const lazy = throughFrames(st, true)
  const ops: RecordBody[] = [
    // Sends into deferred mailboxes wait behind the packed messages without decoding them.
    { op: 'send', from: 'a', to: 'bé', text: 'after 1' },
    { op: 'send', from: 'c', to: 'bé', text: 'after 2', rk: 'c\u0000x' },
    { op: 'send', from: 'a', to: 'c', text: 'after 3' },
    { op: 'read', user: 'bé', limit: 5 },
    { op: 'mark_read', user: 'bé', ids: [2301] },
    { op: 'delete_messages', user: 'c', ids: [5, 6, 2303] },
    { op: 'send', from: 'a', to: 'a', text: 'to self' },
    { op: 'delete_account', user: 'c', created: 3 },
    { op: 'send', from: 'a', to: 'd', text: 'to the empty one' },
    { op: 'read', user: 'bé', limit: 2000 }
  ]
  const feedWhole = feeder(whole)
  const feedLazy = feeder(lazy)
  for (const body of ops) {
    t.same(feedLazy(body), feedWhole(body), `${body.op}: same reply and effects`)
  }
  t.equal(lazy.digest(), whole.digest(), 'same digest after all of them')
  for (const name of ['a', 'bé', 'd']) t.same([...lazy.account(name)!.mailbox.entries()], [...whole.account(name)!.mailbox.entries()], name)
  t.notOk(lazy.account('c'), 'the deferred account was deleted')
})

t.test('added to before it is used: the packed messages still come first, unread marks kept', async t => {
  const st = source()
  const lazy = throughFrames(st, true)
  const whole = throughFrames(st, false)
  for (const s of [lazy, whole]) {
    const apply = feeder(s)
    apply({ op: 'send', from: 'a', to: 'c', text: 'new 1' })
    apply({ op: 'send', from: 'a', to: 'c', text: 'new 2' })
  }
  const box = lazy.account('c')!.mailbox
  t.equal(box.warm(), true, 'the sends did not decode it')
  t.equal(box.unreadCount, whole.account('c')!.mailbox.unreadCount)
  t.same(texts(box.newest(3)), ['new 2', 'new 1', texts(whole.account('c')!.mailbox.newest(3))[2]])
  t.same(texts(box.oldestUnread(1000)), texts(whole.account('c')!.mailbox.oldestUnread(1000)))
  t.equal(lazy.digest(), whole.digest())
})

t.test('the digest recorded in the snapshot: known before any mailbox is decoded, checked once all are', async t => {
  const st = source()
  const lazy = throughFrames(st, true)
  t.equal(lazy.digest(), st.digest(), 'the digest before decoding anything')
  t.equal(lazy.account('bé')!.mailbox.warm(), true, 'asking for it decoded nothing')
  while (lazy.warmSome(1));
  t.equal(lazy.snapshotMismatch, null, 'the decoded messages add up to the recorded digest')
  t.equal(lazy.digest(), st.digest())
  const copy = ChatState.fromSnapshotChunks(throughFrames(st, true).snapshotChunks() as Iterable<Record<string, unknown>>)
  t.equal(copy.digest(), st.digest(), 'a snapshot of a deferred state holds every message')
})

t.test('a snapshot without a recorded digest (older ones): the digest decodes every mailbox first', async t => {
  const st = source()
  const chunks = [...st.snapshotChunks()].map(c => {
    const { digest: _, ...rest } = c as Record<string, unknown>
    const f = decodeFrame(encodeChunkFrame(rest), 0, limits.snapshotFrameBytesMax, true)
    return (f as { value: Record<string, unknown> }).value
  })
  const lazy = ChatState.fromSnapshotChunks(chunks)
  t.equal(lazy.digest(), st.digest())
  t.equal(lazy.account('bé')!.mailbox.warm(), false, 'asking for the digest decoded them')
  t.equal(lazy.snapshotMismatch, null)
})

t.test('messages that do not add up to the recorded digest: refused when loaded whole, reported and counted when deferred', async t => {
  const st = source()
  // One text changed, same length, checksum made valid again: a fault no CRC catches.
  const frames = [...st.snapshotChunks()].map(c => encodeChunkFrame(c))
  const k = frames.findIndex(f => f[8] === 0x02)
  const at = frames[k].indexOf('m1 ünïcode')
  frames[k].write('X', at + 1, 'latin1')
  const zlib = await import('node:zlib')
  frames[k].writeUInt32LE(zlib.crc32(frames[k].subarray(8)), 4)
  const read = (packed: boolean): Array<Record<string, unknown>> => frames.map(f => (decodeFrame(f, 0, limits.snapshotFrameBytesMax, packed) as { value: Record<string, unknown> }).value)

  t.throws(() => ChatState.fromSnapshotChunks(read(false)), /does not match the digest it recorded/, 'a whole load refuses it')
  const lazy = ChatState.fromSnapshotChunks(read(true))
  t.equal(lazy.digest(), st.digest(), 'deferred: the recorded digest, until the messages are decoded')
  while (lazy.warmSome(1));
  t.match(lazy.snapshotMismatch, /do not add up to the digest it recorded/)
  const held = ChatState.fromSnapshotChunks(read(false).map(c => c.kind === 'state' ? { ...c, digest: undefined } : c))
  t.not(held.digest(), st.digest())
  t.equal(lazy.digest(), held.digest(), 'then the digest of what it does hold, so that it differs from the peers\' too')
  t.ok(lazy.account('bé')!.mailbox.newest(3000).some(m => m.text.startsWith('mX ')), 'the changed text is what it holds')
})

t.test('warmSome decodes a chunk per call at least, and says when none is left; a send between chunks waits behind them', async t => {
  const st = source()
  const lazy = throughFrames(st, true)
  const whole = throughFrames(st, false)
  // bé's mailbox is two chunks (1,000 + 840 messages), c's one.
  t.equal(lazy.warmSome(0), true, 'the first of bé\'s chunks')
  t.equal(lazy.deferredMailboxes, 2, 'bé is still deferred')
  for (const s of [lazy, whole]) feeder(s)({ op: 'send', from: 'a', to: 'bé', text: 'between' })
  t.equal(lazy.warmSome(0), true, 'the second; c is left')
  t.equal(lazy.deferredMailboxes, 1)
  t.equal(lazy.warmSome(0), false, 'c, and none is left')
  t.equal(lazy.deferredMailboxes, 0)
  t.equal(lazy.account('bé')!.mailbox.warm(), false)
  t.equal(lazy.account('c')!.mailbox.warm(), false)
  t.equal(lazy.warmSome(0), false, 'nothing left')
  for (const name of ['bé', 'c']) t.same([...lazy.account(name)!.mailbox.entries()], [...whole.account(name)!.mailbox.entries()], name)
  t.equal(lazy.snapshotMismatch, null)
  t.equal(lazy.digest(), whole.digest())
})

t.test('used between chunks: the rest is decoded at once', async t => {
  const st = source()
  const lazy = throughFrames(st, true)
  const whole = throughFrames(st, false)
  t.equal(lazy.warmSome(0), true)
  t.same(texts(lazy.account('bé')!.mailbox.oldestUnread(3)), texts(whole.account('bé')!.mailbox.oldestUnread(3)))
  t.same(texts(lazy.account('bé')!.mailbox.newest(3)), texts(whole.account('bé')!.mailbox.newest(3)))
  t.equal(lazy.account('bé')!.mailbox.warm(), false, 'bé is whole')
  t.equal(lazy.warmSome(0), false, 'c, the last')
  t.equal(lazy.digest(), whole.digest())
  t.equal(lazy.snapshotMismatch, null)
})

t.test('a packed chunk for a mailbox that already holds messages is decoded at once, and not counted as deferred', async t => {
  const st = source()
  const whole = throughFrames(st, false)
  let seen = 0
  // bé's first messages chunk loaded whole, its second packed: the second cannot wait behind it.
  const chunks = [...st.snapshotChunks()].map(c => {
    const packed = !(c.kind === 'messages' && c.name === 'Bé' && seen++ === 0)
    return (decodeFrame(encodeChunkFrame(c), 0, limits.snapshotFrameBytesMax, packed) as { value: Record<string, unknown> }).value
  })
  const lazy = ChatState.fromSnapshotChunks(chunks)
  t.equal(lazy.deferredMailboxes, 1, 'only c is deferred')
  t.equal(lazy.account('bé')!.mailbox.warm(), false, 'bé was decoded at once')
  t.same([...lazy.account('bé')!.mailbox.entries()], [...whole.account('bé')!.mailbox.entries()])
  t.equal(lazy.warmSome(0), false, 'c, the last')
  t.equal(lazy.deferredMailboxes, 0)
  t.equal(lazy.snapshotMismatch, null, 'the check ran when c was done, and passed')
  t.equal(lazy.digest(), st.digest())
})
