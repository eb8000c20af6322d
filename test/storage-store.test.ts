import t, { type Test } from 'tap'
import fs from 'node:fs'
import path from 'node:path'
import { Store, type StoreOptions } from '../lib/storage/store.ts'
import { segmentName } from '../lib/storage/log.ts'
import { CorruptSnapshotError, writeSnapshot } from '../lib/storage/snapshot.ts'
import { encodeRecordFrame, encodeFrame, encodeChunkFrame } from '../lib/storage/framing.ts'
import { realFiles, makeDirs } from '../lib/storage/files.ts'
import { DataFormatError, dataFormat } from '../lib/storage/format.ts'
import { ChatState } from '../lib/state.ts'
import { limits } from '../lib/limits.ts'
import { tempDir, record, records, batch, frameSpans, flipByte, errnoError, thrown, faultyFiles, stateView } from './helpers/storage.ts'
import { waitFor } from './helpers/spawn.ts'

const snapName = (index: number): string => `snapshot-${String(index).padStart(20, '0')}.snap`

interface Logged { msg: string, fields?: Record<string, unknown> }

// Snapshots by count (or bytes) alone, unless a test says otherwise: the records here are few and
// small, and the growth bound (snapshotGrowthPercent) has a test of its own.
function openStore (opts: StoreOptions): { store: Store, warnings: Logged[], infos: Logged[] } {
  const warnings: Logged[] = []
  const infos: Logged[] = []
  const store = new Store({ warn: (msg, fields) => { warnings.push({ msg, fields }) }, info: (msg, fields) => { infos.push({ msg, fields }) }, snapshotGrowthPercent: 0, ...opts })
  return { store, warnings, infos }
}

// What the committer does with each record: make it durable, apply it, consider a snapshot.
function drive (store: Store, state: ChatState, from: number, to: number): void {
  for (let i = from; i <= to; i++) {
    const r = record(i)
    store.append(batch([r]))
    state.apply(r)
    store.maybeSnapshot(state)
  }
}

function replayed (to: number): ChatState {
  const st = new ChatState()
  for (const r of records(1, to)) st.apply(r)
  return st
}

// The data directory's files, sorted, but for FORMAT (see format.ts), which every recovery writes.
const listed = (dir: string): string[] => fs.readdirSync(dir).filter(f => f !== 'FORMAT').sort()

function reopen (t: Test, dir: string, opts: Partial<StoreOptions> = {}): ReturnType<Store['recover']> & { store: Store } {
  const { store } = openStore({ dir, ...opts })
  t.teardown(() => store.close())
  return { ...store.recover(), store }
}

t.test('the record stream exercises the state: read and unread mail, a deleted account, rids', async t => {
  const v = stateView(replayed(35)) as { accounts: Array<{ key: string, messages: Array<{ read: boolean }> }>, rids: unknown[] }
  t.same(v.accounts.map(a => a.key), ['alice', 'bob', 'carol'], 'dave was deleted')
  t.ok(v.accounts.some(a => a.messages.some(m => m.read)), 'some messages read')
  t.ok(v.accounts.some(a => a.messages.some(m => !m.read)), 'some unread')
  t.ok(v.rids.length > 10)
})

