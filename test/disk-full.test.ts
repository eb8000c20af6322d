// A full disk on one member of a chain: its data directory is a small tmpfs that the test mounts
// (root only; skipped otherwise). The member must stop acknowledging, the chain must carry on
// without it, nothing acknowledged may be lost, and once space is freed the member must catch
// up and rejoin by itself.

import t from 'tap'
import fs from 'node:fs'
import os from 'node:os'
import path from 'node:path'
import { execFileSync } from 'node:child_process'
import { Chain } from './helpers/chain.ts'
import { waitFor, type WireLine } from './helpers/spawn.ts'
import { ChatClient, RequestError } from '../lib/client.ts'

function mount (dir: string, size: string): void {
  execFileSync('mount', ['-t', 'tmpfs', '-o', `size=${size}`, 'tmpfs', dir], { stdio: 'pipe' })
}

function remount (dir: string, size: string): void {
  execFileSync('mount', ['-o', `remount,size=${size}`, dir], { stdio: 'pipe' })
}

// Why the test cannot run here, or null if it can: it needs Linux, root, and a working mount.
function cannotMount (): string | null {
  if (process.platform !== 'linux') return 'needs Linux (tmpfs)'
  if (process.getuid?.() !== 0) return 'needs root to mount a small tmpfs'
  const probe = fs.mkdtempSync(path.join(os.tmpdir(), 'chainchat-mount-probe-'))
  try {
    mount(probe, '64k')
    execFileSync('umount', [probe], { stdio: 'pipe' })
    return null
  } catch (e) {
    return `cannot mount a tmpfs here (${String((e as Error).message).split('\n')[0]})`
  } finally {
    fs.rmSync(probe, { recursive: true, force: true })
  }
}

const skip = cannotMount()
if (skip !== null) t.comment(`disk-full test skipped: ${skip}`)

t.test('a member whose disk fills leaves the chain, loses nothing, and rejoins once space is freed', { skip: skip ?? false }, async t => {
  const chain = await Chain.create(t)
  const full = chain.members[1] // the middle
  fs.mkdirSync(full.data, { recursive: true })
  mount(full.data, '256k')
  // Lazy: the member's process may still hold files when this runs.
  t.teardown(() => { try { execFileSync('umount', ['-l', full.data], { stdio: 'pipe' }) } catch { /* already gone */ } })
  await chain.startAll()
  await chain.waitConverged(3)

  const setup = await ChatClient.connect({ servers: chain.servers })
  await setup.register('ann', 'pw')
  await setup.register('ben', 'pw')
  setup.close()
  const ann = await ChatClient.connect({ servers: chain.servers })
  t.teardown(() => ann.close())
  await ann.login('ann', 'pw')

  // Sends of 2 KiB each, one at a time, each with a rid the client retries with. Every one
  // acknowledged is remembered.
  const acked: string[] = []
  let n = 0
  const sendOne = async (): Promise<void> => {
    const text = `m${n++} ` + 'x'.repeat(2048)
    try {
      await ann.send('ben', text)
      acked.push(text.slice(0, text.indexOf(' ')))
    } catch (e) {
      if (!(e instanceof RequestError)) throw e
    }
  }
  const primaryStatus = async (): Promise<WireLine | null> => {
    for (const s of await chain.statuses()) if (s?.role === 'primary') return s
    return null
  }

  // Fill the middle's disk: the chain reconfigures around it.
  const storageError = (): boolean => (full.proc?.stderr() ?? '').includes('"storage error; leaving the chain"')
  await waitFor(async () => {
    await sendOne()
    return storageError()
  }, 60_000, 'the middle member to hit ENOSPC', 0)
  t.pass(`the middle hit ENOSPC after ${acked.length} acknowledged sends`)
  const two = await waitFor(async () => {
    await sendOne()
    const p = await primaryStatus()
    return p !== null && (p.chain as string[]).length === 2 && !(p.chain as string[]).includes(full.addr) ? p : null
  }, 20_000, 'a chain of two without the full member', 0)
  t.same(two.chain, [chain.servers[0], chain.servers[2]], 'the primary linked to the tail')

  // The chain carries on: sends are acknowledged, and the full member acknowledges none of them.
  const before = acked.length
  for (let k = 0; k < 20; k++) await sendOne()
  t.equal(acked.length, before + 20, 'every send is acknowledged by the chain of two')
  const stuck = await chain.status(1)
  t.not(stuck?.role, 'backup', 'the full member is not a backup')
  t.not(stuck?.role, 'primary')
  t.equal(stuck?.storage, 'failing', 'its status says its storage is failing')
  t.ok(stuck !== null && (stuck.index as number) < (two.index as number) + 20, 'and it is behind', { full: stuck?.index, primary: two.index })
  t.ok(full.proc !== null && full.proc.proc.exitCode === null, 'the full member is still running (a write error is not fatal)')

  // Free space: the member catches up and rejoins by itself, at the tail.
  remount(full.data, '64m')
  const after = await chain.waitConverged(3, 60_000)
  t.equal(after.primary, 0)
  const p = await primaryStatus()
  t.same(p?.chain, [chain.servers[0], chain.servers[2], chain.servers[1]], 'rejoined at the tail')
  t.equal((await chain.status(1))?.storage, 'ok', 'its storage is ok again')

  // Nothing acknowledged was lost, and nothing is there twice.
  const ben = await ChatClient.connect({ servers: chain.servers })
  t.teardown(() => ben.close())
  await ben.login('ben', 'pw')
  const { messages } = await ben.history({ limit: 1000 })
  const counts = new Map<string, number>()
  for (const m of messages) {
    const tag = m.text.slice(0, m.text.indexOf(' '))
    counts.set(tag, (counts.get(tag) ?? 0) + 1)
  }
  t.same(acked.filter(tag => counts.get(tag) !== 1), [], `${acked.length} acknowledged sends each present exactly once`)
  t.ok([...counts.values()].every(c => c === 1), 'no message twice')
})