t.test('snapshot every 10 records: one snapshot, covered segments deleted, recovery equals the original', async t => {
  const dir = tempDir(t, 'store')
  const { store, infos, warnings } = openStore({ dir, snapshotEveryRecords: 10 })
  const rec0 = store.recover()
  t.same({ index: rec0.state.index, snapshotIndex: rec0.snapshotIndex, replayed: rec0.replayed, truncatedBytes: rec0.truncatedBytes }, { index: 0, snapshotIndex: 0, replayed: 0, truncatedBytes: 0 })
  const state = rec0.state
  drive(store, state, 1, 9)
  t.same(listed(dir), [segmentName(1)], 'no snapshot before 10 records')
  drive(store, state, 10, 10)
  t.same(listed(dir), [segmentName(11), snapName(10)], 'at 10: snapshot, new segment, old one gone')
  drive(store, state, 11, 35)
  store.close()
  t.same(listed(dir), [segmentName(31), snapName(30)], 'exactly one snapshot and the segment after it')
  t.same(infos.map(i => i.fields && [i.msg, i.fields.index, i.fields.segmentsRemoved, i.fields.file]), [10, 20, 30].map(n => ['snapshot written', n, 1, path.join(dir, snapName(n))]))
  t.same(warnings, [])
  const seg = fs.readFileSync(path.join(dir, segmentName(31)))
  t.equal(frameSpans(seg).length, 5, 'records 31..35 in the live segment')

  t.same(stateView(state), stateView(replayed(35)), 'the live state is what applying the records gives')
  const back = reopen(t, dir, { snapshotEveryRecords: 10 })
  t.same({ snapshotIndex: back.snapshotIndex, replayed: back.replayed, truncatedBytes: back.truncatedBytes }, { snapshotIndex: 30, replayed: 5, truncatedBytes: 0 })
  t.equal(back.state.digest(), state.digest(), 'digest')
  t.equal(back.state.index, 35, 'index')
  t.same(stateView(back.state), stateView(state), 'accounts, mailboxes, read flags, rid table')
  t.same(back.state.ridReply('alice\u0000r35'), state.ridReply('alice\u0000r35'), 'a stored reply answers a retry')

  // The recovered store carries on: the next snapshot at 40 replaces the one at 30.
  drive(back.store, back.state, 36, 41)
  back.store.close()
  t.same(listed(dir), [segmentName(41), snapName(40)])
  const again = reopen(t, dir)
  t.same(stateView(again.state), stateView(replayed(41)))
  t.same({ snapshotIndex: again.snapshotIndex, replayed: again.replayed }, { snapshotIndex: 40, replayed: 1 })
})

t.test('a snapshot is also taken when enough bytes have been logged', async t => {
  const dir = tempDir(t, 'store')
  const { store } = openStore({ dir, snapshotEveryRecords: 1_000_000, snapshotEveryBytes: 1000 })
  const { state } = store.recover()
  let bytes = 0
  let expected = 0
  for (let i = 1; expected === 0; i++) {
    bytes += encodeRecordFrame(record(i)).length
    if (bytes >= 1000) expected = i
  }
  drive(store, state, 1, expected - 1)
  t.same(listed(dir), [segmentName(1)], `nothing before ${expected}`)
  drive(store, state, expected, expected)
  t.same(listed(dir), [segmentName(expected + 1), snapName(expected)])
  store.close()
  const back = reopen(t, dir)
  t.same(stateView(back.state), stateView(state))
  // The byte count starts from what the live segment holds after a restart.
  drive(back.store, back.state, expected + 1, expected + 2)
  t.same(listed(dir), [segmentName(expected + 1), snapName(expected)], 'two records are not 1000 bytes')
})

t.test('a store without log hooks: torn tail reported in the result, snapshots taken quietly', async t => {
  const dir = tempDir(t, 'store')
  const store = new Store({ dir, snapshotEveryRecords: 4, snapshotGrowthPercent: 0 })
  const { state } = store.recover()
  drive(store, state, 1, 6)
  store.close()
  t.same(listed(dir), [segmentName(5), snapName(4)])
  const seg = path.join(dir, segmentName(5))
  const size = fs.statSync(seg).size
  fs.appendFileSync(seg, encodeRecordFrame(record(7)).subarray(0, 20))
  const back = new Store({ dir })
  const r = back.recover()
  back.close()
  t.same({ index: r.state.index, snapshotIndex: r.snapshotIndex, replayed: r.replayed, truncatedBytes: r.truncatedBytes }, { index: 6, snapshotIndex: 4, replayed: 2, truncatedBytes: 20 })
  t.equal(fs.statSync(seg).size, size)
  t.same(stateView(r.state), stateView(state))
})

t.test('snapshot() with nothing new since the last snapshot writes nothing', async t => {
  const dir = tempDir(t, 'store')
  const ff = faultyFiles()
  const { store } = openStore({ dir, files: ff.files, snapshotEveryRecords: 5 })
  const { state } = store.recover()
  const renamed = ff.calls.renameSync // FORMAT, written by the first recovery
  store.snapshot(state)
  t.equal(ff.calls.renameSync - renamed, 0, 'an empty state at index 0 is not snapshotted')
  drive(store, state, 1, 5)
  t.equal(ff.calls.renameSync - renamed, 1)
  store.snapshot(state)
  store.maybeSnapshot(state)
  t.equal(ff.calls.renameSync - renamed, 1, 'no second snapshot at the same index')
  store.close()
})

t.test('recovery from snapshot + log when a crash came between the snapshot and the compaction', async t => {
  // Snapshot at 12 renamed into place, but the log was neither rolled nor compacted.
  const dir = tempDir(t, 'store')
  const { store } = openStore({ dir })
  const { state } = store.recover()
  drive(store, state, 1, 15)
  store.close()
  writeSnapshot(realFiles, dir, 12, replayed(12).snapshotChunks())
  t.same(listed(dir), [segmentName(1), snapName(12)])
  const back = reopen(t, dir, { snapshotEveryRecords: 5 })
  t.same({ snapshotIndex: back.snapshotIndex, replayed: back.replayed }, { snapshotIndex: 12, replayed: 3 })
  t.same(stateView(back.state), stateView(state))
  drive(back.store, back.state, 16, 17)
  back.store.close()
  t.same(listed(dir), [segmentName(18), snapName(17)], 'the next snapshot compacts the old segment')
  t.same(stateView(reopen(t, dir).state), stateView(replayed(17)))
})

t.test('recovery when the snapshot covers the whole log, and a restart after that', async t => {
  // The log reaches 15, the snapshot 20: as after a crash between writing a snapshot received
  // from a peer and resetting the log to start after it.
  const dir = tempDir(t, 'store')
  const { store } = openStore({ dir })
  const { state } = store.recover()
  drive(store, state, 1, 15)
  store.close()
  writeSnapshot(realFiles, dir, 20, replayed(20).snapshotChunks())
  const back = reopen(t, dir)
  t.same({ index: back.state.index, snapshotIndex: back.snapshotIndex, replayed: back.replayed }, { index: 20, snapshotIndex: 20, replayed: 0 })
  t.equal(back.store.log.lastIndex, 20)
  drive(back.store, back.state, 21, 22)
  back.store.close()
  const e = thrown(() => reopen(t, dir))
  t.equal(e, undefined, `the restart recovers (got ${String(e)})`)
  if (e === undefined) t.same(stateView(reopen(t, dir).state), stateView(replayed(22)))
})

t.test('a crash mid-snapshot: the partial temporary file is ignored and removed', async t => {
  const partialOf = (index: number): Buffer => {
    const scratch = tempDir(t, 'scratch')
    const full = fs.readFileSync(writeSnapshot(realFiles, scratch, index, replayed(index).snapshotChunks()).file)
    return full.subarray(0, full.length >> 1)
  }

  t.test('with no snapshot before it', async t => {
    const dir = tempDir(t, 'store')
    const { store } = openStore({ dir })
    const { state } = store.recover()
    drive(store, state, 1, 7)
    store.close()
    fs.writeFileSync(path.join(dir, snapName(7) + '.tmp'), partialOf(7))
    const back = reopen(t, dir)
    t.same({ snapshotIndex: back.snapshotIndex, replayed: back.replayed }, { snapshotIndex: 0, replayed: 7 })
    t.same(stateView(back.state), stateView(state))
    t.same(listed(dir), [segmentName(1)], 'temporary file removed')
  })

  t.test('with an older snapshot', async t => {
    const dir = tempDir(t, 'store')
    const { store } = openStore({ dir, snapshotEveryRecords: 10 })
    const { state } = store.recover()
    drive(store, state, 1, 15)
    store.close()
    fs.writeFileSync(path.join(dir, snapName(15) + '.tmp'), partialOf(15))
    fs.writeFileSync(path.join(dir, snapName(14) + '.tmp'), '') // an even earlier crash, right after the open
    t.same(listed(dir), [segmentName(11), snapName(10), snapName(14) + '.tmp', snapName(15) + '.tmp'])
    const back = reopen(t, dir)
    t.same({ snapshotIndex: back.snapshotIndex, replayed: back.replayed }, { snapshotIndex: 10, replayed: 5 })
    t.same(stateView(back.state), stateView(state))
    t.same(listed(dir), [segmentName(11), snapName(10)], 'temporary files removed')
  })
})

t.test('an older snapshot left by a crash before its removal is removed at recovery', async t => {
  const dir = tempDir(t, 'store')
  const { store } = openStore({ dir, snapshotEveryRecords: 10 })
  const { state } = store.recover()
  drive(store, state, 1, 12)
  store.close()
  writeSnapshot(realFiles, dir, 5, replayed(5).snapshotChunks())
  const back = reopen(t, dir)
  t.equal(back.snapshotIndex, 10)
  t.same(stateView(back.state), stateView(state))
  t.same(listed(dir), [segmentName(11), snapName(10)])
})

t.test('a damaged snapshot: recover throws CorruptSnapshotError naming the file, and changes nothing', async t => {
  const dir = tempDir(t, 'store')
  const { store } = openStore({ dir, snapshotEveryRecords: 10 })
  const { state } = store.recover()
  drive(store, state, 1, 13)
  store.close()
  const file = path.join(dir, snapName(10))
  const good = fs.readFileSync(file)
  const spans = frameSpans(good)
  t.ok(spans.length >= 5, 'head, state, accounts, rids, end')
  for (const k of [0, 2, spans.length - 2, spans.length - 1]) {
    t.test(`byte flipped in frame ${k}`, async t => {
      fs.writeFileSync(file, good)
      flipByte(file, Math.floor((spans[k].start + 8 + spans[k].end) / 2), 0x02)
      const before = new Map(fs.readdirSync(dir).map(f => [f, fs.readFileSync(path.join(dir, f))]))
      const { store } = openStore({ dir })
      const e = thrown(() => store.recover())
      t.type(e, CorruptSnapshotError)
      t.match(e, { file, offset: spans[k].start, message: new RegExp(`corrupt snapshot ${file.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')} at offset ${spans[k].start}`) })
      const after = fs.readdirSync(dir)
      t.same(after.sort(), [...before.keys()].sort(), 'no file created or removed')
      t.ok(after.every(f => fs.readFileSync(path.join(dir, f)).equals(before.get(f)!)), 'no file changed')
    })
  }
})

// Fail every write to a snapshot's temporary file; everything else works.
function failSnapshotWrites (ff: ReturnType<typeof faultyFiles>, code = 'ENOSPC'): { attempts: () => number } {
  let attempts = 0
  ff.hooks.writeSync = (fd, buf, off, len, pos) => {
    if (ff.pathOf(fd)?.endsWith('.snap.tmp')) {
      attempts++
      throw errnoError(code)
    }
    return ff.real.writeSync(fd, buf, off, len, pos)
  }
  return { attempts: () => attempts }
}

t.test('a failed snapshot write: log intact and recoverable, state unchanged, retried a full interval later', async t => {
  const dir = tempDir(t, 'store')
  const ff = faultyFiles()
  const fault = failSnapshotWrites(ff)
  const { store, warnings, infos } = openStore({ dir, files: ff.files, snapshotEveryRecords: 10 })
  const { state } = store.recover()
  drive(store, state, 1, 9)
  const viewBefore = stateView(replayed(10))
  const logBefore = fs.readFileSync(path.join(dir, segmentName(1)))
  drive(store, state, 10, 10)
  t.equal(fault.attempts(), 1, 'the snapshot was attempted at 10')
  t.match(warnings, [{ msg: /snapshot failed/, fields: { error: /ENOSPC/ } }])
  t.same(infos, [])
  t.same(listed(dir), [segmentName(1)], 'no snapshot, no temporary file, the segment kept')
  t.ok(fs.readFileSync(path.join(dir, segmentName(1))).subarray(0, logBefore.length).equals(logBefore), 'log bytes untouched')
  t.same(stateView(state), viewBefore, 'the state is unchanged by the failed snapshot')
  t.equal(store.log.failed, null, 'appends still work')

  drive(store, state, 11, 19)
  t.equal(fault.attempts(), 1, 'no retry before 20')
  const mid = reopen(t, dir)
  t.same({ snapshotIndex: mid.snapshotIndex, replayed: mid.replayed }, { snapshotIndex: 0, replayed: 19 })
  t.same(stateView(mid.state), stateView(state), 'recovered from the log alone')
  mid.store.close()

  drive(store, state, 20, 20)
  t.equal(fault.attempts(), 2, 'retried at 20')
  t.same(listed(dir), [segmentName(1)])
  delete ff.hooks.writeSync
  drive(store, state, 21, 29)
  t.same(listed(dir), [segmentName(1)], 'after the failure at 20, the next try is at 30')
  drive(store, state, 30, 31)
  store.close()
  t.same(listed(dir), [segmentName(31), snapName(30)], 'the disk has room again')
  const back = reopen(t, dir)
  t.same(stateView(back.state), stateView(replayed(31)))
})

t.test('a failed snapshot fsync: same outcome', async t => {
  const dir = tempDir(t, 'store')
  const ff = faultyFiles()
  ff.hooks.fsyncSync = fd => {
    if (ff.pathOf(fd)?.endsWith('.snap.tmp')) throw errnoError('EIO')
    ff.real.fsyncSync(fd)
  }
  const { store, warnings } = openStore({ dir, files: ff.files, snapshotEveryRecords: 5 })
  const { state } = store.recover()
  drive(store, state, 1, 7)
  t.match(warnings, [{ msg: /snapshot failed/, fields: { error: /EIO/ } }])
  t.same(listed(dir), [segmentName(1)])
  store.close()
  t.same(stateView(reopen(t, dir).state), stateView(replayed(7)))
})

t.test('a snapshot whose new log segment cannot be created leaves the log usable', async t => {
  // The snapshot itself is written; creating the next segment fails (a full directory, too many
  // open files). The log must go on taking appends into the segment it has.
  const dir = tempDir(t, 'store')
  const ff = faultyFiles()
  const { store, warnings } = openStore({ dir, files: ff.files, snapshotEveryRecords: 5 })
  const { state } = store.recover()
  drive(store, state, 1, 4)
  ff.hooks.openSync = ((p: fs.PathLike, flags: fs.OpenMode, mode?: fs.Mode) => {
    if (String(p).endsWith('.wal')) throw errnoError('EMFILE')
    return ff.real.openSync(p, flags, mode)
  }) as typeof fs.openSync
  drive(store, state, 5, 5)
  delete ff.hooks.openSync
  t.match(warnings, [{ msg: /snapshot failed/, fields: { error: /EMFILE/ } }])
  const e = thrown(() => drive(store, state, 6, 6))
  t.equal(e, undefined, `the next append works (got ${String(e)})`)
  t.equal(store.log.failed, null, 'the log is not failed')
  store.close()
  const back = thrown(() => reopen(t, dir))
  t.equal(back, undefined, 'recoverable')
  if (back === undefined) t.same(stateView(reopen(t, dir).state), stateView(state))
})

// Snapshots written a slice at a time (as the server takes them): the copy is made at once, the
// log goes on meanwhile, and the covered segments go once the snapshot is in place.
// The growth bound: a snapshot costs work in proportion to the whole state, so the next waits
// until the log since the last comes to a share of that snapshot's size, however many records
// that takes; then the cost of snapshots stays a bounded share of the cost of writing the log.
t.test('snapshotGrowthPercent: the next snapshot waits until the log since the last comes to that share of its size, after a restart too', async t => {
  const dir = tempDir(t, 'store')
  const opts = { dir, snapshotEveryRecords: 10, snapshotGrowthPercent: 150 }
  const { store, infos } = openStore(opts)
  const { state } = store.recover()
  drive(store, state, 1, 10)
  t.same(infos.map(i => i.fields?.index), [10], 'the first at 10: there is no snapshot to measure against')
  const size = (index: number): number => fs.statSync(path.join(dir, snapName(index))).size
  // Where the next is due: 10 records on, and 1.5 times the snapshot's size in log bytes.
  const dueAfter = (from: number, snapBytes: number): number => {
    let bytes = 0
    let i = from
    while (i - from < 10 || bytes < 1.5 * snapBytes) bytes += encodeRecordFrame(record(++i)).length
    return i
  }
  const next = dueAfter(10, size(10))
  t.ok(next > 20, `later than the count alone would take it (${next})`)
  drive(store, state, 11, next - 1)
  t.same(infos.map(i => i.fields?.index), [10], `none up to ${next - 1}`)
  drive(store, state, next, next)
  t.same(infos.map(i => i.fields?.index), [10, next], `one at ${next}`)
  store.close()
  // After a restart, the bound is measured against the snapshot found on disk.
  const back = reopen(t, dir, { snapshotEveryRecords: 10, snapshotGrowthPercent: 150 })
  const after = dueAfter(next, size(next))
  drive(back.store, back.state, next + 1, after - 1)
  t.same(listed(dir).filter(f => f.endsWith('.snap')), [snapName(next)], `none up to ${after - 1}`)
  drive(back.store, back.state, after, after)
  t.same(listed(dir).filter(f => f.endsWith('.snap')), [snapName(after)], `one at ${after}`)
})

t.test('background snapshots: written in slices while the log goes on, then the covered log is dropped', async t => {
  const dir = tempDir(t, 'store')
  const { store, infos, warnings } = openStore({ dir, snapshotEveryRecords: 10, backgroundSnapshots: true })
  const { state } = store.recover()
  drive(store, state, 1, 10)
  t.same(listed(dir), [segmentName(1), segmentName(11), snapName(10) + '.tmp'], 'at 10: a new segment at once; the snapshot is still being written')
  drive(store, state, 11, 14) // the log goes on meanwhile; no second snapshot starts
  await waitFor(() => infos.some(i => i.msg === 'snapshot written'), 5000, 'the snapshot')
  t.same(listed(dir), [segmentName(11), snapName(10)], 'in place, and the covered segment gone')
  t.same(warnings, [])
  store.close()
  const back = reopen(t, dir)
  t.same({ snapshotIndex: back.snapshotIndex, replayed: back.replayed }, { snapshotIndex: 10, replayed: 4 })
  t.same(stateView(back.state), stateView(replayed(14)))
})

t.test('background snapshots: a failed write leaves the log whole and retries a full interval later; close cancels one', async t => {
  const dir = tempDir(t, 'store')
  const ff = faultyFiles()
  const { store, infos, warnings } = openStore({ dir, files: ff.files, snapshotEveryRecords: 5, backgroundSnapshots: true })
  const { state } = store.recover()
  ff.hooks.fsync = (_fd, cb) => { setImmediate(cb, errnoError('EIO')) }
  drive(store, state, 1, 5)
  await waitFor(() => warnings.length > 0, 5000, 'the failure')
  t.match(warnings[0], { msg: /snapshot failed/, fields: { error: /EIO/ } })
  t.notOk(fs.readdirSync(dir).some(f => f.startsWith('snapshot-')), 'no snapshot file, not even a temporary one')
  delete ff.hooks.fsync
  drive(store, state, 6, 9)
  t.equal(infos.length, 0, 'no retry before 10')
  drive(store, state, 10, 10)
  await waitFor(() => infos.length > 0, 5000, 'the retry')
  t.ok(fs.existsSync(path.join(dir, snapName(10))))
  // A snapshot still being written when the store closes is abandoned, temporary file and all.
  drive(store, state, 11, 20)
  store.close()
  await new Promise(resolve => setTimeout(resolve, 50))
  t.notOk(fs.readdirSync(dir).some(f => f.endsWith('.tmp')), 'no temporary file left')
  const back = reopen(t, dir)
  t.same(stateView(back.state), stateView(replayed(20)), 'everything recovers from the snapshot at 10 and the log')
})

t.test('background snapshots: what a snapshot covers is deleted off the event loop; a failed deletion is only a warning, and what it left goes later', async t => {
  const dir = tempDir(t, 'store')
  const ff = faultyFiles()
  const { store, infos, warnings } = openStore({ dir, files: ff.files, snapshotEveryRecords: 10, backgroundSnapshots: true })
  const { state } = store.recover()
  const unlinked: string[] = []
  ff.hooks.unlink = (p, cb) => {
    unlinked.push(path.basename(String(p)))
    if (String(p).endsWith('.wal')) setImmediate(cb, errnoError('EIO'))
    else ff.real.unlink(p, cb)
  }
  drive(store, state, 1, 10)
  await waitFor(() => warnings.length > 0, 5000, 'the failed deletion')
  t.match(warnings, [{ msg: /removing what the snapshot covers failed/, fields: { error: /EIO/ } }])
  t.same(unlinked, [segmentName(1)], 'asynchronously')
  t.same(infos.filter(i => i.msg === 'snapshot written'), [], 'not said to be written in full')
  t.same(listed(dir), [segmentName(1), segmentName(11), snapName(10)], 'the covered segment is still there')
  // An older snapshot that is gone already (ENOENT) is no failure.
  ff.hooks.unlink = (p, cb) => { unlinked.push(path.basename(String(p))); setImmediate(cb, errnoError('ENOENT')) }
  drive(store, state, 11, 20)
  await waitFor(() => infos.some(i => i.msg === 'snapshot written'), 5000, 'the second snapshot')
  t.same(unlinked.slice(1), [segmentName(11), snapName(10)])
  t.equal(warnings.length, 1)
  store.close()
  // After a restart, the segments left are skipped, and the first snapshot deletes them.
  const back = reopen(t, dir, { snapshotEveryRecords: 5, backgroundSnapshots: true })
  t.same({ snapshotIndex: back.snapshotIndex, replayed: back.replayed }, { snapshotIndex: 20, replayed: 0 })
  t.same(stateView(back.state), stateView(replayed(20)))
  t.same(listed(dir), [segmentName(1), segmentName(11), segmentName(21), snapName(20)], 'the older snapshot went at the start')
  drive(back.store, back.state, 21, 25)
  await waitFor(() => listed(dir).length === 2, 5000, 'the third snapshot')
  t.same(listed(dir), [segmentName(26), snapName(25)])
})

t.test('background snapshots after a start from a snapshot: a due one first decodes the mailboxes left packed, a slice per write', async t => {
  const dir = tempDir(t, 'store')
  const first = openStore({ dir, snapshotEveryRecords: 35 })
  drive(first.store, first.store.recover().state, 1, 35)
  first.store.close()
  // warmSliceMs 0: each due write decodes one chunk (here, one mailbox), so the wait shows write
  // by write. Only sends after the start: they do not decode the mailbox they go to.
  const { store, infos } = openStore({ dir, snapshotEveryRecords: 10, backgroundSnapshots: true, warmSliceMs: 0 })
  t.teardown(() => store.close())
  const { state, snapshotIndex } = store.recover()
  t.equal(snapshotIndex, 35)
  t.equal(state.index, 35, 'nothing to replay: no mailbox used before the writes below')
  const expected = replayed(35)
  const send = (i: number): void => {
    const r = { op: 'send', from: 'carol', to: i % 2 ? 'alice' : 'bob', text: `late ${i}`, i, e: 0, ts: 1_800_000_000_000 + i } as const
    store.append(batch([r]))
    state.apply(r)
    expected.apply(r)
    store.maybeSnapshot(state)
  }
  t.equal(state.deferredMailboxes, 3, 'alice, bob and carol left packed')
  for (let i = 36; i <= 44; i++) send(i)
  t.equal(state.deferredMailboxes, 3, 'not due yet: nothing decoded')
  send(45)
  t.equal(state.deferredMailboxes, 2, 'due: one mailbox decoded')
  send(46)
  t.equal(state.deferredMailboxes, 1, 'still due: another')
  t.notOk(listed(dir).some(f => f.endsWith('.tmp')), 'no snapshot started while any is left')
  send(47)
  t.equal(state.deferredMailboxes, 0)
  t.ok(listed(dir).includes(snapName(47) + '.tmp'), 'the last one decoded, the snapshot starts')
  await waitFor(() => infos.some(i => i.msg === 'snapshot written'), 5000, 'the snapshot')
  t.equal(state.digest(), expected.digest())
  store.close()
  const back = reopen(t, dir)
  t.equal(back.snapshotIndex, 47)
  t.same(stateView(back.state), stateView(expected))
})

t.test('FORMAT: written at the first recovery; a newer format, or a line that is not one, is refused', async t => {
  const dir = tempDir(t, 'store')
  const file = path.join(dir, 'FORMAT')
  reopen(t, dir).store.close()
  t.equal(fs.readFileSync(file, 'utf8'), `chainchat data format ${dataFormat}\n`)
  t.notOk(fs.existsSync(file + '.tmp'), 'no temporary file left')
  // An older directory (no FORMAT, or an older one) is read as it is, then marked.
  for (const older of [null, 'chainchat data format 1\n']) {
    if (older === null) fs.rmSync(file)
    else fs.writeFileSync(file, older)
    const back = reopen(t, dir)
    back.store.close()
    t.equal(fs.readFileSync(file, 'utf8'), `chainchat data format ${dataFormat}\n`, `marked, from ${JSON.stringify(older)}`)
  }
  for (const [text, why] of [[`chainchat data format ${dataFormat + 1}\n`, /written by a newer version/], ['garbage', /not a format line/], ['', /not a format line/]] as const) {
    fs.writeFileSync(file, text)
    const before = new Map(fs.readdirSync(dir).map(f => [f, fs.readFileSync(path.join(dir, f))]))
    const { store } = openStore({ dir })
    const e = thrown(() => store.recover())
    store.close()
    t.type(e, DataFormatError, JSON.stringify(text))
    t.match((e as Error).message, why)
    const after = fs.readdirSync(dir)
    t.ok(after.length === before.size && after.every(f => fs.readFileSync(path.join(dir, f)).equals(before.get(f)!)), 'nothing in the directory changed')
  }
})

t.test('makeDirs: creates missing parents, accepts a directory that exists, refuses a file in the way', async t => {
  const dir = tempDir(t)
  const deep = path.join(dir, 'a', 'b', 'c')
  makeDirs(deep)
  t.ok(fs.statSync(deep).isDirectory(), 'every missing level is made')
  makeDirs(deep)
  t.ok(fs.statSync(deep).isDirectory(), 'a directory that exists is fine')
  fs.writeFileSync(path.join(dir, 'file'), 'x')
  t.match(thrown(() => makeDirs(path.join(dir, 'file'))), { code: 'EEXIST' }, 'a file where the directory goes')
  t.match(thrown(() => makeDirs(path.join(dir, 'file', 'below'))), { code: 'ENOTDIR' }, 'a file where a parent goes')
  // Where mkdir says ENOENT though the parent exists, fs.mkdirSync's recursive mode never returns.
  if (fs.existsSync('/proc/self')) t.match(thrown(() => makeDirs('/proc/chainchat-no-such/data')), { code: 'ENOENT' }, 'under /proc: ENOENT, at once')
  new Store({ dir: path.join(dir, 'x', 'y') }).close()
  t.ok(fs.statSync(path.join(dir, 'x', 'y')).isDirectory(), 'a store makes its directory')
})

// Format 2 wrote the exactly-once table into snapshots as JSON, and read marks into the log as
// JSON: a directory written so recovers to the same state, and is marked with the current format.
t.test('a format-2 directory (JSON exactly-once chunks in its snapshot, JSON read marks in its log) recovers as it was', async t => {
  const dir = tempDir(t, 'store')
  const snap = replayed(35)
  const frames = [encodeFrame({ kind: 'head', index: 35 }, limits.snapshotFrameBytesMax)]
  let ridChunks = 0
  for (const c of snap.snapshotChunks()) {
    if (c.kind === 'rids') ridChunks++
    frames.push(c.kind === 'rids' ? encodeFrame(c, limits.snapshotFrameBytesMax) : encodeChunkFrame(c))
  }
  frames.push(encodeFrame({ kind: 'end', index: 35 }, limits.snapshotFrameBytesMax))
  fs.writeFileSync(path.join(dir, snapName(35)), Buffer.concat(frames))
  const tail = records(36, 60)
  const marks = tail.filter(r => r.op === 'mark_read').length
  fs.writeFileSync(path.join(dir, segmentName(36)), Buffer.concat(tail.map(r => r.op === 'mark_read' ? encodeFrame(r) : encodeRecordFrame(r))))
  fs.writeFileSync(path.join(dir, 'FORMAT'), 'chainchat data format 2\n')
  t.ok(ridChunks > 0 && marks > 0, `${ridChunks} JSON exactly-once chunk(s), ${marks} JSON read marks`)
  const back = reopen(t, dir)
  t.same({ snapshotIndex: back.snapshotIndex, replayed: back.replayed }, { snapshotIndex: 35, replayed: 25 })
  t.same(stateView(back.state), stateView(replayed(60)))
  t.equal(fs.readFileSync(path.join(dir, 'FORMAT'), 'utf8'), `chainchat data format ${dataFormat}\n`)
})
